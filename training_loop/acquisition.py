"""Active learning: which frames a human should label next.

MONAI-Label-like split: an :class:`AcquisitionPool` holds what the model says about every candidate frame
(per-task probabilities / uncertainties, MC-dropout passes, backbone embeddings, video ids, frame times);
a :class:`Strategy` turns it into an ordered batch; :func:`score_frames` writes the ordering into the
store's ``acquisition_scores`` table, which the nightly cycle refreshes and Label Studio / napari read
through ``LabelStore.labelling_queue``.

Video frames are temporally redundant: every strategy (random included) drops candidates closer than
``min_gap_s`` seconds, or with an embedding cosine similarity above ``max_similarity``, to a frame already
picked (or labelled) in the same video, so a batch is never a run of near-identical adjacent frames.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from surgenet_assist.core.errors import UsageError
from surgenet_assist.core.schema import TASKS
from surgenet_assist.core.store import DEFAULT_QUEUE_METHOD

MEASURES = ("entropy", "margin", "least-confidence", "bald")
#: the strategy whose queue the front-ends read (``LabelStore.labelling_queue``) when none is named
DEFAULT_STRATEGY = DEFAULT_QUEUE_METHOD
#: plain entropy rows written beside every queue, for readers that ask for this method by name
FALLBACK_METHOD = "entropy"


class FrameRef(NamedTuple):
    video_id: int
    frame_index: int


# --------------------------------------------------------------------------------------------------------
# uncertainty measures (all in [0, 1], high = uncertain)
# --------------------------------------------------------------------------------------------------------
def _entropy(p: np.ndarray, axis: int) -> np.ndarray:
    p = np.clip(p, 1e-8, 1.0)
    return -(p * np.log(p)).sum(axis=axis)


def class_uncertainty(probs: np.ndarray, measure: str, axis: int = -1) -> np.ndarray:
    """Normalised entropy, 1 - margin, or rescaled least confidence over the class axis."""
    c = probs.shape[axis]
    if c < 2:
        return np.zeros(np.delete(probs.shape, axis), np.float32)
    if measure == "entropy":
        return _entropy(probs, axis) / math.log(c)
    top2 = -np.sort(-probs, axis=axis).take([0, 1], axis=axis)
    if measure == "margin":
        return 1.0 - (top2.take(0, axis=axis) - top2.take(1, axis=axis))
    if measure == "least-confidence":
        return (1.0 - top2.take(0, axis=axis)) * c / (c - 1)
    raise UsageError(f"unknown uncertainty measure {measure!r}", f"use one of: {', '.join(MEASURES)}")


def bald(mc_probs: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mutual information H[mean_t p_t] - mean_t H[p_t] over T passes (axis 0), normalised by log C."""
    c = mc_probs.shape[axis]
    mean = mc_probs.mean(0)
    ax = axis if axis < 0 else axis - 1
    mi = _entropy(mean, ax) - _entropy(mc_probs, axis).mean(0)
    return np.clip(mi / math.log(c), 0.0, 1.0)


def _binary(p: np.ndarray) -> np.ndarray:
    """(..., K) criterion probabilities -> (..., K, 2) two-class distributions."""
    return np.stack([p, 1.0 - p], axis=-1)


def reduce_pixels(u: np.ndarray, top_fraction: float = 0.2) -> np.ndarray:
    """(N, H, W) pixel uncertainty -> (N,) mean of the top ``top_fraction`` pixels.

    A plain mean is dominated by easy background; the top-q mean follows the uncertain regions (boundaries,
    small structures), as recommended for segmentation acquisition."""
    flat = u.reshape(len(u), -1)
    q = max(1, int(round(flat.shape[1] * top_fraction)))
    return np.sort(flat, axis=1)[:, -q:].mean(1)


def segmentation_scores(
    probs: np.ndarray, mc_probs: np.ndarray | None = None, top_fraction: float = 0.2
) -> dict[str, np.ndarray]:
    """(N, C, H, W) softmax -> per-frame score for every measure (BALD only with (T, N, C, H, W) passes)."""
    out = {m: reduce_pixels(class_uncertainty(probs, m, axis=1), top_fraction) for m in MEASURES[:3]}
    if mc_probs is not None:
        out["bald"] = reduce_pixels(bald(mc_probs, axis=2), top_fraction)
    return {k: v.astype(np.float32) for k, v in out.items()}


