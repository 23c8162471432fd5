"""Training data from the label store: human labels only, splits fixed by video, a manifest hash per run.

Why by video: adjacent frames are near-duplicates, so a video whose frames sat in both train and test would
inflate every test score. A split, once stored on a video, is never changed here: a model evaluated on the
test split keeps being compared on the same videos. Frame-level split overrides in the store are ignored
for the same reason (the video's split decides).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from tqdm.auto import tqdm

from surgenet_assist.core.schema import TASKS
from surgenet_assist.core.store import LabelStore
from surgenet_assist.core.video import open_video

from .finetune import LabelledFrames, temporal_grid

#: ``final`` is a last test split no selection decision reads (the gate reads ``test``): reported only, so the
#: numbers it gives stay an unbiased estimate however many promotions the ``test`` split has decided.
SPLITS = ("train", "val", "test", "final")


def _video_key(video: dict[str, Any]) -> str:
    return hashlib.sha256(str(video.get("content_hash") or video["path"]).encode()).hexdigest()


def assign_splits(
    store: LabelStore,
    fractions: tuple[float, ...] = (0.6, 0.15, 0.15, 0.1),
    project: str | None = None,
) -> dict[int, str]:
    """Give every video without a split one of train/val/test/final and return video id -> split
    (three fractions: no final split).

    Existing splits are never touched. New videos are placed in a stable order (hash of content hash or
    path) into whichever split is furthest below its target share, so val and test get a video early.
    """
    videos = store.videos(project)
    counts = {s: sum(1 for v in videos if v["split"] == s) for s in SPLITS}
    target = dict(zip(SPLITS, (*fractions, 0.0, 0.0, 0.0)[: len(SPLITS)], strict=True))
    result = {v["id"]: v["split"] for v in videos if v["split"] in SPLITS}
    for video in sorted((v for v in videos if v["split"] not in SPLITS), key=_video_key):
        total = sum(counts.values()) + 1
        # first train video, then val, then test, then by deficit
        if counts["train"] == 0:
            split = "train"
        else:
            # rounded: 0.1 * 6 must tie with 0.6 * 6 - 3 (then the earlier split wins), not beat it by 1e-16
            split = max(SPLITS, key=lambda s: (round(target[s] * total - counts[s], 9), -SPLITS.index(s)))
            if counts["val"] == 0 and target["val"] > 0:
                split = "val"
            elif counts["test"] == 0 and target["test"] > 0 and counts["val"] > 0:
                split = "test"
        store.set_split(video["id"], split)
        counts[split] += 1
        result[video["id"]] = split
    return result


@dataclass
class SplitData:
    """One split's frames, labels and the exact manifest of the labels used."""

    split: str
    frames: LabelledFrames
    frame_keys: list[tuple[int, int]]  # (video id, frame index) per row of ``frames``
    manifest: list[dict[str, Any]] = field(default_factory=list)
    video_paths: dict[int, str] = field(default_factory=dict)

    @property
    def manifest_hash(self) -> str:
        return manifest_hash(self.manifest)

    def counts(self) -> dict[str, int]:
        f = self.frames
        return {
            "frames": len(f),
            "videos": len(set(v for v, _ in self.frame_keys)),
            "segmentation": int((f.masks != 255).any(axis=(1, 2)).sum()) if f.masks is not None else 0,
            "phase": int((f.phases >= 0).sum()) if f.phases is not None else 0,
            "cvs": int((~np.isnan(f.cvs).any(axis=1)).sum()) if f.cvs is not None else 0,
        }


def manifest_hash(entries: list[dict[str, Any]]) -> str:
    """SHA-256 of the sorted manifest: changes when any label, revision, frame or split changes."""
    rows = sorted(json.dumps(e, sort_keys=True, separators=(",", ":")) for e in entries)
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def _payload_digest(record: Any) -> str:
    h = hashlib.sha256(record.task.encode())
    payload = dict(record.payload)
    mask = payload.pop("mask", None)
    h.update(json.dumps(payload, sort_keys=True, default=str).encode())
    if mask is not None:
        h.update(np.ascontiguousarray(mask).tobytes())
    return h.hexdigest()[:16]


