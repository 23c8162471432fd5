"""Training, evaluating and gating the learned click head (the *learned* level of the click engine).

Data: the store's human segmentation masks. One object is one connected part of one class in one labelled
frame, as a binary mask (``core.interactive.objects.click_objects``: the same definition the gate and the
bench score, so training learns the task that is judged). Train and validation objects come from the
project's **train** and **val** videos (the split rule of ``datasets.assign_splits``),
so the gate never sees a frame of a video the head trained on; test and final videos are not read.

Training (RITM's recipe, ``docs/interactive.md``): the backbone is frozen, each frame is embedded once
(``ClickSegmenter.embed``) and kept; per object and step, a first click at a random point deep inside the
object (the empty prediction's error), then 0..3 more clicks, each added by a no-grad pass of the head at
the current error with that mask fed back as the previous mask; the loss (normalised focal loss, RITM's) is
taken on the last pass, on the stride-8 grid, against the area-averaged object mask. Inputs are built by
``ClickSegmenter.head_inputs`` and masks by ``ClickSegmenter.refine``, exactly as serving builds them.

Gate (:func:`judge_click_head`): the standard simulated annotator (``core.interactive.clicker``) on the
validation objects for the candidate, the day-one level and the current interactive champion; the candidate
is promoted only when it needs fewer clicks than day one under the bench's pre-registered rule (the 95 %
bootstrap interval over validation videos of the NoC@90 ratio lies below 1) and no more than the champion.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from surgenet_assist.core.backbone import SurgeNetBackbone, load_backbone
from surgenet_assist.core.bundle import load_bundle
from surgenet_assist.core.errors import SurgenetAssistError
from surgenet_assist.core.interactive import DAY_ONE, ClickSegmenter, ClickSession, ImageEmbedding, simulate
from surgenet_assist.core.interactive.click_head import ClickHead, load_click_head, save_click_head
from surgenet_assist.core.interactive.clicker import (
    BOOTSTRAP_RESAMPLES,
    MAX_CLICKS,
    error_depth,
    noc_ratio,
    summarize,
)
from surgenet_assist.core.interactive.objects import MIN_OBJECT_FRACTION, click_objects
from surgenet_assist.core.interactive.prompts import Click, Prompt
from surgenet_assist.core.interactive.serving import click_champion_row
from surgenet_assist.core.store import (
    CANDIDATE,
    CHAMPION,
    INTERACTIVE_TASK,
    REJECTED,
    RUN_FINISHED,
    LabelStore,
)
from surgenet_assist.core.video import open_video

from .datasets import assign_splits, manifest_hash
from .registry import INSUFFICIENT, MIN_TEST_VIDEOS, code_version, registry_root

log = logging.getLogger("surgenet_assist.click_training")

CLICK_PREFIX = "clicks-"


@dataclass
class ClickTrainConfig:
    """How a click head is trained and judged (``NightlyConfig.click``; YAML ``click: {epochs: ...}``)."""

    epochs: int = 10
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 1e-4
    hidden: int = 64
    max_extra_clicks: int = 3  # RITM: 0..3 no-grad passes with the previous mask fed back
    # RITM's multi-point sampler: 1..3 random positive and min..3 random negative clicks open each prompt
    max_initial_clicks: int = 3
    min_negative_clicks: int = 1
    l1_weight: float = 0.01  # L1 on the (windowed) correction: stay day one unless the labels say otherwise
    # early stopping on held-out *training* videos (never the gate's val videos): the last quarter of the
    # train videos, scored by NoC@90 with at most ``heldout_max_clicks`` clicks; step 0 (day one) competes
    heldout_fraction: float = 0.25
    heldout_max_clicks: int = 10
    max_heldout_objects: int = 30
    seeds: tuple[int, ...] = (0, 1, 2)  # one head per seed; the best on the held-out videos is kept
    focal_gamma: float = 2.0
    # frames are embedded once and kept in memory (~6 MB each at 240x426): these bound the memory and time
    max_train_frames: int = 120
    max_val_frames: int = 40
    max_train_objects: int = 600
    max_val_objects: int = 80
    eval_max_clicks: int = MAX_CLICKS
    # fewer validation videos: "insufficient evidence", the serving head stays (the whole-frame gate's rule)
    min_val_videos: int = MIN_TEST_VIDEOS
    short_side: int = 256  # the engine's default input size
    seed: int = 0
    # torch threads while training and evaluating (not while embedding): the head's convolutions are tiny,
    # so fanning each out costs more than it saves, and under CPU contention 1 thread measured 11x faster
    threads: int | None = 1


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the block, the previous count restored after (``None``: unchanged)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- objects ---------------------------------------------------------------------------------------------
@dataclass
class ClickObject:
    """One object of one embedded frame: what training and the gate iterate over."""

    emb: ImageEmbedding
    mask: np.ndarray  # (H, W) bool, at the embedding's image size
    video: str = ""
    class_id: int = -1
    _target: torch.Tensor | None = field(default=None, repr=False)

    def target(self) -> torch.Tensor:
        """(1, 1, h, w) object fraction of each stride-8 cell (the loss's soft target)."""
        if self._target is None:
            h, w = self.emb.grid
            grid = cv2.resize(self.mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
            self._target = torch.from_numpy(grid)[None, None]
        return self._target


def _objects_of_samples(
    samples: Sequence[tuple[np.ndarray | ImageEmbedding, np.ndarray]],
    segmenter: ClickSegmenter,
    cfg: ClickTrainConfig,
    videos: Sequence[str] | None = None,
    progress: bool = False,
) -> list[ClickObject]:
    """Embed each distinct image once and cut its mask into objects: a bool mask is one object, a class-id
    mask gives one object per connected class part (``core.interactive.objects.click_objects``, the
    definition the gate and the bench use too)."""
    from tqdm.auto import tqdm

    embedded: dict[int, ImageEmbedding] = {}
    out: list[ClickObject] = []
    for i, (image, mask) in enumerate(tqdm(samples, desc="embedding frames", disable=not progress)):
        emb = embedded.get(id(image))
        if emb is None:
            emb = embedded[id(image)] = segmenter.embed(image)
        mask = np.asarray(mask)
        if mask.shape != emb.size:
            raise ValueError(f"mask {mask.shape} does not match its image {emb.size}")
        video = videos[i] if videos is not None else ""
        if mask.dtype == bool:
            if mask.any():
                out.append(ClickObject(emb, mask, video))
            continue
        for class_id, obj in click_objects(mask):
            out.append(ClickObject(emb, obj, video, class_id))
    return out


def _subsample(items: list[Any], limit: int | None) -> list[Any]:
    """At most ``limit`` items, evenly spread (deterministic: the same labels give the same subset)."""
    if limit is None or len(items) <= limit:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


# --- simulated clicks for training -------------------------------------------------------------------------
def training_click(
    gt: np.ndarray, pred: np.ndarray, clicked: np.ndarray, rng: np.random.Generator
) -> Click | None:
    """RITM's training click (``get_next_points``): in the larger error region (missed object: positive,
    false object: negative), a random pixel deeper than half the region's maximal depth. Random rather than
    the evaluation's deepest pixel, so the head does not learn one click position per object."""
    fn_depth, fp_depth = error_depth(gt & ~pred), error_depth(~gt & pred)
    fn_depth[clicked] = 0
    fp_depth[clicked] = 0
    positive = fn_depth.max() > fp_depth.max()
    depth = fn_depth if positive else fp_depth
    top = depth.max()
    if top <= 0:
        return None
    rows, cols = np.nonzero(depth > top / 2) if top > 1 else np.nonzero(depth == top)
    pick = int(rng.integers(len(rows)))
    return Click(float(rows[pick]), float(cols[pick]), bool(positive))


def _mark(clicked: np.ndarray, click: Click) -> None:
    r, c = int(click.row), int(click.col)
    clicked[max(0, r - 2) : r + 3, max(0, c - 2) : c + 3] = True


def learned_mask(
    segmenter: ClickSegmenter, head: ClickHead, emb: ImageEmbedding, prompt: Prompt
) -> np.ndarray:
    """The mask ``head`` gives for ``prompt``: what ``segmenter.segment(level="learned")`` serves with that
    head (same inputs, same refinement), without swapping the segmenter's served head."""
    return segmenter.refine(emb, segmenter.learned_grid(emb, prompt, head), prompt)[0]


def initial_clicks(
    gt: np.ndarray, rng: np.random.Generator, max_clicks: int = 3, min_negative: int = 1
) -> tuple[Click, ...]:
    """RITM's multi-point sampler, simplified: 1..``max_clicks`` positive clicks at random pixels deeper than
    half the object's maximal depth, then ``min_negative``..``max_clicks`` negative clicks at random
    background pixels within a band around the object (the confusable surroundings an annotator rejects),
    anywhere in the background when the band is empty. The head thus learns prompts that already hold
    negatives, not only the bench's opening single positive."""
    inside = error_depth(gt)
    top = inside.max()
    if top <= 0:
        return ()
    rows, cols = np.nonzero(inside > top / 2) if top > 1 else np.nonzero(inside == top)
    clicks = []
    for i in rng.choice(len(rows), size=min(len(rows), int(rng.integers(1, max_clicks + 1))), replace=False):
        clicks.append(Click(float(rows[i]), float(cols[i]), True))
    band = max(3, int(0.1 * max(gt.shape)))
    to_object = cv2.distanceTransform((~gt).astype(np.uint8), cv2.DIST_L2, 5)  # distance to the object
    candidates = (to_object > 2) & (to_object <= band)
    if not candidates.any():
        candidates = to_object > 0
    rows, cols = np.nonzero(candidates)
    n_neg = int(rng.integers(min_negative, max_clicks + 1)) if len(rows) else 0
    for i in rng.choice(len(rows), size=min(len(rows), n_neg), replace=False):
        clicks.append(Click(float(rows[i]), float(cols[i]), False))
    return tuple(clicks)


def _training_prompt(
    head: ClickHead,
    segmenter: ClickSegmenter,
    obj: ClickObject,
    rng: np.random.Generator,
    extra: int,
    cfg: ClickTrainConfig,
) -> Prompt | None:
    """Random initial clicks, then ``extra`` iterative clicks, each at the error of the mask the head
    currently serves for the prompt so far (that mask fed back as the previous mask, as the bench does)."""
    gt = obj.mask
    clicks = initial_clicks(gt, rng, cfg.max_initial_clicks, cfg.min_negative_clicks)
    if not clicks:
        return None
    clicked = np.zeros_like(gt)
    for click in clicks:
        _mark(clicked, click)
    prompt = Prompt(clicks)
    for _ in range(extra):  # RITM's iterative training: the head's own mistakes decide the next click
        pred = learned_mask(segmenter, head, obj.emb, prompt)
        click = training_click(gt, pred, clicked, rng)
        if click is None:
            break
        _mark(clicked, click)
        prompt = Prompt(prompt.clicks + (click,), None, pred)
    return prompt


def normalized_focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """RITM's normalised focal loss: BCE weighted by (1 - p_t)^gamma, the weights rescaled (without
    gradient) to average 1, so the wrong cells along the boundary and in missed parts dominate while the loss
    keeps BCE's scale. Soft targets (cell fractions) are fine: p_t = p t + (1 - p)(1 - t)."""
    p = torch.sigmoid(logits)
    pt = p * target + (1 - p) * (1 - target)
    beta = (1 - pt).pow(gamma)
    beta = (beta * (beta.numel() / (beta.sum() + 1e-8))).detach()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (beta * bce).mean()


@dataclass
class ClickFit:
    """A trained head and how training went (per epoch: the optimised loss and plain BCE, both means)."""

    head: ClickHead
    losses: list[float] = field(default_factory=list)
    bce: list[float] = field(default_factory=list)
    steps: int = 0
    objects: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    seed: int = 0
    # early stopping: held-out NoC@90 after each epoch, index 0 = step 0 (the day-one level); best_epoch is
    # the index kept (0: training never beat day one on the held-out videos, the returned head is day one)
    heldout_noc: list[float] = field(default_factory=list)
    best_epoch: int | None = None


def split_by_video(
    objects: Sequence[ClickObject], fraction: float
) -> tuple[list[ClickObject], list[ClickObject]]:
    """(train, held-out): the last ``ceil(fraction * videos)`` videos (sorted by name) held out whole, so
    early stopping never scores a frame of a video the head trains on. Fewer than two videos: no held-out
    part (training then runs its full length, and says so through ``best_epoch is None``)."""
    names = sorted({o.video for o in objects})
    if len(names) < 2 or fraction <= 0:
        return list(objects), []
    held = set(names[len(names) - max(1, int(np.ceil(fraction * len(names)))) :])
    return [o for o in objects if o.video not in held], [o for o in objects if o.video in held]


def heldout_noc(objects: Sequence[ClickObject], segmenter: ClickSegmenter, head: ClickHead,
                cfg: ClickTrainConfig) -> float:
    """Mean NoC@90 of ``head`` on the held-out objects, at most ``cfg.heldout_max_clicks`` clicks each."""
    sessions = evaluate_click_levels(objects, segmenter, {"h": head}, max_clicks=cfg.heldout_max_clicks)["h"]
    return float(summarize(sessions, cfg.heldout_max_clicks)["noc90"])


def fit_click_head(
    objects: Sequence[ClickObject],
    segmenter: ClickSegmenter,
    cfg: ClickTrainConfig | None = None,
    *,
    heldout: Sequence[ClickObject] = (),
    head: ClickHead | None = None,
    deadline: float | None = None,
    progress: bool = False,
) -> ClickFit:
    """Train a click head on embedded objects (a fresh one, or continue ``head``) with ``cfg.seed``;
    ``deadline`` (a ``time.time()``) ends training early, after the current step. With ``heldout`` objects
    the head is scored after every epoch and the best epoch's weights are returned, step 0 (zero
    correction: exactly day one) included, so training that does not help on unseen videos returns day
    one rather than an overfitted head."""
    cfg = cfg or ClickTrainConfig()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if not objects:
        raise SurgenetAssistError(
            "no objects to train the click head on",
            "label segmentation masks on train-split frames (objects are connected class parts of at least "
            f"{MIN_OBJECT_FRACTION:.0%} of the frame)",
        )
    c8, c16 = int(objects[0].emb.stride8.shape[0]), int(objects[0].emb.stride16.shape[0])
    head = head if head is not None else ClickHead(c8, c16, cfg.hidden)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = -(-len(objects) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=max(1, cfg.epochs * per_epoch), pct_start=0.1
    )
    fit = ClickFit(head, objects=len(objects), seed=cfg.seed)
    started = time.time()
    from tqdm.auto import tqdm

    heldout = _subsample(list(heldout), cfg.max_heldout_objects)
    bar = tqdm(total=cfg.epochs * per_epoch, desc=f"click head (seed {cfg.seed})", disable=not progress)
    with _torch_threads(cfg.threads):
        best_state = None
        if heldout:
            head.eval()
            step0 = copy.deepcopy(head).zero_correction()
            fit.heldout_noc.append(heldout_noc(heldout, segmenter, step0, cfg))
            best_state, fit.best_epoch = step0.state_dict(), 0
        for epoch in range(1, cfg.epochs + 1):
            head.train()
            _epoch(fit, objects, segmenter, cfg, opt, sched, rng, deadline, bar)
            head.eval()
            if heldout:
                fit.heldout_noc.append(heldout_noc(heldout, segmenter, head, cfg))
                if fit.heldout_noc[-1] < min(fit.heldout_noc[:-1]):  # ties keep the earlier (simpler) one
                    best_state, fit.best_epoch = copy.deepcopy(head.state_dict()), epoch
            if fit.stopped_early:
                break
        if best_state is not None:
            head.load_state_dict(best_state)
    bar.close()
    head.eval()
    fit.seconds = round(time.time() - started, 2)
    return fit


def fit_click_head_seeds(
    objects: Sequence[ClickObject],
    segmenter: ClickSegmenter,
    cfg: ClickTrainConfig | None = None,
    *,
    deadline: float | None = None,
    progress: bool = False,
) -> tuple[ClickFit, list[ClickFit]]:
    """One early-stopped head per ``cfg.seeds`` on the objects' train videos (held out by
    :func:`split_by_video`); returns the fit with the lowest held-out NoC@90 (ties: the first seed) and all
    fits, so a report can show every seed's held-out NoC."""
    cfg = cfg or ClickTrainConfig()
    train, heldout = split_by_video(objects, cfg.heldout_fraction)
    fits = [
        fit_click_head(train, segmenter, dataclasses.replace(cfg, seed=seed), heldout=heldout,
                       deadline=deadline, progress=progress)
        for seed in cfg.seeds
    ]
    best = min(fits, key=lambda f: min(f.heldout_noc) if f.heldout_noc else 0.0)
    return best, fits


def _epoch(
    fit: ClickFit,
    objects: Sequence[ClickObject],
    segmenter: ClickSegmenter,
    cfg: ClickTrainConfig,
    opt: torch.optim.Optimizer,
    sched: Any,
    rng: np.random.Generator,
    deadline: float | None,
    bar: Any,
) -> None:
    """One pass over the objects in random order. The loss is on the head's stride-8 logits: what serving
    refines (``ClickSegmenter.refine``: guided filter, colour boundary, prompt enforcement) is not
    differentiable, so the grid the refinement starts from is trained, against the area-averaged mask."""
    head = fit.head
    order = rng.permutation(len(objects))
    losses, bces = [], []
    for start in range(0, len(order), cfg.batch_size):
        if deadline is not None and time.time() > deadline:
            fit.stopped_early = True
            break
        batch = order[start : start + cfg.batch_size]
        opt.zero_grad()
        for i in batch:
            obj = objects[int(i)]
            extra = int(rng.integers(0, cfg.max_extra_clicks + 1))
            head.eval()  # the clicks come from the head as it serves (GroupNorm only, so no state changes)
            prompt = _training_prompt(head, segmenter, obj, rng, extra, cfg)
            head.train()
            if prompt is None:
                continue
            base, correction = head.parts(*segmenter.head_inputs(obj.emb, prompt))
            logits = base + correction
            target = obj.target()
            loss = normalized_focal_loss(logits, target, cfg.focal_gamma)
            loss = loss + cfg.l1_weight * correction.abs().mean()
            (loss / len(batch)).backward()
            losses.append(float(loss.detach()))
            bces.append(float(F.binary_cross_entropy_with_logits(logits.detach(), target)))
        opt.step()
        sched.step()
        fit.steps += 1
        bar.update(1)
    if losses:
        fit.losses.append(float(np.mean(losses)))
        fit.bce.append(float(np.mean(bces)))


def train_click_head_on(
    samples: Sequence[tuple[np.ndarray | ImageEmbedding, np.ndarray]],
    segmenter: ClickSegmenter,
    *,
    videos: Sequence[str] | None = None,
    epochs: int | None = None,
    config: ClickTrainConfig | None = None,
    deadline: float | None = None,
    progress: bool = False,
) -> tuple[ClickFit, list[ClickFit]]:
    """Click heads trained on labelled frames without a store (the bench's entry point; the nightly path
    runs the same :func:`fit_click_head_seeds`): the best fit on the held-out videos and every seed's fit.
    ``samples``: (RGB uint8 frame or its embedding, mask) pairs; a bool mask is one object, a class-id mask
    one object per connected class part. ``videos`` names each sample's video (the held-out split is by
    video; without it there is no early stopping). Each frame is embedded once with ``segmenter`` (so its
    backbone and short side are the ones the head will serve on)."""
    cfg = config or ClickTrainConfig()
    if epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=epochs)
    objects = _objects_of_samples(samples, segmenter, cfg, videos=videos, progress=progress)
    return fit_click_head_seeds(objects, segmenter, cfg, deadline=deadline, progress=progress)


# --- evaluation and gate -----------------------------------------------------------------------------------
def evaluate_click_levels(
    objects: Sequence[ClickObject],
    segmenter: ClickSegmenter,
    heads: dict[str, ClickHead | None],
    *,
    max_clicks: int = MAX_CLICKS,
    stop_at: float | None = 0.90,
) -> dict[str, list[ClickSession]]:
    """The simulated annotator (RITM protocol) on every object for each named level: ``None`` is the day-one
    level, a head its learned level. ``stop_at`` 0.90 ends a session once NoC@90 is known, but never before
    5 clicks, so NoC@85/90 and IoU@1/3/5 are all exact (the bench's rule)."""
    out: dict[str, list[ClickSession]] = {}
    for name, head in heads.items():
        sessions = []
        for obj in objects:
            if head is None:

                def segment(p: Prompt, o: ClickObject = obj) -> np.ndarray:
                    return segmenter.segment(o.emb, p, level=DAY_ONE).mask

            else:

                def segment(p: Prompt, o: ClickObject = obj, h: ClickHead = head) -> np.ndarray:
                    return learned_mask(segmenter, h, o.emb, p)

            at_least = min(5, max_clicks)
            sessions.append(simulate(segment, obj.mask, max_clicks, stop_at, min_clicks=at_least))
        out[name] = sessions
    return out


@dataclass
class ClickGate:
    """The promotion decision of a click head on the validation objects (and why)."""

    promote: bool
    reasons: list[str]
    candidate: dict[str, float]
    day_one: dict[str, float]
    champion: dict[str, float] | None = None
    # NoC@t(candidate) / NoC@t(day one), t = 0.90: (ratio, 95 % low, 95 % high), bootstrap over val videos
    noc_ratio: tuple[float, float, float] | None = None
    objects: int = 0
    videos: int = 0
    verdict: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "promote": self.promote,
            "reasons": self.reasons,
            "candidate": self.candidate,
            "day_one": self.day_one,
            "champion": self.champion,
            "noc_ratio": list(self.noc_ratio) if self.noc_ratio else None,
            "test": "bootstrap over validation videos of the NoC@90 ratio (bench/README.md rule)",
            "objects": self.objects,
            "videos": self.videos,
            "verdict": self.verdict or ("promoted" if self.promote else "rejected"),
        }


