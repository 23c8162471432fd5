"""Active-learning simulation that first proves its regime can show a label saving, then compares strategies.

    .venv/bin/python bench/active_learning.py [--seeds 5] [--backbones random,adapted] [--write-docs]

Per backbone and seed: synthetic pool, validation and test videos with exact labels (the oracle); backbone
stage features computed ONCE (cached under bench/results/cache, keyed by seed/config/backbone); every strategy
starts from the same random batch of ``k`` frames, then each round: train fresh heads on the labelled frames
with early stopping on the validation videos -> evaluate on the test videos (segmentation mIoU, frame phase
macro-F1, CVS mAP) -> score the pool with the trained heads -> the strategy picks ``k`` more -> the oracle
reveals their labels. The full-data model trains the same heads on every pool frame, also to early stopping.

Before any strategy is compared, REGIME CHECKS decide whether this setup can show anything (each printed with
PASS/FAIL and numbers): at least 5 seeds; the full-data heads converge (early stopping fires before the step
cap); the full-data model is a real upper bound on every task (paired 95 % CI of full minus random's last
budget above 0, and no strategy's last-budget mean above the full-data CI); random's curve ends clearly above
chance (last-budget mean minus its 95 % t-interval half-width > chance + margin, chance = the full-data
model's test predictions shuffled across test frames). A label saving is only claimed for a task whose
regime passes, and is called significant only when the paired seed-bootstrap 95 % CI of the labels-to-target
ratio (strategy / random) excludes 1.0.

Backbones: ``random`` = random-init CaFormer-S18; ``adapted`` = the same network after the project's own DINO
continued pretraining (training_loop/pretrain.py) on unlabelled synthetic frames from other videos (cached
once per config); ``surgenetxl`` = cached SurgeNetXL weights when present (never downloads).

Outputs: bench/results/active_learning.json (every number), bench/results/active_learning.png (curves with
95 % bands per backbone), a Markdown block; ``--write-docs`` replaces the results block in
docs/active-learning.md.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from surgenet_assist.core.model import SurgeNetAssistModel
from surgenet_assist.core.schema import IGNORE_INDEX
from surgenet_assist.core.synthetic import generate_clip
from surgenet_assist.training_loop import acquisition as acq
from surgenet_assist.training_loop.finetune import dice_loss, extract_features, seed_everything
from surgenet_assist.training_loop.metrics import SegmentationAccumulator, cvs_metrics, phase_metrics

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("segmentation", "phase", "cvs")
TASK_METRICS = {"segmentation": "mIoU", "phase": "macro-F1", "cvs": "mAP"}
START, END = "<!-- bench:active-learning:start -->", "<!-- bench:active-learning:end -->"
BACKBONE_NAMES = {
    "random": "random-init CaFormer-S18",
    "adapted": "CaFormer-S18 after DINO continued pretraining on unlabelled synthetic frames",
    "surgenetxl": "SurgeNetXL (cached weights)",
}


# --- statistics (pure helpers, tested in tests/test_bench_regime.py) ----------------------------------------
def t_interval(values: Any, level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the Student-t confidence interval over seeds (half-width inf for n < 2)."""
    from scipy import stats

    x = np.asarray(values, float)
    if len(x) < 2:
        return float(x.mean()), float("inf")
    half = stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return float(x.mean()), float(half)


def labels_to_reach(labels: np.ndarray, curve: np.ndarray, target: float) -> float | None:
    """Labels at which ``curve`` first reaches ``target``, linearly interpolated; None if never."""
    if curve[0] >= target:
        return float(labels[0])
    for i in range(1, len(curve)):
        if curve[i] >= target:
            a, b = curve[i - 1], curve[i]
            return float(labels[i - 1] + (target - a) / (b - a) * (labels[i] - labels[i - 1]))
    return None


def ratio_to_target(
    labels: np.ndarray, strat: np.ndarray, rnd: np.ndarray, target: float, censor: float
) -> float | None:
    """Labels the strategy's mean curve needs to reach ``target`` over the labels random's needs.

    A curve that never reaches the target is censored at ``censor`` labels (one round past the last budget):
    a strategy that never gets there is counted as needing more than random, not dropped. None when neither
    curve reaches the target (no ratio is defined)."""
    a, b = labels_to_reach(labels, strat, target), labels_to_reach(labels, rnd, target)
    if a is None and b is None:
        return None
    return (censor if a is None else a) / (censor if b is None else b)


