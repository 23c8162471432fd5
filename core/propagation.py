"""Day-one assistance: carry human labels to other frames of the same video by SurgeNetXL feature similarity.

DINO-trained features match the same tissue across frames without any training (the DINO paper's video
object segmentation by k-NN label propagation), so a few labelled keyframes are enough to pre-annotate
their neighbours before any head has been trained.

- Masks: for each target frame, every stride-8 feature looks up its top-k most similar features in the
  keyframe and the last few propagated frames, restricted to a spatial neighbourhood, and takes their
  labels weighted by a softmax over similarity. Forward and backward from every keyframe; between two
  keyframes the nearer one wins (blended by distance). A guided filter refines the upsampled result on the
  image's edges. Propagation stops (frames marked unreliable) when similarity collapses, e.g. after a
  camera cut.
- Phases: k nearest labelled frames on the pooled embeddings, then a Viterbi pass that only allows the
  phase to stay or move forward in the usual order.
- CVS: similarity-weighted mean of the k nearest labelled frames' criteria.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .embedding_cache import VideoFeatures


@dataclass
class PropagationConfig:
    topk: int = 5
    temperature: float = 0.07  # softmax temperature on cosine similarities
    radius: int = 8  # spatial neighbourhood, in stride-8 feature cells
    n_recent: int = 3  # previously propagated frames used as extra references
    cut_ratio: float = 0.75  # unreliable when similarity falls below this share of its first-step value
    max_distance: int | None = None  # in sampled frames
    dims: int = 64  # PCA dimensions of the matched features (speed: similarity cost is linear in it)
    tile: int = 8  # target cells are matched tile by tile against the tile's window of +-radius cells


@dataclass
class PropagatedFrame:
    """Label distribution of one frame at feature resolution, with where it came from."""

    frame_index: int
    keyframe: int
    distance: int  # sampled frames from the keyframe
    probs: np.ndarray  # (K, h, w) float32
    similarity: float  # mean top-1 cosine similarity to the references
    reliable: bool

    @property
    def confidence(self) -> float:
        return float(self.probs.max(axis=0).mean())


def guided_filter(guide: np.ndarray, planes: np.ndarray, radius: int = 4, eps: float = 1e-3) -> np.ndarray:
    """He et al.'s guided filter (grey guide, box filters): edge-aware smoothing of each plane."""
    ksize = (2 * radius + 1, 2 * radius + 1)

    def box(x: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(x, -1, ksize, borderType=cv2.BORDER_REFLECT)

    mean_i = box(guide)
    var_i = box(guide * guide) - mean_i * mean_i
    out = np.empty_like(planes)
    for k, p in enumerate(planes):
        mean_p = box(p)
        a = (box(guide * p) - mean_i * mean_p) / (var_i + eps)
        b = mean_p - a * mean_i
        out[k] = box(a) * guide + box(b)
    return out


class MaskPropagator:
    """Propagates keyframe masks through one video's cached features."""

    def __init__(
        self, features: VideoFeatures, num_classes: int, config: PropagationConfig | None = None
    ) -> None:
        self.features = features
        self.num_classes = num_classes
        self.config = config or PropagationConfig()
        _, _, h, w = features.stride8.shape
        self.grid = (h, w)
        tile = self.config.tile
        self._padded = (-(-h // tile) * tile, -(-w // tile) * tile)  # grid padded to whole tiles
        # which key cells of each tile's window are real (not padding): padding never wins the top-k
        valid = torch.zeros(
            1, 1, self._padded[0] + 2 * self.config.radius, self._padded[1] + 2 * self.config.radius
        )
        r = self.config.radius
        valid[..., r : r + h, r : r + w] = 1
        self._key_valid = self._windows(valid)[0, 0] > 0.5  # (L, W*W)
        self._feat_cache: dict[int, torch.Tensor] = {}
        self._projection: tuple[torch.Tensor, torch.Tensor] | None = None

    def _raw_feature(self, pos: int) -> torch.Tensor:
        s8 = torch.from_numpy(np.asarray(self.features.stride8[pos], dtype=np.float32))
        s16 = torch.from_numpy(np.asarray(self.features.stride16[pos], dtype=np.float32))
        s16 = F.interpolate(s16[None], size=self.grid, mode="bilinear", align_corners=False)[0]
        return torch.cat([F.normalize(s8, dim=0), F.normalize(s16, dim=0)], 0).flatten(1).T  # (hw, C)

    def _fit_projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """PCA of the video's features (a few evenly spaced frames): matching in 64 dims instead of 448
        keeps the neighbours nearly the same and makes each frame ~7x cheaper."""
        n = len(self.features.indices)
        sample = torch.cat([self._raw_feature(int(p)) for p in np.linspace(0, n - 1, min(n, 12)).round()])
        mean = sample.mean(0, keepdim=True)
        dims = min(self.config.dims, sample.shape[1])
        _, _, v = torch.pca_lowrank(sample - mean, q=dims, center=False, niter=3)
        return mean, v[:, :dims]

    def feature(self, pos: int) -> torch.Tensor:
        """(hw, d) L2-normalised, PCA-projected stride-8 features (stage 2 + upsampled stage 3)."""
        if pos not in self._feat_cache:
            if self._projection is None:
                self._projection = self._fit_projection()
            mean, basis = self._projection
            feat = F.normalize((self._raw_feature(pos) - mean) @ basis, dim=1)
            if len(self._feat_cache) > 64:
                self._feat_cache.pop(next(iter(self._feat_cache)))
            self._feat_cache[pos] = feat
        return self._feat_cache[pos]

    def label_probs(self, mask: np.ndarray, ignore_index: int = 255) -> np.ndarray:
        """(H, W) class ids -> (K, h, w) area-averaged one-hot on the feature grid (ignore pixels dropped)."""
        h, w = self.grid
        planes = np.stack(
            [
                cv2.resize((mask == k).astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
                for k in range(self.num_classes)
            ]
        )
        total = planes.sum(0, keepdims=True)
        return np.where(total > 0, planes / np.maximum(total, 1e-6), 1.0 / self.num_classes).astype(
            np.float32
        )

    def _windows(self, grid: torch.Tensor) -> torch.Tensor:
        """(N, C, Hp+2r, Wp+2r) -> (N, C, L, W*W): each tile's window of key cells, W = tile + 2r."""
        n, c = grid.shape[:2]
        size = self.config.tile + 2 * self.config.radius
        cols = F.unfold(grid, kernel_size=size, stride=self.config.tile)  # (N, C*W*W, L)
        return cols.view(n, c, size * size, -1).permute(0, 1, 3, 2)

    def _to_grid(self, cells: torch.Tensor, pad: int) -> torch.Tensor:
        """(hw, C) -> (1, C, Hp + 2*pad, Wp + 2*pad), zero padded."""
        h, w = self.grid
        hp, wp = self._padded
        grid = cells.T.reshape(1, -1, h, w)
        return F.pad(grid, (pad, pad + wp - w, pad, pad + hp - h))

    def _tiles(self, cells: torch.Tensor) -> torch.Tensor:
        """(hw, C) -> (L, t*t, C) contiguous: the cells of each target tile."""
        t = self.config.tile
        q = F.unfold(self._to_grid(cells, 0), kernel_size=t, stride=t)  # (1, C*t*t, L)
        return q.view(cells.shape[1], t * t, -1).permute(2, 1, 0).contiguous()

    def _window_cells(self, cells: torch.Tensor) -> torch.Tensor:
        """(hw, C) -> (L, W*W, C) contiguous: the key cells around each tile (zero outside the frame)."""
        return self._windows(self._to_grid(cells, self.config.radius))[0].permute(1, 2, 0).contiguous()

    def _reference(self, pos: int, probs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """A frame as a reference: its key windows and the matching label windows, computed once."""
        values = torch.from_numpy(np.ascontiguousarray(probs.reshape(self.num_classes, -1).T))
        return self._window_cells(self.feature(pos)), self._window_cells(values)

    def _step(
        self, target: int, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor
    ) -> tuple[np.ndarray, float]:
        """Labels of ``target`` from its top-k most similar key cells within +-radius in the references.

        ``keys`` (L, n*WW, d) / ``values`` (L, n*WW, K) hold the references' windows side by side;
        ``valid`` (L, n*WW) marks real cells of filled reference slots."""
        t = self.config.tile
        h, w = self.grid
        q = self._tiles(self.feature(target))  # (L, t*t, d)
        L, nww, kk = values.shape
        sim = torch.bmm(q, keys.transpose(1, 2))  # (L, t*t, n*WW)
        sim.masked_fill_(~valid[:, None, :], -4.0)
        k = min(self.config.topk, nww)
        top, idx = sim.topk(k, dim=-1)  # (L, t*t, k)
        weights = torch.softmax(top / self.config.temperature, dim=-1)
        picked = torch.gather(
            values[:, None].expand(L, t * t, nww, kk), 2, idx[..., None].expand(L, t * t, k, kk)
        )
        probs = (weights[..., None] * picked).sum(2)  # (L, t*t, K)
        hp, wp = self._padded
        grid = F.fold(probs.permute(2, 1, 0).reshape(1, kk * t * t, L), (hp, wp), kernel_size=t, stride=t)
        best = F.fold(top[..., 0].T.reshape(1, t * t, L), (hp, wp), kernel_size=t, stride=t)[0, 0, :h, :w]
        return grid[0, :, :h, :w].contiguous().numpy(), float(best.mean())

    def _run(self, start: int, probs0: np.ndarray, stop: int, step: int) -> list[PropagatedFrame]:
        """From sampled position ``start`` towards ``stop`` (exclusive) in direction ``step``."""
        cfg = self.config
        indices = self.features.indices
        # reference slots side by side: slot 0 = the keyframe, slots 1..n_recent = a ring of the last frames
        key_k, key_v = self._reference(start, probs0)
        L, ww, d = key_k.shape
        slots = 1 + cfg.n_recent
        keys = key_k.new_zeros(L, slots * ww, d)
        values = key_v.new_zeros(L, slots * ww, key_v.shape[-1])
        valid = torch.zeros(L, slots * ww, dtype=torch.bool)
        keys[:, :ww], values[:, :ww], valid[:, :ww] = key_k, key_v, self._key_valid
        out: list[PropagatedFrame] = []
        baseline = None
        for distance, pos in enumerate(range(start + step, stop, step), start=1):
            if cfg.max_distance is not None and distance > cfg.max_distance:
                break
            probs, similarity = self._step(pos, keys, values, valid)
            baseline = baseline or similarity
            reliable = similarity >= cfg.cut_ratio * baseline
            out.append(
                PropagatedFrame(int(indices[pos]), int(indices[start]), distance, probs, similarity, reliable)
            )
            if not reliable:
                break  # confidence collapsed (e.g. camera cut): don't carry labels into another scene
            if cfg.n_recent:
                slot = 1 + (distance - 1) % cfg.n_recent
                ref_k, ref_v = self._reference(pos, probs)
                span = slice(slot * ww, (slot + 1) * ww)
                keys[:, span], values[:, span], valid[:, span] = ref_k, ref_v, self._key_valid
        return out

    def propagate(
        self,
        keyframes: dict[int, np.ndarray],
        targets: Iterable[int] | None = None,
        changed: int | None = None,
    ) -> dict[int, PropagatedFrame]:
        """Propagate ``{frame_index: mask}`` to the other sampled frames (or only to ``targets``).

        ``changed``: the keyframe that was just added or corrected. Only frames between its neighbouring
        keyframes can change, so only the runs that reach them are computed (a new label on a long video
        costs the span around it, not the whole video)."""
        positions = sorted((self.features.position(i), m) for i, m in keyframes.items())
        starts = [p for p, _ in positions]
        n = len(self.features.indices)
        k = None
        if changed is not None:
            k = starts.index(self.features.position(changed))
            lo = starts[k - 1] if k > 0 else -1
            hi = starts[k + 1] if k + 1 < len(starts) else n
            span = {int(i) for i in self.features.indices[lo + 1 : hi]}
            targets = span if targets is None else span & set(targets)
        candidates: dict[int, list[PropagatedFrame]] = {}
        for j, (pos, mask) in enumerate(positions):
            # with a changed keyframe k, only runs into the span around it: k-1 forward, k both, k+1 backward
            forward = k is None or j in (k - 1, k)
            backward = k is None or j in (k, k + 1)
            if not (forward or backward):
                continue
            probs0 = self.label_probs(mask)
            left = starts[j - 1] if j > 0 else -1
            right = starts[j + 1] if j + 1 < len(starts) else n
            frames = (self._run(pos, probs0, right, +1) if forward else []) + (
                self._run(pos, probs0, left, -1) if backward else []
            )
            for frame in frames:
                candidates.setdefault(frame.frame_index, []).append(frame)
        wanted = set(targets) if targets is not None else None
        result = {}
        for index, frames in candidates.items():
            if wanted is not None and index not in wanted:
                continue
            if len(frames) == 1:
                result[index] = frames[0]
                continue
            reliable = [f for f in frames if f.reliable] or frames
            weights = np.array([1.0 / f.distance for f in reliable])
            weights /= weights.sum()
            nearest = min(reliable, key=lambda f: f.distance)
            blended = sum(w * f.probs for w, f in zip(weights, reliable, strict=True))
            result[index] = PropagatedFrame(
                index,
                nearest.keyframe,
                nearest.distance,
                blended,
                max(f.similarity for f in reliable),
                nearest.reliable,
            )
        return result

    def to_mask(
        self, frame: PropagatedFrame, image: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Class mask and per-pixel confidence at the original frame size, edge-refined on ``image``."""
        h, w = self.features.frame_size
        up = np.stack([cv2.resize(p, (w, h), interpolation=cv2.INTER_LINEAR) for p in frame.probs])
        if image is not None:
            guide = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
            up = guided_filter(guide, up, radius=max(2, round(min(h, w) / 120)))
        mask = up.argmax(0).astype(np.uint8)
        conf = np.clip(up.max(0), 0, 1).astype(np.float16)
        return mask, conf


def _knn_scores(embeddings: np.ndarray, labelled_pos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    emb = F.normalize(torch.from_numpy(np.asarray(embeddings, dtype=np.float32)), dim=1)
    sims = emb @ emb[torch.from_numpy(labelled_pos)].T  # (T, L)
    k = min(k, len(labelled_pos))
    top, idx = sims.topk(k, dim=1)
    return top.numpy(), idx.numpy()


def propagate_phases(
    embeddings: np.ndarray,
    labelled: dict[int, int],
    num_phases: int,
    k: int = 5,
    temperature: float = 0.05,
    ordered: bool = True,
    switch_cost: float = 4.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Phase of every sampled frame from a few labelled ones (positions -> phase ids).

    Returns (labels (T,), probabilities (T, P)). With ``ordered``, a Viterbi pass allows the phase only to
    stay or move forward (at ``switch_cost`` nats per change), and labelled frames keep their label; if the
    human labels themselves go backwards, the order constraint is dropped.
    """
    pos = np.array(sorted(labelled), dtype=np.int64)
    lab = np.array([labelled[p] for p in pos], dtype=np.int64)
    top, idx = _knn_scores(embeddings, pos, k)
    weights = np.exp((top - top[:, :1]) / temperature)
    probs = np.full((len(embeddings), num_phases), 1e-3)
    for j in range(idx.shape[1]):
        np.add.at(probs, (np.arange(len(embeddings)), lab[idx[:, j]]), weights[:, j])
    probs /= probs.sum(1, keepdims=True)
    probs[pos] = np.eye(num_phases)[lab] * 0.999 + 0.001 / num_phases
    if not ordered or (np.diff(lab) < 0).any():
        return probs.argmax(1), probs
    emission = np.log(probs)
    T, P = emission.shape
    score = emission[0].copy()
    back = np.zeros((T, P), dtype=np.int64)
    for t in range(1, T):
        # best predecessor for phase p is the best of phases <= p (staying costs nothing, moving on costs)
        best_prev = np.maximum.accumulate(score - switch_cost)
        arg_prev = np.array([int(np.argmax(score[: p + 1] - switch_cost)) for p in range(P)])
        stay_better = score >= best_prev
        back[t] = np.where(stay_better, np.arange(P), arg_prev)
        score = np.where(stay_better, score, best_prev) + emission[t]
    labels = np.zeros(T, dtype=np.int64)
    labels[-1] = int(score.argmax())
    for t in range(T - 1, 0, -1):
        labels[t - 1] = back[t, labels[t]]
    return labels, probs


def propagate_cvs(
    embeddings: np.ndarray, labelled: dict[int, np.ndarray], k: int = 5, temperature: float = 0.05
) -> np.ndarray:
    """(T, 3) CVS probabilities: similarity-weighted mean of the k nearest labelled frames' values."""
    pos = np.array(sorted(labelled), dtype=np.int64)
    values = np.stack([np.asarray(labelled[p], dtype=np.float32) for p in pos])
    top, idx = _knn_scores(embeddings, pos, k)
    weights = np.exp((top - top[:, :1]) / temperature)
    weights /= weights.sum(1, keepdims=True)
    return (weights[..., None] * values[idx]).sum(1)