# --------------------------------------------------------------------------------------------------------
# the pool
# --------------------------------------------------------------------------------------------------------
@dataclass
class AcquisitionPool:
    """Candidate frames and what the current model says about them."""

    video_ids: np.ndarray  # (N,)
    frame_indices: np.ndarray  # (N,)
    embeddings: np.ndarray  # (N, D) backbone embeddings
    timestamps: np.ndarray | None = None  # (N,) seconds; defaults to the frame index (1 fps)
    phase_probs: np.ndarray | None = None  # (N, P)
    cvs_probs: np.ndarray | None = None  # (N, K) independent binary criteria
    seg_scores: dict[str, np.ndarray] = field(default_factory=dict)  # measure -> (N,)
    mc_phase: np.ndarray | None = None  # (T, N, P) MC-dropout passes
    mc_cvs: np.ndarray | None = None  # (T, N, K)

    def __post_init__(self) -> None:
        self.video_ids = np.asarray(self.video_ids, np.int64)
        self.frame_indices = np.asarray(self.frame_indices, np.int64)
        if self.timestamps is None:
            self.timestamps = self.frame_indices.astype(np.float64)
        emb = np.asarray(self.embeddings, np.float32)
        emb = emb - emb.mean(0, keepdims=True)  # centred: random-init / SSL embeddings share a big mean
        self.unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-8)
        n = len(self.video_ids)
        if len(self.frame_indices) != n or len(self.unit) != n:
            raise ValueError("video_ids, frame_indices and embeddings must have the same length")
        # within-video centred directions: what the guard compares (a video's frames share its mean look)
        self.unit_in_video = np.zeros_like(emb)
        for v in np.unique(self.video_ids):
            sel = self.video_ids == v
            e = emb[sel] - emb[sel].mean(0, keepdims=True)
            self.unit_in_video[sel] = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-8)
        refs = list(zip(self.video_ids.tolist(), self.frame_indices.tolist(), strict=True))
        if len(set(refs)) != n:
            raise ValueError("the pool holds a frame twice")

    def __len__(self) -> int:
        return len(self.video_ids)

    def ref(self, i: int) -> FrameRef:
        return FrameRef(int(self.video_ids[i]), int(self.frame_indices[i]))

    def tasks(self) -> list[str]:
        have = {"segmentation": bool(self.seg_scores), "phase": self.phase_probs is not None}
        have["cvs"] = self.cvs_probs is not None
        return [t for t in TASKS if have[t]]

    def uncertainty(self, measure: str, task: str) -> np.ndarray:
        """(N,) uncertainty of one task in [0, 1]."""
        if task == "segmentation":
            if measure not in self.seg_scores:
                raise ValueError(f"the pool has no segmentation {measure!r} scores (MC passes for BALD)")
            return np.asarray(self.seg_scores[measure], np.float64)
        if task == "phase":
            if measure == "bald":
                return self._need(self.mc_phase, "phase MC passes", lambda a: bald(a, -1))
            fn = lambda a: class_uncertainty(a, measure)  # noqa: E731
            return self._need(self.phase_probs, "phase probabilities", fn)
        if task == "cvs":
            if measure == "bald":
                return self._need(self.mc_cvs, "CVS MC passes", lambda a: bald(_binary(a), -1).mean(-1))
            fn = lambda a: class_uncertainty(_binary(a), measure).mean(-1)  # noqa: E731
            return self._need(self.cvs_probs, "CVS probabilities", fn)
        raise UsageError(f"unknown task {task!r}", f"use one of: {', '.join(TASKS)}")

    @staticmethod
    def _need(arr: np.ndarray | None, what: str, fn: Any) -> np.ndarray:
        if arr is None:
            raise ValueError(f"the pool has no {what}")
        return np.asarray(fn(np.asarray(arr, np.float64)), np.float64)

    def combined(self, measure: str, task: str | None = None) -> np.ndarray:
        """One task's uncertainty, or (task None) the mean over tasks of per-task percentile ranks.

        Ranks put tasks on one scale (segmentation top-q entropy and CVS binary entropy have different
        ranges), so no task dominates the sum by units alone."""
        if task is not None:
            return self.uncertainty(measure, task)
        ranks = []
        for t in self.tasks():
            u = self.uncertainty(measure, t)
            ranks.append((np.argsort(np.argsort(u, kind="stable"), kind="stable") + 1) / len(u))
        if not ranks:
            raise ValueError("the pool has no model outputs")
        return np.mean(ranks, axis=0)


