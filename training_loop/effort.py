"""Annotation-effort workflows: the same labelled videos annotated five ways, priced by ``core.effort``.

What a team pays to label a set of videos depends on what the system hands the annotator. The workflows,
side by side on the same videos and brought to the same quality (every object IoU >= 0.90, phase segments
and CVS exactly right; :mod:`surgenet_assist.core.effort`):

- ``a`` from scratch: every object traced as polygons, the phase timeline and CVS set by hand;
- ``b`` correcting the champion's pre-annotation (masks, smoothed phase timeline, CVS) with polygons;
- ``c`` (b) plus propagation: each keyframe's masks after the first are pre-annotated by propagating the
  previous, human-corrected keyframe (``core.propagation.MaskPropagator``; the champion's masks where
  propagation is unreliable); phase and CVS stay the champion's;
- ``d`` (c) plus the click engine (``core.interactive.ClickSegmenter``) for corrections, polygons only
  where 20 clicks do not reach the target;
- ``e`` the loop: (d) with videos taken in active-learning order (mean per-frame uncertainty of the
  champion, ``training_loop.acquisition``), a nightly cycle after every batch (instant heads refitted on
  everything labelled so far, promoted only when they score at least the champion's on validation videos)
  and the next batch pre-annotated by the champion that cycle left.

The champion here is a set of instant heads (``training_loop.instant``) on frozen backbone features: the
nightly fine-tune of the whole model is too slow for a CPU benchmark, and the instant heads are what the
project serves before its first nightly promotion. The bench (``bench/effort.py``) and the CLI
(``surgenet-assist effort``) both run these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from surgenet_assist.core.effort import (
    TARGET_IOU,
    Actions,
    TimeModel,
    annotate_masks,
    cvs_toggles,
    phase_edits,
)
from surgenet_assist.core.embedding_cache import VideoFeatures, image_stages
from surgenet_assist.core.interactive import ClickSegmenter
from surgenet_assist.core.propagation import MaskPropagator
from surgenet_assist.core.schema import DEFAULT_SCHEMA, LabelSchema
from surgenet_assist.core.timeline import smooth_phase_labels

from .acquisition import AcquisitionPool, segmentation_scores
from .evaluate import overall_score
from .instant import InstantHeads, SegSample, fit_instant, score_heads
from .registry import paired_interval

WORKFLOWS = ("a", "b", "c", "d", "e")
WORKFLOW_NAMES = {
    "a": "from scratch",
    "b": "correct pre-annotation",
    "c": "+ propagation",
    "d": "+ click engine",
    "e": "the loop",
}


@dataclass
class LabelledVideo:
    """One video's 1 fps keyframes with their true labels (what the simulated annotator must reach)."""

    name: str
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    masks: np.ndarray  # (T, H, W) class ids, schema.ignore_index where nothing is labelled
    phases: np.ndarray  # (T,) phase ids
    cvs: np.ndarray  # (T, 3) criteria in {0, 1}
    features: VideoFeatures | None = None

    def __len__(self) -> int:
        return len(self.frames)


def keyframe_features(backbone: Any, frames: np.ndarray, short_side: int) -> VideoFeatures:
    """Backbone features of in-memory keyframes, resized as the embedding cache resizes video frames."""
    stages = [image_stages(backbone, frame, short_side) for frame in frames]
    return VideoFeatures(
        indices=np.arange(len(frames), dtype=np.int64),
        stride8=np.stack([s[0] for s in stages]),
        stride16=np.stack([s[1] for s in stages]),
        embeddings=np.stack([s[2] for s in stages]),
        frame_size=(int(frames.shape[1]), int(frames.shape[2])),
        key="",
    )


# --------------------------------------------------------------------------------------------------------
# the champion: instant heads with a validation score
# --------------------------------------------------------------------------------------------------------
@dataclass
class Champion:
    """What pre-annotates: instant heads, their name and their validation scores."""

    heads: InstantHeads
    version: str
    validation: dict[str, float] = field(default_factory=dict)

    @property
    def score(self) -> float:
        return overall_score(self.validation)

    def seg_probs(self, video: LabelledVideo) -> np.ndarray:
        """(T, K, h, w) class probabilities on the feature grid."""
        f = _features(video)
        return np.stack([self.heads.seg_probs(f.stride8[t], f.stride16[t]) for t in range(len(video))])

    def masks(self, video: LabelledVideo) -> np.ndarray:
        size = video.masks.shape[1:]
        return np.stack([self.heads.to_mask(p, size)[0] for p in self.seg_probs(video)])

    def phases(self, video: LabelledVideo) -> np.ndarray:
        """The smoothed phase timeline the annotator is shown (``core.timeline``)."""
        return smooth_phase_labels(self.heads.phase_probs(_embeddings(video)))

    def cvs(self, video: LabelledVideo) -> np.ndarray:
        return (self.heads.cvs_probs(_embeddings(video)) > 0.5).astype(np.float32)


