"""Consumer of the training queue the Label Studio backend fills on ``START_TRAINING``.

The backend (``backend/webhooks.py``) adds a ``training_runs`` row with ``status="queued"`` and never a
second one while one is queued. The trainer claims the oldest queued row (queued -> running, in one
conditional UPDATE, so two trainers cannot both claim it) and marks it finished or failed.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa

from surgenet_assist.core.store import LabelStore
from surgenet_assist.core.store.models import TrainingRun


def update_run(store: LabelStore, run_id: int, **values: Any) -> None:
    """Set columns of a training_runs row (status, finished_at, metrics, params, model_version, ...)."""
    store.transaction(
        lambda w: w.session.execute(sa.update(TrainingRun).where(TrainingRun.id == run_id).values(**values))
    )


def claim_queued(store: LabelStore) -> dict[str, Any] | None:
    """Claim the oldest queued run; ``None`` when the queue is empty (or another trainer won the race)."""
    queued = [r for r in store.training_runs() if r.get("status") == "queued"]
    for row in queued:

        def fn(w: Any, rid: int = row["id"]) -> int:
            res = w.session.execute(
                sa.update(TrainingRun)
                .where(TrainingRun.id == rid, TrainingRun.status == "queued")
                .values(
                    status="running", task="nightly", started_at=dt.datetime.now(dt.UTC).replace(tzinfo=None)
                )
            )
            return res.rowcount

        if store.transaction(fn) == 1:
            return row
    return None


def fail_interrupted(store: LabelStore, task: str = "nightly") -> list[int]:
    """Mark ``running`` rows of ``task`` as ``interrupted`` (call only while holding the nightly lock, so
    no cycle can really be running): they are what a killed cycle leaves behind."""
    stale = [r["id"] for r in store.training_runs() if r.get("status") == "running" and r.get("task") == task]
    for rid in stale:
        update_run(store, rid, status="interrupted", finished_at=dt.datetime.now(dt.UTC).replace(tzinfo=None))
    return stale