def load_split(
    store: LabelStore,
    split: str,
    *,
    project: str | None = None,
    size: tuple[int, int] | None = None,
    phase_stride: int | None = None,
    temporal_fps: float = 1.0,
    max_frames: int | None = None,
    progress: bool = False,
) -> SplitData:
    """Decode the labelled frames of one split (by video split) with all their labels.

    A frame is included when it has a single-frame label for any task; frames covered only by a phase range
    are included on the temporal model's grid (the frames nearest each time k / ``temporal_fps``, default one
    per second of video; ``phase_stride``: every that many frames instead), so the temporal model's uniform
    sequences (``finetune.temporal_sequences``) find every grid frame. ``size`` (h, w) resizes frames and
    masks (masks by nearest neighbour); default: keep the video's size. Each row records its frame index and
    its video's fps (``frame_indices``, ``fps``).
    """
    schema = store.schema
    videos = {v["id"]: v for v in store.videos(project) if v["split"] == split}
    per_frame: dict[tuple[int, int], dict[str, Any]] = defaultdict(dict)
    manifest: list[dict[str, Any]] = []
    phase_ranges: dict[int, bool] = {}
    for task in TASKS:
        for rec in store.training_labels(task, project=project):
            if rec.video_id not in videos:
                continue
            manifest.append(
                {
                    "video": videos[rec.video_id].get("content_hash") or rec.video_path,
                    "start": rec.frame_start,
                    "end": rec.frame_end,
                    "task": task,
                    "annotation": rec.annotation_id,
                    "revision": rec.revision_id,
                    "payload": _payload_digest(rec),
                    "split": split,
                }
            )
            if task == "phase" and rec.frame_start != rec.frame_end:
                phase_ranges[rec.video_id] = True
                continue
            per_frame[(rec.video_id, rec.frame_start)][task] = rec.payload
    phase_arrays: dict[int, np.ndarray] = {}
    for vid in videos:
        if phase_ranges.get(vid) or any(k[0] == vid and "phase" in t for k, t in per_frame.items()):
            phase_arrays[vid] = store.phase_labels(vid, project=project)
    for vid, arr in phase_arrays.items():
        if not phase_ranges.get(vid):
            continue
        fps = videos[vid].get("fps") or 1.0
        if phase_stride:
            grid = np.arange(0, len(arr), phase_stride)
        else:
            grid = temporal_grid(len(arr), fps, temporal_fps)
        for i in grid[arr[grid] >= 0]:
            per_frame.setdefault((vid, int(i)), {})
    keys = sorted(per_frame)
    if max_frames is not None and len(keys) > max_frames:
        pick = np.linspace(0, len(keys) - 1, max_frames).round().astype(int)
        keys = [keys[i] for i in pick]
    if not keys:
        return SplitData(
            split,
            LabelledFrames(np.zeros((0, 1, 1, 3), np.uint8)),
            [],
            manifest,
            {v: videos[v]["path"] for v in videos},
        )
    images, masks, phases, cvs = [], [], [], []
    by_video: dict[int, list[int]] = defaultdict(list)
    for vid, idx in keys:
        by_video[vid].append(idx)
    for vid in tqdm(sorted(by_video), desc=f"decoding {split} frames", disable=not progress):
        with open_video(videos[vid]["path"], fps=videos[vid].get("fps")) as source:
            for idx in by_video[vid]:
                image = source.read_frame(idx)
                labels = per_frame[(vid, idx)]
                h0, w0 = image.shape[:2]
                if "segmentation" in labels:
                    mask = labels["segmentation"]["mask"]
                    if mask.shape != (h0, w0):
                        mask = cv2.resize(mask, (w0, h0), interpolation=cv2.INTER_NEAREST)
                else:
                    mask = np.full((h0, w0), schema.ignore_index, np.uint8)
                if size is not None and (h0, w0) != tuple(size):
                    image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
                    mask = cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
                images.append(image)
                masks.append(mask)
                arr = phase_arrays.get(vid)
                phases.append(int(arr[idx]) if arr is not None and idx < len(arr) else -1)
                cvs.append(labels["cvs"]["values"] if "cvs" in labels else [np.nan] * schema.num_cvs)
    ordered = [(vid, idx) for vid in sorted(by_video) for idx in by_video[vid]]
    frames = LabelledFrames(
        images=np.stack(images),
        masks=np.stack(masks),
        phases=np.asarray(phases, np.int64),
        cvs=np.asarray(cvs, np.float32),
        video_ids=np.asarray([v for v, _ in ordered], np.int64),
        frame_indices=np.asarray([i for _, i in ordered], np.int64),
        fps=np.asarray([float(videos[v].get("fps") or 1.0) for v, _ in ordered], np.float64),
    )
    return SplitData(split, frames, ordered, manifest, {v: videos[v]["path"] for v in videos})


def load_splits(
    store: LabelStore,
    *,
    project: str | None = None,
    size: tuple[int, int] | None = None,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    assign: bool = True,
    progress: bool = False,
) -> dict[str, SplitData]:
    """Assign splits to new videos (unless ``assign=False``) and load train, val and test."""
    if assign:
        assign_splits(store, fractions, project)
    return {s: load_split(store, s, project=project, size=size, progress=progress) for s in SPLITS}


def combined_manifest_hash(splits: dict[str, SplitData]) -> str:
    """Hash of every split's manifest together (the split is part of each entry)."""
    return manifest_hash([e for s in splits.values() for e in s.manifest])