# --------------------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------------------
@dataclass
class Strategy:
    """Base: greedy batch construction under temporal de-duplication.

    ``task`` None = all tasks the pool has (one frame gives a label for every task, as in the oracle).
    Subclasses implement :meth:`scores` (static priority) or override :meth:`_pick` (adaptive)."""

    name: str = "base"
    task: str | None = None
    min_gap_s: float = 3.0
    max_similarity: float | None = 0.95
    seed: int = 0

    def scores(self, pool: AcquisitionPool) -> np.ndarray:
        raise NotImplementedError

    def select(
        self, pool: AcquisitionPool, k: int, already_labelled: Iterable[FrameRef | tuple[int, int]] = ()
    ) -> list[FrameRef]:
        """Up to ``k`` unique, unlabelled, de-duplicated frames, most valuable first."""
        labelled_idx = _indices(pool, already_labelled)
        cand = np.ones(len(pool), bool)
        cand[labelled_idx] = False
        k = int(min(k, cand.sum()))
        if k <= 0:
            return []
        guard = _Guard(pool, self.min_gap_s, self.max_similarity)
        for i in labelled_idx:
            guard.add(i)
        picked = self._pick(pool, k, cand, labelled_idx, guard)
        return [pool.ref(i) for i in picked]

    def _pick(
        self, pool: AcquisitionPool, k: int, cand: np.ndarray, labelled: np.ndarray, guard: _Guard
    ) -> list[int]:
        order = np.argsort(-self.scores(pool), kind="stable")
        return guard.fill([int(i) for i in order if cand[i]], k)


def _indices(pool: AcquisitionPool, refs: Iterable[FrameRef | tuple[int, int]]) -> np.ndarray:
    where = {pool.ref(i): i for i in range(len(pool))}
    return np.array(sorted({where[FrameRef(int(v), int(f))] for v, f in refs if (v, f) in where}), np.int64)


class _Guard:
    """Temporal / embedding de-duplication against frames already picked or labelled in the same video."""

    def __init__(self, pool: AcquisitionPool, min_gap_s: float, max_similarity: float | None) -> None:
        self.pool, self.gap, self.sim = pool, min_gap_s, max_similarity
        self.labelled: list[int] = []
        self.batch: list[int] = []

    def add(self, i: int) -> None:
        self.labelled.append(i)

    #: relaxation levels: (check labelled frames too, check embedding similarity)
    LEVELS = ((True, True), (False, True), (False, False))

    def ok(self, i: int, level: int = 0) -> bool:
        """Level 0: far enough in time and look from labelled and picked frames; 1: from picked frames;
        2: far enough in time from picked frames (the minimum gap is never relaxed)."""
        p = self.pool
        with_labelled, with_sim = self.LEVELS[level]
        others = self.batch + (self.labelled if with_labelled else [])
        same = [j for j in others if p.video_ids[j] == p.video_ids[i]]
        if not same:
            return True
        if np.min(np.abs(p.timestamps[same] - p.timestamps[i])) < self.gap:
            return False
        if self.sim is None or not with_sim:
            return True
        return float(np.max(p.unit_in_video[same] @ p.unit_in_video[i])) <= self.sim

    def fill(self, order: Sequence[int], k: int) -> list[int]:
        """Take ``order`` greedily, relaxing the guard level by level only when the batch would starve."""
        for level in range(len(self.LEVELS)):
            for i in order:
                if len(self.batch) >= k:
                    return self.batch
                if i not in self.batch and self.ok(i, level):
                    self.batch.append(i)
        return self.batch


@dataclass
class RandomStrategy(Strategy):
    name: str = "random"

    def scores(self, pool: AcquisitionPool) -> np.ndarray:
        return np.random.default_rng(self.seed).random(len(pool))


@dataclass
class UncertaintyStrategy(Strategy):
    """Top uncertainty (entropy / margin / least-confidence / BALD) under de-duplication."""

    name: str = "entropy"
    measure: str = "entropy"

    def scores(self, pool: AcquisitionPool) -> np.ndarray:
        return pool.combined(self.measure, self.task)


