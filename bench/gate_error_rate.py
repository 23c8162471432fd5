"""False-promotion rate of the promotion gate at true gain = margin, for 2-10 test videos.

    .venv/bin/python bench/gate_error_rate.py [--trials 100000] [--seed 11] [--json bench/results/gate.json]

A promotion is false when the candidate's true per-video gain equals the margin exactly (the boundary of
what the gate should reject); the intended rate is 2.5% (the lower bound of a two-sided 95% interval).
Per number of test videos n, ``trials`` simulated stores draw per-video gains = margin + 0.02 x noise
(normal, or Student-t with 3 degrees of freedom: symmetric, heavier tails) and the gate's own interval
function (``registry.paired_interval``, with its minimum of ``MIN_TEST_VIDEOS``) decides; the percentile
bootstrap over videos that the gate used before is run on the same draws for contrast (fewer trials: it
resamples). Each rate comes with its 95% Wilson interval. The test suite runs the same simulation with its
own seed (tests/test_gate.py); the figures in docs/nightly.md come from this script with a seed the tests
do not use.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import stats

from surgenet_assist.training_loop.registry import MIN_TEST_VIDEOS, paired_interval

MARGIN = 0.005
SPREAD = 0.02


def _rate(promoted: np.ndarray) -> dict[str, float]:
    k, n = int(promoted.sum()), len(promoted)
    ci = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
    return {"rate": k / n, "low": float(ci.low), "high": float(ci.high), "trials": n}


def _bootstrap(deltas: np.ndarray, rng: np.random.Generator, n_boot: int = 1000) -> np.ndarray:
    picks = rng.integers(0, deltas.shape[1], size=(n_boot, deltas.shape[1]))
    return np.percentile(deltas[:, picks].mean(-1), 2.5, axis=1) > MARGIN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100_000)
    parser.add_argument("--bootstrap-trials", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    rows = []
    for n in range(2, 11):
        row = {"videos": n}
        for noise in ("normal", "t3"):
            shape = (args.trials, n)
            draws = rng.standard_normal(shape) if noise == "normal" else rng.standard_t(3, shape)
            deltas = MARGIN + SPREAD * draws
            promoted = np.zeros(len(deltas), bool)
            if n >= MIN_TEST_VIDEOS:
                promoted = paired_interval(deltas)[0] > MARGIN
            row[f"t_interval_{noise}"] = _rate(promoted)
        deltas = MARGIN + SPREAD * rng.standard_normal((args.bootstrap_trials, n))
        row["percentile_bootstrap_normal"] = _rate(_bootstrap(deltas, rng))
        rows.append(row)
    print("| test videos | gate (t-interval), normal | gate, Student-t(3) | old percentile bootstrap |")
    print("|---|---|---|---|")
    for r in rows:
        cells = [
            f"{c['rate']:.2%} ({c['low']:.2%}-{c['high']:.2%})"
            for c in (r["t_interval_normal"], r["t_interval_t3"], r["percentile_bootstrap_normal"])
        ]
        print(f"| {r['videos']} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"seed": args.seed, "margin": MARGIN, "spread": SPREAD, "rows": rows}
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
