"""COCO export: segmentation training labels as RLE masks (pycocotools), CVS as Endoscapes-style ``ds``.

One image per labelled frame (``file_name`` = ``<video>_<frame>.png``), one annotation per class present,
``segmentation`` = compressed RLE with ``iscrowd = 1`` (the COCO convention for RLE); ignore pixels belong to
no annotation. Frames with a CVS label carry ``ds`` = [C1, C2, C3] (and ``ds_raters`` when known).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..encoders import coco_rle_area_bbox, coco_rle_encode
from ..schema import DEFAULT_SCHEMA, LabelSchema
from ..store import LabelStore


def export_coco(
    store: LabelStore, out: str | Path, *, split: str | None = None, schema: LabelSchema = DEFAULT_SCHEMA
) -> dict[str, int]:
    """Write one COCO JSON file; returns counts of images and annotations."""
    images: dict[tuple[int, int], dict[str, Any]] = {}

    def image(video_id: int, video_path: str, frame: int, h: int | None = None, w: int | None = None) -> dict:
        key = (video_id, frame)
        if key not in images:
            images[key] = {
                "id": len(images) + 1,
                "file_name": f"{Path(video_path).name}_{frame}.png",
                "video": video_path,
                "frame": frame,
            }
        if h is not None:
            images[key].update(height=h, width=w)
        return images[key]

    annotations: list[dict[str, Any]] = []
    for lab in store.training_labels("segmentation", split):
        mask = lab.payload["mask"]
        h, w = mask.shape
        img = image(lab.video_id, lab.video_path, lab.frame_start, int(h), int(w))
        for c in lab.payload.get("classes", []):
            rle = coco_rle_encode(mask == c)
            area, bbox = coco_rle_area_bbox(rle)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": img["id"],
                    "category_id": c + 1,
                    "segmentation": rle,
                    "area": area,
                    "bbox": bbox,
                    "iscrowd": 1,
                }
            )
    for lab in store.training_labels("cvs", split):
        if lab.frame_start != lab.frame_end:
            continue
        img = image(lab.video_id, lab.video_path, lab.frame_start)
        img["ds"] = lab.payload["values"]
        img["is_ds_keyframe"] = True
        if lab.payload.get("raters"):
            img["ds_raters"] = lab.payload["raters"]
    coco = {
        "info": {
            "description": "surgenet-assist label store export (human labels only)",
            "date_created": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        "categories": [{"id": c.id + 1, "name": c.name, "color": list(c.color)} for c in schema.classes],
        "images": list(images.values()),
        "annotations": annotations,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(coco), encoding="utf-8")
    return {"images": len(images), "annotations": len(annotations)}
