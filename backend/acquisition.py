"""Active-learning order in Label Studio: a task high in the acquisition queue gets a low prediction score.

Label Studio's data manager sorts by prediction score, so the rule below makes "sort ascending" the
acquisition order. With a queue in the store: a queued frame scores ``0.5 * (1 - priority)`` (priority in
(0, 1], 1 = label first; so [0, 0.5)), every other frame ``0.5 + 0.5 * confidence`` ([0.5, 1]). Without a
queue the score stays the model's confidence. Documented in docs/active-learning.md.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from surgenet_assist.core.errors import SurgenetAssistError
from surgenet_assist.core.formats.label_studio import task_target
from surgenet_assist.core.schema import TASKS

log = logging.getLogger("surgenet_assist.backend")


def _frame_of(
    task: dict[str, Any], by_path: dict[str, int], by_stem: dict[str, int]
) -> tuple[int, int] | None:
    """The store (video id, frame) a task shows, read by the one translator's rule (``task_target``)."""
    try:
        target = task_target(task)
    except SurgenetAssistError:  # a task the translator cannot place has no queue position
        return None
    if target.frame is None:
        return None
    vid = by_path.get(target.video) or by_stem.get(Path(target.video).stem)
    return None if vid is None else (vid, target.frame)


def queue_priorities(store: Any, project: str | None = None) -> dict[tuple[int, int], float]:
    """(video id, frame index) -> highest queue priority over tasks (the front-ends' queue)."""
    out: dict[tuple[int, int], float] = {}
    for task in TASKS:
        for item in store.labelling_queue(task, limit=100_000, project=project):
            key = (item.video_id, item.frame_index)
            out[key] = max(out.get(key, 0.0), float(item.score))
    return out


def apply_queue_scores(
    results: list[dict[str, Any]], tasks: list[dict[str, Any]], store: Any, project: str | None = None
) -> list[dict[str, Any]]:
    """Rewrite each prediction's top-level ``score`` by the rule in the module docstring (in place)."""
    if store is None:
        return results
    try:
        prio = queue_priorities(store, project)
        if not prio:
            return results
        videos = store.videos(project)
    except Exception as exc:  # noqa: BLE001 - ordering is a nicety; never fail a prediction over it
        log.warning("acquisition order unavailable: %s", exc)
        return results
    by_path = {str(v["path"]): v["id"] for v in videos}
    by_stem = {Path(str(v["path"])).stem: v["id"] for v in videos}
    for res, task in zip(results, tasks, strict=True):
        ref = _frame_of(task, by_path, by_stem)
        conf = min(1.0, max(0.0, float(res.get("score") or 0.0)))
        p = prio.get(ref) if ref is not None else None
        res["score"] = round(0.5 * (1.0 - p), 6) if p is not None else round(0.5 + 0.5 * conf, 6)
    return results