@dataclass
class KCenterStrategy(Strategy):
    """Core-set k-center greedy on centred, L2-normalised backbone embeddings (Sener & Savarese 2018)."""

    name: str = "kcenter"

    def weights(self, pool: AcquisitionPool) -> np.ndarray:
        return np.ones(len(pool))

    def _pick(
        self, pool: AcquisitionPool, k: int, cand: np.ndarray, labelled: np.ndarray, guard: _Guard
    ) -> list[int]:
        w = self.weights(pool)
        if len(labelled):
            dist = np.min(_cosine_distance(pool.unit, pool.unit[labelled]), axis=1)
        else:  # cold start: closeness to the pool centre, so the first pick is a typical frame
            centre = pool.unit.mean(0, keepdims=True)
            centre /= max(float(np.linalg.norm(centre)), 1e-8)
            dist = 2.0 - _cosine_distance(pool.unit, centre)[:, 0]
        for level in range(len(guard.LEVELS)):
            blocked = np.zeros(len(pool), bool)
            while len(guard.batch) < k:
                val = np.where(cand & ~blocked, w * np.maximum(dist, 0) + 1e-12 * w, -np.inf)
                i = int(np.argmax(val))
                if not np.isfinite(val[i]):
                    break
                blocked[i] = True
                if i in guard.batch or not guard.ok(i, level):
                    continue
                guard.batch.append(i)
                dist = np.minimum(dist, _cosine_distance(pool.unit, pool.unit[i : i + 1])[:, 0])
            if len(guard.batch) >= k:
                break
        return guard.batch


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 1.0 - a @ b.T


@dataclass
class HybridStrategy(KCenterStrategy):
    """Uncertainty-weighted diversity (default): greedy argmax of u_i^power x distance to the labelled and
    already picked frames. Uncertainty alone picks clusters of similar hard frames; distance alone ignores
    what the model already knows; the product needs both."""

    name: str = "hybrid"
    measure: str = "entropy"
    power: float = 1.0

    def weights(self, pool: AcquisitionPool) -> np.ndarray:
        u = pool.combined(self.measure, self.task)
        return np.power(np.clip(u, 1e-6, None), self.power)


@dataclass
class VideoPhaseStrategy(Strategy):
    """Video-level selection for phases: rank videos by mean phase uncertainty, then spread the batch
    evenly in time over the top videos (annotators need a video's context to name phases)."""

    name: str = "video-phase"
    task: str | None = "phase"
    measure: str = "entropy"
    videos_per_batch: int = 2

    def _pick(
        self, pool: AcquisitionPool, k: int, cand: np.ndarray, labelled: np.ndarray, guard: _Guard
    ) -> list[int]:
        u = pool.uncertainty(self.measure, self.task or "phase")
        vids = [v for v in np.unique(pool.video_ids) if (cand & (pool.video_ids == v)).any()]
        vids.sort(key=lambda v: -float(u[pool.video_ids == v].mean()))
        order: list[int] = []
        chosen = vids[: max(1, self.videos_per_batch)]
        per = [np.flatnonzero(cand & (pool.video_ids == v)) for v in chosen]
        quota = [len(per_v) for per_v in per]
        share = np.maximum(1, np.round(np.array(quota) / max(1, sum(quota)) * k)).astype(int)
        for idx, n in zip(per, share, strict=True):
            idx = idx[np.argsort(pool.timestamps[idx])]
            order += [int(idx[j]) for j in np.unique(np.linspace(0, len(idx) - 1, n).round().astype(int))]
        rest = [int(i) for i in np.argsort(-u) if cand[i] and int(i) not in order]
        return guard.fill(order + rest, k)


def _factory() -> dict[str, Any]:
    return {
        "random": RandomStrategy,
        "entropy": lambda **kw: UncertaintyStrategy(name="entropy", measure="entropy", **kw),
        "margin": lambda **kw: UncertaintyStrategy(name="margin", measure="margin", **kw),
        "least-confidence": lambda **kw: UncertaintyStrategy(
            name="least-confidence", measure="least-confidence", **kw
        ),
        "bald": lambda **kw: UncertaintyStrategy(name="bald", measure="bald", **kw),
        "kcenter": KCenterStrategy,
        "hybrid": HybridStrategy,
        "video-phase": VideoPhaseStrategy,
    }


STRATEGIES: dict[str, Any] = _factory()


def get_strategy(name: str = DEFAULT_STRATEGY, **kwargs: Any) -> Strategy:
    """A strategy by registry name (see :data:`STRATEGIES`)."""
    if name not in STRATEGIES:
        raise UsageError(f"unknown strategy {name!r}", f"use one of: {', '.join(STRATEGIES)}")
    return STRATEGIES[name](**kwargs)


def needs_mc(name: str) -> bool:
    return name == "bald"


