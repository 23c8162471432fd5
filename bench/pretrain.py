"""Continued pretraining benchmark: does the small-batch DINO recipe teach a backbone something, on CPU?

Pre-registered in ``bench/README.md`` ("Continued pretraining"): per replicate, a random-init CaFormer-S18
(SurgeNetBackbone, seeded by the replicate) is pretrained with :class:`DINOTrainer` on world-v2 frames of the
replicate's "unlabelled" videos; then linear probes, fitted on half of its "probe" videos and scored on the
other half, read the starting and the adapted backbone:

- frame phase macro-F1 and CVS mAP from the pooled embedding (the same logistic-regression probe as the
  privileged ceilings, ``bench/ceilings.py``);
- segmentation mIoU from a per-pixel logistic regression on the stage-2/3 feature grid (strides 8 and 16),
  its prediction upsampled (nearest) and scored on the full-resolution masks.

Reported: adapted minus start per replicate, mean with a paired 95 % t-interval over replicates; the DINO
loss curve (``bench/results/pretrain.png``). Regime checks: no collapse (final DINO loss, mean of the last
10 steps, below ln(out_dim) - 0.1 and teacher output std above 0.01: ``dino_collapsed``), the start's probes
above chance + 0.05 (chance: held-out predictions shuffled across frames), privileged ceilings above
chance + 0.05. Decision rule: helps when the interval lies above 0, hurts when below 0, otherwise "no claim".

    OMP_NUM_THREADS=1 .venv/bin/python bench/pretrain.py [--seed-set calibration|report]
    OMP_NUM_THREADS=1 .venv/bin/python bench/pretrain.py --ablation     # calibration replicates only

``--ablation`` runs the calibration replicates once per recipe component switched off (Sinkhorn-Knopp ->
EMA centre, no KoLeo, no teacher-temperature warm-up, no local crops, 4096 prototypes) and reports each
variant's probe gains and collapse checks next to the full recipe's (same replicates, paired).

The run is sized for 2 CPU cores (the whole report run in about 15 min): frames rendered at 72x128, global
crops 48 px and local crops 24 px, crops and flips only (no colour jitter: colour carries meaning here, and
photometric invariance was too hard a task at this budget), batch 8, 100 steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent))
import seeds  # noqa: E402
from active_learning import t_interval  # noqa: E402
from ceilings import _fit_predict, _scores, ceiling_checks, privileged_ceilings  # noqa: E402

from surgenet_assist.core.backbone import load_backbone  # noqa: E402
from surgenet_assist.core.schema import DEFAULT_SCHEMA, IGNORE_INDEX  # noqa: E402
from surgenet_assist.core.synthetic import SyntheticClip, generate_clip  # noqa: E402
from surgenet_assist.training_loop.metrics import SegmentationAccumulator  # noqa: E402
from surgenet_assist.training_loop.pretrain import (  # noqa: E402
    COLLAPSE_LOSS_MARGIN,
    COLLAPSE_MIN_TEACHER_STD,
    DINOConfig,
    DINOTrainer,
    MemoryFramePool,
    dino_collapsed,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TASKS = ("phase", "cvs", "segmentation")
MARGIN = 0.05  # probes above chance + MARGIN (registered)
FRAME_SIZE = (72, 128)  # rendered frames, also the probes' input
FRAMES_PER_VIDEO = 60
UNLABELLED_VIDEOS = 6
PROBE_VIDEOS = 6  # first half fits the probes, second half is held out
PIXELS_PER_FIT = 6000  # pixels sampled to fit the segmentation probe (all held-out pixels are scored)

#: The bench's run: DINOConfig defaults (the recipe) except size, length and optimiser for the CPU budget.
BENCH_CONFIG = dict(
    steps=100,
    batch_size=8,
    global_size=48,
    local_size=24,
    local_crops=2,
    global_scale=(0.5, 1.0),
    local_scale=(0.1, 0.5),
    photometric=False,
    lr=1e-3,  # from random init: DINO's own order, not the continuation's low re-warm peak
    min_lr=1e-5,
    warmup_steps=10,
    momentum=0.9,  # a teacher that follows within the run's 100 steps (0.996 would barely move)
    replay_fraction=0.0,
    checkpoint_every=0,
)

#: Each recipe component switched off (``--ablation``).
ABLATIONS: dict[str, dict[str, Any]] = {
    "ema_centre": {"centering": "ema"},
    "no_koleo": {"koleo_weight": 0.0},
    "no_temp_warmup": {"teacher_temp_warmup": 0.0},
    "no_multicrop": {"local_crops": 0},
    "out_dim_4096": {"out_dim": 4096},
}


def _clips(seed_set: seeds.SeedSet, replicate: int, role: str, count: int) -> list[SyntheticClip]:
    return [
        generate_clip(s, FRAMES_PER_VIDEO, *FRAME_SIZE, world=seed_set.world)
        for s in seed_set.video_seeds(replicate, role, count)
    ]


@torch.no_grad()
def features(backbone: Any, frames: np.ndarray, batch: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Pooled embeddings (N, 512) and a pixel feature grid (N, h, w, C): stage 2 (stride 8) with stage 3
    (stride 16) upsampled onto it, each channel-standardised later by the probe."""
    backbone.eval()
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    pooled, grids = [], []
    for i in range(0, len(frames), batch):
        x = torch.from_numpy(frames[i : i + batch]).permute(0, 3, 1, 2).float() / 255.0
        stages = backbone((x - mean) / std)
        pooled.append(backbone.pool(stages[-1]).numpy())
        s2, s3 = stages[1], stages[2]
        s3 = torch.nn.functional.interpolate(s3, size=s2.shape[-2:], mode="bilinear", align_corners=False)
        grids.append(torch.cat([s2, s3], dim=1).permute(0, 2, 3, 1).numpy())
    return np.concatenate(pooled), np.concatenate(grids)


