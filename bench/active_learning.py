"""Active-learning simulation: does the acquisition strategy save labels?

    .venv/bin/python bench/active_learning.py [--seeds 3] [--rounds 6] [--k 10] [--write-docs]

Per seed: synthetic pool videos and held-out test videos with exact labels (the oracle); backbone stage
features computed ONCE for pool and test; every strategy starts from the same random batch of ``k`` frames,
then each round: train fresh heads on the cached features of the labelled frames -> evaluate on the test
videos (segmentation mIoU, frame phase macro-F1, CVS mAP) -> score the pool with the trained heads -> the
strategy picks ``k`` more -> the oracle reveals their labels. The full-data score trains the same heads on
every pool frame. Fixed seeds throughout; nothing is tuned on the test videos.

Outputs: learning curves (mean and spread over seeds) as PNG, a JSON of every number, and a Markdown table
(labels to reach 95 % of the full-data score per task, as a ratio to random's; labels the default strategy
needs to reach random's final score). ``--write-docs`` replaces the results block in docs/active-learning.md.
The backbone is random-init unless SurgeNetXL weights are already cached (never downloads); the output says
which.
"""

from __future__ import annotations

import argparse
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
TASK_METRICS = {"segmentation": "mIoU", "phase": "macro-F1", "cvs": "mAP"}
START, END = "<!-- bench:active-learning:start -->", "<!-- bench:active-learning:end -->"


# --- data --------------------------------------------------------------------------------------------------
class Split:
    """Cached backbone features (per-pixel at stride 8, pooled embedding) plus exact labels of some videos."""

    def __init__(self, model: SurgeNetAssistModel, seeds: list[int], frames: int, size: tuple[int, int]):
        clips = [generate_clip(s, frames, size[0], size[1], camera_cuts=1) for s in seeds]
        images = np.concatenate([c.frames for c in clips])
        feats, _ = extract_features(model, images, size[0], batch_size=16, progress=False)
        with torch.inference_mode():
            self.emb = model.backbone.pool(feats[-1].float()).float()
            h8, w8 = feats[1].shape[-2:]
            self.pix = torch.cat(  # (N, C, h/8, w/8): stage 1 pooled, stage 2, stage 3 upsampled
                [F.adaptive_avg_pool2d(feats[0].float(), (h8, w8)), feats[1].float()]
                + [F.interpolate(feats[2].float(), size=(h8, w8), mode="bilinear")],
                1,
            ).half()
        self.masks = torch.from_numpy(
            np.stack(
                [
                    cv2.resize(m, (w8 * 4, h8 * 4), interpolation=cv2.INTER_NEAREST)
                    for c in clips
                    for m in c.masks
                ]
            )
        ).long()
        self.masks8 = self.masks[:, 2::4, 2::4].contiguous()  # nearest, at the feature grid
        self.phases = torch.from_numpy(np.concatenate([c.phases for c in clips])).long()
        self.cvs = torch.from_numpy(np.concatenate([c.cvs for c in clips])).float()
        self.video_ids = np.concatenate([np.full(len(c), i) for i, c in enumerate(clips)])
        self.frame_indices = np.concatenate([np.arange(len(c)) for c in clips])

    def __len__(self) -> int:
        return len(self.video_ids)


def project_pixels(pool: Split, test: Split, dims: int) -> None:
    """PCA of the pool's pixel features (basis from pool pixels only), applied to pool and test: keeps the
    per-round head training cheap on 2 cores."""
    x = pool.pix.float().permute(0, 2, 3, 1).reshape(-1, pool.pix.shape[1])
    mean = x.mean(0)
    sample = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:20000]] - mean
    _, _, v = torch.pca_lowrank(sample, q=dims, center=False)
    for split in (pool, test):
        n, c, h, w = split.pix.shape
        flat = split.pix.float().permute(0, 2, 3, 1).reshape(-1, c)
        proj = (flat - mean) @ v
        proj = proj / proj.std(0, keepdim=True).clamp_min(1e-6)
        split.pix = proj.reshape(n, h, w, dims).permute(0, 3, 1, 2).contiguous().half()


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


