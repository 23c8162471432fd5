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
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, sessionmaker

from ..errors import StoreError
from ..schema import DEFAULT_SCHEMA, LabelSchema
from . import payloads as pl
from .db import check_reachable, create_store_engine, mask_url, resolve_url, retrying, writer
from .models import (
    AcquisitionScore,
    Annotation,
    AnnotationRevision,
    Frame,
    ModelVersion,
    Prediction,
    Project,
    TrainingRun,
    Video,
    utcnow,
)

T = TypeVar("T")
SOURCES = ("label-studio", "napari", "import")
DEFAULT_PROJECT = "default"
_CHUNK = 500


# ------------------------------------------------------------------------------------------------------------
# value objects
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecordResult:
    """Outcome of recording a human label: which revision holds it and whether this call added it."""

    annotation_id: int
    revision_id: int
    revision: int
    created: bool
    current: bool


@dataclass(frozen=True)
class AnnotationInput:
    """One human label to record (see :meth:`LabelStore.record_annotation` for the fields)."""

    video_id: int
    frame_start: int
    task: str
    payload: pl.Payload | None
    source: str
    author: str | None = None
    frame_end: int | None = None
    ls_task_id: int | None = None
    ls_annotation_id: int | None = None
    updated_at: datetime | None = None
    key: str | None = None
    deleted: bool = False

    @property
    def end(self) -> int:
        return self.frame_start if self.frame_end is None else self.frame_end

    def identity(self) -> str:
        return self.key or annotation_key(
            self.source,
            self.video_id,
            self.frame_start,
            self.end,
            self.task,
            self.ls_annotation_id,
            self.author,
        )


@dataclass(frozen=True)
class LabelRecord:
    """A human label revision as read back (``payload`` has ``mask`` decoded for segmentation)."""

    annotation_id: int
    revision_id: int
    revision: int
    video_id: int
    video_path: str
    frame_start: int
    frame_end: int
    task: str
    source: str
    author: str | None
    updated_at: datetime
    deleted: bool
    payload: dict[str, Any] = field(repr=False)
    origin: str = "human"


@dataclass(frozen=True)
class PredictionRecord:
    id: int
    video_id: int
    frame_start: int
    frame_end: int
    task: str
    model_version: str | None
    probabilities: Any
    uncertainty: float | None
    score: float | None
    created_at: datetime
    payload: dict[str, Any] = field(repr=False)
    origin: str = "model"


@dataclass(frozen=True)
class AcquisitionItem:
    video_id: int
    frame_index: int
    task: str
    method: str
    score: float
    model_version: str


def annotation_key(
    source: str,
    video_id: int,
    frame_start: int,
    frame_end: int,
    task: str,
    ls_annotation_id: int | None = None,
    author: str | None = None,
) -> str:
    """Identity of a label: a Label Studio annotation id, else source + author + frame(s) + task."""
    if ls_annotation_id is not None:
        return f"ls:{ls_annotation_id}:{video_id}:{frame_start}-{frame_end}:{task}"
    return f"{source}:{author or ''}:{video_id}:{frame_start}-{frame_end}:{task}"


def to_utc(ts: datetime | str | float | None) -> datetime | None:
    """Naive UTC from a datetime (aware, or naive meaning UTC), an ISO string (``Z`` ok) or epoch seconds."""
    if ts is None:
        return None
    if isinstance(ts, (int, float)):
        return datetime.fromtimestamp(float(ts), UTC).replace(tzinfo=None)
    if isinstance(ts, str):
        try:
            ts = datetime.fromisoformat(ts.strip().replace("Z", "+00:00"))
        except ValueError:
            raise StoreError(f"not an ISO timestamp: {ts!r}", "use e.g. 2024-05-01T12:00:00Z") from None
    if ts.tzinfo is not None:
        ts = ts.astimezone(UTC).replace(tzinfo=None)
    return ts