def judge_click_head(
    candidate: Sequence[ClickSession],
    day_one: Sequence[ClickSession],
    champion: Sequence[ClickSession] | None = None,
    *,
    videos: Sequence[str] | None = None,
    max_clicks: int = MAX_CLICKS,
    min_val_videos: int = MIN_TEST_VIDEOS,
    resamples: int = BOOTSTRAP_RESAMPLES,
    threshold: float = 0.90,
) -> ClickGate:
    """Promote only under the bench's pre-registered rule (``bench/README.md``, "Interactive segmentation,
    NoC"), so the nightly gate and the published comparison are one decision: the 95 % bootstrap interval
    of NoC@90(candidate) / NoC@90(day one) lies below 1.0, resampling validation **videos** with their
    objects kept together (:func:`~surgenet_assist.core.interactive.clicker.noc_ratio`; objects of one video
    are not independent). Also required: NoC@85 and NoC@90 below day one's, no more clicks than the current
    champion (sessions on the same objects) at either threshold, and at least ``min_val_videos`` videos
    (fewer: insufficient evidence, what serves stays). ``videos`` names each object's video; without it
    every object counts as its own video (only right for independent objects). Without validation objects
    nothing is promoted. ``threshold``: the IoU of the ratio's NoC (0.90 registered; lower only where the
    frames are too small for any method to reach 0.90, as in tests)."""
    cand, base = summarize(candidate, max_clicks), summarize(day_one, max_clicks)
    champ = summarize(champion, max_clicks) if champion is not None else None
    if not candidate or len(candidate) != len(day_one):
        why = ["no validation objects (label masks on a val-split video)"]
        return ClickGate(False, why, cand, base, champ)
    names = list(videos) if videos is not None else [str(i) for i in range(len(candidate))]
    unit = "validation videos" if videos is not None else "validation objects"
    units = len(set(names))
    if units < min_val_videos:
        why = [
            f"insufficient evidence: {units} {unit}, at least {min_val_videos} are needed for an interval "
            "that no single video decides; what serves now stays"
        ]
        return ClickGate(False, why, cand, base, champ, None, len(candidate), units, INSUFFICIENT)
    reasons: list[str] = []
    for t in ("noc85", "noc90"):
        if not cand[t] < base[t]:
            reasons.append(f"{t} {cand[t]:.2f} is not below day one's {base[t]:.2f}")
    ratio = noc_ratio(
        candidate, day_one, names, threshold=threshold, max_clicks=max_clicks, resamples=resamples
    )
    text = (
        f"NoC@{threshold * 100:.0f} ratio vs day one {ratio[0]:.3f} "
        f"(95% CI {ratio[1]:.3f}..{ratio[2]:.3f} over {units} {unit})"
    )
    if not ratio[2] < 1.0:
        reasons.append(f"{text}: the interval does not lie below 1.0")
    if champ:
        for t in ("noc85", "noc90"):
            if cand[t] > champ[t]:
                reasons.append(f"{t} {cand[t]:.2f} is worse than the champion's {champ[t]:.2f}")
    if reasons:
        return ClickGate(False, reasons, cand, base, champ, ratio, len(candidate), units, "rejected")
    champ_note = "; no interactive champion yet" if champ is None else "; not worse than the champion"
    return ClickGate(True, [text + champ_note], cand, base, champ, ratio, len(candidate), units, "promoted")