def _grid_labels(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Mask label at each feature cell's centre (nearest), (N, h, w)."""
    h, w = masks.shape[1:]
    ys = ((np.arange(grid[0]) + 0.5) * h / grid[0]).astype(int)
    xs = ((np.arange(grid[1]) + 0.5) * w / grid[1]).astype(int)
    return masks[:, ys][:, :, xs]


def _upsample(pred: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.stack([cv2.resize(p.astype(np.uint8), (size[1], size[0]), cv2.INTER_NEAREST) for p in pred])


def _miou(pred: np.ndarray, masks: np.ndarray) -> float:
    acc = SegmentationAccumulator(DEFAULT_SCHEMA.num_classes)
    for p, m in zip(pred, masks, strict=True):
        acc.update(p, m)
    return float(acc.result()["mIoU"])


def probe(
    backbone: Any, fit: list[SyntheticClip], held: list[SyntheticClip], seed: int, chance_perms: int = 10
) -> dict[str, Any]:
    """Linear-probe scores (phase macro-F1, CVS mAP, segmentation mIoU) on ``held`` and their chance
    (held-out predictions shuffled across frames, mean of ``chance_perms`` shuffles)."""
    rng = np.random.default_rng(seed)
    cat = np.concatenate
    f_pool, f_grid = features(backbone, cat([c.frames for c in fit]))
    h_pool, h_grid = features(backbone, cat([c.frames for c in held]))
    f_ph, f_cvs, f_masks = (
        cat([c.phases for c in fit]),
        cat([c.cvs for c in fit]),
        cat([c.masks for c in fit]),
    )
    h_ph, h_cvs, h_masks = (
        cat([c.phases for c in held]),
        cat([c.cvs for c in held]),
        cat([c.masks for c in held]),
    )
    phase_pred, cvs_prob = _fit_predict(f_pool, f_ph, f_cvs, h_pool)
    scores = _scores(phase_pred, cvs_prob, h_ph, h_cvs, DEFAULT_SCHEMA)
    chance = {"phase": [], "cvs": [], "segmentation": []}
    for _ in range(chance_perms):
        perm = rng.permutation(len(h_ph))
        for k, v in _scores(phase_pred[perm], cvs_prob[perm], h_ph, h_cvs, DEFAULT_SCHEMA).items():
            chance[k].append(v)

    grid = f_grid.shape[1:3]
    x = f_grid.reshape(-1, f_grid.shape[-1])
    y = _grid_labels(f_masks, grid).reshape(-1)
    keep = np.flatnonzero(y != IGNORE_INDEX)
    keep = rng.choice(keep, min(PIXELS_PER_FIT, len(keep)), replace=False)
    pix = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=0.1))
    with warnings.catch_warnings():  # lbfgs may stop at max_iter: a fixed budget, the same for every backbone
        warnings.simplefilter("ignore", ConvergenceWarning)
        pix.fit(x[keep], y[keep])
    seg = pix.predict(h_grid.reshape(-1, h_grid.shape[-1])).reshape(len(h_grid), *grid)
    seg = _upsample(seg, FRAME_SIZE)
    scores["segmentation"] = _miou(seg, h_masks)
    for _ in range(chance_perms):
        chance["segmentation"].append(_miou(seg[rng.permutation(len(seg))], h_masks))
    return {"scores": scores, "chance": {k: float(np.mean(v)) for k, v in chance.items()}}


