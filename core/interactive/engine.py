"""Click/box-to-mask for one object at a time, on SurgeNetXL features computed once per frame.

The expensive part, the backbone pass, runs once per frame (:meth:`ClickSegmenter.embed`, kept in an LRU
cache bounded by bytes and keyed by the caller: a Label Studio task, a video frame); every click after that
only compares feature vectors and refines on the image, so a click costs tens of milliseconds on a CPU.

Work per click is bounded whatever the image: the backbone input is sized by ``core.model.target_size``
(its long side clamped), and the refinement runs on the frame scaled down to at most ``max_pixels`` (default
1920 x 1080, so video frames are refined at their own size) before the mask is scaled back to the image.

Two levels share the same input and output:

- **day one** (no training): each feature cell of the stride-8 grid is compared with the clicked cells
  (cosine similarity of the stride-8 + stride-16 features, with the cell's colour). A cell belongs to the
  object when it is closer to a positive click than to any negative click and than to the image's own split
  between similar and dissimilar cells (Otsu's threshold on the similarities); a box adds the cells outside
  it as negatives and keeps the object inside. Only the connected parts that hold a positive click (or the
  box's centre) are kept: a similar-looking tissue elsewhere in the frame is not the clicked object. The
  previous mask, when given, contributes its cells as weak examples of both sides.
- **learned**: a light click-conditioned head (:mod:`.click_head`) reads the backbone features, the click
  maps and the day-one probability, and is trained nightly from the store's human masks; it is served only
  once it needs fewer clicks than day one on validation.

Both grids are refined to full resolution the same way (:meth:`ClickSegmenter.refine`): a colour model of the
confident inside and outside decides the uncertain band along the boundary, a guided filter snaps the result
to image edges, and the clicks are enforced (a positive click's pixel is always in the mask, a negative
click's always out).

Memory per cached frame (:attr:`ImageEmbedding.nbytes`): 9 bytes per refined pixel (the frame, its grey guide
and colour bins) plus the features, 2.5-4.5 MB at a 256-pixel short side: 8 MB for an 854 x 480 frame, 22 MB
for 1920 x 1080, the most any frame costs with the default ``max_pixels`` (a 4000 x 4000 image: 20 MB). The
default budget, 256 MB, holds 32 frames of 854 x 480 or 11 of 1920 x 1080.
"""

from __future__ import annotations

import copy
import hashlib
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..backbone import SurgeNetBackbone
from ..embedding_cache import DEFAULT_CACHE_BYTES, ByteLRU, image_stages, resident_nbytes
from ..errors import FrameError
from ..propagation import guided_filter
from ..video import check_frame
from .prompts import Prompt, PromptError, click_maps

if TYPE_CHECKING:
    from .click_head import ClickHead

DAY_ONE = "day-one"
LEARNED = "learned"
CLICK_RADIUS_CELLS = 1.0  # click disks on the stride-8 grid (RITM uses 5 px disks at full resolution)
_COLOUR_BITS = 4  # 16 levels per channel -> 4,096 colour bins for the boundary's colour model
DEFAULT_WORK_PIXELS = 1920 * 1080  # frames up to this size are refined at their own resolution


@dataclass
class ImageEmbedding:
    """What the engine keeps per frame: the image, its backbone features and the derived per-cell vectors."""

    image: np.ndarray  # (h', w', 3) uint8 RGB at the working resolution (the frame, or scaled down)
    stride8: torch.Tensor  # (C8, h, w) float32
    stride16: torch.Tensor  # (C16, h16, w16) float32
    cells: torch.Tensor  # (h*w, d) float32, L2-normalised similarity features
    guide: np.ndarray  # (h', w') float32 grey image in [0, 1] (guided filter)
    colour_bins: np.ndarray  # (h', w') uint16 quantised colour (boundary colour model)
    centres: torch.Tensor  # (K, d) the frame's kinds of tissue: k-means centres of ``cells``
    original_size: tuple[int, int] | None = None  # the frame's (H, W) when ``image`` is scaled down

    @property
    def size(self) -> tuple[int, int]:
        """The frame's (H, W): prompts are in its pixels and masks come back at it."""
        if self.original_size is not None:
            return self.original_size
        return self.work_size

    @property
    def work_size(self) -> tuple[int, int]:
        """(h', w') the boundary is refined at."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    @property
    def nbytes(self) -> int:
        """Memory this embedding holds (what the engine's cache budget counts)."""
        return resident_nbytes(
            self.image, self.stride8, self.stride16, self.cells, self.guide, self.colour_bins, self.centres
        )

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.stride8.shape[1]), int(self.stride8.shape[2])


