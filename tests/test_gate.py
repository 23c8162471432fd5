"""The promotion gate: a candidate is promoted only when its improvement over the champion clears the margin
with the lower bound of a paired bootstrap interval over test videos, and no task regresses."""

from __future__ import annotations

import numpy as np

from surgenet_assist.training_loop.registry import gate, paired_bootstrap


def _videos(deltas, base=0.6):
    champion = {"segmentation": base, "phase": base}
    return [({"segmentation": base + d, "phase": base + d}, champion) for d in deltas]


def test_a_tie_is_not_promoted():
    per_video = _videos([0.0] * 8)
    overall = {"segmentation": 0.6, "phase": 0.6}
    decision = gate(overall, overall, margin=0.005, per_video=per_video)
    assert not decision.promote and decision.improvement_ci == (0.0, 0.0) and decision.videos == 8


def test_a_lucky_mean_with_a_wide_interval_is_not_promoted():
    """Mean +0.02 (well above the margin) but driven by two of eight videos: the lower bound is below it.
    The old point-estimate rule promoted this candidate."""
    deltas = [0.10, 0.08, -0.01, -0.01, -0.005, 0.0, -0.005, 0.0]
    assert np.mean(deltas) > 0.015
    cand = {"segmentation": 0.62, "phase": 0.62}
    champ = {"segmentation": 0.60, "phase": 0.60}
    assert gate(cand, champ, margin=0.005).promote  # no per-video numbers: point estimate
    decision = gate(cand, champ, margin=0.005, per_video=_videos(deltas))
    assert not decision.promote and decision.improvement_ci[0] < 0.005 < decision.improvement_ci[1]
    assert "lower bound" in decision.reasons[0] and "8 test videos" in decision.reasons[0]


def test_a_consistent_improvement_is_promoted_with_its_interval():
    deltas = [0.03, 0.025, 0.035, 0.028, 0.032, 0.027, 0.031, 0.029]
    cand = {"segmentation": 0.63, "phase": 0.63}
    champ = {"segmentation": 0.60, "phase": 0.60}
    decision = gate(cand, champ, margin=0.005, per_video=_videos(deltas))
    assert decision.promote and decision.improvement_ci[0] > 0.02
    assert "95% CI" in decision.reasons[0]
    assert decision.to_dict()["improvement_ci"] == list(decision.improvement_ci)


def test_a_task_regression_blocks_promotion_whatever_the_interval():
    deltas = [0.05] * 8
    cand = {"segmentation": 0.75, "phase": 0.50}
    champ = {"segmentation": 0.60, "phase": 0.55}
    decision = gate(cand, champ, margin=0.005, tolerance=0.02, per_video=_videos(deltas))
    assert not decision.promote and any("phase regresses" in r for r in decision.reasons)


def test_bootstrap_resamples_videos_and_uses_only_tasks_both_measured():
    per_video = [
        ({"segmentation": 0.7, "cvs": 0.9}, {"segmentation": 0.6}),  # CVS measured for one model only
        ({"segmentation": 0.5}, {"segmentation": 0.5}),
    ]
    mean, (low, high), n = paired_bootstrap(per_video, n_boot=500)
    assert n == 2 and abs(mean - 0.05) < 1e-9 and 0.0 <= low <= mean <= high <= 0.1 + 1e-9
    single = gate({"segmentation": 0.7}, {"segmentation": 0.6}, per_video=per_video[:1])
    assert single.promote and single.videos == 1  # one video: the point estimate decides
