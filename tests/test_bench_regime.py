"""The active-learning benchmark's regime checks and interval helpers (bench/active_learning.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

_PATH = Path(__file__).resolve().parents[1] / "bench" / "active_learning.py"
_spec = importlib.util.spec_from_file_location("bench_active_learning", _PATH)
al = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(al)


def test_t_interval_matches_the_t_quantile():
    mean, half = al.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0
    assert abs(half - 2.776445 * np.std([1, 2, 3, 4, 5], ddof=1) / np.sqrt(5)) < 1e-5
    assert al.t_interval([0.3])[1] == float("inf")


def test_labels_to_reach_interpolates_and_censors():
    labels = np.array([3.0, 6.0, 9.0])
    assert al.labels_to_reach(labels, np.array([0.1, 0.3, 0.5]), 0.4) == 7.5
    assert al.labels_to_reach(labels, np.array([0.1, 0.2, 0.3]), 0.4) is None
    # a strategy that never reaches the target counts as needing one round more than the last budget
    slow, rnd = np.array([0.1, 0.2, 0.3]), np.array([0.1, 0.3, 0.5])
    assert al.ratio_to_target(labels, slow, rnd, 0.5, 12.0) == 12 / 9


def test_bootstrap_ratio_is_significant_only_when_the_interval_excludes_one():
    labels = np.arange(3, 30, 3, dtype=float)
    rng = np.random.default_rng(0)
    rnd = np.stack([np.linspace(0.2, 0.8, 9) + rng.normal(0, 0.01, 9) for _ in range(6)])
    fast = np.stack([np.linspace(0.2, 0.8, 9) ** 0.3 + rng.normal(0, 0.01, 9) for _ in range(6)])
    out = al.bootstrap_ratio(labels, fast, rnd, lambda idx: 0.75, censor=30.0, n_boot=300)
    assert out["ratio"] < 0.6 and out["significant"] and out["ci"][1] < 1.0
    same = al.bootstrap_ratio(labels, rnd, rnd, lambda idx: 0.75, censor=30.0, n_boot=300)
    assert same["ratio"] == 1.0 and not same["significant"]


def _finals(random_final, full, n=5):
    return {"random": {t: np.full(n, random_final) + np.linspace(-0.01, 0.01, n) for t in al.TASKS}}, {
        t: np.full(n, full) + np.linspace(-0.01, 0.01, n) for t in al.TASKS
    }


def test_regime_passes_only_with_a_real_upper_bound_above_chance():
    chance = {t: np.full(5, 0.14) for t in al.TASKS}
    finals, full = _finals(0.5, 0.7)
    good = al.regime_checks(full, chance, finals, np.ones(5, bool), margin=0.05)
    assert good["pass"] and all(good["task_pass"].values())
    # random at the last budget beats the "full-data" model: no upper bound
    finals, full = _finals(0.7, 0.5)
    assert not al.regime_checks(full, chance, finals, np.ones(5, bool), margin=0.05)["pass"]
    # near chance: fails even with an upper bound
    finals, full = _finals(0.16, 0.3)
    out = al.regime_checks(full, chance, finals, np.ones(5, bool), margin=0.05)
    assert not out["pass"] and not any(out["task_pass"].values())
    # too few seeds or unconverged full-data training fail the whole regime
    finals, full = _finals(0.5, 0.7, n=3)
    few_chance = {t: np.full(3, 0.14) for t in al.TASKS}
    assert not al.regime_checks(full, few_chance, finals, np.ones(3, bool), 0.05)["pass"]
    finals, full = _finals(0.5, 0.7)
    assert not al.regime_checks(full, chance, finals, np.zeros(5, bool), margin=0.05)["pass"]
