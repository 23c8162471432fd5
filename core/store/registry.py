"""Model registry and training runs of the label store, including the training queue.

* ``model_versions``: one row per registered bundle; making one version ``champion`` turns the task's old
  champion into ``previous-champion`` (kept for rollback) in the same transaction.
* ``training_runs``: what was trained on which data version. The Label Studio backend queues a run on
  ``START_TRAINING`` (:meth:`RegistryMixin.queue_training_run`, never a second one while one is queued); a
  trainer claims the oldest queued run with one conditional UPDATE (:meth:`RegistryMixin.claim_queued_run`),
  so two trainers cannot both claim it, and closes it with :meth:`RegistryMixin.update_training_run`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from ..errors import StoreError
from .base import StoreBase
from .models import ModelVersion, TrainingRun, utcnow
from .records import (
    ARCHIVED,
    CANDIDATE,
    CHAMPION,
    PREVIOUS_CHAMPION,
    RUN_FINISHED,
    RUN_INTERRUPTED,
    RUN_QUEUED,
    RUN_RUNNING,
    to_utc,
)
from .writer import Writer, jsonable

#: training_runs columns a caller may set after the row exists
RUN_FIELDS = frozenset(
    {
        "model_version",
        "task",
        "status",
        "started_at",
        "finished_at",
        "params",
        "metrics",
        "num_labels",
        "max_revision_id",
    }
)


def _run_dict(run: TrainingRun) -> dict[str, Any]:
    return {c.name: getattr(run, c.name) for c in TrainingRun.__table__.columns}


class RegistryMixin(StoreBase):
    """Model versions and training runs (part of :class:`~surgenet_assist.core.store.LabelStore`)."""

    # --- model versions ----------------------------------------------------------------------------------
    def register_model_version(
        self,
        version: str,
        *,
        task: str | None = None,
        bundle_path: str | None = None,
        bundle_hash: str | None = None,
        metrics: dict[str, Any] | None = None,
        status: str = CANDIDATE,
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
                metrics=jsonable(metrics),
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
            if status == CHAMPION:
                same_task = ModelVersion.task.is_(None) if mv.task is None else ModelVersion.task == mv.task
                s.execute(
                    sa.update(ModelVersion)
                    .where(same_task, ModelVersion.status == PREVIOUS_CHAMPION)
                    .values(status=ARCHIVED, updated_at=utcnow())
                )
                s.execute(
                    sa.update(ModelVersion)
                    .where(same_task, ModelVersion.status == CHAMPION, ModelVersion.id != mv.id)
                    .values(status=PREVIOUS_CHAMPION, updated_at=utcnow())
                )
            mv.status = status
            mv.updated_at = utcnow()

        self.transaction(fn)

    def model_versions(self, task: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        """Registry rows, oldest first, optionally of one task and/or status."""
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

    # --- training runs -----------------------------------------------------------------------------------
    def record_training_run(
        self,
        *,
        model_version: str | None = None,
        task: str | None = None,
        status: str = RUN_FINISHED,
        started_at: datetime | str | None = None,
        finished_at: datetime | str | None = None,
        params: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        num_labels: int | None = None,
        max_revision_id: int | None = None,
    ) -> int:
        """Add a training_runs row; returns its id."""

        def fn(w: Writer) -> int:
            run = TrainingRun(
                model_version=model_version,
                task=task,
                status=status,
                started_at=to_utc(started_at) or utcnow(),
                finished_at=to_utc(finished_at),
                params=jsonable(params),
                metrics=jsonable(metrics),
                num_labels=num_labels,
                max_revision_id=max_revision_id,
            )
            w.session.add(run)
            w.session.flush()
            return run.id

        return self.transaction(fn)

    def training_runs(self, task: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        """training_runs rows (all columns), oldest first, optionally of one task and/or status."""
        q = sa.select(TrainingRun).order_by(TrainingRun.id)
        if task is not None:
            q = q.where(TrainingRun.task == task)
        if status is not None:
            q = q.where(TrainingRun.status == status)
        with self._read() as s:
            return [_run_dict(r) for r in s.scalars(q)]

    def update_training_run(self, run_id: int, **values: Any) -> None:
        """Set columns of one run (``status``, ``finished_at``, ``metrics``, ``model_version``, ...)."""
        unknown = set(values) - RUN_FIELDS
        if unknown:
            raise StoreError(f"training_runs has no column(s) {sorted(unknown)}", f"use {sorted(RUN_FIELDS)}")
        for key in ("started_at", "finished_at"):
            if key in values:
                values[key] = to_utc(values[key])
        for key in ("params", "metrics"):
            if key in values:
                values[key] = jsonable(values[key])

        def fn(w: Writer) -> int:
            return w.session.execute(
                sa.update(TrainingRun).where(TrainingRun.id == run_id).values(**values)
            ).rowcount

        if self.transaction(fn) != 1:
            raise StoreError(f"no training run with id {run_id}", "list them with LabelStore.training_runs()")

    # --- the training queue ------------------------------------------------------------------------------
    def queue_training_run(self, params: dict[str, Any] | None = None) -> tuple[int, bool]:
        """Queue a training cycle unless one is queued; returns (run id, whether this call added it)."""

        def fn(w: Writer) -> tuple[int, bool]:
            queued = w.session.scalar(
                sa.select(TrainingRun.id)
                .where(TrainingRun.status == RUN_QUEUED)
                .order_by(TrainingRun.id.desc())
            )
            if queued is not None:
                return int(queued), False
            run = TrainingRun(status=RUN_QUEUED, started_at=utcnow(), params=jsonable(params))
            w.session.add(run)
            w.session.flush()
            return run.id, True

        return self.transaction(fn)

    def claim_queued_run(self, task: str = "nightly") -> dict[str, Any] | None:
        """Claim the oldest queued run for ``task`` (queued -> running, one conditional UPDATE); returns the
        claimed row, or ``None`` when nothing is queued (or another trainer won every race)."""
        for row in self.training_runs(status=RUN_QUEUED):

            def fn(w: Writer, rid: int = row["id"]) -> int:
                res = w.session.execute(
                    sa.update(TrainingRun)
                    .where(TrainingRun.id == rid, TrainingRun.status == RUN_QUEUED)
                    .values(status=RUN_RUNNING, task=task, started_at=utcnow())
                )
                return res.rowcount

            if self.transaction(fn) == 1:
                with self._read() as s:
                    return _run_dict(s.get_one(TrainingRun, row["id"]))
        return None

    def close_interrupted_runs(self, task: str = "nightly") -> list[int]:
        """Mark ``running`` runs of ``task`` as ``interrupted``; returns their ids.

        What a killed cycle leaves behind: call it only while holding the cycle lock, so that no run of
        ``task`` can really be running.
        """

        def fn(w: Writer) -> list[int]:
            where = (TrainingRun.status == RUN_RUNNING, TrainingRun.task == task)
            ids = [
                int(i)
                for i in w.session.scalars(sa.select(TrainingRun.id).where(*where).order_by(TrainingRun.id))
            ]
            if ids:
                w.session.execute(
                    sa.update(TrainingRun)
                    .where(TrainingRun.id.in_(ids))
                    .values(status=RUN_INTERRUPTED, finished_at=utcnow())
                )
            return ids

        return self.transaction(fn)
