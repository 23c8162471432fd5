"""Which learned click head a project serves: its registry champion of task ``INTERACTIVE_TASK``.

The nightly cycle registers click heads beside the whole-frame models, with their own champion (a click head
never becomes the served segmentation model: ``LabelStore.serving_champion`` skips them). A head is only valid
on the features it was trained on, so the champion is returned only when it was trained on the serving
backbone's weights; otherwise the engine stays at the day-one level rather than serve a head that reads
features it has never seen.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import SurgenetAssistError
from ..store import CHAMPION, INTERACTIVE_TASK
from .click_head import ClickHead, load_click_head

log = logging.getLogger("surgenet_assist.interactive")


def click_champion_row(store: Any, project: str | None = None) -> dict[str, Any] | None:
    """The project's newest interactive champion row that has an artefact folder (``None``: none yet)."""
    rows = [
        r
        for r in store.model_versions(task=INTERACTIVE_TASK, status=CHAMPION, project=project)
        if r.get("bundle_path")
    ]
    return max(rows, key=lambda r: (r["updated_at"], r["created_at"])) if rows else None


def serving_click_head(
    store: Any, project: str | None = None, *, backbone_sha256: str | None = None
) -> tuple[ClickHead, str] | None:
    """``(head, version)`` of the project's interactive champion, or ``None`` when there is none, when it was
    trained on another backbone than ``backbone_sha256`` (the serving backbone's ``weights_sha256``; ``None``
    skips the check, so pass it whenever the backbone is known), or when its folder cannot be read (logged:
    serving falls back to day one instead of failing the click)."""
    row = click_champion_row(store, project)
    if row is None:
        return None
    trained_on = (row.get("metrics") or {}).get("backbone_sha256")
    if backbone_sha256 is not None and trained_on != backbone_sha256:
        log.info(
            "click head %s was trained on backbone %s, serving %s: day one instead",
            row["version"], str(trained_on)[:12], backbone_sha256[:12],
        )
        return None
    try:
        head, meta = load_click_head(row["bundle_path"])
    except SurgenetAssistError as exc:
        log.warning("click head %s cannot be loaded (%s): day one instead", row["version"], exc)
        return None
    if backbone_sha256 is not None and meta.get("backbone_sha256") not in (None, backbone_sha256):
        return None
    return head, str(row["version"])