# --- the store path ----------------------------------------------------------------------------------------
def click_backbone(
    store: LabelStore, project: str | None = None, *, name: str | None = None, random_init: bool = False
) -> SurgeNetBackbone:
    """The backbone a project's click engine should see: the serving champion's (so the head reads the
    features the whole-frame model is served on), else the configured zoo backbone."""
    champ = store.serving_champion(project)
    if champ is not None:
        model, _ = load_bundle(champ["bundle_path"], allow_download=not random_init)
        return model.backbone.eval()
    kwargs = {"name": name} if name else {}
    return load_backbone(**kwargs, random_init=random_init, allow_download=not random_init)


@dataclass
class ClickRecords:
    """The human masks a click head trains and is judged on (read, not yet decoded): per split the label
    records (evenly subsampled to the frame caps) and the manifest that identifies them."""

    videos: dict[int, dict[str, Any]]
    records: dict[str, list[Any]]  # "train" / "val" -> LabelRecord list
    manifest: list[dict[str, Any]]

    @property
    def manifest_hash(self) -> str:
        return manifest_hash(self.manifest)


def click_records(
    store: LabelStore,
    cfg: ClickTrainConfig,
    *,
    project: str | None = None,
    split_fractions: tuple[float, ...] | None = None,
) -> ClickRecords:
    """Assign splits to new videos (the project's rule) and pick the train / val masks, without decoding a
    frame: enough to tell whether anything changed since the last click head."""
    if split_fractions is not None:
        assign_splits(store, split_fractions, project)
    else:
        assign_splits(store, project=project)
    videos = {v["id"]: v for v in store.videos(project)}
    labels = store.training_labels("segmentation", project=project)
    records: dict[str, list[Any]] = {}
    manifest: list[dict[str, Any]] = []
    for split, cap in (("train", cfg.max_train_frames), ("val", cfg.max_val_frames)):
        ids = {v for v, info in videos.items() if info["split"] == split}
        recs = sorted((r for r in labels if r.video_id in ids), key=lambda r: (r.video_id, r.frame_start))
        records[split] = _subsample(recs, cap)
        manifest += [
            {
                "video": videos[r.video_id].get("content_hash") or r.video_path,
                "frame": r.frame_start,
                "annotation": r.annotation_id,
                "revision": r.revision_id,
                "split": split,
            }
            for r in records[split]
        ]
    return ClickRecords(videos, records, manifest)


