"""Which tasks are pre-annotated: not those of test and final videos, unless a team turns it on.

Why: the gate judges the candidate on the test split. A test video labelled by correcting the champion's (or
the candidate's) pre-annotations carries that model's mistakes wherever the annotator did not look twice,
and so favours it. The batch ``/predict`` and ``ls preannotate`` therefore give such a task an empty
prediction and say why (``failed`` / the log / the report). With ``SURGENET_ASSIST_PREANNOTATE_HELD_OUT=1``
(``ls preannotate --include-test-videos``) they are pre-annotated like the others, and the labels made from
them are stored as "started from model V" (the store's provenance), so the gate can show its verdict without
them.

A task's split is its store video's (``LabelStore.video_split``): the stored one, else the one the video will
get when it enters the store; without a store, the store's rule alone (``core.store.split_for_video``).
"""

from __future__ import annotations

import logging
from typing import Any

from surgenet_assist.core.errors import SurgenetAssistError
from surgenet_assist.core.formats.label_studio import task_target
from surgenet_assist.core.store import HELD_OUT_SPLITS, split_for_video

from .predictions import empty_prediction

log = logging.getLogger("surgenet_assist.backend")
HELD_OUT = "held-out split"
ENABLE_HINT = "SURGENET_ASSIST_PREANNOTATE_HELD_OUT=1 (ls preannotate --include-test-videos) pre-annotates it"


def held_out_tasks(
    tasks: list[dict[str, Any]], plan: Any, store: Any, project: str | None, *, allowed: bool = False
) -> dict[int, dict[str, Any]]:
    """Position in ``tasks`` -> why that task gets no pre-annotation (``{"task", "reason", "split"}``), for
    the tasks of test and final videos; empty when ``allowed``. A task that names no media is left to the
    predictor, which reports it."""
    if allowed:
        return {}
    held: dict[int, dict[str, Any]] = {}
    for i, task in enumerate(tasks):
        try:
            video = task_target(task, plan).video
        except SurgenetAssistError:
            continue
        split = store.video_split(video, project) if store is not None else split_for_video(video)
        if split in HELD_OUT_SPLITS:
            held[i] = {"task": task.get("id"), "reason": HELD_OUT, "split": split}
            log.info(
                "task %s: its video is in the %s split: empty prediction, so that its labels do not start "
                "from the model the gate judges (%s)",
                task.get("id"),
                split,
                ENABLE_HINT,
            )
    return held


def with_held_out(
    results: list[dict[str, Any]], held: dict[int, dict[str, Any]], model_version: str
) -> list[dict[str, Any]]:
    """The predictions of every task, in order: ``results`` for the tasks not held out, an empty prediction
    for each held-out position."""
    rest = iter(results)
    total = len(results) + len(held)
    return [empty_prediction(model_version) if i in held else next(rest) for i in range(total)]