def _features(video: LabelledVideo) -> VideoFeatures:
    if video.features is None:
        raise ValueError(f"video {video.name} has no features: compute them with keyframe_features")
    return video.features


def _embeddings(video: LabelledVideo) -> np.ndarray:
    return np.asarray(_features(video).embeddings, np.float32)


def _samples(videos: Sequence[LabelledVideo], every: int) -> tuple[list, list, list]:
    seg, phase, cvs = [], [], []
    for v in videos:
        f = _features(v)
        for t in range(0, len(v), every):
            seg.append(SegSample(np.asarray(f.stride8[t]), np.asarray(f.stride16[t]), v.masks[t]))
            emb = np.asarray(f.embeddings[t], np.float32)
            phase.append((emb, int(v.phases[t])))
            cvs.append((emb, np.asarray(v.cvs[t], np.float32)))
    return seg, phase, cvs


def fit_champion(
    labelled: Sequence[LabelledVideo],
    validation: Sequence[LabelledVideo],
    version: str,
    schema: LabelSchema = DEFAULT_SCHEMA,
    every: int = 2,
) -> Champion:
    """Instant heads fitted on every ``every``-th keyframe of the labelled videos, scored on the
    validation videos (mIoU, phase Jaccard, CVS mAP; their mean is what the gate compares)."""
    heads = fit_instant(*_samples(labelled, every), schema, seed=0)
    scores = score_heads(heads, *_samples(validation, every), schema) if validation else {}
    return Champion(heads, version, scores)


def nightly_cycle(
    champion: Champion,
    labelled: Sequence[LabelledVideo],
    validation: Sequence[LabelledVideo],
    version: str,
    schema: LabelSchema = DEFAULT_SCHEMA,
) -> tuple[Champion, dict[str, Any]]:
    """Refit on everything labelled, promote through the gate (the candidate's validation score at least
    the champion's: a cycle never serves a model that validates worse). Returns the serving champion."""
    candidate = fit_champion(labelled, validation, version, schema)
    promoted = candidate.score >= champion.score
    report = {
        "candidate": version,
        "candidate_score": round(candidate.score, 4),
        "champion_score": round(champion.score, 4),
        "promoted": bool(promoted),
        "labelled_videos": len(labelled),
    }
    return (candidate if promoted else champion), report


def acquisition_order(videos: Sequence[LabelledVideo], champion: Champion) -> list[int]:
    """Videos most uncertain first: per-frame entropy ranks over the tasks (``AcquisitionPool.combined``,
    the active-learning bench's measure), averaged over each video's keyframes."""
    ids, frames, emb, phase, cvs, seg = [], [], [], [], [], []
    for i, v in enumerate(videos):
        e = _embeddings(v)
        ids += [i] * len(v)
        frames += list(range(len(v)))
        emb.append(e)
        phase.append(champion.heads.phase_probs(e))
        cvs.append(champion.heads.cvs_probs(e))
        seg.append(segmentation_scores(champion.seg_probs(v))["entropy"])
    pool = AcquisitionPool(
        np.array(ids),
        np.array(frames),
        np.concatenate(emb),
        phase_probs=np.concatenate(phase),
        cvs_probs=np.concatenate(cvs),
        seg_scores={"entropy": np.concatenate(seg)},
    )
    per_frame = pool.combined("entropy")
    means = [float(per_frame[np.array(ids) == i].mean()) for i in range(len(videos))]
    return sorted(range(len(videos)), key=lambda i: (-means[i], i))


# --------------------------------------------------------------------------------------------------------
# one video, one workflow
# --------------------------------------------------------------------------------------------------------
@dataclass
class VideoEffort:
    """What annotating one video cost in one workflow, and the quality it reached."""

    video: str
    workflow: str
    actions: Actions
    seconds: float
    min_object_iou: float
    phase_exact: bool
    cvs_exact: bool
    objects: int
    how: dict[str, int]
    champion: str | None = None

    @property
    def hours(self) -> float:
        return self.seconds / 3600.0

    @property
    def quality_met(self) -> bool:
        return self.min_object_iou >= TARGET_IOU and self.phase_exact and self.cvs_exact

    def as_dict(self) -> dict[str, Any]:
        return {
            "video": self.video,
            "workflow": self.workflow,
            "hours": round(self.hours, 5),
            "seconds": round(self.seconds, 2),
            "actions": self.actions.as_dict(),
            "min_object_iou": round(self.min_object_iou, 4),
            "phase_exact": self.phase_exact,
            "cvs_exact": self.cvs_exact,
            "objects": self.objects,
            "how": self.how,
            "champion": self.champion,
        }