def run_replicate(
    seed_set: seeds.SeedSet, replicate: int, variants: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Start probes, ceilings, then per variant: pretrain from the same start and probe the teacher."""
    t0 = time.time()
    unlabelled = np.concatenate(
        [c.frames for c in _clips(seed_set, replicate, "unlabelled", UNLABELLED_VIDEOS)]
    )
    probes = _clips(seed_set, replicate, "probe", PROBE_VIDEOS)
    fit, held = probes[: PROBE_VIDEOS // 2], probes[PROBE_VIDEOS // 2 :]
    torch.manual_seed(replicate)
    start = load_backbone(random_init=True)
    out: dict[str, Any] = {
        "replicate": replicate,
        "start": probe(start, fit, held, replicate),
        "ceilings": privileged_ceilings(fit, held),
        "variants": {},
    }
    for name, overrides in variants.items():
        cfg = DINOConfig(**(BENCH_CONFIG | overrides | {"seed": replicate}))
        trainer = DINOTrainer(start, cfg, device="cpu")
        t1 = time.time()
        trainer.train(MemoryFramePool(unlabelled), None, progress=False)
        seconds = time.time() - t1
        adapted = trainer.adapted()
        result = probe(adapted, fit, held, replicate)
        final_loss = float(np.mean(trainer.losses[-10:]))
        final_std = float(np.mean(trainer.teacher_stds[-10:]))
        out["variants"][name] = {
            **result,
            "gain": {t: result["scores"][t] - out["start"]["scores"][t] for t in TASKS},
            "losses": trainer.losses,
            "teacher_stds": trainer.teacher_stds,
            "koleo": trainer.koleo,
            "final_loss": final_loss,
            "final_teacher_std": final_std,
            "ln_out_dim": math.log(cfg.out_dim),
            "collapsed": dino_collapsed(trainer.losses, cfg.out_dim, teacher_stds=trainer.teacher_stds),
            "pretrain_seconds": round(seconds, 1),
            "config": {k: v for k, v in cfg.__dict__.items() if k != "checkpoint_path"},
        }
        g = out["variants"][name]["gain"]
        print(
            f"  replicate {replicate} {name}: loss {final_loss:.3f} (ln K {math.log(cfg.out_dim):.3f}), "
            f"teacher std {final_std:.4f}, gains phase {g['phase']:+.3f} cvs {g['cvs']:+.3f} "
            f"seg {g['segmentation']:+.3f} "
            f"({seconds:.0f} s)",
            flush=True,
        )
    out["seconds"] = round(time.time() - t0, 1)
    return out


def summarise(reps: list[dict[str, Any]], variant: str) -> dict[str, Any]:
    """Per task: start, adapted and the paired gain (mean, 95 % half-width), and the registered verdict."""
    out: dict[str, Any] = {}
    for t in TASKS:
        start = [r["start"]["scores"][t] for r in reps]
        adapted = [r["variants"][variant]["scores"][t] for r in reps]
        gain = [r["variants"][variant]["gain"][t] for r in reps]
        m, h = t_interval(gain)
        verdict = "helps" if m - h > 0 else "hurts" if m + h < 0 else "no claim"
        out[t] = {
            "start": list(t_interval(start)),
            "adapted": list(t_interval(adapted)),
            "gain": [m, h],
            "verdict": verdict,
        }
    return out


def regime_checks(reps: list[dict[str, Any]], variant: str) -> list[dict[str, Any]]:
    rows = []
    for r in reps:
        v = r["variants"][variant]
        rows.append(
            {
                "check": f"no collapse (replicate {r['replicate']})",
                "task": "all",
                "pass": not v["collapsed"],
                "detail": f"final loss {v['final_loss']:.3f} vs ln(out_dim) - {COLLAPSE_LOSS_MARGIN} = "
                f"{v['ln_out_dim'] - COLLAPSE_LOSS_MARGIN:.3f}; teacher std {v['final_teacher_std']:.4f} vs "
                f"{COLLAPSE_MIN_TEACHER_STD}",
            }
        )
    for t in TASKS:
        m, h = t_interval([r["start"]["scores"][t] for r in reps])
        chance = float(np.mean([r["start"]["chance"][t] for r in reps]))
        rows.append(
            {
                "check": "starting backbone's probe above chance + 0.05",
                "task": t,
                "pass": bool(m - h > chance + MARGIN),
                "detail": f"{m:.3f} ± {h:.3f} vs chance {chance:.3f} + {MARGIN}",
            }
        )
    rows += ceiling_checks([r["ceilings"] for r in reps], t_interval, MARGIN)
    return rows


def plot(reps: list[dict[str, Any]], variants: list[str], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(variants):
        for j, r in enumerate(reps):
            v = r["variants"][name]
            label = name if j == 0 else None
            ax[0].plot(
                np.asarray(v["losses"]) - v["ln_out_dim"], color=colours[i % 10], alpha=0.7, label=label
            )
            ax[1].plot(v["teacher_stds"], color=colours[i % 10], alpha=0.7, label=label)
    ax[0].axhline(-COLLAPSE_LOSS_MARGIN, color="k", ls="--", lw=0.8)
    ax[0].set(xlabel="step", ylabel="DINO loss - ln(out_dim)", title="loss (collapse above the dashed line)")
    ax[1].axhline(COLLAPSE_MIN_TEACHER_STD, color="k", ls="--", lw=0.8)
    ax[1].set(xlabel="step", ylabel="teacher output std over the batch", title="teacher spread")
    ax[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    seeds.add_argument(ap)
    ap.add_argument("--ablation", action="store_true", help="each recipe component off (calibration seeds)")
    ap.add_argument("--replicates", type=int, default=None, help="calibration only: the first N replicates")
    ap.add_argument("--json", default=None, help="default bench/results/pretrain[_ablation].json")
    args = ap.parse_args()
    if args.ablation and args.seed_set == "report":
        raise seeds.SeedRegistryError(
            "the ablation is a calibration experiment", "run --ablation with --seed-set calibration"
        )
    seed_set = seeds.load("continued_pretraining", args.seed_set)
    replicates = list(seed_set.seeds)
    if args.replicates:
        if args.seed_set == "report":
            raise seeds.SeedRegistryError("a report run uses every report replicate", "drop --replicates")
        replicates = replicates[: args.replicates]
    variants = {"recipe": {}} | (ABLATIONS if args.ablation else {})
    print(f"{seed_set.describe()}; replicates {replicates}; variants {list(variants)}", flush=True)
    t0, cpu0 = time.time(), time.process_time()
    reps = [run_replicate(seed_set, r, variants) for r in replicates]
    result = {
        "config": BENCH_CONFIG,
        "frame_size": FRAME_SIZE,
        "frames_per_video": FRAMES_PER_VIDEO,
        "unlabelled_videos": UNLABELLED_VIDEOS,
        "probe_videos": PROBE_VIDEOS,
        "replicates_run": replicates,
        "summary": {name: summarise(reps, name) for name in variants},
        "checks": {name: regime_checks(reps, name) for name in variants},
        "replicates": reps,
        "seconds": round(time.time() - t0, 1),
        # wall time depends on what else runs; CPU time is what an idle machine would need (on 1 thread)
        "cpu_seconds": round(time.process_time() - cpu0, 1),
        "load_average": list(os.getloadavg()),
        "torch_threads": torch.get_num_threads(),
    }
    result = seed_set.stamp(result)
    stem = "pretrain_ablation" if args.ablation else "pretrain"
    if args.seed_set == "calibration" and not args.ablation:
        stem = "pretrain_calibration"
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.json) if args.json else RESULTS / f"{stem}.json"
    out.write_text(json.dumps(result, indent=1))
    plot(reps, list(variants), out.with_suffix(".png"), seed_set.describe())
    for name in variants:
        print(f"== {name}")
        for row in result["checks"][name]:
            print(f"{'PASS' if row['pass'] else 'FAIL'}  {row['check']} ({row['task']}): {row['detail']}")
        for t, s in result["summary"][name].items():
            print(
                f"{t}: start {s['start'][0]:.3f} ± {s['start'][1]:.3f}, adapted {s['adapted'][0]:.3f} ± "
                f"{s['adapted'][1]:.3f}, gain {s['gain'][0]:+.3f} ± {s['gain'][1]:.3f} -> {s['verdict']}"
            )
    print(f"{result['seconds']:.0f} s wall, {result['cpu_seconds']:.0f} s CPU; wrote {out}")


if __name__ == "__main__":
    main()