def bootstrap_ratio(
    labels: np.ndarray,
    strat: np.ndarray,
    rnd: np.ndarray,
    target_of: Any,
    censor: float,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired seed bootstrap of :func:`ratio_to_target` on mean curves.

    ``strat`` and ``rnd`` are (seeds, budgets) arrays of the same seeds; ``target_of(idx)`` gives the target
    for a resample of seed indices (e.g. 95 % of the resampled full-data mean). Returns the point estimate
    (all seeds), the 2.5/97.5 percentiles and whether the interval excludes 1.0."""
    n = len(strat)
    all_idx = np.arange(n)
    point = ratio_to_target(labels, strat.mean(0), rnd.mean(0), target_of(all_idx), censor)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        r = ratio_to_target(labels, strat[idx].mean(0), rnd[idx].mean(0), target_of(idx), censor)
        if r is not None:
            draws.append(r)
    if not draws or point is None:
        return {"ratio": point, "ci": None, "defined_fraction": len(draws) / n_boot, "significant": False}
    lo, hi = (float(v) for v in np.percentile(draws, [2.5, 97.5]))
    return {
        "ratio": float(point),
        "ci": [lo, hi],
        "defined_fraction": len(draws) / n_boot,
        "significant": bool(hi < 1.0 or lo > 1.0),
        "saving": bool(hi < 1.0),
    }


def regime_checks(
    full: dict[str, np.ndarray],
    chance: dict[str, np.ndarray],
    finals: dict[str, dict[str, np.ndarray]],
    converged: np.ndarray,
    margin: float,
    min_seeds: int = 5,
) -> dict[str, Any]:
    """Is this regime informative? ``full``/``chance``: per task, one value per seed; ``finals``: per
    strategy, per task, the last-budget score per seed (same seed order, 'random' required);
    ``converged``: per seed, whether the full-data training stopped early (before the step cap)."""
    n = len(next(iter(full.values())))
    checks: list[dict[str, Any]] = [
        {"check": "seeds", "task": None, "pass": n >= min_seeds, "detail": f"{n} seeds (need {min_seeds}+)"},
        {
            "check": "full-data converged",
            "task": None,
            "pass": bool(np.all(converged)),
            "detail": f"early stopping fired on {int(np.sum(converged))}/{n} seeds",
        },
    ]
    task_ok = {}
    for t in TASKS:
        f_mean, f_half = t_interval(full[t])
        diff_mean, diff_half = t_interval(np.asarray(full[t]) - np.asarray(finals["random"][t]))
        best = max(finals, key=lambda s: float(np.mean(finals[s][t])))
        best_mean = float(np.mean(finals[best][t]))
        upper = diff_mean - diff_half > 0 and best_mean <= f_mean + f_half
        c_mean = float(np.mean(chance[t]))
        r_mean, r_half = t_interval(finals["random"][t])
        above = r_mean - r_half > c_mean + margin
        checks.append(
            {
                "check": "full-data is an upper bound",
                "task": t,
                "pass": bool(upper),
                "detail": (
                    f"full {f_mean:.3f} ± {f_half:.3f}; full − random@last {diff_mean:+.3f} ± {diff_half:.3f}"
                    f"; best strategy@last {best} {best_mean:.3f}"
                ),
            }
        )
        checks.append(
            {
                "check": "random rises above chance",
                "task": t,
                "pass": bool(above),
                "detail": (
                    f"random@last {r_mean:.3f} ± {r_half:.3f} (lower {r_mean - r_half:.3f}) vs chance "
                    f"{c_mean:.3f} + margin {margin:.2f}"
                ),
            }
        )
        task_ok[t] = bool(upper and above)
    common = all(c["pass"] for c in checks if c["task"] is None)
    return {
        "checks": checks,
        "task_pass": {t: bool(common and ok) for t, ok in task_ok.items()},
        "pass": bool(common and all(task_ok.values())),
    }


# --- data --------------------------------------------------------------------------------------------------
class Split:
    """Cached backbone features (per-pixel at stride 8, pooled embedding) plus exact labels of some videos."""

    def __init__(self, feats: dict[str, torch.Tensor], labels: dict[str, Any]) -> None:
        self.pix, self.emb = feats["pix"], feats["emb"]
        self.masks, self.phases, self.cvs = labels["masks"], labels["phases"], labels["cvs"]
        self.masks8 = self.masks[:, 2::4, 2::4].contiguous()  # nearest, at the feature grid
        self.video_ids, self.frame_indices = labels["video_ids"], labels["frame_indices"]

    def __len__(self) -> int:
        return len(self.video_ids)


def make_split(
    backbone_model: SurgeNetAssistModel, seeds: list[int], frames: int, size: tuple[int, int], cache: Path
) -> Split:
    # world v1 until this bench is ported to its pre-registered seeds (bench/README.md): recorded figures
    clips = [generate_clip(s, frames, size[0], size[1], camera_cuts=1, world="v1") for s in seeds]
    if cache.exists():
        feats = torch.load(cache)
    else:
        images = np.concatenate([c.frames for c in clips])
        stages, _ = extract_features(backbone_model, images, size[0], batch_size=16, progress=False)
        with torch.inference_mode():
            emb = backbone_model.backbone.pool(stages[-1].float()).float()
            h8, w8 = stages[1].shape[-2:]
            pix = torch.cat(  # (N, C, h/8, w/8): stage 1 pooled, stage 2, stage 3 upsampled
                [F.adaptive_avg_pool2d(stages[0].float(), (h8, w8)), stages[1].float()]
                + [F.interpolate(stages[2].float(), size=(h8, w8), mode="bilinear")],
                1,
            ).half()
        feats = {"pix": pix, "emb": emb}
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(feats, cache)
    h8, w8 = feats["pix"].shape[-2:]
    masks = np.stack(
        [cv2.resize(m, (w8 * 4, h8 * 4), interpolation=cv2.INTER_NEAREST) for c in clips for m in c.masks]
    )
    labels = {
        "masks": torch.from_numpy(masks).long(),
        "phases": torch.from_numpy(np.concatenate([c.phases for c in clips])).long(),
        "cvs": torch.from_numpy(np.concatenate([c.cvs for c in clips])).float(),
        "video_ids": np.concatenate([np.full(len(c), i) for i, c in enumerate(clips)]),
        "frame_indices": np.concatenate([np.arange(len(c)) for c in clips]),
    }
    return Split(feats, labels)


def standardise(pool: Split, others: list[Split], dims: int) -> None:
    """PCA of the pool's pixel features (basis from pool pixels only) and z-scored embeddings (pool
    statistics), applied to every split: keeps head training cheap and well-conditioned on 2 cores."""
    x = pool.pix.float().permute(0, 2, 3, 1).reshape(-1, pool.pix.shape[1])
    mean = x.mean(0)
    sample = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:20000]] - mean
    _, _, v = torch.pca_lowrank(sample, q=dims, center=False)
    scale = ((x - mean) @ v).std(0).clamp_min(1e-6)
    e_mean, e_std = pool.emb.mean(0), pool.emb.std(0).clamp_min(1e-6)
    for split in (pool, *others):
        n, c, h, w = split.pix.shape
        proj = ((split.pix.float().permute(0, 2, 3, 1).reshape(-1, c) - mean) @ v) / scale
        split.pix = proj.reshape(n, h, w, dims).permute(0, 3, 1, 2).contiguous().half()
        split.emb = (split.emb - e_mean) / e_std


# --- backbones ---------------------------------------------------------------------------------------------
def adapted_backbone(
    args: argparse.Namespace, cache_dir: Path
) -> tuple[SurgeNetAssistModel, dict[str, Any]]:
    """Random-init CaFormer-S18 (seed 0) after the project's DINO continued pretraining on unlabelled
    synthetic frames (videos disjoint from every pool/val/test video). Trained once, cached by config."""
    from surgenet_assist.training_loop.pretrain import DINOConfig, DINOTrainer, MemoryFramePool

    cfg = DINOConfig(
        steps=args.pretrain_steps,
        batch_size=args.pretrain_batch,
        lr=args.pretrain_lr,  # from random init: DINO's own order (5e-4 x B/256 would be far lower)
        warmup_steps=max(1, args.pretrain_steps // 10),
        out_dim=1024,
        global_size=args.pretrain_global,
        local_size=args.pretrain_global // 2,
        local_crops=2,
        replay_fraction=0.0,
        seed=0,
        checkpoint_every=0,
    )
    key_src = {
        "cfg": {k: v for k, v in cfg.__dict__.items() if k != "checkpoint_path"},
        "videos": args.pretrain_videos,
        "frames": args.frames,
        "size": args.size,
        "budget_s": args.pretrain_budget_s,
    }
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir / f"dino_adapted_{key}.pt"
    torch.manual_seed(0)
    model = SurgeNetAssistModel.create(random_init=True)
    if path.exists():
        blob = torch.load(path)
        model.backbone.load_state_dict({k: v.float() for k, v in blob["state"].items()})
        return model, blob["info"] | {"cache": str(path.relative_to(ROOT)), "cached": True}
    frames = np.concatenate(
        [
            generate_clip(90_000 + i, args.frames, *args.size, world="v1").frames
            for i in range(args.pretrain_videos)
        ]
    )
    trainer = DINOTrainer(model.backbone, cfg, device="cpu")
    t0 = time.time()
    losses = trainer.train(MemoryFramePool(frames), None, deadline=t0 + args.pretrain_budget_s, progress=True)
    model.backbone.load_state_dict(trainer.adapted().state_dict())
    info = {
        "config": key_src,
        "steps_done": trainer.step,
        "frames": len(frames),
        "first_loss": losses[0] if losses else None,
        "last_loss": float(np.mean(losses[-10:])) if losses else None,
        "seconds": round(time.time() - t0, 1),
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"state": {k: v.half() for k, v in model.backbone.state_dict().items()}, "info": info}, path)
    return model, info | {"cache": str(path.relative_to(ROOT)), "cached": False}


def load_backbone_model(name: str, args: argparse.Namespace, cache_dir: Path) -> tuple[Any, dict]:
    if name == "random":
        torch.manual_seed(0)
        return SurgeNetAssistModel.create(random_init=True), {}
    if name == "adapted":
        return adapted_backbone(args, cache_dir)
    if name == "surgenetxl":
        return SurgeNetAssistModel.create(allow_download=False), {}
    raise SystemExit(f"unknown backbone {name!r}: use random, adapted or surgenetxl")


# --- light heads on cached features -------------------------------------------------------------------------
class Heads(torch.nn.Module):
    """Pixel MLP (1x1 convs) for segmentation, linear phase / CVS heads on the pooled embedding, each behind
    Dropout so MC-dropout (BALD) works as in the served model. Light on purpose: 2 CPU cores."""

    def __init__(self, pix_dim: int, emb_dim: int, classes: int, phases: int, criteria: int) -> None:
        super().__init__()
        nn = torch.nn
        self.seg = nn.Sequential(
            nn.Conv2d(pix_dim, 64, 1), nn.ReLU(True), nn.Dropout2d(0.2), nn.Conv2d(64, classes, 1)
        )
        self.phase = nn.Sequential(nn.Dropout(0.2), nn.Linear(emb_dim, phases))
        self.cvs = nn.Sequential(nn.Dropout(0.2), nn.Linear(emb_dim, criteria))

    def forward(self, pix: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.seg(pix), self.phase(emb), self.cvs(emb)


def _losses(heads: Heads, data: Split, b: Any) -> dict[str, torch.Tensor]:
    seg, ph, cv = heads(data.pix[b].float(), data.emb[b])
    target = data.masks8[b]
    return {
        "segmentation": F.cross_entropy(seg, target, ignore_index=IGNORE_INDEX)
        + 0.5 * dice_loss(seg, target),
        "phase": F.cross_entropy(ph, data.phases[b]),
        "cvs": F.binary_cross_entropy_with_logits(cv, data.cvs[b]),
    }


HEAD_OF = {"segmentation": "seg", "phase": "phase", "cvs": "cvs"}


def train_heads(
    heads: Heads,
    init: dict[str, torch.Tensor],
    data: Split,
    idx: np.ndarray,
    val: Split,
    args: argparse.Namespace,
    seed: int,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Fresh heads (same init every time) trained on the labelled frames with early stopping PER HEAD (the
    three heads share no parameters): each head keeps its best-validation-loss state, and training stops
    when no head has improved for ``patience`` evaluations (or at the step cap)."""
    heads.load_state_dict(init)
    seed_everything(seed)
    optim = torch.optim.AdamW(heads.parameters(), lr=args.lr, weight_decay=1e-4)
    gen = np.random.default_rng(seed)
    batch = min(16, len(idx))
    best = {t: float("inf") for t in TASKS}
    best_state: dict[str, dict] = {}
    best_step = dict.fromkeys(TASKS, 0)
    bad = dict.fromkeys(TASKS, 0)
    step = 0
    cap = max_steps or args.max_steps
    while step < cap:
        heads.train()
        for _ in range(args.eval_every):
            b = torch.from_numpy(gen.choice(idx, size=batch, replace=False))
            loss = sum(_losses(heads, data, b).values())
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            step += 1
        heads.eval()
        with torch.inference_mode():
            v = {t: float(x) for t, x in _losses(heads, val, slice(None)).items()}
        for t in TASKS:
            if v[t] < best[t] - 1e-4:
                best[t], best_step[t], bad[t] = v[t], step, 0
                best_state[t] = copy.deepcopy(getattr(heads, HEAD_OF[t]).state_dict())
            else:
                bad[t] += 1
        if all(b >= args.patience for b in bad.values()):
            break
    for t in TASKS:
        getattr(heads, HEAD_OF[t]).load_state_dict(best_state[t])
    heads.eval()
    return {
        "best_step": best_step,
        "epochs": {t: round(best_step[t] * batch / len(idx), 1) for t in TASKS},
        "stopped_early": all(b >= args.patience for b in bad.values()),
        "val_loss": best,
    }