def _propagated(video: LabelledVideo, t: int, previous: np.ndarray, schema: LabelSchema) -> np.ndarray | None:
    """Keyframe ``t`` from the human labels of keyframe ``t - 1`` (one step; None when unreliable)."""
    f = _features(video)
    pair = VideoFeatures(
        indices=np.array([0, 1], np.int64),
        stride8=f.stride8[t - 1 : t + 1],
        stride16=f.stride16[t - 1 : t + 1],
        embeddings=f.embeddings[t - 1 : t + 1],
        frame_size=f.frame_size,
        key="",
    )
    prop = MaskPropagator(pair, schema.num_classes)
    frame = prop.propagate({0: previous}, targets=[1]).get(1)
    if frame is None or not frame.reliable:
        return None
    return prop.to_mask(frame, video.frames[t])[0]


def propagated_masks(video: LabelledVideo, schema: LabelSchema = DEFAULT_SCHEMA) -> list[np.ndarray | None]:
    """Each keyframe propagated from the previous keyframe's *true* labels (None for the first and where
    propagation is unreliable). The corrected labels are within the targets of the truth, and starting
    from the truth keeps workflows on the same footing, so (c), (d) and (e) share this."""
    return [None] + [_propagated(video, t, video.masks[t - 1], schema) for t in range(1, len(video))]


def _click_engine(segmenter: ClickSegmenter, video: LabelledVideo, t: int) -> Callable[[int], Callable]:
    """The click engine on keyframe ``t``, its embedding made on the first click (a frame whose objects all
    pass needs none) from the video's cached features."""
    cache: dict[str, Any] = {}

    def segment(prompt: Any) -> np.ndarray:
        if "emb" not in cache:
            f = _features(video)
            cache["emb"] = segmenter.embedding_from_stages(video.frames[t], f.stride8[t], f.stride16[t])
        return segmenter.segment(cache["emb"], prompt).mask

    return lambda _class_id: segment


def annotate_video(
    video: LabelledVideo,
    workflow: str,
    champion: Champion | None,
    segmenter: ClickSegmenter | None = None,
    time_model: TimeModel | None = None,
    schema: LabelSchema = DEFAULT_SCHEMA,
    propagated: list[np.ndarray | None] | None = None,
) -> VideoEffort:
    """The simulated annotator labels every keyframe of ``video`` in ``workflow`` (``WORKFLOWS``).

    ``propagated``: :func:`propagated_masks` of the video when already computed (workflows c-e)."""
    if workflow not in WORKFLOWS:
        raise ValueError(f"unknown workflow {workflow!r}; use one of {WORKFLOWS}")
    time_model = time_model or TimeModel()
    scratch = workflow == "a" or champion is None
    propagate = workflow in ("c", "d", "e")
    clicks = workflow in ("d", "e")
    if clicks and segmenter is None:
        raise ValueError(f"workflow {workflow} needs the click engine (segmenter)")
    pre_masks = None if scratch else champion.masks(video)
    pre_cvs = None if scratch else champion.cvs(video)
    if propagate and propagated is None:
        propagated = propagated_masks(video, schema)
    total = Actions()
    min_iou, objects, cvs_ok = 1.0, 0, True
    how: dict[str, int] = {}
    for t in range(len(video)):
        pre = None if pre_masks is None else pre_masks[t]
        cvs_start = None if pre_cvs is None else pre_cvs[t]
        if propagate and t > 0 and propagated[t] is not None:
            pre = propagated[t]
        segment_for: Callable[[int], Callable] | None = None
        if clicks:
            segment_for = _click_engine(segmenter, video, t)

        frame = annotate_masks(video.masks[t], pre, schema.ignore_index, segment_for)
        toggles, cvs_final = cvs_toggles(video.cvs[t], cvs_start)
        cvs_ok &= bool(np.array_equal(cvs_final, np.asarray(video.cvs[t]) > 0.5))
        total = total + frame.actions + Actions(toggles=toggles)
        min_iou = min(min_iou, frame.min_iou)
        objects += len(frame.objects)
        for o in frame.objects:
            how[o.how] = how.get(o.how, 0) + 1
    edits, timeline = phase_edits(video.phases, None if scratch else champion.phases(video))
    total = total + Actions(boundary_edits=edits)
    return VideoEffort(
        video=video.name,
        workflow=workflow,
        actions=total,
        seconds=time_model.seconds(total),
        min_object_iou=min_iou,
        phase_exact=bool(np.array_equal(timeline, video.phases)),
        cvs_exact=cvs_ok,
        objects=objects,
        how=how,
        champion=None if scratch else champion.version,
    )