# --------------------------------------------------------------------------------------------------------
# model outputs -> pool (backbone once; MC dropout only in the heads)
# --------------------------------------------------------------------------------------------------------
def _dropout_modules(model: Any) -> list[Any]:
    import torch.nn as nn

    heads = (model.seg_head, model.phase_head.frame, model.cvs_head)
    kinds = (nn.Dropout, nn.Dropout2d)
    return [m for h in heads for m in h.modules() if isinstance(m, kinds)]


def head_outputs(
    model: Any, feats: list[Any], mc_passes: int = 0, top_fraction: float = 0.2, seed: int = 0
) -> dict[str, np.ndarray]:
    """Heads on one batch of backbone stage features: per-frame seg scores, phase/CVS probabilities,
    embeddings, and ``mc_passes`` MC-dropout passes (dropout on in the heads only; the backbone ran once)."""
    import torch

    feats = [f.float() for f in feats]
    drops = _dropout_modules(model)
    with torch.inference_mode():
        for m in drops:
            m.eval()
        out = model.heads_from_features(feats)
        seg = torch.softmax(out.seg_logits.float(), 1).cpu().numpy()
        res: dict[str, Any] = {
            "phase": torch.softmax(out.phase_logits.float(), 1).cpu().numpy(),
            "cvs": torch.sigmoid(out.cvs_logits.float()).cpu().numpy(),
            "embedding": out.embedding.float().cpu().numpy(),
        }
        mc_seg = None
        if mc_passes > 0:
            gen_state = torch.get_rng_state()
            torch.manual_seed(seed)
            for m in drops:
                m.train()
            passes = [model.heads_from_features(feats) for _ in range(mc_passes)]
            for m in drops:
                m.eval()
            torch.set_rng_state(gen_state)
            mc_seg = np.stack([torch.softmax(o.seg_logits.float(), 1).cpu().numpy() for o in passes])
            res["mc_phase"] = np.stack([torch.softmax(o.phase_logits.float(), 1).numpy() for o in passes])
            res["mc_cvs"] = np.stack([torch.sigmoid(o.cvs_logits.float()).numpy() for o in passes])
    res["seg"] = segmentation_scores(seg, mc_seg, top_fraction)
    return res


def pool_from_outputs(
    parts: list[dict[str, Any]],
    video_ids: Sequence[int],
    frame_indices: Sequence[int],
    timestamps: Sequence[float] | None = None,
) -> AcquisitionPool:
    """Concatenate per-batch :func:`head_outputs` into one pool."""

    def cat(key: str, axis: int = 0) -> np.ndarray | None:
        return np.concatenate([p[key] for p in parts], axis=axis) if parts and key in parts[0] else None

    seg = {m: np.concatenate([p["seg"][m] for p in parts]) for m in parts[0]["seg"]} if parts else {}
    return AcquisitionPool(
        video_ids=np.asarray(video_ids),
        frame_indices=np.asarray(frame_indices),
        embeddings=cat("embedding"),
        timestamps=None if timestamps is None else np.asarray(timestamps, np.float64),
        phase_probs=cat("phase"),
        cvs_probs=cat("cvs"),
        seg_scores=seg,
        mc_phase=cat("mc_phase", 1),
        mc_cvs=cat("mc_cvs", 1),
    )


def _sampled_frames(
    store: Any, project: str | None, fps: float, max_per_video: int, split: str | None
) -> Iterable[tuple[int, Any]]:
    """(video id, FrameRecord) for frames sampled at ``fps`` (at most ``max_per_video``, evenly spread)."""
    from surgenet_assist.core.video import open_video

    for video in store.videos(project):
        if split is not None and video.get("split") != split:
            continue
        with open_video(video["path"], fps=video.get("fps")) as src:
            idx = src.sample_indices(fps)
            if len(idx) > max_per_video:
                idx = [idx[i] for i in np.linspace(0, len(idx) - 1, max_per_video).astype(int)]
            keep = set(idx)
            for rec in src.iter_frames(fps):
                if rec.index in keep:
                    yield video["id"], rec