def _chunks(seq: Sequence[T], n: int = _CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _insert(session: Session, table: sa.Table) -> Any:
    """Dialect insert supporting ON CONFLICT (SQLite and PostgreSQL both have it)."""
    return (postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert)(table)


def _is_unique_race(exc: BaseException) -> bool:
    return isinstance(exc, IntegrityError) and "foreign key" not in str(exc.orig).lower()


# ------------------------------------------------------------------------------------------------------------
# writer: all writes of one transaction
# ------------------------------------------------------------------------------------------------------------
class Writer:
    """Writes inside one open transaction; obtained from :meth:`LabelStore.transaction`."""

    def __init__(self, session: Session, schema: LabelSchema, default_project: str) -> None:
        self.session = session
        self.schema = schema
        self.default_project = default_project
        self._projects: dict[str, int] = {}

    # --- projects, videos, frames ----------------------------------------------------------------------
    def ensure_project(self, name: str | None = None) -> int:
        name = name or self.default_project
        if name in self._projects:
            return self._projects[name]
        s = self.session
        pid = s.scalar(sa.select(Project.id).where(Project.name == name))
        if pid is None:
            s.execute(
                _insert(s, Project.__table__).values(name=name, created_at=utcnow()).on_conflict_do_nothing()
            )
            pid = s.scalar(sa.select(Project.id).where(Project.name == name))
        self._projects[name] = int(pid)
        return int(pid)

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
        pid = self.ensure_project(project)
        s = self.session
        video = s.scalar(sa.select(Video).where(Video.project_id == pid, Video.path == str(path)))
        if video is None:
            s.execute(
                _insert(s, Video.__table__)
                .values(
                    project_id=pid,
                    path=str(path),
                    fps=fps,
                    frame_count=frame_count,
                    content_hash=content_hash,
                    split=split,
                    created_at=utcnow(),
                )
                .on_conflict_do_nothing()
            )
            video = s.scalar(sa.select(Video).where(Video.project_id == pid, Video.path == str(path)))
            assert video is not None
            return video.id
        if content_hash and video.content_hash and content_hash != video.content_hash:
            raise StoreError(
                f"video {path!r} is already stored with content hash {video.content_hash[:12]}…, "
                f"not {content_hash[:12]}…",
                "a different video under the same path: give it another path, or use another project",
            )
        if fps is not None and video.fps is None:
            video.fps = fps
        if frame_count is not None and (video.frame_count or 0) < frame_count:
            video.frame_count = frame_count
        if content_hash and not video.content_hash:
            video.content_hash = content_hash
        if split is not None:
            video.split = split
        return video.id

    def ensure_frames(
        self,
        video_id: int,
        indices: Iterable[int],
        *,
        split: str | None = None,
        image_paths: dict[int, str] | None = None,
    ) -> dict[int, int]:
        """Frame rows for ``indices`` (created if missing); returns frame index -> frame id."""
        s = self.session
        idx = sorted({int(i) for i in indices})
        if not idx:
            return {}
        fps = s.scalar(sa.select(Video.fps).where(Video.id == video_id))
        if fps is None and s.scalar(sa.select(Video.id).where(Video.id == video_id)) is None:
            raise StoreError(f"no video with id {video_id}", "add the video first (LabelStore.add_video)")
        rows = [
            {
                "video_id": video_id,
                "index": i,
                "timestamp": (i / fps if fps else None),
                "split": split,
                "image_path": (image_paths or {}).get(i),
            }
            for i in idx
        ]
        for part in _chunks(rows, 2000):
            s.execute(_insert(s, Frame.__table__).on_conflict_do_nothing(), list(part))
        out: dict[int, int] = {}
        for part in _chunks(idx, 5000):
            q = sa.select(Frame.index, Frame.id).where(Frame.video_id == video_id, Frame.index.in_(part))
            out.update({int(i): int(f) for i, f in s.execute(q)})
        return out

    def set_split(self, video_id: int, split: str | None, frames: Iterable[int] | None = None) -> None:
        """Assign a split to a whole video or to some of its frames."""
        if frames is None:
            self.session.execute(sa.update(Video).where(Video.id == video_id).values(split=split))
            return
        for part in _chunks(sorted({int(f) for f in frames})):
            self.session.execute(
                sa.update(Frame).where(Frame.video_id == video_id, Frame.index.in_(part)).values(split=split)
            )

    # --- predictions -----------------------------------------------------------------------------------
    def add_predictions(self, items: Sequence[dict[str, Any]]) -> list[int]:
        """Bulk form of :meth:`LabelStore.add_prediction`: dicts with the same keyword names."""
        rows = []
        for it in items:
            payload = pl.build_payload(it["task"], it["payload"], self.schema)
            start = int(it["frame_index"])
            rows.append(
                Prediction(
                    video_id=int(it["video_id"]),
                    frame_start=start,
                    frame_end=int(it.get("frame_end") or start),
                    task=payload.task,
                    payload=payload.data,
                    mask=payload.mask,
                    probabilities=_jsonable(it.get("probabilities")),
                    uncertainty=_opt_float(it.get("uncertainty")),
                    score=_opt_float(it.get("score")),
                    model_version=it.get("model_version"),
                    created_at=utcnow(),
                )
            )
        self._check_videos({r.video_id for r in rows})
        self.session.add_all(rows)
        self.session.flush()
        return [r.id for r in rows]

    # --- human annotations -----------------------------------------------------------------------------
    def record_annotations(
        self, items: Sequence[AnnotationInput], project: str | None = None
    ) -> list[RecordResult]:
        """Record many human labels (see module doc for the idempotency rules)."""
        s = self.session
        pid = self.ensure_project(project)
        for it in items:
            if it.source not in SOURCES:
                raise StoreError(f"unknown annotation source {it.source!r}", f"use one of {list(SOURCES)}")
            pl.check_task(it.task)
            if it.end < it.frame_start or it.frame_start < 0:
                raise StoreError(
                    f"bad frame range {it.frame_start}..{it.end}", "frames are 0-based, end >= start"
                )
            if not it.deleted and it.payload is None:
                raise StoreError("an annotation needs a payload unless it is a delete")
        self._check_videos({it.video_id for it in items})
        singles: dict[int, set[int]] = defaultdict(set)
        for it in items:
            if it.end == it.frame_start:
                singles[it.video_id].add(it.frame_start)
        for vid, frames in singles.items():
            self.ensure_frames(vid, frames)

        keys = list(dict.fromkeys(it.identity() for it in items))
        anns: dict[str, Annotation] = {}
        for part in _chunks(keys):
            for ann in s.scalars(
                sa.select(Annotation).where(Annotation.project_id == pid, Annotation.key.in_(part))
            ):
                anns[ann.key] = ann
        # history of the annotations that already exist: (digest, updated_at, deleted), max revision, newest
        history: dict[int, list[tuple[str, datetime, bool, int, int]]] = defaultdict(list)
        existing_ids = [a.id for a in anns.values()]
        for part in _chunks(existing_ids):
            q = sa.select(
                AnnotationRevision.annotation_id,
                AnnotationRevision.digest,
                AnnotationRevision.updated_at,
                AnnotationRevision.deleted,
                AnnotationRevision.revision,
                AnnotationRevision.id,
            ).where(AnnotationRevision.annotation_id.in_(part))
            for aid, dig, upd, dele, rev, rid in s.execute(q):
                history[aid].append((dig, upd, bool(dele), rev, rid))

        new_anns = []
        for it in items:
            k = it.identity()
            ann = anns.get(k)
            if ann is None:
                if it.deleted:
                    continue
                ann = Annotation(
                    project_id=pid,
                    key=k,
                    video_id=it.video_id,
                    frame_start=it.frame_start,
                    frame_end=it.end,
                    task=it.task,
                    source=it.source,
                    ls_task_id=it.ls_task_id,
                    ls_annotation_id=it.ls_annotation_id,
                    created_at=utcnow(),
                )
                anns[k] = ann
                new_anns.append(ann)
            elif (ann.video_id, ann.frame_start, ann.frame_end, ann.task) != (
                it.video_id,
                it.frame_start,
                it.end,
                it.task,
            ):
                raise StoreError(
                    f"annotation {k!r} is stored for video {ann.video_id}"
                    f" frames {ann.frame_start}..{ann.frame_end} task {ann.task}, not video {it.video_id}"
                    f" frames {it.frame_start}..{it.end} task {it.task}",
                    "an annotation's key must always name the same frame(s) and task",
                )
        s.add_all(new_anns)
        s.flush()

        results: list[RecordResult | None] = []
        now = utcnow()
        for it in items:
            ann = anns.get(it.identity())
            if ann is None:  # delete of a label never stored: nothing to do
                results.append(None)
                continue
            hist = history[ann.id]
            digest = "tombstone" if it.deleted else it.payload.digest()  # type: ignore[union-attr]
            upd = it.updated_at
            newest = max(hist, key=lambda h: (h[1], h[4])) if hist else None
            match = None
            if upd is not None:
                match = next((h for h in hist if h[0] == digest and h[1] == upd and h[2] == it.deleted), None)
            elif newest is not None and newest[0] == digest and newest[2] == it.deleted:
                match = newest
            if match is not None:
                results.append(RecordResult(ann.id, match[4], match[3], False, match is newest))
                continue
            upd = upd or now
            revno = max((h[3] for h in hist), default=0) + 1
            is_current = newest is None or upd >= newest[1]
            rev = AnnotationRevision(
                annotation_id=ann.id,
                revision=revno,
                payload=None if it.deleted else it.payload.data,  # type: ignore[union-attr]
                mask=None if it.deleted else it.payload.mask,  # type: ignore[union-attr]
                digest=digest,
                deleted=it.deleted,
                author=it.author,
                source=it.source,
                updated_at=upd,
                recorded_at=now,
            )
            s.add(rev)
            s.flush()
            hist.append((digest, upd, it.deleted, revno, rev.id))
            results.append(RecordResult(ann.id, rev.id, revno, True, is_current))
        return results  # type: ignore[return-value]

    def _check_videos(self, ids: set[int]) -> None:
        known: set[int] = set()
        for part in _chunks(sorted(ids)):
            known.update(self.session.scalars(sa.select(Video.id).where(Video.id.in_(part))))
        missing = ids - known
        if missing:
            raise StoreError(f"no video with id(s) {sorted(missing)[:10]}", "add the video first (add_video)")


def _jsonable(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        return np.round(value.astype(np.float64), 6).tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


# ------------------------------------------------------------------------------------------------------------
# the store
# ------------------------------------------------------------------------------------------------------------
class LabelStore:
    """Label store on SQLite (default file under the data dir) or PostgreSQL.

    ``LabelStore()`` opens ``$SURGENET_ASSIST_DB_URL`` or the default SQLite file and migrates it to the
    latest schema (``upgrade=False`` refuses to touch a database that is not at the latest revision).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        upgrade: bool = True,
        project: str = DEFAULT_PROJECT,
        schema: LabelSchema = DEFAULT_SCHEMA,
    ) -> None:
        from . import migrations

        self.url = resolve_url(url)
        self.project = project
        self.schema = schema
        self.engine: Engine = create_store_engine(self.url)
        check_reachable(self.engine)
        current = migrations.current_revision(self.engine)
        if current != migrations.head_revision():
            if not upgrade:
                self.engine.dispose()
                raise StoreError(
                    f"the label store at {mask_url(self.url)} is at schema revision {current}, "
                    f"not {migrations.head_revision()}",
                    "run `surgenet-assist db upgrade` (it migrates without losing data)",
                )
            migrations.upgrade(self.engine)
        self._sessions = sessionmaker(bind=writer(self.engine), expire_on_commit=False)
        self._reads = sessionmaker(bind=self.engine, expire_on_commit=False)

    def __repr__(self) -> str:
        return f"LabelStore({mask_url(self.url)!r})"

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transactions ----------------------------------------------------------------------------------
    def transaction(self, fn: Callable[[Writer], T]) -> T:
        """Run ``fn(writer)`` as ONE transaction; rerun as a whole after lock/serialization conflicts.

        Any exception inside ``fn`` rolls everything back. ``fn`` must not have side effects outside the
        database, since it may run more than once.
        """

        def attempt() -> T:
            with self._sessions.begin() as session:
                return fn(Writer(session, self.schema, self.project))

        return retrying(attempt, also=_is_unique_race)

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._reads() as session:
            yield session

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

    def delete_ls_annotation(self, ls_annotation_id: int, updated_at: datetime | str | None = None) -> int:
        """Tombstone every label that came from one Label Studio annotation; returns how many."""
        with self._read() as s:
            anns = s.scalars(
                sa.select(Annotation).where(Annotation.ls_annotation_id == ls_annotation_id)
            ).all()
        items = [
            AnnotationInput(
                a.video_id,
                a.frame_start,
                a.task,
                None,
                a.source,
                frame_end=a.frame_end,
                key=a.key,
                updated_at=to_utc(updated_at),
                deleted=True,
            )
            for a in anns
        ]
        if not items:
            return 0
        res = self.transaction(lambda w: w.record_annotations(items))
        return sum(1 for r in res if r is not None and r.created)

    def _current_revisions(self, task: str | None) -> sa.Subquery:
        """Newest revision per annotation (by updated_at, then id), tombstones included."""
        R, A = AnnotationRevision, Annotation
        rn = sa.func.row_number().over(
            partition_by=R.annotation_id, order_by=(R.updated_at.desc(), R.id.desc())
        )
        q = sa.select(
            R.id.label("rid"), R.annotation_id.label("aid"), R.deleted, R.updated_at, rn.label("rn")
        )
        q = q.join(A, A.id == R.annotation_id)
        if task is not None:
            q = q.where(A.task == task)
        return q.subquery()

    def training_labels(
        self,
        task: str,
        split: str | None = None,
        *,
        video_id: int | None = None,
        project: str | None = None,
        with_payload: bool = True,
    ) -> list[LabelRecord]:
        """The labels to train on: per (video, frames, task) the newest non-deleted human revision.

        Never a prediction. ``split`` filters on the frame's split, falling back to the video's.
        """
        pl.check_task(task)
        R, A, V, F = AnnotationRevision, Annotation, Video, Frame
        cur = self._current_revisions(task)
        live = sa.select(cur.c.rid, cur.c.aid, cur.c.updated_at).where(
            cur.c.rn == 1, cur.c.deleted.is_(False)
        )
        live = live.subquery()
        best_rn = sa.func.row_number().over(
            partition_by=(A.video_id, A.frame_start, A.frame_end),
            order_by=(live.c.updated_at.desc(), live.c.rid.desc()),
        )
        best = (
            sa.select(live.c.rid, best_rn.label("brn"))
            .join(A, A.id == live.c.aid)
            .join(Project, Project.id == A.project_id)
            .where(Project.name == (project or self.project))
        )
        if video_id is not None:
            best = best.where(A.video_id == video_id)
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
            for r in self.training_labels(task, video_id=video_id)
            if r.frame_start <= frame_index <= r.frame_end
        ]
        if human:
            return max(human, key=lambda r: (r.frame_start == r.frame_end, r.updated_at, r.revision_id))
        preds = self.predictions_for(video_id, task=task, frame_index=frame_index)
        return max(preds, key=lambda p: (p.created_at, p.id)) if preds else None

    def phase_labels(self, video_id: int, length: int | None = None) -> np.ndarray:
        """Per-frame phase ids (-1 = unlabelled) from human labels; single-frame labels override ranges."""
        labels = self.training_labels("phase", video_id=video_id)
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

    # --- model registry, training runs -----------------------------------------------------------------
    def register_model_version(
        self,
        version: str,
        *,
        task: str | None = None,
        bundle_path: str | None = None,
        bundle_hash: str | None = None,
        metrics: dict[str, Any] | None = None,
        status: str = "candidate",
    ) -> int:
        """Add a registry row (idempotent for the same bundle hash; a different hash is refused)."""

        def fn(w: Writer) -> int:
            s = w.session
            mv = s.scalar(sa.select(ModelVersion).where(ModelVersion.version == version))
            if mv is not None:
                if bundle_hash and mv.bundle_hash and bundle_hash != mv.bundle_hash:
                    raise StoreError(
                        f"model version {version!r} is already registered with another bundle hash",
                        "give the new bundle a new version string",
                    )
                return mv.id
            mv = ModelVersion(
                version=version,
                task=task,
                bundle_path=bundle_path,
                bundle_hash=bundle_hash,
                metrics=_jsonable(metrics),
                status=status,
                created_at=utcnow(),
                updated_at=utcnow(),
            )
            s.add(mv)
            s.flush()
            return mv.id

        return self.transaction(fn)

    def set_model_status(self, version: str, status: str) -> None:
        """Change a version's status; making one ``champion`` turns the task's old champion into
        ``previous-champion`` (kept for rollback) in the same transaction."""

        def fn(w: Writer) -> None:
            s = w.session
            mv = s.scalar(sa.select(ModelVersion).where(ModelVersion.version == version))
            if mv is None:
                raise StoreError(
                    f"no model version {version!r}", "register it first (register_model_version)"
                )
            if status == "champion":
                same_task = ModelVersion.task.is_(None) if mv.task is None else ModelVersion.task == mv.task
                s.execute(
                    sa.update(ModelVersion)
                    .where(same_task, ModelVersion.status == "previous-champion")
                    .values(status="archived", updated_at=utcnow())
                )
                s.execute(
                    sa.update(ModelVersion)
                    .where(same_task, ModelVersion.status == "champion", ModelVersion.id != mv.id)
                    .values(status="previous-champion", updated_at=utcnow())
                )
            mv.status = status
            mv.updated_at = utcnow()

        self.transaction(fn)

    def model_versions(self, task: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        q = sa.select(ModelVersion).order_by(ModelVersion.created_at, ModelVersion.id)
        if task is not None:
            q = q.where(ModelVersion.task == task)
        if status is not None:
            q = q.where(ModelVersion.status == status)
        with self._read() as s:
            return [
                {
                    "version": m.version,
                    "task": m.task,
                    "bundle_path": m.bundle_path,
                    "bundle_hash": m.bundle_hash,
                    "metrics": m.metrics,
                    "status": m.status,
                    "created_at": m.created_at,
                    "updated_at": m.updated_at,
                }
                for m in s.scalars(q)
            ]

    def record_training_run(
        self,
        *,
        model_version: str | None = None,
        task: str | None = None,
        status: str = "finished",
        started_at: datetime | str | None = None,
        finished_at: datetime | str | None = None,
        params: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        num_labels: int | None = None,
        max_revision_id: int | None = None,
    ) -> int:
        def fn(w: Writer) -> int:
            run = TrainingRun(
                model_version=model_version,
                task=task,
                status=status,
                started_at=to_utc(started_at) or utcnow(),
                finished_at=to_utc(finished_at),
                params=_jsonable(params),
                metrics=_jsonable(metrics),
                num_labels=num_labels,
                max_revision_id=max_revision_id,
            )
            w.session.add(run)
            w.session.flush()
            return run.id

        return self.transaction(fn)

    def training_runs(self, task: str | None = None) -> list[dict[str, Any]]:
        q = sa.select(TrainingRun).order_by(TrainingRun.id)
        if task is not None:
            q = q.where(TrainingRun.task == task)
        with self._read() as s:
            return [{c.name: getattr(r, c.name) for c in TrainingRun.__table__.columns} for r in s.scalars(q)]

    # --- active learning ---------------------------------------------------------------------------------
    def save_acquisition_scores(
        self,
        scores: Iterable[tuple[int, int, float]],
        *,
        task: str,
        method: str,
        model_version: str | None = None,
    ) -> int:
        """Upsert ``(video_id, frame_index, score)`` rows of one task/method/model version; returns count."""
        pl.check_task(task)
        rows = [
            {
                "video_id": int(v),
                "frame_index": int(f),
                "score": float(sc),
                "task": task,
                "method": method,
                "model_version": model_version or "",
                "created_at": utcnow(),
            }
            for v, f, sc in scores
        ]

        def fn(w: Writer) -> int:
            w._check_videos({r["video_id"] for r in rows})
            for part in _chunks(rows, 2000):
                ins = _insert(w.session, AcquisitionScore.__table__)
                ins = ins.on_conflict_do_update(
                    index_elements=["video_id", "frame_index", "task", "method", "model_version"],
                    set_={"score": ins.excluded.score, "created_at": ins.excluded.created_at},
                )
                w.session.execute(ins, list(part))
            return len(rows)

        return self.transaction(fn) if rows else 0

    def acquisition_queue(
        self,
        task: str,
        *,
        method: str | None = None,
        model_version: str | None = None,
        limit: int = 50,
        exclude_labelled: bool = True,
    ) -> list[AcquisitionItem]:
        """Highest-scoring frames first, skipping frames that already have a live human label for ``task``."""
        S, A = AcquisitionScore, Annotation
        q = sa.select(S).where(S.task == pl.check_task(task))
        if method is not None:
            q = q.where(S.method == method)
        if model_version is not None:
            q = q.where(S.model_version == model_version)
        if exclude_labelled:
            cur = self._current_revisions(task)
            live = sa.select(cur.c.aid).where(cur.c.rn == 1, cur.c.deleted.is_(False)).subquery()
            covered = (
                sa.select(A.id)
                .join(live, live.c.aid == A.id)
                .where(A.video_id == S.video_id, A.frame_start <= S.frame_index, A.frame_end >= S.frame_index)
            )
            q = q.where(~sa.exists(covered))
        q = q.order_by(S.score.desc(), S.video_id, S.frame_index).limit(limit)
        with self._read() as s:
            return [
                AcquisitionItem(r.video_id, r.frame_index, r.task, r.method, r.score, r.model_version)
                for r in s.scalars(q)
            ]

    # --- overview ------------------------------------------------------------------------------------------
    def videos(self, project: str | None = None) -> list[dict[str, Any]]:
        q = sa.select(Video).join(Project).where(Project.name == (project or self.project)).order_by(Video.id)
        with self._read() as s:
            return [{c.name: getattr(v, c.name) for c in Video.__table__.columns} for v in s.scalars(q)]

    def stats(self) -> dict[str, Any]:
        """Counts for `db stats`: videos, frames, predictions per task, live human labels per task/source."""
        cur = self._current_revisions(None)
        live = sa.select(cur.c.aid).where(cur.c.rn == 1, cur.c.deleted.is_(False)).subquery()
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