def _embed_records(
    recs: list[Any],
    videos: dict[int, dict[str, Any]],
    segmenter: ClickSegmenter,
    cfg: ClickTrainConfig,
    *,
    size: tuple[int, int] | None,
    max_objects: int,
    progress: bool,
) -> list[ClickObject]:
    """Decode the records' frames, embed each once and cut their masks into objects (at most
    ``max_objects``, evenly spread)."""
    by_video: dict[int, list[Any]] = defaultdict(list)
    for r in recs:
        by_video[r.video_id].append(r)
    samples: list[tuple[np.ndarray, np.ndarray]] = []
    names: list[str] = []
    for vid in sorted(by_video):
        info = videos[vid]
        with open_video(info["path"], fps=info.get("fps")) as source:
            for r in by_video[vid]:
                image = source.read_frame(r.frame_start)
                mask = np.asarray(r.payload["mask"])
                h0, w0 = image.shape[:2]
                if mask.shape != (h0, w0):
                    mask = cv2.resize(mask, (w0, h0), interpolation=cv2.INTER_NEAREST)
                if size is not None and (h0, w0) != tuple(size):
                    image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
                    mask = cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
                samples.append((np.ascontiguousarray(image), mask))
                names.append(str(info.get("content_hash") or info["path"]))
    objects = _objects_of_samples(samples, segmenter, cfg, videos=names, progress=progress)
    return _subsample(objects, max_objects)