@torch.inference_mode()
def predict(heads: Heads, test: Split) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    seg, ph, cv = heads(test.pix.float(), test.emb)
    up = F.interpolate(seg, size=test.masks.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
    return up.numpy(), ph.argmax(1).numpy(), torch.sigmoid(cv).numpy()


def score(pred: tuple[np.ndarray, ...], test: Split, schema: Any, perm: np.ndarray | None = None) -> dict:
    """Test metrics; with ``perm`` the predictions are shuffled across test frames first (chance level: same
    marginals and spatial priors, no association with the frame they are scored on)."""
    seg, ph, cv = pred if perm is None else tuple(p[perm] for p in pred)
    acc = SegmentationAccumulator(schema.num_classes)
    for p, t in zip(seg, test.masks.numpy(), strict=True):
        acc.update(p, t)
    return {
        "segmentation": float(acc.result()["mIoU"]),
        "phase": phase_metrics(ph, test.phases.numpy(), schema.num_phases)["macro_f1"],
        "cvs": cvs_metrics(cv, test.cvs.numpy(), list(schema.cvs_keys))["mAP"],
    }


@torch.inference_mode()
def pool_of(heads: Heads, pool: Split, mc_passes: int, seed: int = 0) -> acq.AcquisitionPool:
    """What the trained heads say about every pool frame (MC passes with dropout on, for BALD)."""
    heads.eval()
    seg, ph, cv = heads(pool.pix.float(), pool.emb)
    mc_seg = mc_ph = mc_cv = None
    if mc_passes:
        torch.manual_seed(seed)
        heads.train()
        passes = [heads(pool.pix.float(), pool.emb) for _ in range(mc_passes)]
        heads.eval()
        mc_seg = np.stack([torch.softmax(p[0], 1).numpy() for p in passes])
        mc_ph = np.stack([torch.softmax(p[1], 1).numpy() for p in passes])
        mc_cv = np.stack([torch.sigmoid(p[2]).numpy() for p in passes])
    return acq.AcquisitionPool(
        video_ids=pool.video_ids,
        frame_indices=pool.frame_indices,
        embeddings=pool.emb.numpy(),
        phase_probs=torch.softmax(ph, 1).numpy(),
        cvs_probs=torch.sigmoid(cv).numpy(),
        seg_scores=acq.segmentation_scores(torch.softmax(seg, 1).numpy(), mc_seg),
        mc_phase=mc_ph,
        mc_cvs=mc_cv,
    )


# --- one seed ----------------------------------------------------------------------------------------------
def run_seed(
    args: argparse.Namespace, model: Any, tag: str, seed: int, strategies: list[str], bar: Any
) -> dict[str, Any]:
    seed_everything(seed)
    schema = model.schema
    base = 1000 * (seed + 1)
    cache = Path(args.cache_dir) / f"features_{tag}_s{seed}_{args.frames}f_{args.size[0]}x{args.size[1]}"
    pool = make_split(model, [base + i for i in range(args.pool_videos)], args.frames, args.size,
                      Path(f"{cache}_pool{args.pool_videos}.pt"))
    val = make_split(model, [base + 300 + i for i in range(args.val_videos)], args.frames, args.size,
                     Path(f"{cache}_val{args.val_videos}.pt"))
    test = make_split(model, [base + 500 + i for i in range(args.test_videos)], args.frames, args.size,
                      Path(f"{cache}_test{args.test_videos}.pt"))
    standardise(pool, [val, test], args.pixel_dims)
    torch.manual_seed(seed)
    heads = Heads(pool.pix.shape[1], pool.emb.shape[1], schema.num_classes, schema.num_phases, schema.num_cvs)
    init = {k: v.clone() for k, v in heads.state_dict().items()}
    full_fit = train_heads(heads, init, pool, np.arange(len(pool)), val, args, seed, args.full_max_steps)
    pred = predict(heads, test)
    full = score(pred, test, schema)
    rng = np.random.default_rng(seed)
    perms = [score(pred, test, schema, rng.permutation(len(test))) for _ in range(args.chance_perms)]
    chance = {t: float(np.mean([p[t] for p in perms])) for t in TASKS}
    start = acq.get_strategy("random", seed=seed, min_gap_s=args.min_gap).select(
        pool_of(heads, pool, 0), args.k
    )
    where = {
        (int(v), int(f)): i for i, (v, f) in enumerate(zip(pool.video_ids, pool.frame_indices, strict=True))
    }
    curves: dict[str, dict[str, list[float]]] = {}
    for name in strategies:
        labelled = list(start)
        curve: dict[str, list[float]] = {"labels": [], "epochs": [], **{t: [] for t in TASKS}}
        for r in range(args.rounds + 1):
            idx = np.array([where[(ref.video_id, ref.frame_index)] for ref in labelled])
            fit = train_heads(heads, init, pool, idx, val, args, seed)
            scores = score(predict(heads, test), test, schema)
            curve["labels"].append(len(labelled))
            curve["epochs"].append(fit["epochs"])
            for t in TASKS:
                curve[t].append(scores[t])
            bar.update(1)
            if r == args.rounds:
                break
            strategy = acq.get_strategy(name, seed=seed * 100 + r, min_gap_s=args.min_gap)
            mc = args.mc_passes if acq.needs_mc(name) else 0
            labelled += strategy.select(pool_of(heads, pool, mc, seed=r), args.k, labelled)  # oracle reveals
        curves[name] = curve
    return {"seed": seed, "full": full, "full_fit": full_fit, "chance": chance, "curves": curves}


# --- summary ----------------------------------------------------------------------------------------------
def add_overall(results: list[dict[str, Any]]) -> None:
    """Overall = mean over tasks of score / full-data score (each task on its own scale, per seed)."""
    for r in results:
        for c in r["curves"].values():
            c["overall"] = list(
                np.mean([np.array(c[t]) / max(r["full"][t], 1e-9) for t in TASKS], axis=0)
            )


def summarise(
    results: list[dict[str, Any]], strategies: list[str], default: str, args: argparse.Namespace
) -> dict[str, Any]:
    labels = np.array(results[0]["curves"][strategies[0]]["labels"], float)
    censor = float(labels[-1] + args.k)
    arr = {s: {t: np.array([r["curves"][s][t] for r in results]) for t in [*TASKS, "overall"]}
           for s in strategies}
    full = {t: np.array([r["full"][t] for r in results]) for t in TASKS}
    chance = {t: np.array([r["chance"][t] for r in results]) for t in TASKS}
    finals = {s: {t: arr[s][t][:, -1] for t in TASKS} for s in strategies}
    converged = np.array([r["full_fit"]["stopped_early"] for r in results])
    regime = regime_checks(full, chance, finals, converged, args.chance_margin)
    out: dict[str, Any] = {
        "labels": labels.tolist(),
        "full": {t: dict(zip(("mean", "ci_half"), t_interval(full[t]), strict=True)) for t in TASKS},
        "chance": {t: float(chance[t].mean()) for t in TASKS},
        "full_fit": {
            "best_step": [r["full_fit"]["best_step"] for r in results],
            "epochs": [r["full_fit"]["epochs"] for r in results],
            "stopped_early": converged.tolist(),
        },
        "regime": regime,
        "strategies": {},
    }
    for s in strategies:
        row: dict[str, Any] = {
            "curve": {t: [list(t_interval(arr[s][t][:, i])) for i in range(len(labels))]
                      for t in [*TASKS, "overall"]},
        }
        for t in TASKS:
            row[f"ratio_95_{t}"] = bootstrap_ratio(
                labels, arr[s][t], arr["random"][t], lambda idx, t=t: 0.95 * full[t][idx].mean(), censor,
                args.boot,
            )
        row["ratio_random_final"] = bootstrap_ratio(
            labels, arr[s]["overall"], arr["random"]["overall"],
            lambda idx: float(arr["random"]["overall"][idx, -1].mean()), censor, args.boot,
        )
        out["strategies"][s] = row
    d = out["strategies"][default]["ratio_random_final"]
    out["verdict"] = {
        "regime_pass": regime["pass"],
        "default": default,
        "ratio": d["ratio"],
        "ci": d["ci"],
        "significant_saving": bool(regime["pass"] and d.get("saving", False)),
        "target_met": bool(regime["pass"] and d.get("saving", False) and d["ci"][1] <= 1.0
                           and d["ratio"] is not None and d["ratio"] <= 0.6),
    }
    return out


def plot(all_results: dict[str, list[dict[str, Any]]], strategies: list[str], out: Path, title: str) -> None:
    from matplotlib.figure import Figure

    keys = [*TASKS, "overall"]
    fig = Figure(figsize=(4.6 * len(keys), 3.8 * len(all_results)))
    axes = fig.subplots(len(all_results), len(keys), squeeze=False)
    for row, (bname, results) in zip(axes, all_results.items(), strict=True):
        labels = np.array(results[0]["curves"][strategies[0]]["labels"])
        for ax, t in zip(row, keys, strict=True):
            for s in strategies:
                ys = np.array([r["curves"][s][t] for r in results])
                ci = np.array([t_interval(ys[:, i]) for i in range(ys.shape[1])])
                style = {"lw": 2.5} if s in ("hybrid", "random") else {"lw": 1.0, "alpha": 0.8}
                (line,) = ax.plot(labels, ci[:, 0], label=s, **style)
                if s in ("hybrid", "random"):
                    ax.fill_between(labels, ci[:, 0] - ci[:, 1], ci[:, 0] + ci[:, 1], alpha=0.15,
                                    color=line.get_color())
            if t == "overall":
                ax.axhline(1.0, color="k", ls="--", lw=1, label="full data")
            else:
                f = np.array([r["full"][t] for r in results])
                m, h = t_interval(f)
                ax.axhline(m, color="k", ls="--", lw=1, label="full data (±95 % CI)")
                ax.axhspan(m - h, m + h, color="k", alpha=0.07)
                chance = np.mean([r["chance"][t] for r in results])
                ax.axhline(chance, color="r", ls=":", lw=1, label="chance")
            ax.set_title(f"{bname}: {t} ({TASK_METRICS.get(t, 'score / full-data')})", fontsize=9)
            ax.set_xlabel("labelled frames")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    fig.suptitle(title + " — bands: 95 % t-interval over seeds (random, hybrid)", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


def _ci(r: dict[str, Any] | None) -> str:
    if not r or r.get("ratio") is None:
        return "n/a"
    if r["ci"] is None:
        return f"{r['ratio']:.2f}"
    return f"{r['ratio']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]" + (" *" if r["significant"] else "")


def markdown(summaries: dict[str, dict[str, Any]], meta: dict[str, Any], strategies: list[str]) -> str:
    lines = [
        f"Setup: {meta['setup']}.",
        f"Wall time {meta['seconds']:.0f} s on {meta['machine']} (load average at start {meta['load']}).",
        "",
    ]
    for bname, s in summaries.items():
        info = meta["backbones"][bname]
        lines += [f"#### Backbone: {info['name']}", ""]
        if info.get("pretrain"):
            p = info["pretrain"]
            lines += [
                f"DINO continued pretraining (training_loop/pretrain.py `DINOTrainer`): {p['steps_done']} "
                f"steps on {p['frames']} unlabelled frames, loss {p['first_loss']:.3f} -> "
                f"{p['last_loss']:.3f}, "
                f"{p['seconds']:.0f} s (cached: `{p['cache']}`).",
                "",
            ]
        ff = s["full_fit"]
        lines += [
            f"Regime: **{'PASS' if s['regime']['pass'] else 'FAIL'}**. Full-data heads (early stopping per "
            "head; range over seeds): "
            + "; ".join(
                f"{t} best step {min(b[t] for b in ff['best_step'])}-{max(b[t] for b in ff['best_step'])} "
                f"({min(e[t] for e in ff['epochs'])}-{max(e[t] for e in ff['epochs'])} epochs)"
                for t in TASKS
            )
            + ".",
            "",
            "| check | task | result | numbers |",
            "|---|---|---|---|",
        ]
        for c in s["regime"]["checks"]:
            lines.append(f"| {c['check']} | {c['task'] or 'all'} | {'PASS' if c['pass'] else 'FAIL'} "
                         f"| {c['detail']} |")
        lab = s["labels"]
        lines += [
            "",
            "Labels-to-target ratio vs random (paired seed bootstrap, 95 % CI; * = CI excludes 1.0; targets: "
            "95 % of the full-data score per task, and random's final overall score at "
            f"{lab[-1]:.0f} labels; "
            f"a curve that never reaches a target counts as {lab[-1] + meta['k']:.0f} labels). Only tasks "
            "whose regime passed may be read as a saving.",
            "",
            "| strategy | seg mIoU @95 % | phase F1 @95 % | CVS mAP @95 % | to random's final overall "
            "| final overall (mean ± CI) |",
            "|---|---|---|---|---|---|",
        ]
        for name in strategies:
            r = s["strategies"][name]
            m, h = r["curve"]["overall"][-1]
            cells = [name] + [
                _ci(r[f"ratio_95_{t}"]) + ("" if s["regime"]["task_pass"][t] else " (regime FAIL)")
                for t in TASKS
            ]
            cells += [_ci(r["ratio_random_final"]), f"{m:.3f} ± {h:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
        v = s["verdict"]
        if not v["regime_pass"]:
            text = (
                "**No saving can be claimed on this backbone: the regime check FAILED** (see the FAIL "
                f"rows). For the record, default `{v['default']}` vs random: "
                f"{_ci(s['strategies'][v['default']]['ratio_random_final'])}."
            )
        else:
            text = (
                f"Default `{v['default']}` labels to reach random's final overall score / random's: "
                f"{_ci(s['strategies'][v['default']]['ratio_random_final'])} — "
                + ("**statistically significant saving**" if v["significant_saving"]
                   else "**not statistically significant** (CI includes 1.0)")
                + "; target <= 0.60 with a significant saving: "
                + f"**{'met' if v['target_met'] else 'NOT met'}**."
            )
        lines += ["", text, ""]
    return "\n".join(lines).rstrip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--backbones", default="random,adapted", help="random, adapted, surgenetxl")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--pool-videos", type=int, default=4)
    ap.add_argument("--val-videos", type=int, default=2)
    ap.add_argument("--test-videos", type=int, default=3)
    ap.add_argument("--frames", type=int, default=60, help="frames per video (1 fps)")
    ap.add_argument("--size", default="96x170")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-steps", type=int, default=200, help="head-training step cap")
    ap.add_argument("--full-max-steps", type=int, default=1500, help="step cap of the full-data heads")
    ap.add_argument("--eval-every", type=int, default=20, help="steps between validation evaluations")
    ap.add_argument("--patience", type=int, default=3, help="evaluations without improvement before stopping")
    ap.add_argument("--pixel-dims", type=int, default=48, help="PCA dims of the pixel features")
    ap.add_argument("--mc-passes", type=int, default=8)
    ap.add_argument("--min-gap", type=float, default=3.0, help="seconds between picks in one video")
    ap.add_argument("--chance-perms", type=int, default=20)
    ap.add_argument("--chance-margin", type=float, default=0.05, help="absolute metric units above chance")
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap resamples of seeds")
    ap.add_argument("--pretrain-steps", type=int, default=150)
    ap.add_argument("--pretrain-batch", type=int, default=8)
    ap.add_argument("--pretrain-lr", type=float, default=5e-4)
    ap.add_argument("--pretrain-global", type=int, default=64, help="global crop size (local = half)")
    ap.add_argument("--pretrain-videos", type=int, default=8)
    ap.add_argument("--pretrain-budget-s", type=float, default=420, help="wall-clock cap on pretraining")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--strategies", default="random,entropy,kcenter,hybrid", help="all: " + ",".join(acq.STRATEGIES)
    )
    ap.add_argument("--cache-dir", default=str(ROOT / "bench/results/cache"))
    ap.add_argument("--png", default=str(ROOT / "bench/results/active_learning.png"))
    ap.add_argument("--json", default=str(ROOT / "bench/results/active_learning.json"))
    ap.add_argument("--write-docs", action="store_true", help="update the results block of the docs page")
    args = ap.parse_args()
    args.size = tuple(int(v) for v in args.size.split("x"))
    torch.set_num_threads(args.threads)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if "random" not in strategies:
        strategies.insert(0, "random")
    if acq.DEFAULT_STRATEGY not in strategies:
        strategies.append(acq.DEFAULT_STRATEGY)
    cache_dir = Path(args.cache_dir)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t0 = time.time()
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    all_results: dict[str, list[dict[str, Any]]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    meta: dict[str, Any] = {"backbones": {}, "k": args.k}
    for bname in backbones:
        tb = time.time()
        model, pre = load_backbone_model(bname, args, cache_dir)
        tag = bname if bname != "adapted" else Path(pre["cache"]).stem
        total = args.seeds * len(strategies) * (args.rounds + 1)
        results = []
        with tqdm(total=total, desc=f"AL simulation, {bname} backbone (seed x strategy x round)") as bar:
            for seed in range(args.seeds):
                results.append(run_seed(args, model, tag, seed, strategies, bar))
        add_overall(results)
        all_results[bname] = results
        summaries[bname] = summarise(results, strategies, acq.DEFAULT_STRATEGY, args)
        meta["backbones"][bname] = {"name": BACKBONE_NAMES[bname], "pretrain": pre or None,
                                    "seconds": round(time.time() - tb, 1)}
        for c in summaries[bname]["regime"]["checks"]:
            verdict = "PASS" if c["pass"] else "FAIL"
            print(f"[{bname}] {verdict}  {c['check']} ({c['task'] or 'all'}): {c['detail']}")
    meta.update(
        {
            "seconds": time.time() - t0,
            "machine": f"{platform.machine()} x{torch.get_num_threads()} torch threads",
            "load": f"{load:.1f}",
            "default": acq.DEFAULT_STRATEGY,
            "setup": (
                f"{args.seeds} seeds; per seed pool {args.pool_videos} synthetic videos x {args.frames} "
                "frames "
                f"({args.pool_videos * args.frames} frames, {args.size[0]}x{args.size[1]}), validation "
                f"{args.val_videos} and test {args.test_videos} other videos; start {args.k} random frames, "
                f"{args.rounds} rounds of k={args.k}; heads retrained from the same init every round "
                "(pixel MLP "
                f"on {args.pixel_dims} PCA dims + linear heads on the z-scored embedding, AdamW {args.lr:g}) "
                f"until the validation loss stalls for {args.patience} evaluations every {args.eval_every} "
                f"steps (cap {args.max_steps}, full data {args.full_max_steps}); min gap {args.min_gap:g} s; "
                f"BALD {args.mc_passes} MC passes; "
                f"chance = full-data predictions shuffled across test frames ({args.chance_perms} "
                f"permutations), margin {args.chance_margin:g}"
            ),
        }
    )
    plot(all_results, strategies, Path(args.png), f"AL simulation, {args.seeds} seeds")
    table = markdown(summaries, meta, strategies)
    print(table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps({"meta": meta, "summaries": summaries, "runs": all_results}, indent=1, default=float)
    )
    if args.write_docs:
        doc = ROOT / "docs/active-learning.md"
        text = doc.read_text()
        if START in text and END in text:
            text = text[: text.index(START) + len(START)] + "\n" + table + "\n" + text[text.index(END) :]
            doc.write_text(text)
    print(f"PNG {args.png}\nJSON {args.json}")


if __name__ == "__main__":
    main()