# --------------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------------
@dataclass
class LoopResult:
    """Workflow (e): per video in labelling order, with the batch it was in and the cycles between."""

    efforts: list[VideoEffort]
    batches: list[int]
    cycles: list[dict[str, Any]]


def run_loop(
    videos: Sequence[LabelledVideo],
    champion: Champion,
    pool: Sequence[LabelledVideo],
    validation: Sequence[LabelledVideo],
    segmenter: ClickSegmenter,
    batch_size: int,
    time_model: TimeModel | None = None,
    schema: LabelSchema = DEFAULT_SCHEMA,
    progress: Callable[[str], None] | None = None,
    propagated: Sequence[list[np.ndarray | None]] | None = None,
) -> LoopResult:
    """Workflow (e): label ``videos`` batch by batch in active-learning order; after each batch a nightly
    cycle on ``pool`` + everything labelled, gated on ``validation``; the next batch sees the result."""
    remaining = list(range(len(videos)))
    labelled = list(pool)
    efforts: list[VideoEffort] = []
    batches: list[int] = []
    cycles: list[dict[str, Any]] = []
    batch = 0
    while remaining:
        order = acquisition_order([videos[i] for i in remaining], champion)
        chosen = [remaining[j] for j in order[:batch_size]]
        for i in chosen:
            moved = propagated[i] if propagated is not None else None
            efforts.append(annotate_video(videos[i], "e", champion, segmenter, time_model, schema, moved))
            batches.append(batch)
            if progress:
                progress(f"(e) batch {batch}: {videos[i].name} {efforts[-1].hours:.3f} h")
        labelled += [videos[i] for i in chosen]
        remaining = [i for i in remaining if i not in chosen]
        champion, report = nightly_cycle(champion, labelled, validation, f"cycle-{batch + 1}", schema)
        cycles.append(report)
        batch += 1
    return LoopResult(efforts, batches, cycles)


# --------------------------------------------------------------------------------------------------------
# summaries (the bench and the CLI report the same numbers)
# --------------------------------------------------------------------------------------------------------
def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean over videos and the half-width of its 95 % Student-t interval (inf for fewer than two)."""
    x = np.asarray(values, np.float64)
    if len(x) < 2:
        return float(x.mean()) if len(x) else float("nan"), float("inf")
    lo, hi = paired_interval(x)
    return float(x.mean()), float(hi - lo) / 2


def ratio_interval(
    num: Sequence[float], den: Sequence[float], resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """sum(num) / sum(den) over videos (paired: the same videos in both) with a video-bootstrap 95 %
    interval: a ratio of totals, so long videos weigh what they cost."""
    a, b = np.asarray(num, np.float64), np.asarray(den, np.float64)
    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    ratios = a[idx].sum(1) / b[idx].sum(1)
    return float(a.sum() / b.sum()), float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


def summarize(efforts: Sequence[VideoEffort]) -> dict[str, Any]:
    """One workflow: hours per video (mean, 95 % interval over videos), total hours, mean actions per video
    by kind, how objects were finished, and the quality reached (lowest object IoU, phase and CVS exact)."""
    hours = [e.hours for e in efforts]
    mean, half = mean_interval(hours)
    kinds = Actions().as_dict()
    how: dict[str, int] = {}
    for e in efforts:
        for k, v in e.how.items():
            how[k] = how.get(k, 0) + v
    return {
        "hours_per_video": round(mean, 4),
        "hours_per_video_ci95": round(half, 4),
        "hours_total": round(float(np.sum(hours)), 3),
        "hours_total_ci95": round(half * len(hours), 3),
        "actions_per_video": {
            k: round(float(np.mean([e.actions.as_dict()[k] for e in efforts])), 1) for k in kinds
        },
        "objects_by_outcome": how,
        "min_object_iou": round(min(e.min_object_iou for e in efforts), 4),
        "phase_exact": all(e.phase_exact for e in efforts),
        "cvs_exact": all(e.cvs_exact for e in efforts),
        "videos": len(efforts),
    }


def set_threads(threads: int) -> None:
    """CPU threads for the backbone and OpenCV (the bench and the CLI share the machine with others)."""
    import cv2

    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