def _config_digest(cfg: ClickTrainConfig, size: tuple[int, int] | None) -> str:
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "threads"}  # speed, not result
    blob = repr((settings, size)).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _override(cfg: ClickTrainConfig | None, epochs: int | None, max_objects: int | None) -> ClickTrainConfig:
    cfg = cfg or ClickTrainConfig()
    if epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=epochs)
    if max_objects is not None:
        cfg = dataclasses.replace(cfg, max_train_objects=max_objects)
    return cfg


def train_click_head(
    store: LabelStore,
    backbone: SurgeNetBackbone,
    *,
    project: str | None = None,
    config: ClickTrainConfig | None = None,
    epochs: int | None = None,
    max_objects: int | None = None,
    size: tuple[int, int] | None = None,
    split_fractions: tuple[float, ...] | None = None,
    deadline: float | None = None,
    progress: bool = False,
    records: ClickRecords | None = None,
) -> dict[str, Any]:
    """Train a click head on the project's train-split masks and score it, the day-one level and the current
    interactive champion (when trained on this backbone) on the val-split objects.

    Returns ``head``, ``fit`` (:class:`ClickFit`), ``sessions`` (level -> list of sessions), ``val`` (level ->
    NoC@85/90, NoF@90, IoU@1/3/5), ``counts``, ``manifest_hash``, ``backbone_sha256``, ``champion`` (its
    version or None) and ``config``. ``epochs`` / ``max_objects`` override the config (``max_objects`` caps
    training objects). ``size`` (h, w) resizes frames and masks first (the nightly cycle's ``frame_size``).
    ``records``: :func:`click_records`' answer when the caller already has it."""
    cfg = _override(config, epochs, max_objects)
    if records is None:
        records = click_records(store, cfg, project=project, split_fractions=split_fractions)
    segmenter = ClickSegmenter(backbone, short_side=cfg.short_side, cache_size=1)
    sha = backbone.weights_sha256 or "unknown"
    objects: dict[str, list[ClickObject]] = {}
    for split, cap in (("train", cfg.max_train_objects), ("val", cfg.max_val_objects)):
        if records.records["train"] and records.records["val"]:  # else: say so before decoding a frame
            objects[split] = _embed_records(
                records.records[split], records.videos, segmenter, cfg, size=size, max_objects=cap,
                progress=progress,
            )
        if not objects.get(split):
            purpose = "train" if split == "train" else "judge"
            raise SurgenetAssistError(
                f"no objects in the {split} split to {purpose} a click head on",
                f"label segmentation masks on frames of a {split}-split video (objects are connected class "
                f"parts of at least {MIN_OBJECT_FRACTION:.0%} of the frame)",
            )
    train, val = objects["train"], objects["val"]
    fit, fits = fit_click_head_seeds(train, segmenter, cfg, deadline=deadline, progress=progress)
    heads: dict[str, ClickHead | None] = {"learned": fit.head, "day_one": None}
    champ_row = click_champion_row(store, project)
    champ_version = None
    if champ_row is not None and (champ_row.get("metrics") or {}).get("backbone_sha256") == sha:
        try:
            heads["champion"], _ = load_click_head(champ_row["bundle_path"])
            champ_version = champ_row["version"]
        except SurgenetAssistError as exc:  # an unreadable champion is judged as absent, and said so
            log.warning("interactive champion %s cannot be loaded: %s", champ_row["version"], exc)
    with _torch_threads(cfg.threads):
        sessions = evaluate_click_levels(val, segmenter, heads, max_clicks=cfg.eval_max_clicks)
    return {
        "head": fit.head,
        "fit": fit,
        "seed_fits": [
            {"seed": f.seed, "heldout_noc90": f.heldout_noc, "best_epoch": f.best_epoch} for f in fits
        ],
        "sessions": sessions,
        "val_videos": [o.video for o in val],
        "val": {name: summarize(s, cfg.eval_max_clicks) for name, s in sessions.items()},
        "counts": {
            "train_frames": len(records.records["train"]),
            "train_objects": len(train),
            "val_frames": len(records.records["val"]),
            "val_objects": len(val),
        },
        "manifest_hash": records.manifest_hash,
        "config_digest": _config_digest(cfg, size),
        "backbone_sha256": sha,
        "champion": champ_version,
        "config": cfg,
        "size": list(size) if size else None,
    }


