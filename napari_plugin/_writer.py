"""npe2 writer: "save" a SurgeNet Labels layer as the store's COCO export.

Saving a layer to a file is how napari users expect to export; writing the layer's raw array would bypass the
store and lose provenance (the napari-deeplabcut lesson: Ctrl+S must never overwrite the machine labels). So
this writer exports what the store holds as human labels — commit first, then save.
"""

from __future__ import annotations

from typing import Any

from .session import ReviewSession, plugin_settings


def write_coco(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Export the store's human labels (all videos of the project) as one COCO JSON file."""
    cfg = plugin_settings()
    session = ReviewSession(cfg["database_url"] or None, project=cfg["project"])
    try:
        session.export("coco", path)
    finally:
        session.close()
    return [path]
