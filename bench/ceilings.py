"""Privileged ceilings: how well phase and CVS can be predicted from a perfect perception of the scene.

A learning benchmark that finds a model at chance cannot tell "the model failed" from "there is nothing to
see". These probes answer the second question on the same videos: logistic regressions, fitted on some
videos and scored on held-out ones, from

- the renderer's **true scene state** (``SyntheticClip.states``: scene variables and Cholec80 tool presence,
  never the phase or its progress), and tool presence alone (what a perfect tool detector would know),
- the **true masks** (class fractions of the frame and of a 3x3 grid; ignored pixels left out, because a
  segmentation model never predicts them),

to frame phase (macro-F1) and CVS (mAP), with the same metric functions the benchmarks use. Chance = the
probe's held-out predictions shuffled across frames (same marginals, no association), as in
``bench/active_learning.py``.

    .venv/bin/python bench/ceilings.py --benchmark active_learning [--seed-set calibration] [--json out.json]

computes them for every replicate of a registered benchmark (``bench/README.md``) in the active-learning
layout (pool videos to fit, test videos to score) and prints PASS/FAIL rows with 95 % t-intervals over
replicates.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from surgenet_assist.core.schema import DEFAULT_SCHEMA, LabelSchema
from surgenet_assist.core.synthetic import SyntheticClip, generate_clip
from surgenet_assist.training_loop.metrics import cvs_metrics, phase_metrics

PROBES = ("state", "tools", "mask")
TASKS = ("phase", "cvs")
PROBE_NAMES = {
    "state": "true scene state + tools",
    "tools": "Cholec80 tool presence alone",
    "mask": "true-mask class histograms",
}


def mask_features(masks: np.ndarray, num_classes: int, grid: int = 3) -> np.ndarray:
    """(frames, num_classes * (1 + grid**2)) class fractions of the whole frame and of each grid cell.

    Pixels outside ``0..num_classes-1`` (the ignore index) count in no class: a model's mask never has them.
    """
    masks = np.asarray(masks)
    n, h, w = masks.shape
    ys = np.linspace(0, h, grid + 1).astype(int)
    xs = np.linspace(0, w, grid + 1).astype(int)
    cells = [(slice(0, h), slice(0, w))] + [
        (slice(ys[i], ys[i + 1]), slice(xs[j], xs[j + 1])) for i in range(grid) for j in range(grid)
    ]
    out = np.zeros((n, len(cells), num_classes), np.float32)
    for c, (sy, sx) in enumerate(cells):
        part = masks[:, sy, sx].reshape(n, -1).astype(np.int64)
        size = max(1, part.shape[1])
        for k in range(num_classes):
            out[:, c, k] = (part == k).sum(axis=1) / size
    return out.reshape(n, -1)


def _model() -> Any:
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=1.0))


def _fit_predict(x_fit: np.ndarray, phases: np.ndarray, cvs: np.ndarray, x_test: np.ndarray) -> tuple:
    """Phase labels and CVS probabilities for the held-out frames."""
    if len(np.unique(phases)) > 1:
        phase_pred = _model().fit(x_fit, phases).predict(x_test)
    else:
        phase_pred = np.full(len(x_test), phases[0])
    cvs_prob = np.zeros((len(x_test), cvs.shape[1]))
    for j in range(cvs.shape[1]):
        y = cvs[:, j] >= 0.5
        if y.all() or not y.any():
            cvs_prob[:, j] = float(y[0])
        else:
            cvs_prob[:, j] = _model().fit(x_fit, y).predict_proba(x_test)[:, 1]
    return phase_pred, cvs_prob


def _scores(
    phase_pred: np.ndarray, cvs_prob: np.ndarray, phases: np.ndarray, cvs: np.ndarray, schema
) -> dict:
    return {
        "phase": phase_metrics(phase_pred, phases, schema.num_phases)["macro_f1"],
        "cvs": cvs_metrics(cvs_prob, cvs, list(schema.cvs_keys))["mAP"],
    }


def privileged_ceilings(
    fit_clips: Sequence[SyntheticClip],
    held_out_clips: Sequence[SyntheticClip],
    schema: LabelSchema = DEFAULT_SCHEMA,
    chance_perms: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """Ceilings of one replicate: probes fitted on ``fit_clips``, scored on ``held_out_clips`` (other videos).

    Returns ``{"state": {"phase": f1, "cvs": mAP}, "tools": {...}, "mask": {...}, "chance": {probe: {...}},
    "world": ..., "frames": {"fit": n, "held_out": m}}``.
    """
    clips = list(fit_clips) + list(held_out_clips)
    if not fit_clips or not held_out_clips or any(c.states is None for c in clips):
        raise ValueError("privileged ceilings need fit and held-out clips made by generate_clip")
    worlds = {c.world for c in clips}
    if len(worlds) != 1:
        raise ValueError(f"fit and held-out clips come from different worlds: {sorted(worlds)}")

    def stack(group: Sequence[SyntheticClip]) -> dict[str, np.ndarray]:
        return {
            "state": np.concatenate([c.states.features() for c in group]),
            "tools": np.concatenate([c.states.tools for c in group]).astype(np.float32),
            "mask": np.concatenate([mask_features(c.masks, schema.num_classes) for c in group]),
            "phases": np.concatenate([c.phases for c in group]),
            "cvs": np.concatenate([c.cvs for c in group]),
        }

    fit, test = stack(fit_clips), stack(held_out_clips)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"chance": {}}
    for probe in PROBES:
        phase_pred, cvs_prob = _fit_predict(fit[probe], fit["phases"], fit["cvs"], test[probe])
        out[probe] = _scores(phase_pred, cvs_prob, test["phases"], test["cvs"], schema)
        perms = [rng.permutation(len(phase_pred)) for _ in range(chance_perms)]
        shuffled = [_scores(phase_pred[p], cvs_prob[p], test["phases"], test["cvs"], schema) for p in perms]
        out["chance"][probe] = {t: float(np.mean([s[t] for s in shuffled])) for t in TASKS}
    out["world"] = worlds.pop()
    out["frames"] = {"fit": int(len(fit["phases"])), "held_out": int(len(test["phases"]))}
    return out


def ceiling_checks(
    per_replicate: Sequence[dict[str, Any]],
    interval: Callable[[Any], tuple[float, float]],
    margin: float = 0.05,
    probes: Sequence[str] = ("state", "mask"),
) -> list[dict[str, Any]]:
    """Regime-check rows (the format of ``bench/active_learning.py``'s ``regime_checks``): per probe and task,
    PASS when the lower end of the ceiling's interval over replicates exceeds mean chance + ``margin``.
    ``interval`` is the benchmark's own (mean, half-width) function, so every check uses one statistic.
    The regime needs the true-state and true-mask ceilings; ``"tools"`` may be added for information."""
    rows = []
    for probe in probes:
        for task in TASKS:
            mean, half = interval([r[probe][task] for r in per_replicate])
            chance = float(np.mean([r["chance"][probe][task] for r in per_replicate]))
            rows.append(
                {
                    "check": f"privileged ceiling ({PROBE_NAMES[probe]})",
                    "task": task,
                    "pass": bool(mean - half > chance + margin),
                    "detail": (
                        f"{mean:.3f} ± {half:.3f} (lower {mean - half:.3f}) vs chance {chance:.3f} + margin "
                        f"{margin:.2f}; {len(per_replicate)} replicates"
                    ),
                }
            )
    return rows


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import seeds
    from active_learning import t_interval

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--benchmark", default="active_learning", help="a benchmark registered in bench/README.md"
    )
    seeds.add_argument(ap)
    ap.add_argument("--world", default=None, help="calibration only: another world than the registered one")
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--size", default="96x170")
    ap.add_argument("--pool-videos", type=int, default=4)
    ap.add_argument("--test-videos", type=int, default=3)
    ap.add_argument("--camera-cuts", type=int, default=1)
    ap.add_argument("--margin", type=float, default=0.05)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    seed_set = seeds.load(args.benchmark, args.seed_set)
    world = seed_set.world
    if args.world and args.world != world:
        if args.seed_set == "report":
            raise seeds.SeedRegistryError(
                "a report run uses the registered world", f"drop --world (registered: {seed_set.world})"
            )
        world = args.world
    h, w = (int(v) for v in args.size.split("x"))
    print(f"{seed_set.describe()}; rendering world {world} at {h}x{w}")
    t0 = time.time()
    per_replicate = []
    for replicate in tqdm(seed_set.seeds, desc="privileged ceilings (replicates)"):

        def clips(role: str, count: int, replicate: int = replicate) -> list[SyntheticClip]:
            return [
                generate_clip(s, args.frames, h, w, camera_cuts=args.camera_cuts, world=world)
                for s in seed_set.video_seeds(replicate, role, count)
            ]

        per_replicate.append(
            privileged_ceilings(clips("pool", args.pool_videos), clips("test", args.test_videos))
        )
    rows = ceiling_checks(per_replicate, t_interval, args.margin)
    for row in rows:
        print(f"{'PASS' if row['pass'] else 'FAIL'}  {row['check']} ({row['task']}): {row['detail']}")
    for row in ceiling_checks(per_replicate, t_interval, args.margin, probes=("tools",)):
        print(f"(information) {row['check']} ({row['task']}): {row['detail']}")
    print(f"{time.time() - t0:.0f} s")
    if args.json:
        result = seed_set.stamp({"rendered_world": world, "checks": rows, "replicates": per_replicate})
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