def new_click_version() -> str:
    from .registry import new_version

    return new_version(CLICK_PREFIX)


def register_click_head(
    store: LabelStore,
    result: dict[str, Any],
    decision: ClickGate,
    *,
    project: str | None = None,
    root: str | Path | None = None,
    version: str | None = None,
) -> str:
    """Save the head under the registry root, register it (task ``INTERACTIVE_TASK``, status candidate, the
    validation numbers and the gate's decision in its metrics), then make it champion or rejected in one
    store transaction each: the bundle exists before its row, and the champion changes only in the last
    ``set_model_status``, so a crash at any point leaves the old champion serving."""
    version = version or new_click_version()
    fit: ClickFit = result["fit"]
    meta = {
        "version": version,
        "backbone_sha256": result["backbone_sha256"],
        "short_side": result["config"].short_side,
        "manifest_hash": result["manifest_hash"],
    }
    folder = save_click_head(result["head"], Path(root or registry_root()) / version, meta)
    digest = hashlib.sha256((folder / "click_head.pt").read_bytes()).hexdigest()
    metrics = {
        "kind": INTERACTIVE_TASK,
        "val": result["val"],
        "gate": decision.to_dict(),
        "counts": result["counts"],
        "backbone_sha256": result["backbone_sha256"],
        "manifest_hash": result["manifest_hash"],
        "config_digest": result["config_digest"],
        "params": dataclasses.asdict(result["config"]) | {"size": result.get("size")},
        "training": {"losses": fit.losses, "bce": fit.bce, "steps": fit.steps, "seconds": fit.seconds,
                     "stopped_early": fit.stopped_early, "seed": fit.seed, "best_epoch": fit.best_epoch,
                     "seeds": result.get("seed_fits")},
        "champion_compared": result.get("champion"),
        "code_version": code_version(),
    }
    store.register_model_version(
        version,
        task=INTERACTIVE_TASK,
        bundle_path=str(folder),
        bundle_hash=digest,
        metrics=metrics,
        status=CANDIDATE,
        project=project,
    )
    store.set_model_status(version, CHAMPION if decision.promote else REJECTED, project=project)
    return version


