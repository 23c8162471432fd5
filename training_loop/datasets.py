"""Training data from the label store: human labels only, splits fixed by video, a manifest hash per run.

Why by video: adjacent frames are near-duplicates, so a video whose frames sat in both train and test would
inflate every test score. A video gets its split when it enters the store (``core.store.splits``: a hash of
its path, so the same video lands in the same split however it arrives), and a split once stored is never
changed here: a model evaluated on the test split keeps being compared on the same videos. Frame-level split
overrides in the store are ignored for the same reason (the video's split decides).

Which label of a frame trains is the store's rule (``LabelStore.training_labels``): Label Studio's ground
truth first, then the newest human revision; a label created from a prediction that nobody has touched since
is left out unless ``unreviewed=True``. What the gate needs to judge a model on labels it did not shape is
:func:`label_origins` (per test video: how many of its labels started from which model version) with
:func:`videos_started_from` and :func:`without_videos`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from tqdm.auto import tqdm

from surgenet_assist.core.schema import TASKS
from surgenet_assist.core.store import DEFAULT_SPLIT_FRACTIONS, SPLITS, LabelStore, split_for_video
from surgenet_assist.core.video import open_video

from .finetune import LabelledFrames, temporal_grid


def assign_splits(
    store: LabelStore,
    fractions: tuple[float, ...] = DEFAULT_SPLIT_FRACTIONS,
    project: str | None = None,
) -> dict[int, str]:
    """Give every video still without a split (one whose split was cleared by hand: the store gives one at
    entry) the split of the store's rule with these shares of train/val/test/final (three: no final), and
    return video id -> split. Existing splits are never touched."""
    result = {}
    for video in store.videos(project):
        split = video["split"]
        if split not in SPLITS:
            split = split_for_video(video["path"], fractions)
            store.set_split(video["id"], split)
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
    video_keys: dict[int, str] = field(default_factory=dict)  # video id -> its manifest entries' "video"

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
    unreviewed: bool = False,
) -> SplitData:
    """Decode the labelled frames of one split (by video split) with all their training labels
    (``LabelStore.training_labels``; ``unreviewed``: let in labels created from a prediction and never
    touched since).

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
    phase_records: dict[int, list[Any]] = defaultdict(list)
    video_keys = {vid: str(v.get("content_hash") or v["path"]) for vid, v in videos.items()}
    for task in TASKS:
        for rec in store.training_labels(task, project=project, unreviewed=unreviewed):
            if rec.video_id not in videos:
                continue
            if task == "phase":
                phase_records[rec.video_id].append(rec)
            manifest.append(
                {
                    "video": video_keys[rec.video_id],
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
            phase_arrays[vid] = store.phase_labels(vid, project=project, labels=phase_records[vid])
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
            video_keys,
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
    paths = {v: videos[v]["path"] for v in videos}
    return SplitData(split, frames, ordered, manifest, paths, video_keys)


def load_splits(
    store: LabelStore,
    *,
    project: str | None = None,
    size: tuple[int, int] | None = None,
    fractions: tuple[float, ...] = DEFAULT_SPLIT_FRACTIONS,
    assign: bool = True,
    progress: bool = False,
    unreviewed: bool = False,
) -> dict[str, SplitData]:
    """Assign splits to videos without one (unless ``assign=False``) and load every split."""
    if assign:
        assign_splits(store, fractions, project)
    return {
        s: load_split(store, s, project=project, size=size, progress=progress, unreviewed=unreviewed)
        for s in SPLITS
    }


def combined_manifest_hash(splits: dict[str, SplitData]) -> str:
    """Hash of every split's manifest together (the split is part of each entry)."""
    return manifest_hash([e for s in splits.values() for e in s.manifest])


# --- independent test labels: what the gate needs -----------------------------------------------------------
@dataclass(frozen=True)
class VideoLabelOrigin:
    """Where one video's training labels came from: how many there are, and how many of them a person
    started from a model's prediction, per model version (``None``: a prediction of an unknown model)."""

    video_id: int
    path: str
    labels: int
    started_from: dict[str | None, int]

    @property
    def independent(self) -> bool:
        """No label of the video started from any model's prediction."""
        return not self.started_from


def label_origins(
    store: LabelStore, split: str = "test", *, project: str | None = None, unreviewed: bool = False
) -> dict[int, VideoLabelOrigin]:
    """Per video of ``split`` with training labels (the labels :func:`load_split` reads, same ``unreviewed``):
    whether its labels started from a model version (``Provenance.from_prediction`` / ``model_version``).

    A test video labelled by correcting the candidate's (or the champion's) pre-annotations favours that
    model; the gate report shows its verdict with and without such videos (:func:`videos_started_from`,
    :func:`without_videos`).
    """
    videos = {v["id"]: str(v["path"]) for v in store.videos(project) if v["split"] == split}
    counts: dict[int, int] = Counter()
    started: dict[int, Counter[str | None]] = defaultdict(Counter)
    for task in TASKS:
        for rec in store.training_labels(task, project=project, with_payload=False, unreviewed=unreviewed):
            if rec.video_id in videos:
                counts[rec.video_id] += 1
                if rec.provenance.from_prediction:
                    started[rec.video_id][rec.provenance.model_version] += 1
    return {
        vid: VideoLabelOrigin(vid, videos[vid], counts[vid], dict(started[vid])) for vid in sorted(counts)
    }


def videos_started_from(
    origins: dict[int, VideoLabelOrigin], versions: Iterable[str | None] | None = None
) -> set[int]:
    """Ids of the videos with a label that started from one of ``versions`` (say, the candidate and the
    champion the gate compares) or from a model of unknown version (it might be one of them); every video
    with a label that started from any model when ``versions`` is None."""
    wanted = None if versions is None else {v for v in versions if v is not None} | {None}
    return {
        vid
        for vid, origin in origins.items()
        if origin.started_from and (wanted is None or any(v in wanted for v in origin.started_from))
    }


def without_videos(data: SplitData, video_ids: Collection[int]) -> SplitData:
    """``data`` without the frames (and manifest entries) of ``video_ids``: the gate's test split with only
    labels no compared model shaped, to evaluate both models on it a second time."""
    drop = set(video_ids)
    keep = np.array([vid not in drop for vid, _ in data.frame_keys], dtype=bool)
    return SplitData(
        data.split,
        data.frames.subset(keep),
        [k for k, kept in zip(data.frame_keys, keep, strict=True) if kept],
        [e for e in data.manifest if e["video"] not in {data.video_keys.get(v) for v in drop}],
        {v: p for v, p in data.video_paths.items() if v not in drop},
        {v: k for v, k in data.video_keys.items() if v not in drop},
    )
