"""Model registry and training runs of the label store, including the training queue; all per project.

* ``model_versions``: one row per registered bundle, in one project's registry (``version`` names are unique
  across projects: they name bundle directories). Making one version ``champion`` turns its project's old
  champion of the same task into ``previous-champion`` (kept for rollback) in the same transaction, so each
  project has its own champion.
* ``training_runs``: what was trained on which data version, in which project. The Label Studio backend
  queues a run on ``START_TRAINING`` in the Label Studio project's store project
  (:meth:`RegistryMixin.queue_training_run`, never a second one while that project has one queued); a trainer
  claims a project's oldest queued run with one conditional UPDATE (:meth:`RegistryMixin.claim_queued_run`),
  so two trainers cannot both claim it, and closes it with :meth:`RegistryMixin.update_training_run`.
  :meth:`RegistryMixin.queued_run_projects` tells a trainer which projects have something queued.

Every method takes ``project=`` (a project name); without it the store's own project (``LabelStore(url,
project=...)``, default ``"default"``) is meant.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ..errors import StoreError
from .base import StoreBase
from .models import ModelVersion, Project, TrainingRun, utcnow
from .records import (
    ARCHIVED,
    CANDIDATE,
    CHAMPION,
    INTERACTIVE_TASK,
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


def is_frame_model(row: dict[str, Any]) -> bool:
    """Whether a registry row is a whole-frame model (a bundle that segments a frame alone), not a learned
    click head (task ``INTERACTIVE_TASK``: its own champion, promoted by the click gate)."""
    return row.get("task") != INTERACTIVE_TASK


def _project_names(s: Session) -> dict[int, str]:
    return {int(i): str(n) for i, n in s.execute(sa.select(Project.id, Project.name))}


def _run_dict(run: TrainingRun, names: dict[int, str]) -> dict[str, Any]:
    row = {c.name: getattr(run, c.name) for c in TrainingRun.__table__.columns}
    row["project"] = names.get(run.project_id) if run.project_id is not None else None
    return row


class RegistryMixin(StoreBase):
    """Model versions and training runs (part of :class:`~surgenet_assist.core.store.LabelStore`)."""

    def _project_name(self, project: str | None) -> str:
        return project or self.project

    def _project_id_of(self, project: str | None) -> sa.ScalarSelect[Any]:
        """The project's id as a scalar subquery (NULL, so matching nothing, for an unknown project)."""
        return sa.select(Project.id).where(Project.name == self._project_name(project)).scalar_subquery()

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
        project: str | None = None,
    ) -> int:
        """Add a registry row to ``project``'s registry (idempotent for the same bundle hash; a different
        hash, or the same version in another project, is refused: version names are unique)."""

        def fn(w: Writer) -> int:
            s = w.session
            pid = w.ensure_project(project)
            mv = s.scalar(sa.select(ModelVersion).where(ModelVersion.version == version))
            if mv is not None:
                if bundle_hash and mv.bundle_hash and bundle_hash != mv.bundle_hash:
                    raise StoreError(
                        f"model version {version!r} is already registered with another bundle hash",
                        "give the new bundle a new version string",
                    )
                if mv.project_id is not None and mv.project_id != pid:
                    owner = _project_names(s).get(mv.project_id)
                    raise StoreError(
                        f"model version {version!r} is already registered in project {owner!r}",
                        "version names are unique across projects: give the new bundle a new version string",
                    )
                return mv.id
            mv = ModelVersion(
                version=version,
                project_id=pid,
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

    def set_model_status(self, version: str, status: str, *, project: str | None = None) -> None:
        """Change a version's status; making one ``champion`` turns the old champion of the same task in the
        same project into ``previous-champion`` (kept for rollback) in the same transaction. Other projects'
        champions are untouched. A version of another project than ``project`` is refused."""

        def fn(w: Writer) -> None:
            s = w.session
            name = self._project_name(project)
            mv = s.scalar(sa.select(ModelVersion).where(ModelVersion.version == version))
            pid = s.scalar(sa.select(Project.id).where(Project.name == name))
            if mv is None or (mv.project_id is not None and mv.project_id != pid):
                where = "" if mv is None else f" in project {name!r}"
                owner = "" if mv is None else f" (it is project {_project_names(s).get(mv.project_id)!r}'s)"
                raise StoreError(
                    f"no model version {version!r}{where}{owner}",
                    "register it first (register_model_version), or name its project (--project)",
                )
            if status == CHAMPION:
                same_task = ModelVersion.task.is_(None) if mv.task is None else ModelVersion.task == mv.task
                same_project = (
                    ModelVersion.project_id.is_(None)
                    if mv.project_id is None
                    else ModelVersion.project_id == mv.project_id
                )
                s.execute(
                    sa.update(ModelVersion)
                    .where(same_project, same_task, ModelVersion.status == PREVIOUS_CHAMPION)
                    .values(status=ARCHIVED, updated_at=utcnow())
                )
                s.execute(
                    sa.update(ModelVersion)
                    .where(same_project, same_task, ModelVersion.status == CHAMPION, ModelVersion.id != mv.id)
                    .values(status=PREVIOUS_CHAMPION, updated_at=utcnow())
                )
            mv.status = status
            mv.updated_at = utcnow()

        self.transaction(fn)

    def model_versions(
        self,
        task: str | None = None,
        status: str | None = None,
        *,
        project: str | None = None,
        all_projects: bool = False,
    ) -> list[dict[str, Any]]:
        """``project``'s registry rows, oldest first, optionally of one task and/or status
        (``all_projects=True``: every project's, e.g. to know which bundle directories are in use)."""
        q = sa.select(ModelVersion).order_by(ModelVersion.created_at, ModelVersion.id)
        if not all_projects:
            q = q.where(ModelVersion.project_id == self._project_id_of(project))
        if task is not None:
            q = q.where(ModelVersion.task == task)
        if status is not None:
            q = q.where(ModelVersion.status == status)
        with self._read() as s:
            names = _project_names(s)
            return [
                {
                    "version": m.version,
                    "project": names.get(m.project_id) if m.project_id is not None else None,
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

    def frame_model_versions(
        self, status: str | None = None, *, project: str | None = None
    ) -> list[dict[str, Any]]:
        """``project``'s whole-frame model rows (oldest first, optionally of one status): every row but the
        learned click heads (task ``INTERACTIVE_TASK``), whose ``bundle_path`` is a click-head folder, not a
        model bundle. What model choices, the acquisition queue and rollback read."""
        return [r for r in self.model_versions(status=status, project=project) if is_frame_model(r)]

    def serving_champion(self, project: str | None = None) -> dict[str, Any] | None:
        """The champion that serves ``project``: the newest champion row that has a bundle (the registry,
        the backend and the day-one assistant all ask this). A learned click head (task
        ``INTERACTIVE_TASK``) has its own champion and is never this one: it cannot segment a frame alone."""
        rows = self.frame_model_versions(status=CHAMPION, project=project)
        rows = [r for r in rows if r.get("bundle_path")]
        return max(rows, key=lambda r: (r["updated_at"], r["created_at"])) if rows else None

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
        project: str | None = None,
    ) -> int:
        """Add a training_runs row of ``project``; returns its id."""

        def fn(w: Writer) -> int:
            run = TrainingRun(
                project_id=w.ensure_project(project),
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

    def training_runs(
        self,
        task: str | None = None,
        status: str | None = None,
        *,
        project: str | None = None,
        all_projects: bool = False,
    ) -> list[dict[str, Any]]:
        """``project``'s training_runs rows (all columns, plus ``project`` by name), oldest first, optionally
        of one task and/or status (``all_projects=True``: every project's)."""
        q = sa.select(TrainingRun).order_by(TrainingRun.id)
        if not all_projects:
            q = q.where(TrainingRun.project_id == self._project_id_of(project))
        if task is not None:
            q = q.where(TrainingRun.task == task)
        if status is not None:
            q = q.where(TrainingRun.status == status)
        with self._read() as s:
            names = _project_names(s)
            return [_run_dict(r, names) for r in s.scalars(q)]

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
    def queue_training_run(
        self, params: dict[str, Any] | None = None, *, project: str | None = None
    ) -> tuple[int, bool]:
        """Queue a training cycle of ``project`` unless that project has one queued; returns (run id,
        whether this call added it). One transaction: two webhooks never queue two runs."""

        def fn(w: Writer) -> tuple[int, bool]:
            pid = w.ensure_project(project)
            queued = w.session.scalar(
                sa.select(TrainingRun.id)
                .where(TrainingRun.status == RUN_QUEUED, TrainingRun.project_id == pid)
                .order_by(TrainingRun.id.desc())
            )
            if queued is not None:
                return int(queued), False
            run = TrainingRun(project_id=pid, status=RUN_QUEUED, started_at=utcnow(), params=jsonable(params))
            w.session.add(run)
            w.session.flush()
            return run.id, True

        return self.transaction(fn)

    def queued_run_projects(self) -> list[str]:
        """Names of the projects that have a queued training run, oldest queued first (what a trainer that
        serves every project claims from)."""
        first = sa.func.min(TrainingRun.id)
        q = (
            sa.select(Project.name, first)
            .join(TrainingRun, TrainingRun.project_id == Project.id)
            .where(TrainingRun.status == RUN_QUEUED)
            .group_by(Project.name)
            .order_by(first)
        )
        with self._read() as s:
            return [str(name) for name, _ in s.execute(q)]

    def claim_queued_run(self, task: str = "nightly", *, project: str | None = None) -> dict[str, Any] | None:
        """Claim ``project``'s oldest queued run for ``task`` (queued -> running, one conditional UPDATE);
        returns the claimed row, or ``None`` when nothing is queued (or another trainer won every race)."""
        for row in self.training_runs(status=RUN_QUEUED, project=project):

            def fn(w: Writer, rid: int = row["id"]) -> int:
                res = w.session.execute(
                    sa.update(TrainingRun)
                    .where(TrainingRun.id == rid, TrainingRun.status == RUN_QUEUED)
                    .values(status=RUN_RUNNING, task=task, started_at=utcnow())
                )
                return res.rowcount

            if self.transaction(fn) == 1:
                with self._read() as s:
                    return _run_dict(s.get_one(TrainingRun, row["id"]), _project_names(s))
        return None

    def close_interrupted_runs(self, task: str = "nightly", *, project: str | None = None) -> list[int]:
        """Mark ``project``'s ``running`` runs of ``task`` as ``interrupted``; returns their ids.

        What a killed cycle leaves behind: call it only while holding the project's cycle lock, so that no
        run of ``task`` of that project can really be running.
        """

        def fn(w: Writer) -> list[int]:
            where = (
                TrainingRun.status == RUN_RUNNING,
                TrainingRun.task == task,
                TrainingRun.project_id == w.ensure_project(project),
            )
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
