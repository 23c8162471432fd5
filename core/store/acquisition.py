"""Active-learning scores of the label store and the queue the front-ends read.

The training loop writes one score per (frame, task, method, model version) — for a strategy's queue the
score is the queue position (1.0 first, decreasing); Label Studio and napari read
:meth:`AcquisitionMixin.labelling_queue`: the default method's rows for the champion, unlabelled frames first.
Both queues are per project: frames of the project's videos, for the project's champion.
"""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa

from ..errors import UsageError
from ..schema import TASKS
from . import payloads as pl
from .models import AcquisitionScore, Annotation, Video, utcnow
from .queries import live_annotation_ids
from .records import CHAMPION, AcquisitionItem
from .registry import RegistryMixin
from .writer import Writer, chunks, dialect_insert

#: the strategy whose queue the front-ends read when none is named (``training_loop.acquisition`` uses it)
DEFAULT_QUEUE_METHOD = "hybrid"


class AcquisitionMixin(RegistryMixin):
    """Acquisition scores and the labelling queue (part of :class:`LabelStore`)."""

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
            w.check_videos({r["video_id"] for r in rows})
            for part in chunks(rows, 2000):
                ins = dialect_insert(w.session, AcquisitionScore.__table__)
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
        project: str | None = None,
    ) -> list[AcquisitionItem]:
        """Highest-scoring frames of ``project``'s videos first, skipping frames that already have a live
        human label for ``task``."""
        S, A = AcquisitionScore, Annotation
        videos = sa.select(Video.id).where(Video.project_id == self._project_id_of(project))
        q = sa.select(S).where(S.task == pl.check_task(task), S.video_id.in_(videos))
        if method is not None:
            q = q.where(S.method == method)
        if model_version is not None:
            q = q.where(S.model_version == model_version)
        if exclude_labelled:
            live = live_annotation_ids(task)
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

    def labelling_queue(
        self,
        task: str,
        strategy: str | None = None,
        *,
        limit: int = 50,
        exclude_labelled: bool = True,
        project: str | None = None,
    ) -> list[AcquisitionItem]:
        """The queue the front-ends show (Label Studio's order, napari's "Next to review", ``al next``).

        Frames of ``project``'s videos only (default: the store's project): ``strategy``'s rows (when none is
        named: the default strategy's when it has rows, else any method), for the newest champion of the
        project when that version has rows, else for any version; highest priority first, frames with a live
        human label left out unless ``exclude_labelled=False``.
        """
        if task not in TASKS:
            raise UsageError(f"unknown task {task!r}", f"use one of: {', '.join(TASKS)}")
        methods = [strategy] if strategy else [DEFAULT_QUEUE_METHOD, None]
        champions = self.frame_model_versions(status=CHAMPION, project=project)  # not the click head
        versions = [c["version"] for c in champions[-1:]] + [None]
        for method in methods:
            for version in versions:
                items = self.acquisition_queue(
                    task,
                    method=method,
                    model_version=version,
                    limit=limit,
                    exclude_labelled=exclude_labelled,
                    project=project,
                )
                if items:
                    return items
        return []
