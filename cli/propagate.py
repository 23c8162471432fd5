"""`surgenet-assist propagate`: keyframe labels -> the rest of the video, written like `predict`'s output."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
from rich.console import Console

from surgenet_assist.core.backbone import load_backbone
from surgenet_assist.core.embedding_cache import EmbeddingCache
from surgenet_assist.core.errors import DatasetFormatError
from surgenet_assist.core.prediction_writer import write_csv
from surgenet_assist.core.propagation import MaskPropagator, propagate_cvs, propagate_phases
from surgenet_assist.core.schema import DEFAULT_SCHEMA, LabelSchema
from surgenet_assist.core.video import open_video
from surgenet_assist.core.visualize import overlay, timeline_png, write_png


def _read_label_folder(folder: Path, schema: LabelSchema) -> tuple[dict, dict, dict]:
    masks, phases, cvs = {}, {}, {}
    for path in sorted(folder.glob("frame_*.png")):
        mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if mask is None or mask.ndim != 2:
            raise DatasetFormatError(
                f"{path} is not a single-channel class-id PNG", "write masks as uint8 ids"
            )
        unknown = np.setdiff1d(np.unique(mask), [*range(schema.num_classes), schema.ignore_index])
        if unknown.size:
            raise DatasetFormatError(
                f"{path} has class ids {unknown.tolist()} unknown to the schema",
                f"use ids 0..{schema.num_classes - 1} or {schema.ignore_index} (ignore)",
            )
        masks[int(path.stem.split("_")[-1])] = mask
    if (folder / "phases.csv").exists():
        with open(folder / "phases.csv") as fh:
            for row in csv.DictReader(fh):
                phases[int(row["frame"])] = schema.phase_id(row["phase"])
    if (folder / "cvs.csv").exists():
        with open(folder / "cvs.csv") as fh:
            for row in csv.DictReader(fh):
                cvs[int(row["frame"])] = np.array([float(row[k]) for k in schema.cvs_keys])
    return masks, phases, cvs


def _read_store(video: Path, db: str | None, schema: LabelSchema) -> tuple[dict, dict, dict]:
    from surgenet_assist.core.store import LabelStore

    with LabelStore(db) as store:
        vid = store.video_id(str(video))
        if vid is None:
            raise DatasetFormatError(
                f"video {video} is not in the label store", "import or annotate it first"
            )
        masks = {
            r.frame_start: r.payload["mask"] for r in store.current_human_labels("segmentation", video_id=vid)
        }
        per_frame = store.phase_labels(vid)
        phases = {i: int(p) for i, p in enumerate(per_frame) if p >= 0}
        cvs = {
            r.frame_start: np.asarray(r.payload["values"], dtype=float)
            for r in store.current_human_labels("cvs", video_id=vid)
        }
    return masks, phases, cvs


def run_propagation(
    video: Path,
    labels: str,
    out: Path,
    fps: float | None = None,
    db: str | None = None,
    weights: Path | None = None,
    random_init: bool = False,
    short_side: int = 256,
    console: Console | None = None,
) -> dict:
    console = console or Console(stderr=True)
    schema = DEFAULT_SCHEMA
    masks, phases, cvs = (
        _read_store(video, db, schema) if labels == "store" else _read_label_folder(Path(labels), schema)
    )
    if not (masks or phases or cvs):
        raise DatasetFormatError(f"no labels found in {labels}", "give at least one keyframe mask or phase")
    backbone = load_backbone(weights=weights, random_init=random_init)
    feats = EmbeddingCache().get_or_compute(
        video, backbone, sample_fps=fps, short_side=short_side, progress=True
    )
    console.print(
        f"features: {'cache hit' if feats.from_cache else 'computed'} ({len(feats.indices)} frames)"
    )
    out = Path(out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    sampled = {int(i) for i in feats.indices}
    summary: dict = {
        "video": str(video),
        "keyframes": sorted(masks),
        "propagated_frames": 0,
        "unreliable_frames": 0,
    }
    if masks:
        keyframes = {i: m for i, m in masks.items() if i in sampled}
        prop = MaskPropagator(feats, schema.num_classes)
        result = prop.propagate(keyframes)
        rows = []
        with open_video(video) as src:
            for index in sorted(result):
                frame = result[index]
                mask, _ = prop.to_mask(frame, src.read_frame(index))
                write_png(out / "masks" / f"frame_{index:06d}.png", mask)
                write_png(
                    out / "overlays" / f"frame_{index:06d}.png", overlay(src.read_frame(index), mask, schema)
                )
                rows.append(
                    [
                        index,
                        frame.keyframe,
                        frame.distance,
                        f"{frame.similarity:.4f}",
                        f"{frame.confidence:.4f}",
                        int(frame.reliable),
                    ]
                )
        write_csv(
            out / "propagation.csv",
            ["frame", "keyframe", "distance", "similarity", "confidence", "reliable"],
            rows,
        )
        summary["propagated_frames"] = len(rows)
        summary["unreliable_frames"] = sum(1 for r in rows if not r[-1])
    pos_of = {int(i): p for p, i in enumerate(feats.indices)}
    if phases:
        labelled = {pos_of[i]: p for i, p in phases.items() if i in pos_of}
        labels_t, _ = propagate_phases(feats.embeddings, labelled, schema.num_phases)
        write_csv(
            out / "phases.csv",
            ["frame", "phase_id", "phase", "labelled"],
            (
                [int(i), int(labels_t[p]), schema.phases[labels_t[p]].name, int(int(i) in phases)]
                for p, i in enumerate(feats.indices)
            ),
        )
        timeline_png(out / "timeline.png", schema, {"propagated": labels_t}, title="Propagated phases")
    if cvs:
        labelled = {pos_of[i]: v for i, v in cvs.items() if i in pos_of}
        probs = propagate_cvs(feats.embeddings, labelled)
        write_csv(
            out / "cvs.csv",
            ["frame", *schema.cvs_keys],
            ([int(i), *[f"{v:.4f}" for v in probs[p]]] for p, i in enumerate(feats.indices)),
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