def train_heads(
    heads: Heads, init: dict[str, torch.Tensor], data: Split, idx: np.ndarray, steps: int, seed: int
):
    """Fresh heads (same init every time) trained for a fixed number of steps on the labelled frames."""
    heads.load_state_dict(init)
    seed_everything(seed)
    optim = torch.optim.AdamW(heads.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=3e-3, total_steps=steps)
    gen = np.random.default_rng(seed)
    heads.train()
    for _ in range(steps):
        b = torch.from_numpy(gen.choice(idx, size=min(16, len(idx)), replace=False))
        seg, ph, cv = heads(data.pix[b].float(), data.emb[b])
        target = data.masks8[b]
        loss = F.cross_entropy(seg, target, ignore_index=IGNORE_INDEX) + 0.5 * dice_loss(seg, target)
        loss = loss + F.cross_entropy(ph, data.phases[b])
        loss = loss + F.binary_cross_entropy_with_logits(cv, data.cvs[b])
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
    heads.eval()


@torch.inference_mode()
def evaluate(heads: Heads, test: Split, schema: Any) -> dict[str, float]:
    seg_acc = SegmentationAccumulator(schema.num_classes)
    seg, ph, cv = heads(test.pix.float(), test.emb)
    up = F.interpolate(seg, size=test.masks.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
    for p, t in zip(up.numpy(), test.masks.numpy(), strict=True):
        seg_acc.update(p, t)
    return {
        "segmentation": float(seg_acc.result()["mIoU"]),
        "phase": phase_metrics(ph.argmax(1).numpy(), test.phases.numpy(), schema.num_phases)["macro_f1"],
        "cvs": cvs_metrics(torch.sigmoid(cv).numpy(), test.cvs.numpy(), list(schema.cvs_keys))["mAP"],
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
def run_seed(args: argparse.Namespace, seed: int, strategies: list[str], bar: Any) -> dict[str, Any]:
    seed_everything(seed)
    model, backbone = load_model(seed)
    schema = model.schema
    base = 1000 * (seed + 1)
    pool = Split(model, [base + i for i in range(args.pool_videos)], args.frames, args.size)
    test = Split(model, [base + 500 + i for i in range(args.test_videos)], args.frames, args.size)
    project_pixels(pool, test, args.pixel_dims)
    torch.manual_seed(seed)
    heads = Heads(pool.pix.shape[1], pool.emb.shape[1], schema.num_classes, schema.num_phases, schema.num_cvs)
    init = {k: v.clone() for k, v in heads.state_dict().items()}
    steps = args.steps
    train_heads(heads, init, pool, np.arange(len(pool)), steps, seed)
    full = evaluate(heads, test, schema)
    # the shared cold-start batch: random, de-duplicated (all strategies start from it)
    start = acq.get_strategy("random", seed=seed, min_gap_s=args.min_gap).select(
        pool_of(heads, pool, 0), args.k
    )
    where = {
        (int(v), int(f)): i for i, (v, f) in enumerate(zip(pool.video_ids, pool.frame_indices, strict=True))
    }
    curves: dict[str, dict[str, list[float]]] = {}
    for name in strategies:
        labelled = list(start)
        curve: dict[str, list[float]] = {"labels": [], **{t: [] for t in TASK_METRICS}}
        for r in range(args.rounds + 1):
            idx = np.array([where[(ref.video_id, ref.frame_index)] for ref in labelled])
            train_heads(heads, init, pool, idx, steps, seed)
            scores = evaluate(heads, test, schema)
            curve["labels"].append(len(labelled))
            for t in TASK_METRICS:
                curve[t].append(scores[t])
            bar.update(1)
            if r == args.rounds:
                break
            strategy = acq.get_strategy(name, seed=seed * 100 + r, min_gap_s=args.min_gap)
            mc = args.mc_passes if acq.needs_mc(name) else 0
            labelled += strategy.select(pool_of(heads, pool, mc, seed=r), args.k, labelled)  # oracle reveals
        curves[name] = curve
    return {"seed": seed, "full": full, "curves": curves, "backbone": backbone}


def load_model(seed: int) -> tuple[SurgeNetAssistModel, str]:
    torch.manual_seed(seed)
    try:
        return SurgeNetAssistModel.create(allow_download=False), "SurgeNetXL (cached weights)"
    except Exception:  # noqa: BLE001 - no cached weights: random-init backbone, said in the output
        return SurgeNetAssistModel.create(random_init=True), "random-init CaFormer-S18 (no cached SurgeNetXL)"


# --- summary ----------------------------------------------------------------------------------------------
def labels_to_reach(labels: np.ndarray, curve: np.ndarray, target: float) -> float | None:
    """Labels at which the (mean) curve first reaches ``target``, linearly interpolated; None if never."""
    if curve[0] >= target:
        return float(labels[0])
    for i in range(1, len(curve)):
        if curve[i] >= target:
            a, b = curve[i - 1], curve[i]
            return float(labels[i - 1] + (target - a) / (b - a) * (labels[i] - labels[i - 1]))
    return None


def summarise(results: list[dict[str, Any]], strategies: list[str], default: str) -> dict[str, Any]:
    labels = np.array(results[0]["curves"][strategies[0]]["labels"], float)
    full = {t: float(np.mean([r["full"][t] for r in results])) for t in TASK_METRICS}
    mean = {
        s: {t: np.mean([r["curves"][s][t] for r in results], axis=0) for t in [*TASK_METRICS, "overall"]}
        for s in strategies
    }
    out: dict[str, Any] = {"labels": labels.tolist(), "full": full, "strategies": {}}
    rnd = mean.get("random")
    for s in strategies:
        row: dict[str, Any] = {"final": {t: float(mean[s][t][-1]) for t in [*TASK_METRICS, "overall"]}}
        for t in TASK_METRICS:
            need = labels_to_reach(labels, mean[s][t], 0.95 * full[t])
            base = labels_to_reach(labels, rnd[t], 0.95 * full[t]) if rnd is not None else None
            row[f"labels_95_{t}"] = need
            row[f"ratio_95_{t}"] = None if need is None or base is None else need / base
        if rnd is not None:
            need = labels_to_reach(labels, mean[s]["overall"], float(rnd["overall"][-1]))
            row["labels_to_random_final"] = need
            row["ratio_to_random_final"] = None if need is None else need / float(labels[-1])
        out["strategies"][s] = row
    d = out["strategies"].get(default, {})
    # random's own first batch already at its final score: the curve is flat and no saving can be shown
    out["informative"] = rnd is not None and float(rnd["overall"][0]) < float(rnd["overall"][-1])
    ratio = d.get("ratio_to_random_final")
    out["target_met"] = bool(out["informative"] and ratio is not None and ratio <= 0.6)
    return out


def add_overall(results: list[dict[str, Any]]) -> None:
    """Overall = mean over tasks of score / full-data score (each task on its own scale)."""
    for r in results:
        for c in r["curves"].values():
            c["overall"] = list(
                np.mean([np.array(c[t]) / max(r["full"][t], 1e-9) for t in TASK_METRICS], axis=0)
            )


def plot(results: list[dict[str, Any]], strategies: list[str], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [*TASK_METRICS, "overall"]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4))
    labels = np.array(results[0]["curves"][strategies[0]]["labels"])
    for ax, t in zip(axes, keys, strict=True):
        for s in strategies:
            ys = np.array([r["curves"][s][t] for r in results])
            m, sd = ys.mean(0), ys.std(0)
            style = {"lw": 2.5} if s in ("hybrid", "random") else {"lw": 1.2, "alpha": 0.8}
            ax.plot(labels, m, label=s, **style)
            ax.fill_between(labels, m - sd, m + sd, alpha=0.12)
        full = 1.0 if t == "overall" else np.mean([r["full"][t] for r in results])
        ax.axhline(full, color="k", ls="--", lw=1, label="all pool frames")
        ax.axhline(0.95 * full, color="grey", ls=":", lw=1, label="95 % of that")
        ax.set_title(f"{t} ({TASK_METRICS.get(t, 'score / full-data score')})")
        ax.set_xlabel("labelled frames")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _fmt(x: float | None, nd: int = 2, suffix: str = "") -> str:
    return "never" if x is None else f"{x:.{nd}f}{suffix}"


def markdown(summary: dict[str, Any], meta: dict[str, Any], strategies: list[str]) -> str:
    n_max = int(summary["labels"][-1])
    lines = [
        f"Setup: {meta['setup']}.",
        f"Backbone: {meta['backbone']}. Wall time {meta['seconds']:.0f} s on {meta['machine']}.",
        "",
        "Full-data score (heads trained on every pool frame): "
        + ", ".join(f"{t} {TASK_METRICS[t]} {summary['full'][t]:.3f}" for t in TASK_METRICS)
        + ".",
        "",
        "Labels to reach 95 % of the full-data score (mean curve over seeds, interpolated; 'never' = not "
        f"within {n_max} labels) and the ratio to random's count; then the labels each strategy needs to "
        "reach random's final overall score (overall = mean over tasks of score / full-data score) as a "
        f"fraction of random's {n_max}.",
        "",
        "| strategy | seg mIoU @95 % | ratio | phase F1 @95 % | ratio | CVS mAP @95 % | ratio "
        "| final overall | labels to random's final | fraction of random's |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in strategies:
        r = summary["strategies"][s]
        cells = [s]
        for t in TASK_METRICS:
            cells += [_fmt(r[f"labels_95_{t}"], 0), _fmt(r[f"ratio_95_{t}"])]
        cells += [
            _fmt(r["final"]["overall"], 3),
            _fmt(r.get("labels_to_random_final"), 0),
            _fmt(r.get("ratio_to_random_final")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    d = summary["strategies"].get(meta["default"], {})
    verdict = "met" if summary["target_met"] else "NOT met"
    if not summary["informative"]:
        verdict = "NOT demonstrated (random's curve is flat: its first batch already scores its final score)"
    lines += [
        "",
        f"Target (default `{meta['default']}` reaches random's final score with <= 60 % of random's labels): "
        f"**{verdict}** ({_fmt(d.get('ratio_to_random_final'))}).",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--pool-videos", type=int, default=4)
    ap.add_argument("--test-videos", type=int, default=2)
    ap.add_argument("--frames", type=int, default=60, help="frames per video (1 fps)")
    ap.add_argument("--size", default="96x170")
    ap.add_argument("--steps", type=int, default=80, help="head-training steps per round")
    ap.add_argument("--pixel-dims", type=int, default=48, help="PCA dims of the pixel features")
    ap.add_argument("--mc-passes", type=int, default=8)
    ap.add_argument("--min-gap", type=float, default=3.0, help="seconds between picks in one video")
    ap.add_argument("--strategies", default=",".join(s for s in acq.STRATEGIES if s != "video-phase"))
    ap.add_argument("--png", default=str(ROOT / "docs/images/active_learning_curves.png"))
    ap.add_argument("--json", default=str(ROOT / "bench/results/active_learning.json"))
    ap.add_argument("--write-docs", action="store_true", help="update the results block of the docs page")
    args = ap.parse_args()
    args.size = tuple(int(v) for v in args.size.split("x"))
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if "random" not in strategies:
        strategies.insert(0, "random")
    t0 = time.time()
    total = args.seeds * len(strategies) * (args.rounds + 1)
    results = []
    with tqdm(total=total, desc="AL simulation (seed x strategy x round)") as bar:
        for seed in range(args.seeds):
            results.append(run_seed(args, seed, strategies, bar))
    add_overall(results)
    summary = summarise(results, strategies, acq.DEFAULT_STRATEGY)
    meta = {
        "backbone": results[0]["backbone"],
        "seconds": time.time() - t0,
        "machine": f"{platform.machine()} x{torch.get_num_threads()} threads",
        "default": acq.DEFAULT_STRATEGY,
        "setup": (
            f"{args.seeds} seeds; pool {args.pool_videos} synthetic videos x {args.frames} frames "
            f"({args.pool_videos * args.frames} frames, {args.size[0]}x{args.size[1]}), "
            f"test {args.test_videos} other videos; start {args.k} random frames, "
            f"{args.rounds} rounds of k={args.k}; heads "
            f"retrained from the same init for {args.steps} steps per round on cached backbone features "
            f"(pixel MLP on {args.pixel_dims} PCA dims + linear heads); "
            f"min gap {args.min_gap:g} s; BALD {args.mc_passes} MC-dropout passes"
        ),
    }
    title = f"{meta['backbone']} — {meta['setup']}"
    plot(results, strategies, Path(args.png), title if len(title) < 200 else title[:200] + "…")
    table = markdown(summary, meta, strategies)
    print(table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "summary": summary, "runs": results}, indent=1))
    if args.write_docs:
        doc = ROOT / "docs/active-learning.md"
        text = doc.read_text()
        if START in text and END in text:
            text = text[: text.index(START) + len(START)] + "\n" + table + "\n" + text[text.index(END) :]
            doc.write_text(text)
    print(f"PNG {args.png}\nJSON {args.json}")


if __name__ == "__main__":
    main()