def _unchanged_since(
    store: LabelStore, project: str | None, keys: dict[str, str]
) -> dict[str, Any] | None:
    """The newest interactive version trained on the same labels, backbone and settings (``None``: none)."""
    rows = store.model_versions(task=INTERACTIVE_TASK, project=project)
    for row in reversed(rows):
        m = row.get("metrics") or {}
        if all(m.get(k) == v for k, v in keys.items()):
            return row
    return None


def run_click_stage(
    store: LabelStore,
    backbone: SurgeNetBackbone,
    *,
    project: str | None = None,
    config: ClickTrainConfig | None = None,
    size: tuple[int, int] | None = None,
    split_fractions: tuple[float, ...] | None = None,
    deadline: float | None = None,
    force: bool = False,
    progress: bool = False,
    root: str | Path | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Train, judge, register and promote-or-reject one click head (the nightly cycle's ``interactive``
    stage and ``surgenet-assist train-clicks``); returns a JSON-able report: ``outcome``, ``version``, the
    validation numbers of every level, the gate, counts and timings. Skipped when there are no train or
    val objects (``strict``: raised as the error saying what to label, for a command run by hand), or when
    the labels, backbone and settings are those of an existing interactive version (unless ``force``)."""
    cfg = config or ClickTrainConfig()
    started = time.time()
    if deadline is not None and time.time() > deadline:
        return {"outcome": "skipped: no time left in the cycle's budget"}
    records = click_records(store, cfg, project=project, split_fractions=split_fractions)
    keys = {
        "manifest_hash": records.manifest_hash,
        "backbone_sha256": backbone.weights_sha256 or "unknown",
        "config_digest": _config_digest(cfg, size),
    }
    same = None if force else _unchanged_since(store, project, keys)
    if same is not None:  # decided before a frame is decoded: an unchanged night costs nothing
        return {"outcome": f"skipped: labels, backbone and settings unchanged since {same['version']}",
                "val": (same.get("metrics") or {}).get("val")}
    try:
        result = train_click_head(
            store, backbone, project=project, config=cfg, size=size, deadline=deadline, progress=progress,
            records=records,
        )
    except SurgenetAssistError as exc:
        if strict:
            raise
        return {"outcome": f"skipped: {exc.message}"}
    report: dict[str, Any] = {
        "counts": result["counts"],
        "val": result["val"],
        "champion_before": result["champion"],
    }
    decision = judge_click_head(
        result["sessions"]["learned"],
        result["sessions"]["day_one"],
        result["sessions"].get("champion"),
        videos=result.get("val_videos"),
        max_clicks=cfg.eval_max_clicks,
        min_val_videos=cfg.min_val_videos,
    )
    version = register_click_head(store, result, decision, project=project, root=root)
    fit: ClickFit = result["fit"]
    report |= {
        "outcome": f"promoted {version}" if decision.promote else f"rejected {version}",
        "version": version,
        "gate": decision.to_dict(),
        "training": {"losses": fit.losses, "steps": fit.steps, "seconds": fit.seconds,
                     "stopped_early": fit.stopped_early, "seed": fit.seed, "best_epoch": fit.best_epoch,
                     "seeds": result.get("seed_fits")},
        "seconds": round(time.time() - started, 1),
    }
    store.record_training_run(
        model_version=version,
        task=INTERACTIVE_TASK,
        status=RUN_FINISHED,
        started_at=started,
        finished_at=time.time(),
        params={"config": dataclasses.asdict(cfg), "size": result.get("size")},
        metrics={"outcome": report["outcome"], "val": result["val"], "gate": decision.to_dict()},
        num_labels=result["counts"]["train_frames"],
        project=project,
    )
    return report
