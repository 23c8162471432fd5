"""The label store API that every front-end calls (Label Studio backend, napari plugin, training loop, CLI).

Guarantees (each tested on SQLite and PostgreSQL):

* **Nothing is overwritten.** A human label is an :class:`Annotation` (identity) with append-only revisions;
  an update adds a revision, a delete adds a tombstone.
* **Idempotent ingestion.** Re-delivering the same label (same content and timestamp, or same content
  without a timestamp) returns the stored revision instead of adding one. Out-of-order deliveries are kept
  as history, and the current revision is always the newest by ``updated_at``.
* **One transaction per call.** Every multi-row write (a whole import, a batch of predictions) commits as one
  transaction, retried as a whole on lock/serialization conflicts; a failure leaves nothing half-written.
* **Human labels win.** :meth:`LabelStore.training_labels` reads only human revisions; predictions never
  become training labels.

The store is split by concept: value objects (``records.py``), the writer of one transaction (``writer.py``),
opening and transactions (``base.py``), model registry + training runs + training queue (``registry.py``),
acquisition scores + labelling queue (``acquisition.py``); this module is the facade, :class:`LabelStore`,
with videos, predictions and human labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import aliased

from . import payloads as pl
from .acquisition import AcquisitionMixin
from .db import mask_url
from .models import (
    AcquisitionScore,
    Annotation,
    AnnotationRevision,
    Frame,
    LabelStudioSyncState,
    ModelVersion,
    Prediction,
    Project,
    TrainingRun,
    Video,
)
from .queries import current_revisions, live_annotation_ids
from .records import AnnotationInput, LabelRecord, PredictionRecord, RecordResult, to_utc


class LabelStore(AcquisitionMixin):
    """Label store on SQLite (default file under the data dir) or PostgreSQL.

    ``LabelStore()`` opens ``$SURGENET_ASSIST_DB_URL`` or the default SQLite file. It creates nothing and
    migrates nothing unless ``migrate=True``: a missing SQLite file or a database whose schema is not at the
    latest revision is a ``StoreError`` whose hint is ``surgenet-assist db upgrade``. Services and writing
    commands pass ``migrate=True``; see :class:`~surgenet_assist.core.store.base.StoreBase`.
    """

    # --- projects, videos, frames ----------------------------------------------------------------------
    def ensure_project(self, name: str | None = None) -> int:
        return self.transaction(lambda w: w.ensure_project(name))

    def add_video(
        self,
        path: str,
        fps: float | None = None,
        frame_count: int | None = None,
        content_hash: str | None = None,
        *,
        split: str | None = None,
        project: str | None = None,
    ) -> int:
        """Register a video (idempotent on project + path); returns its id."""
        return self.transaction(
            lambda w: w.add_video(path, fps, frame_count, content_hash, split=split, project=project)
        )

    def video_id(self, path: str, project: str | None = None) -> int | None:
        with self._read() as s:
            q = (
                sa.select(Video.id)
                .join(Project)
                .where(Project.name == (project or self.project), Video.path == path)
            )
            return s.scalar(q)

    def ensure_frames(
        self, video_id: int, indices: Iterable[int], *, split: str | None = None
    ) -> dict[int, int]:
        idx = list(indices)
        return self.transaction(lambda w: w.ensure_frames(video_id, idx, split=split))

    def set_split(self, video_id: int, split: str | None, frames: Iterable[int] | None = None) -> None:
        f = None if frames is None else list(frames)
        self.transaction(lambda w: w.set_split(video_id, split, f))

    # --- predictions -----------------------------------------------------------------------------------
    def add_prediction(
        self,
        video_id: int,
        frame_index: int,
        task: str,
        payload: Any,
        *,
        model_version: str | None,
        frame_end: int | None = None,
        probabilities: Any = None,
        uncertainty: float | None = None,
        score: float | None = None,
    ) -> int:
        """Store one model output (validated like a human label, but never used as a training label)."""
        item = dict(
            video_id=video_id,
            frame_index=frame_index,
            frame_end=frame_end,
            task=task,
            payload=payload,
            model_version=model_version,
            probabilities=probabilities,
            uncertainty=uncertainty,
            score=score,
        )
        return self.transaction(lambda w: w.add_predictions([item]))[0]

    def add_predictions(self, items: Sequence[dict[str, Any]]) -> list[int]:
        return self.transaction(lambda w: w.add_predictions(items))

    def predictions_for(
        self,
        video_id: int | None = None,
        *,
        task: str | None = None,
        frame_index: int | None = None,
        model_version: str | None = None,
        latest: bool = True,
    ) -> list[PredictionRecord]:
        """Predictions, filtered; ``latest`` keeps only the newest per (video, frames, task)."""
        P = Prediction
        q = sa.select(P)
        if video_id is not None:
            q = q.where(P.video_id == video_id)
        if task is not None:
            q = q.where(P.task == pl.check_task(task))
        if frame_index is not None:
            q = q.where(P.frame_start <= frame_index, P.frame_end >= frame_index)
        if model_version is not None:
            q = q.where(P.model_version == model_version)
        if latest:
            rn = sa.func.row_number().over(
                partition_by=(P.video_id, P.frame_start, P.frame_end, P.task),
                order_by=(P.created_at.desc(), P.id.desc()),
            )
            sub = q.add_columns(rn.label("rn")).subquery()
            latest_p = aliased(P, sub)
            q = sa.select(latest_p).where(sub.c.rn == 1)
            q = q.order_by(latest_p.video_id, latest_p.frame_start, latest_p.task)
        else:
            q = q.order_by(P.video_id, P.frame_start, P.task, P.id)
        with self._read() as s:
            return [
                PredictionRecord(
                    p.id,
                    p.video_id,
                    p.frame_start,
                    p.frame_end,
                    p.task,
                    p.model_version,
                    p.probabilities,
                    p.uncertainty,
                    p.score,
                    p.created_at,
                    pl.decode_payload(p.task, p.payload, p.mask),
                )
                for p in s.scalars(q)
            ]

    def record_video_predictions(
        self,
        path: str,
        items: Sequence[dict[str, Any]],
        *,
        fps: float | None = None,
        frame_count: int | None = None,
        project: str | None = None,
    ) -> int:
        """A whole video's predictions in ONE transaction: the video row, its frames, every prediction
        (``items`` as for :meth:`add_predictions`, without ``video_id``). Archive runs (core/archive.py) rely
        on it: a video either has all its predictions of a model version or none, so "has any" means
        "done" and a run killed mid-video redoes that video. Returns the video id."""
        rows = list(items)

        def write(w: Any) -> int:
            vid = w.add_video(path, fps, frame_count, project=project)
            w.ensure_frames(vid, {int(it["frame_index"]) for it in rows})
            w.add_predictions([dict(it, video_id=vid) for it in rows])
            return vid

        return self.transaction(write)

    def videos_predicted_by(self, model_version: str, project: str | None = None) -> set[str]:
        """Paths of the project's videos holding predictions of ``model_version`` (see
        :meth:`record_video_predictions`)."""
        q = (
            sa.select(Video.path)
            .join(Project)
            .where(
                Project.name == (project or self.project),
                sa.exists().where(Prediction.video_id == Video.id, Prediction.model_version == model_version),
            )
        )
        with self._read() as s:
            return {str(p) for p in s.scalars(q)}

    # --- human annotations -----------------------------------------------------------------------------
    def record_annotation(
        self,
        video_id: int,
        frame_index: int,
        task: str,
        payload: Any,
        *,
        source: str,
        author: str | None = None,
        frame_end: int | None = None,
        ls_task_id: int | None = None,
        ls_annotation_id: int | None = None,
        updated_at: datetime | str | float | None = None,
        key: str | None = None,
        project: str | None = None,
    ) -> RecordResult:
        """Record a human label for a frame (or ``frame_index..frame_end``) and task.

        ``source`` is ``label-studio``, ``napari`` or ``import``. The label's identity is ``key`` if given,
        else the Label Studio annotation id, else source + author + frames + task. Returns the revision
        holding the label and ``created=False`` when the same delivery was already stored.
        """
        item = AnnotationInput(
            video_id=video_id,
            frame_start=frame_index,
            frame_end=frame_end,
            task=task,
            payload=pl.build_payload(task, payload, self.schema),
            source=source,
            author=author,
            ls_task_id=ls_task_id,
            ls_annotation_id=ls_annotation_id,
            updated_at=to_utc(updated_at),
            key=key,
        )
        return self.transaction(lambda w: w.record_annotations([item], project))[0]

    def record_annotations(
        self, items: Sequence[AnnotationInput], project: str | None = None
    ) -> list[RecordResult]:
        """Record many labels in one transaction (importers, batch webhooks)."""
        return self.transaction(lambda w: w.record_annotations(items, project))

    def delete_annotation(
        self,
        video_id: int,
        frame_index: int,
        task: str,
        *,
        source: str,
        author: str | None = None,
        frame_end: int | None = None,
        ls_annotation_id: int | None = None,
        updated_at: datetime | str | float | None = None,
        key: str | None = None,
        project: str | None = None,
    ) -> RecordResult | None:
        """Tombstone a label (its revisions stay); ``None`` when no such label was ever stored."""
        item = AnnotationInput(
            video_id=video_id,
            frame_start=frame_index,
            frame_end=frame_end,
            task=task,
            payload=None,
            source=source,
            author=author,
            ls_annotation_id=ls_annotation_id,
            updated_at=to_utc(updated_at),
            key=key,
            deleted=True,
        )
        return self.transaction(lambda w: w.record_annotations([item], project))[0]

    # --- reading human labels: two uses, one rule ----------------------------------------------------------
    def training_labels(
        self,
        task: str,
        split: str | None = None,
        *,
        video_id: int | None = None,
        project: str | None = None,
        with_payload: bool = True,
    ) -> list[LabelRecord]:
        """The labels to train on (and to evaluate and export): per (video, frames, task) the newest
        non-deleted human revision.

        Never a prediction. ``split`` filters on the frame's split, falling back to the video's. Readers that
        show labels to a person use :meth:`current_human_labels`.
        """
        return self._newest_human_labels(task, split, video_id, project, with_payload)

    def current_human_labels(
        self,
        task: str,
        *,
        video_id: int | None = None,
        project: str | None = None,
        with_payload: bool = True,
    ) -> list[LabelRecord]:
        """What a reviewer sees as the human label of each frame or range right now (napari, propagation
        keyframes, "is this frame labelled?"): the newest non-deleted human revision, whatever its split.

        The same rule as :meth:`training_labels` today; kept apart so the training set can gain rules (a
        split, a minimum agreement) without changing what people see, and the other way round.
        """
        return self._newest_human_labels(task, None, video_id, project, with_payload)

    def _newest_human_labels(
        self,
        task: str,
        split: str | None,
        video_id: int | None,
        project: str | None,
        with_payload: bool,
    ) -> list[LabelRecord]:
        pl.check_task(task)
        R, A, V, F = AnnotationRevision, Annotation, Video, Frame
        cur = current_revisions(task)
        live = sa.select(cur.c.rid, cur.c.aid, cur.c.updated_at).where(
            cur.c.rn == 1, cur.c.deleted.is_(False)
        )
        live = live.subquery()
        best_rn = sa.func.row_number().over(
            partition_by=(A.video_id, A.frame_start, A.frame_end),
            order_by=(live.c.updated_at.desc(), live.c.rid.desc()),
        )
        best = sa.select(live.c.rid, best_rn.label("brn")).join(A, A.id == live.c.aid)
        if video_id is not None:  # a video belongs to one project: no project filter unless one is named
            best = best.where(A.video_id == video_id)
        if video_id is None or project is not None:
            best = best.join(Project, Project.id == A.project_id).where(
                Project.name == (project or self.project)
            )
        best = best.subquery()
        cols = [
            R.id,
            R.annotation_id,
            R.revision,
            A.video_id,
            V.path,
            A.frame_start,
            A.frame_end,
            A.task,
            R.source,
            R.author,
            R.updated_at,
            R.deleted,
        ]
        if with_payload:
            cols += [R.payload, R.mask]
        q = (
            sa.select(*cols)
            .join(best, best.c.rid == R.id)
            .join(A, A.id == R.annotation_id)
            .join(V, V.id == A.video_id)
            .outerjoin(
                F, sa.and_(F.video_id == A.video_id, F.index == A.frame_start, A.frame_start == A.frame_end)
            )
            .where(best.c.brn == 1)
            .order_by(A.video_id, A.frame_start, A.frame_end)
        )
        if split is not None:
            q = q.where(sa.func.coalesce(F.split, V.split) == split)
        out = []
        with self._read() as s:
            for row in s.execute(q):
                payload = pl.decode_payload(row.task, row.payload, row.mask) if with_payload else {}
                out.append(
                    LabelRecord(
                        row[1],  # annotation_id (the select lists R.id first)
                        row[0],  # revision_id
                        row[2],
                        row[3],
                        row[4],
                        row[5],
                        row[6],
                        row[7],
                        row[8],
                        row[9],
                        row[10],
                        bool(row[11]),
                        payload,
                    )
                )
        return out

    def label_for(self, video_id: int, frame_index: int, task: str) -> LabelRecord | PredictionRecord | None:
        """The label shown for a frame: the newest human label covering it, else the newest prediction."""
        human = [
            r
            for r in self.current_human_labels(task, video_id=video_id)
            if r.frame_start <= frame_index <= r.frame_end
        ]
        if human:
            return max(human, key=lambda r: (r.frame_start == r.frame_end, r.updated_at, r.revision_id))
        preds = self.predictions_for(video_id, task=task, frame_index=frame_index)
        return max(preds, key=lambda p: (p.created_at, p.id)) if preds else None

    def phase_labels(
        self, video_id: int, length: int | None = None, *, project: str | None = None
    ) -> np.ndarray:
        """Per-frame phase ids (-1 = unlabelled) from human labels of ``project`` (default: the store's);
        single-frame labels override ranges."""
        labels = self.current_human_labels("phase", video_id=video_id, project=project)
        with self._read() as s:
            count = s.scalar(sa.select(Video.frame_count).where(Video.id == video_id))
        ends = [r.frame_end + 1 for r in labels]
        n = length if length is not None else max([count or 0, *ends])
        out = np.full(n, -1, dtype=np.int64)
        for r in sorted(labels, key=lambda r: (r.frame_start == r.frame_end, r.updated_at, r.revision_id)):
            if "segments" in r.payload:
                for start, end, name in r.payload["segments"]:
                    out[start : end + 1] = self.schema.phase_id(name)
            elif r.frame_start < n:
                out[r.frame_start] = self.schema.phase_id(r.payload["phase"])
        return out

    def history(self, annotation_id: int) -> list[LabelRecord]:
        """Every revision of one label, oldest first (tombstones included)."""
        R, A, V = AnnotationRevision, Annotation, Video
        q = (
            sa.select(R, A, V.path)
            .join(A, A.id == R.annotation_id)
            .join(V, V.id == A.video_id)
            .where(R.annotation_id == annotation_id)
            .order_by(R.updated_at, R.id)
        )
        with self._read() as s:
            return [
                LabelRecord(
                    r.annotation_id,
                    r.id,
                    r.revision,
                    a.video_id,
                    path,
                    a.frame_start,
                    a.frame_end,
                    a.task,
                    r.source,
                    r.author,
                    r.updated_at,
                    r.deleted,
                    pl.decode_payload(a.task, r.payload, r.mask) if not r.deleted else {},
                )
                for r, a, path in s.execute(q)
            ]

    def label_version(self) -> int:
        """Highest revision id: a cheap 'data version' to record with a training run."""
        with self._read() as s:
            return int(s.scalar(sa.select(sa.func.coalesce(sa.func.max(AnnotationRevision.id), 0))))

    def ls_live_revisions(self, project: str | None = None) -> dict[int, frozenset[int]]:
        """Label Studio annotation id -> the current revision ids of its live labels, for the project's live
        Label Studio labels: what a reconciliation compares with :meth:`ls_sync_states` to skip, without
        decoding, an annotation nothing has touched since the last sync."""
        cur = current_revisions(None)
        q = (
            sa.select(Annotation.ls_annotation_id, cur.c.rid)
            .join(cur, sa.and_(cur.c.aid == Annotation.id, cur.c.rn == 1, cur.c.deleted.is_(False)))
            .join(Project, Project.id == Annotation.project_id)
            .where(
                Project.name == (project or self.project),
                Annotation.source == "label-studio",
                Annotation.ls_annotation_id.is_not(None),
            )
        )
        out: dict[int, set[int]] = {}
        with self._read() as s:
            for ls_id, rid in s.execute(q):
                out.setdefault(int(ls_id), set()).add(int(rid))
        return {k: frozenset(v) for k, v in out.items()}

    def ls_sync_states(self, project: str | None = None) -> dict[int, tuple[str, frozenset[int]]]:
        """Label Studio annotation id -> (digest the last sync read, revision ids it left live); see
        :class:`~surgenet_assist.core.store.models.LabelStudioSyncState`."""
        S = LabelStudioSyncState
        q = (
            sa.select(S.ls_annotation_id, S.digest, S.revision_ids)
            .join(Project, Project.id == S.project_id)
            .where(Project.name == (project or self.project))
        )
        with self._read() as s:
            return {int(i): (str(d), frozenset(int(r) for r in revs or ())) for i, d, revs in s.execute(q)}

    # --- overview ------------------------------------------------------------------------------------------
    def projects(self, *, with_human_labels: bool = False) -> list[str]:
        """Names of the store's projects, sorted; ``with_human_labels``: only those with a live human label
        (the projects a trainer that serves every project trains)."""
        q = sa.select(Project.name)
        if with_human_labels:
            live = live_annotation_ids(None)
            q = q.where(
                sa.exists(
                    sa.select(Annotation.id)
                    .join(live, live.c.aid == Annotation.id)
                    .where(Annotation.project_id == Project.id)
                )
            )
        with self._read() as s:
            return sorted(str(n) for n in s.scalars(q))

    def videos(self, project: str | None = None) -> list[dict[str, Any]]:
        q = sa.select(Video).join(Project).where(Project.name == (project or self.project)).order_by(Video.id)
        with self._read() as s:
            return [{c.name: getattr(v, c.name) for c in Video.__table__.columns} for v in s.scalars(q)]

    def split_names(self, project: str | None = None) -> list[str]:
        """The splits the project's frames belong to (a frame's own split, else its video's), sorted."""
        q = (
            sa.select(sa.func.coalesce(Frame.split, Video.split))
            .select_from(Video)
            .join(Project)
            .outerjoin(Frame, Frame.video_id == Video.id)
            .where(Project.name == (project or self.project))
            .distinct()
        )
        with self._read() as s:
            return sorted(str(v) for v in s.scalars(q) if v is not None)

    def prediction_model_versions(self) -> list[str]:
        """The model versions that have stored predictions, sorted."""
        q = sa.select(Prediction.model_version).where(Prediction.model_version.is_not(None)).distinct()
        with self._read() as s:
            return sorted(str(v) for v in s.scalars(q))

    def stats(self) -> dict[str, Any]:
        """Counts for `db stats`: videos, frames, predictions per task, live human labels per task/source."""
        live = live_annotation_ids(None)
        A = Annotation
        with self._read() as s:

            def count(model: Any) -> int:
                return int(s.scalar(sa.select(sa.func.count()).select_from(model)) or 0)

            def grouped(q: Any) -> dict[str, int]:
                return {str(k): int(n) for k, n in s.execute(q)}

            return {
                "url": mask_url(self.url),
                "projects": count(Project),
                "videos": count(Video),
                "frames": count(Frame),
                "predictions": {
                    "total": count(Prediction),
                    "by_task": grouped(sa.select(Prediction.task, sa.func.count()).group_by(Prediction.task)),
                    "by_model_version": grouped(
                        sa.select(sa.func.coalesce(Prediction.model_version, ""), sa.func.count()).group_by(
                            Prediction.model_version
                        )
                    ),
                },
                "annotations": {
                    "total": int(s.scalar(sa.select(sa.func.count()).select_from(live)) or 0),
                    "by_task": grouped(
                        sa.select(A.task, sa.func.count()).join(live, live.c.aid == A.id).group_by(A.task)
                    ),
                    "by_source": grouped(
                        sa.select(A.source, sa.func.count()).join(live, live.c.aid == A.id).group_by(A.source)
                    ),
                    "deleted": count(A) - int(s.scalar(sa.select(sa.func.count()).select_from(live)) or 0),
                    "revisions": count(AnnotationRevision),
                },
                "model_versions": count(ModelVersion),
                "training_runs": count(TrainingRun),
                "acquisition_scores": count(AcquisitionScore),
            }