def build_pool(
    model: Any,
    frames: Iterable[tuple[int, Any]],
    short_side: int,
    mc_passes: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> AcquisitionPool:
    """Run the backbone once per frame batch, then the heads (and MC-dropout passes) on its features."""
    import cv2
    import torch
    from tqdm.auto import tqdm

    from surgenet_assist.core.predictor import target_size

    from .finetune import normalise

    model.eval()
    device = next(model.parameters()).device
    vids: list[int] = []
    fidx: list[int] = []
    times: list[float] = []
    parts: list[dict[str, Any]] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        if not batch:
            return
        h, w = target_size(batch[0].shape[0], batch[0].shape[1], short_side)
        chunk = np.stack([cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA) for im in batch])
        with torch.inference_mode():
            feats = model.backbone(normalise(model, chunk, device))
        parts.append(head_outputs(model, feats, mc_passes, seed=len(parts)))
        batch.clear()

    for vid, rec in tqdm(frames, desc="acquisition scoring", unit="frame", disable=not progress):
        vids.append(int(vid))
        fidx.append(int(rec.index))
        times.append(float(rec.timestamp))
        batch.append(rec.image)
        if len(batch) >= batch_size:
            flush()
    flush()
    if not parts:
        raise UsageError(
            "no frames to score: the chosen videos have no decodable frames",
            "import videos into the store, or pick another --split ('' scores every video)",
        )
    return pool_from_outputs(parts, vids, fidx, times)


def strategy_for_task(name: str, task: str, **kwargs: Any) -> Strategy:
    """The strategy a task's queue uses: the default hybrid becomes video-level selection for phases."""
    if name == DEFAULT_STRATEGY and task == "phase":
        return VideoPhaseStrategy(**kwargs)
    return get_strategy(name, task=task, **kwargs)


def labelled_in_pool(
    store: Any, pool: AcquisitionPool, task: str, project: str | None = None
) -> list[FrameRef]:
    """Pool frames covered by a live human label of ``task`` in ``project`` (default: the store's); range
    labels cover every frame inside."""
    out: list[FrameRef] = []
    for rec in store.current_human_labels(task, project=project, with_payload=False):
        sel = (pool.video_ids == rec.video_id) & (pool.frame_indices >= rec.frame_start)
        sel &= pool.frame_indices <= rec.frame_end
        out += [pool.ref(int(i)) for i in np.flatnonzero(sel)]
    return out


def queue_scores(order: Sequence[FrameRef]) -> list[tuple[int, int, float]]:
    """Queue position -> stored score: 1.0 for the first frame, decreasing linearly, > 0 for the last."""
    n = len(order)
    return [(r.video_id, r.frame_index, 1.0 - i / n) for i, r in enumerate(order)]


def save_queue(
    store: Any,
    pool: AcquisitionPool,
    version: str,
    strategy: str = DEFAULT_STRATEGY,
    queue_size: int = 200,
    save_entropy: bool = True,
    project: str | None = None,
) -> dict[str, int]:
    """Write per-task queue rows (method = strategy name) and, for older readers, plain entropy rows."""
    counts: dict[str, int] = {}
    for task in pool.tasks():
        if save_entropy:
            rows = [(*pool.ref(i), float(u)) for i, u in enumerate(pool.uncertainty("entropy", task))]
            store.save_acquisition_scores(rows, task=task, method=FALLBACK_METHOD, model_version=version)
        labelled = labelled_in_pool(store, pool, task, project)
        order = strategy_for_task(strategy, task).select(pool, queue_size, labelled)
        counts[task] = store.save_acquisition_scores(
            queue_scores(order), task=task, method=strategy, model_version=version
        )
    return counts


def score_frames(
    store: Any,
    model_or_bundle: Any,
    version: str | None = None,
    strategy: str = DEFAULT_STRATEGY,
    *,
    project: str | None = None,
    fps: float = 1.0,
    max_frames_per_video: int = 200,
    short_side: int | None = None,
    split: str | None = "train",
    queue_size: int = 200,
    mc_passes: int = 8,
    allow_download: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Score sampled frames with a model (or bundle path) and store the queue of ``strategy``."""
    get_strategy(strategy)  # fail early on a bad name
    model = model_or_bundle
    if not hasattr(model, "heads_from_features"):
        from surgenet_assist.core.bundle import load_bundle

        model, info = load_bundle(model_or_bundle, allow_download=allow_download)
        version = version or getattr(info, "version", None)
    short = short_side or min(model.backbone.input_size)
    frames = _sampled_frames(store, project, fps, max_frames_per_video, split)
    pool = build_pool(model, frames, short, mc_passes if needs_mc(strategy) else 0, progress=progress)
    counts = save_queue(store, pool, version or "", strategy, queue_size, project=project)
    return {"strategy": strategy, "frames_scored": len(pool), "queue": counts}