@dataclass
class MaskResult:
    """One object's mask after a click, at the image's size."""

    mask: np.ndarray  # (H, W) bool
    probability: np.ndarray  # (H, W) float32
    level: str  # DAY_ONE | LEARNED
    model_version: str
    seconds: float

    @property
    def score(self) -> float:
        """Mean confidence inside the mask (what Label Studio shows as the region's score)."""
        inside = self.probability[self.mask]
        return float(inside.mean()) if inside.size else 0.0


def _cell_features(stride8: torch.Tensor, stride16: torch.Tensor, image: np.ndarray) -> torch.Tensor:
    """(h*w, d) similarity vectors: normalised stride-8 and upsampled stride-16 features plus the cell's mean
    colour (CIE Lab), so that day one separates tissues by what the backbone sees and by colour."""
    _, h, w = stride8.shape
    s16 = F.interpolate(stride16[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    lab = cv2.cvtColor(cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2LAB)
    lab = torch.from_numpy(lab.astype(np.float32).transpose(2, 0, 1) / 255.0)
    colour = F.normalize(lab - lab.mean((1, 2), keepdim=True), dim=0)
    stacked = torch.cat([F.normalize(stride8, dim=0), F.normalize(s16, dim=0), colour], 0)
    return F.normalize(stacked.flatten(1).T, dim=1).contiguous()


def _kmeans(cells: torch.Tensor, k: int, iterations: int = 8) -> torch.Tensor:
    """(k, d) unit centres of the cells (farthest-point start, so it is deterministic and covers rare tissue
    such as a thin duct; a few Lloyd steps on cosine similarity)."""
    k = min(k, len(cells))
    chosen = [int(torch.argmin(cells @ cells.mean(0)))]
    nearest = cells @ cells[chosen[0]]
    for _ in range(k - 1):
        chosen.append(int(torch.argmin(nearest)))
        nearest = torch.maximum(nearest, cells @ cells[chosen[-1]])
    centres = cells[chosen].clone()
    for _ in range(iterations):
        assign = (cells @ centres.T).argmax(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, cells)
        filled = torch.bincount(assign, minlength=k) > 0
        centres[filled] = F.normalize(sums[filled], dim=1)
    return centres


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of a 1-D array (the split that best separates two groups of similarities)."""
    hist, edges = np.histogram(values, bins=64)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = hist.astype(np.float64)
    w0 = np.cumsum(weight)
    w1 = w0[-1] - w0
    m0 = np.cumsum(weight * centres) / np.maximum(w0, 1e-9)
    m1 = (np.sum(weight * centres) - np.cumsum(weight * centres)) / np.maximum(w1, 1e-9)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def _keep_seeded(mask: np.ndarray, seeds: list[tuple[int, int]]) -> np.ndarray:
    """The connected parts of ``mask`` that contain one of ``seeds`` ((row, col) pixels)."""
    if not seeds or not mask.any():
        return mask
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    keep = {int(labels[r, c]) for r, c in seeds if mask[r, c]}
    if not keep:
        return mask
    kept = np.zeros(count, bool)
    kept[sorted(keep)] = True
    return kept[labels]


class ClickSegmenter:
    """Click/box prompts to one object's mask, day one or with a learned click head.

    Thread-safe: the backend's request threads and napari's worker share one instance. Frames' features are
    kept in ``cache`` (an LRU of at most ``cache_bytes`` bytes, and at most ``cache_size`` frames when that is
    given; pass another engine's ``cache`` to share one budget). ``max_pixels``: frames larger than this are
    refined scaled down (see the module docstring)."""

    def __init__(
        self,
        backbone: SurgeNetBackbone,
        *,
        short_side: int = 256,
        cache_size: int | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        cache: ByteLRU[ImageEmbedding] | None = None,
        max_pixels: int = DEFAULT_WORK_PIXELS,
        head: ClickHead | None = None,
        head_version: str | None = None,
        temperature: float = 0.05,
        colour_weight: float = 3.0,
        guided_radius: int = 4,
        tissue_kinds: int = 12,
        kind_margin: float = 0.02,
        distance_cost: float = 0.5,  # tuned on the interactive bench's calibration videos (bench/README.md)
    ) -> None:
        self.backbone = backbone.eval()
        self.short_side = short_side
        self.max_pixels = int(max_pixels)
        self.temperature = temperature
        self.colour_weight = colour_weight
        self.guided_radius = guided_radius
        self.tissue_kinds = tissue_kinds
        self.kind_margin = kind_margin
        self.distance_cost = distance_cost
        if cache is None:
            cache = ByteLRU(cache_bytes, lambda emb: emb.nbytes, max_items=cache_size)
        self.cache: ByteLRU[ImageEmbedding] = cache
        self._head_lock = threading.Lock()
        self.head: ClickHead | None = None
        self.head_version: str | None = None
        self.use_head(head, head_version)

    # --- serving state ----------------------------------------------------------------------------------
    def use_head(self, head: ClickHead | None, version: str | None) -> None:
        """Serve ``head`` (``None``: back to day one). The nightly cycle's promoted head arrives here."""
        if head is not None and not version:
            raise ValueError("a learned click head needs its registry version")
        with self._head_lock:
            self.head = head.eval() if head is not None else None
            self.head_version = version if head is not None else None

    def with_head(self, head: ClickHead, version: str) -> ClickSegmenter:
        """An engine serving ``head`` on the same backbone, settings and feature cache (one memory budget
        for every project's engine; a frame's features do not depend on the head)."""
        twin = copy.copy(self)
        twin._head_lock = threading.Lock()
        twin.use_head(head, version)
        return twin

    @property
    def level(self) -> str:
        return LEARNED if self.head is not None else DAY_ONE

    @property
    def day_one_version(self) -> str:
        return f"clicks-day-one-{(self.backbone.weights_sha256 or 'unknown')[:8]}"

    @property
    def model_version(self) -> str:
        """What a mask made now is stamped with: the head's registry version, or day one on this backbone."""
        return self.head_version or self.day_one_version

    # --- features ---------------------------------------------------------------------------------------
    def embed(self, image: np.ndarray | ImageEmbedding, key: Hashable | None = None) -> ImageEmbedding:
        """The frame's features, from the cache when ``key`` (or the image's content) was seen before."""
        if isinstance(image, ImageEmbedding):
            return image
        check_frame(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise FrameError(
                f"click-to-mask needs an RGB frame (H, W, 3), got shape {image.shape}",
                "pass the frame as decoded (uint8 RGB)",
            )
        if key is None:
            digest = hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16).digest()
            key = ("content", image.shape, digest)
        hit = self.cache.get(key)
        if hit is not None and hit.size == image.shape[:2]:
            return hit
        emb = self.embedding_from_stages(image, *image_stages(self.backbone, image, self.short_side)[:2])
        return self.cache.put(key, emb)

    def work_size(self, height: int, width: int) -> tuple[int, int]:
        """(h', w') a ``height`` x ``width`` frame is refined at: itself, or scaled down to ``max_pixels``."""
        if height * width <= self.max_pixels:
            return height, width
        scale = (self.max_pixels / (height * width)) ** 0.5
        return max(1, int(height * scale)), max(1, int(width * scale))

    def embedding_from_stages(self, image: np.ndarray, stride8: Any, stride16: Any) -> ImageEmbedding:
        """An embedding from features computed elsewhere (e.g. a video's :class:`EmbeddingCache` entry)."""
        s8 = torch.as_tensor(np.asarray(stride8, dtype=np.float32))
        s16 = torch.as_tensor(np.asarray(stride16, dtype=np.float32))
        height, width = image.shape[:2]
        h, w = self.work_size(height, width)
        original = None
        if (h, w) != (height, width):
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
            original = (height, width)
        cells = _cell_features(s8, s16, image)
        if self.colour_weight != 1.0:
            cells = F.normalize(cells * self._colour_scale(cells.shape[1]), dim=1)
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
        q = (image >> (8 - _COLOUR_BITS)).astype(np.uint16)
        bins = (q[..., 0] << (2 * _COLOUR_BITS)) | (q[..., 1] << _COLOUR_BITS) | q[..., 2]
        centres = _kmeans(cells, self.tissue_kinds)
        return ImageEmbedding(image, s8, s16, cells, grey, bins, centres, original)

    def _colour_scale(self, dims: int) -> torch.Tensor:
        scale = torch.ones(dims)
        scale[-3:] = self.colour_weight
        return scale

    # --- segmentation -----------------------------------------------------------------------------------
    def segment(
        self,
        image: np.ndarray | ImageEmbedding,
        prompt: Prompt,
        *,
        key: Hashable | None = None,
        level: str | None = None,
    ) -> MaskResult:
        """The object's mask for ``prompt`` on ``image``. ``level``: ``None`` serves the best available
        (the learned head when one is set), ``"day-one"`` forces the training-free level."""
        started = time.perf_counter()
        height, width = (image.size if isinstance(image, ImageEmbedding) else image.shape[:2])
        prompt.validate(height, width)
        if level not in (None, DAY_ONE, LEARNED):
            raise PromptError(f"unknown level {level!r}", f"use {DAY_ONE!r} or {LEARNED!r}")
        emb = self.embed(image, key)
        with self._head_lock:
            head, version = self.head, self.head_version
        if level == LEARNED and head is None:
            raise PromptError("no learned click head is being served", "train one (nightly) or use day one")
        use_head = head is not None and level != DAY_ONE
        grid = self.learned_grid(emb, prompt, head) if use_head else self.day_one_grid(emb, prompt)
        mask, prob = self.refine(emb, grid, prompt)
        return MaskResult(
            mask,
            prob,
            LEARNED if use_head else DAY_ONE,
            version if use_head else self.day_one_version,
            time.perf_counter() - started,
        )

    def learned_grid(self, emb: ImageEmbedding, prompt: Prompt, head: ClickHead) -> np.ndarray:
        """(h, w) object probability on the stride-8 grid from ``head`` (the served one, or a head being
        trained or judged: training and the gate score exactly what serving would)."""
        s8, s16, maps = self.head_inputs(emb, prompt)
        with torch.inference_mode():
            return head.probability(s8, s16, maps)[0, 0].numpy()

    def head_inputs(
        self, emb: ImageEmbedding, prompt: Prompt
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The learned head's input, built the same way for training and serving: stride-8 and stride-16
        features (1, C, h, w) and nine maps on the stride-8 grid (positive disks, negative disks, box,
        previous mask, day-one probability, the newest click's correction window, each cell's mean RGB in
        [0, 1]; ``click_head.NUM_MAPS``)."""
        from .click_head import newest_click_window

        day_one = self.day_one_grid(emb, prompt)
        maps = click_maps(prompt, emb.grid, emb.size, CLICK_RADIUS_CELLS)
        h, w = emb.grid
        rgb = cv2.resize(emb.image, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        window = newest_click_window(prompt.clicks, emb.grid, emb.size)
        stacked = np.concatenate(
            [maps, day_one[None].astype(np.float32), window[None], rgb.transpose(2, 0, 1)], 0
        )
        return emb.stride8[None], emb.stride16[None], torch.from_numpy(stacked)[None]

    def _cell(self, emb: ImageEmbedding, row: float, col: float) -> int:
        (H, W), (h, w) = emb.size, emb.grid
        r = min(h - 1, int(row * h / H))
        c = min(w - 1, int(col * w / W))
        return r * w + c

    def day_one_grid(self, emb: ImageEmbedding, prompt: Prompt) -> np.ndarray:
        """(h, w) object probability on the stride-8 grid from feature similarity to the clicks.

        Each cell goes to its best match among the positive clicks, the negative clicks and the frame's
        other kinds of tissue. Matching a click costs a little per unit of distance from it, so two clicks
        on the same kind of tissue each claim their own surroundings (how a negative click removes a false
        part that looks like the object), while a distant part of the clicked tissue still beats every other
        kind."""
        (H, W), (h, w) = emb.size, emb.grid
        cells = emb.cells
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
        coords = torch.from_numpy(np.stack([yy.ravel(), xx.ravel()], 1))  # (hw, 2) cell centres
        diagonal = float(np.hypot(h, w))
        pos_idx = [self._cell(emb, c.row, c.col) for c in prompt.positives]
        neg_idx = [self._cell(emb, c.row, c.col) for c in prompt.negatives]
        inside_box = np.ones((h, w), bool)
        background: list[int] = []
        if prompt.box is not None:
            b = prompt.box
            rows_in = (yy >= b.top * h / H) & (yy < b.bottom * h / H)
            inside_box = rows_in & (xx >= b.left * w / W) & (xx < b.right * w / W)
            if not inside_box.any():  # a box thinner than a cell: its centre cell
                centre = self._cell(emb, (b.top + b.bottom) / 2, (b.left + b.right) / 2)
                inside_box[centre // w, centre % w] = True
            if not pos_idx:  # the box's central third stands for the object
                ys, xs = np.where(inside_box)
                r0, r1, c0, c1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
                dr, dc = (r1 - r0) // 3, (c1 - c0) // 3
                core = np.zeros_like(inside_box)
                core[r0 + dr : r1 - dr, c0 + dc : c1 - dc] = True
                pos_idx = list(np.flatnonzero(core & inside_box)) or [int(np.flatnonzero(inside_box)[0])]
            outside = np.flatnonzero(~inside_box)
            background = list(outside[np.linspace(0, len(outside) - 1, min(len(outside), 64)).astype(int)])
        if not pos_idx and prompt.previous_mask is not None:  # correcting an existing mask: it is the object
            prev = cv2.resize(prompt.previous_mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
            idx = np.flatnonzero(prev > 0.75)
            if len(idx):
                pos_idx = list(idx[np.linspace(0, len(idx) - 1, min(len(idx), 48)).astype(int)])
        if not pos_idx:
            return np.zeros((h, w), np.float32)

        def claim(idx: list[int]) -> torch.Tensor:
            """Best similarity to the clicked cells ``idx``, less the distance penalty."""
            sim = cells @ cells[idx].T
            dist = torch.cdist(coords, coords[idx]) / diagonal
            return (sim - self.distance_cost * dist).amax(1)

        protos = cells[pos_idx]
        score_pos = claim(pos_idx)
        # the frame's other kinds of tissue compete with the clicks: every k-means centre that is not the
        # clicked cells' own kind is a negative example (a further positive click claims its kind back)
        to_centres = protos @ emb.centres.T  # (P, K)
        others = torch.ones(len(emb.centres), dtype=torch.bool)
        others[to_centres.argmax(1)] = False
        others &= to_centres.amax(0) < to_centres.amax(1).min() - self.kind_margin
        if others.any():
            score_neg = (cells @ emb.centres[others].T).amax(1)
        else:
            score_neg = torch.full_like(score_pos, _otsu(score_pos.numpy()))
        if neg_idx:
            score_neg = torch.maximum(score_neg, claim(neg_idx))
        if background:
            score_neg = torch.maximum(score_neg, (cells @ cells[background].T).amax(1))
        prob = torch.sigmoid((score_pos - score_neg) / self.temperature).view(h, w).numpy().astype(np.float32)
        prob = np.where(inside_box, prob, np.minimum(prob, 0.05))
        flat = prob.reshape(-1)
        flat[neg_idx] = 0.0
        flat[[self._cell(emb, c.row, c.col) for c in prompt.positives]] = 1.0
        seeds = [(i // w, i % w) for i in pos_idx]
        keep = _keep_seeded(prob > 0.5, seeds)
        return np.where(keep | (prob <= 0.5), prob, 0.3).astype(np.float32)

    def refine(
        self, emb: ImageEmbedding, grid_prob: np.ndarray, prompt: Prompt
    ) -> tuple[np.ndarray, np.ndarray]:
        """Grid probability -> full-resolution (mask, probability): colour model in the boundary band, guided
        filter on the image (both at the working resolution), then at the frame's size the clicks enforced
        and only the clicked parts kept."""
        prob = self._boundary_probability(emb, grid_prob)
        H, W = emb.size
        if prob.shape != (H, W):
            prob = cv2.resize(prob, (W, H), interpolation=cv2.INTER_LINEAR)
        return enforce_prompt(prob, prompt)

    def _boundary_probability(self, emb: ImageEmbedding, grid_prob: np.ndarray) -> np.ndarray:
        """(h', w') object probability at the working resolution: the grid's, with the boundary band decided
        by a colour model and snapped to image edges by a guided filter."""
        H, W = emb.work_size
        up = cv2.resize(grid_prob.astype(np.float32), (W, H), interpolation=cv2.INTER_LINEAR)
        up = np.clip(up, 1e-4, 1 - 1e-4)
        logit = np.log(up / (1 - up))
        # the boundary band: within about one feature cell of the grid's 0.5 contour; inside it, a colour
        # model of the confident inside and outside decides (finer than the grid), elsewhere the grid does
        inside = (up > 0.5).astype(np.uint8)
        cell = max(3, round(1.5 * H / emb.grid[0]))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * cell + 1, 2 * cell + 1))
        band = (cv2.dilate(inside, kernel) > 0) & ~(cv2.erode(inside, kernel) > 0)
        sure_fg, sure_bg = (inside > 0) & ~band, (inside == 0) & ~band
        if band.any() and sure_fg.sum() > 16 and sure_bg.sum() > 16:
            bins = 1 << (3 * _COLOUR_BITS)
            fg = np.bincount(emb.colour_bins[sure_fg], minlength=bins).astype(np.float32) + 1.0
            bg = np.bincount(emb.colour_bins[sure_bg], minlength=bins).astype(np.float32) + 1.0
            llr = np.log(fg / fg.sum()) - np.log(bg / bg.sum())
            logit[band] += 0.5 * np.clip(llr[emb.colour_bins[band]], -6, 6)
        prob = up.copy()
        if band.any():  # away from the band nothing changed: filter only the band's bounding box (speed)
            rows, cols = np.nonzero(band.any(1))[0], np.nonzero(band.any(0))[0]
            m = 2 * self.guided_radius + 2
            r0, r1 = max(0, rows[0] - m), min(H, rows[-1] + 1 + m)
            c0, c1 = max(0, cols[0] - m), min(W, cols[-1] + 1 + m)
            crop = 1.0 / (1.0 + np.exp(-logit[r0:r1, c0:c1]))
            guide = emb.guide[r0:r1, c0:c1]
            prob[r0:r1, c0:c1] = guided_filter(guide, crop[None], radius=self.guided_radius, eps=1e-3)[0]
        return np.clip(prob, 0.0, 1.0).astype(np.float32)


def click_radius(height: int, width: int) -> int:
    """Radius in pixels of the disk a click is enforced on (positive in, negative out), the same for both
    signs and for every method the bench compares."""
    return max(2, round(min(height, width) / 160))


def enforce_prompt(prob: np.ndarray, prompt: Prompt) -> tuple[np.ndarray, np.ndarray]:
    """Clicks enforced on a frame-size probability (a positive click's disk in, a negative's out), only
    the parts holding a positive click (or the box's object, or the previous mask) kept, the box cut.
    ``prob`` is changed in place. One function for day one, the learned head and the bench's classical
    baselines, so every method obeys the same kept-parts rule with the same disks."""
    H, W = prob.shape
    radius = click_radius(H, W)
    click_layer = np.zeros((H, W), np.uint8)
    for c in prompt.clicks:
        cv2.circle(click_layer, (int(c.col), int(c.row)), radius, 1 if c.positive else 2, -1)
    prob[click_layer == 1] = 1.0
    prob[click_layer == 2] = 0.0
    mask = prob > 0.5
    seeds = [(int(c.row), int(c.col)) for c in prompt.positives]
    if not seeds and prompt.box is not None:
        b = prompt.box
        inside = mask[int(max(0, b.top)) : int(b.bottom), int(max(0, b.left)) : int(b.right)]
        if inside.any():
            rows, cols = np.nonzero(inside)
            mid = len(rows) // 2
            seeds = [(int(rows[mid] + max(0, b.top)), int(cols[mid] + max(0, b.left)))]
    if not seeds and prompt.previous_mask is not None:
        rows, cols = np.nonzero(prompt.previous_mask & mask)
        step = max(1, len(rows) // 64)
        seeds += list(zip(rows[::step].tolist(), cols[::step].tolist(), strict=True))
    mask = _keep_seeded(mask, seeds)
    if prompt.box is not None:  # nothing outside the box
        b = prompt.box
        top, left, bottom, right = int(max(0, b.top)), int(max(0, b.left)), int(b.bottom), int(b.right)
        mask[:top] = False
        mask[bottom:] = False
        mask[:, :left] = False
        mask[:, right:] = False
    # in place: a 4000 x 4000 frame's probability is 64 MB, and np.where would make three of them
    np.maximum(prob, 0.5, out=prob, where=mask)
    np.minimum(prob, 0.5, out=prob, where=~mask)
    return mask, prob
