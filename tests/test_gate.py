"""The promotion gate (issue 22): a paired t-interval over test videos with the promised error rate, an
"insufficient evidence" verdict below the minimum number of test videos, regressions measured against a
fixed reference (no ratchet), and the test-minus-final gap's interval."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from surgenet_assist.training_loop.registry import (
    CONFIDENCE,
    INSUFFICIENT,
    MIN_TEST_VIDEOS,
    gap_interval,
    gate,
    next_reference,
    paired_interval,
    paired_test,
)

MARGIN = 0.005
NOMINAL = (1 - CONFIDENCE) / 2  # one-sided: the lower bound of the 95% interval must clear the margin


def _videos(deltas, base=0.6):
    champion = {"segmentation": base, "phase": base}
    return {f"video{i}": ({t: base + d for t in champion}, champion) for i, d in enumerate(deltas)}


def _overall(deltas, base=0.6):
    gain = float(np.mean(deltas))
    return {"segmentation": base + gain, "phase": base + gain}, {"segmentation": base, "phase": base}


def _promotes(deltas: np.ndarray) -> np.ndarray:
    """The gate's rule on (trials, videos) gains, vectorised: the very interval function the gate calls."""
    n = deltas.shape[-1]
    if n < MIN_TEST_VIDEOS:
        return np.zeros(deltas.shape[0], bool)
    return paired_interval(deltas)[0] > MARGIN


def _percentile_bootstrap_promotes(deltas: np.ndarray, n_boot: int = 400, seed: int = 1) -> np.ndarray:
    """The rule this gate replaced (percentile bootstrap over videos, from 2 videos up), for contrast."""
    rng = np.random.default_rng(seed)
    n = deltas.shape[-1]
    picks = rng.integers(0, n, size=(n_boot, n))
    means = deltas[:, picks].mean(-1)  # (trials, n_boot)
    return np.percentile(means, 2.5, axis=1) > MARGIN


@pytest.mark.parametrize("noise", ["normal", "heavy-tailed"])
def test_false_promotion_rate_at_true_gain_equal_to_the_margin_stays_nominal_for_2_to_10_videos(noise):
    """True per-video gain exactly at the margin: a promotion is a false one. Its rate must not exceed the
    nominal 2.5% for any number of test videos from 2 to 10 (Monte Carlo: 40,000 simulated stores per n,
    so the bound allows 3 standard errors of simulation noise). Per-video gains are normal or, heavier
    tailed, Student-t with 3 degrees of freedom; the t-interval assumes roughly symmetric gains."""
    rng = np.random.default_rng(20260422)
    trials = 40_000
    slack = 3 * np.sqrt(NOMINAL * (1 - NOMINAL) / trials)
    rates = {}
    for n in range(2, 11):
        spread = rng.standard_normal((trials, n)) if noise == "normal" else rng.standard_t(3, (trials, n))
        deltas = MARGIN + 0.02 * spread
        rates[n] = float(_promotes(deltas).mean())
        # the vectorised rule is the gate's decision: check on a sample through gate() itself
        for row in deltas[:150]:
            cand, champ = _overall(row)
            decided = gate(cand, champ, margin=MARGIN, tolerance=1.0, per_video=_videos(row)).promote
            assert decided == bool(_promotes(row[None])[0])
    assert rates[2] == 0.0  # below the minimum: never promoted
    assert all(rate <= NOMINAL + slack for rate in rates.values()), rates
    if noise == "normal":  # the t-interval is exact here: the rate is nominal, not merely below it
        assert all(abs(rates[n] - NOMINAL) <= slack for n in range(MIN_TEST_VIDEOS, 11)), rates


def test_the_simulation_catches_the_percentile_bootstrap():
    """The same simulation on the rule the gate replaced: far above nominal with few videos, as the issue
    found (24% with 2 videos, 11% with 3). A test that could not fail would pass here too."""
    rng = np.random.default_rng(7)
    rates = {}
    for n in (2, 3):
        deltas = MARGIN + 0.02 * rng.standard_normal((4000, n))
        rates[n] = float(_percentile_bootstrap_promotes(deltas).mean())
    assert rates[2] > 0.15 and rates[3] > 0.07, rates


def test_two_video_store_whose_candidate_wins_both_by_less_than_the_margin_is_not_promoted():
    deltas = [0.004, 0.0045]  # wins on both videos, by less than the margin
    cand, champ = _overall(deltas)
    decision = gate(cand, champ, margin=MARGIN, per_video=_videos(deltas))
    assert not decision.promote and decision.verdict == INSUFFICIENT and decision.videos == 2
    assert "insufficient evidence: 2 test videos" in decision.reasons[0]
    record = decision.to_dict()
    assert record["verdict"] == INSUFFICIENT and record["min_videos"] == MIN_TEST_VIDEOS
    # not even a clear win on both decides with two videos: the champion stays and the report says why
    big = [0.05, 0.051]
    decision = gate(*_overall(big), margin=MARGIN, per_video=_videos(big))
    assert not decision.promote and decision.verdict == INSUFFICIENT
    # the same clear, consistent win on three videos is evidence
    three = [0.05, 0.051, 0.049]
    decision = gate(*_overall(three), margin=MARGIN, per_video=_videos(three))
    assert decision.promote and decision.verdict == "promoted" and decision.improvement_ci[0] > MARGIN


def test_without_per_video_scores_there_is_no_evidence():
    decision = gate({"segmentation": 0.9}, {"segmentation": 0.5}, margin=MARGIN)
    assert not decision.promote and decision.verdict == INSUFFICIENT and decision.videos == 0
    assert gate({"segmentation": 0.1}, None).promote  # the first model has nothing to beat


def test_a_tie_is_not_promoted():
    decision = gate(*_overall([0.0] * 8), margin=MARGIN, per_video=_videos([0.0] * 8))
    assert not decision.promote and decision.improvement_ci == (0.0, 0.0) and decision.videos == 8
    assert decision.verdict == "rejected"


def test_a_lucky_mean_with_a_wide_interval_is_not_promoted():
    """Mean +0.02 (well above the margin) but carried by two of eight videos."""
    deltas = [0.10, 0.08, -0.01, -0.01, -0.005, 0.0, -0.005, 0.0]
    decision = gate(*_overall(deltas), margin=MARGIN, per_video=_videos(deltas))
    assert not decision.promote and decision.improvement_ci[0] < MARGIN < decision.improvement_ci[1]
    assert "lower bound does not clear" in decision.reasons[0] and "8 test videos" in decision.reasons[0]
    # the interval is Student's t over the eight per-video gains (scipy's, computed independently)
    low, high = stats.t.interval(0.95, 7, loc=np.mean(deltas), scale=stats.sem(deltas))
    assert decision.improvement_ci == pytest.approx((low, high))


def test_a_consistent_improvement_is_promoted_with_its_interval():
    deltas = [0.03, 0.025, 0.035, 0.028, 0.032, 0.027, 0.031, 0.029]
    decision = gate(*_overall(deltas), margin=MARGIN, per_video=_videos(deltas))
    assert decision.promote and decision.improvement_ci[0] > 0.02
    assert "95% CI" in decision.reasons[0]
    assert decision.to_dict()["improvement_ci"] == list(decision.improvement_ci)


def test_a_task_regression_blocks_promotion_whatever_the_interval():
    per_video = _videos([0.05] * 8)
    cand = {"segmentation": 0.75, "phase": 0.50}
    champ = {"segmentation": 0.60, "phase": 0.55}
    decision = gate(cand, champ, margin=MARGIN, tolerance=0.02, per_video=per_video)
    assert not decision.promote and any("phase 0.5000 is more than 0.02 below" in r for r in decision.reasons)


def _losing_candidate(champion: dict[str, float]) -> tuple[dict[str, float], dict]:
    """A candidate clearly better overall (+0.06 segmentation) that loses 0.015 on phase, on six videos
    that agree (per-video overall gains 0.0225 .. 0.0275)."""
    candidate = {"segmentation": champion["segmentation"] + 0.06, "phase": champion["phase"] - 0.015}
    per_video = {
        k: ({t: v + 0.001 * k for t, v in candidate.items()}, champion) for k in range(6)
    }
    return candidate, per_video


def _three_nights(with_reference: bool) -> tuple[list[bool], dict[str, float], dict]:
    champion = {"segmentation": 0.50, "phase": 0.80}
    reference = next_reference({}, champion, "v0")
    outcomes, last = [], None
    for night in (1, 2, 3):
        candidate, per_video = _losing_candidate(champion)
        last = gate(
            candidate, champion, margin=MARGIN, tolerance=0.02, per_video=per_video,
            reference=reference if with_reference else None,
        )
        outcomes.append(last.promote)
        if last.promote:
            reference = next_reference(reference, candidate, f"v{night}")
            champion = candidate
    return outcomes, champion, {"reference": reference, "last": last}


def test_no_ratchet_across_three_promotions_that_each_lose_0015():
    """Three nights, each candidate losing 0.015 on phase against the champion of the night. Measured
    against the champion (the old rule) every one passes the tolerance of 0.02 and phase falls 0.045 in
    three promotions; measured against the best score ever promoted, the second is already 0.03 below the
    first champion's phase, so it and the third are rejected and phase never falls more than 0.02."""
    ratchet, champion, _ = _three_nights(with_reference=False)
    assert ratchet == [True, True, True] and champion["phase"] == pytest.approx(0.755)

    fixed, champion, seen = _three_nights(with_reference=True)
    assert fixed == [True, False, False]
    assert champion["phase"] == pytest.approx(0.785) and champion["phase"] >= 0.80 - 0.02
    assert seen["reference"]["phase"] == {"score": 0.80, "version": "v0"}
    assert seen["reference"]["segmentation"] == {"score": pytest.approx(0.56), "version": "v1"}
    reasons = seen["last"].reasons
    below = "phase 0.7700 is more than 0.02 below its reference 0.8000"
    assert any(below in r and "v0" in r for r in reasons)


def test_the_verdict_without_model_started_test_videos_is_reported_not_decisive():
    deltas = [0.03, 0.031, 0.029, 0.03]
    per_video = _videos(deltas)
    started = {"video0", "video1"}
    decision = gate(*_overall(deltas), margin=MARGIN, per_video=per_video, model_started_videos=started)
    assert decision.promote  # all four videos decide
    without = decision.to_dict()["without_model_started"]
    assert without["units"] == 2 and without["outcome"] == INSUFFICIENT
    unknown = gate(*_overall(deltas), margin=MARGIN, per_video=per_video)
    assert unknown.to_dict()["without_model_started"] is None


def test_paired_test_needs_its_minimum_and_names_its_units():
    low = paired_test([1.0, 1.1], 0.0, min_units=3, unit="validation videos")
    assert low.outcome == INSUFFICIENT and "2 validation videos" in low.reason and low.interval is not None
    assert paired_test([1.0, 1.1, 0.9], 0.0).better
    with pytest.raises(ValueError, match="at least 2"):
        paired_interval([0.1])


def test_gap_interval_is_welchs():
    test_scores, final_scores = [0.80, 0.90, 0.85], [0.60, 0.70]
    gap, (low, high) = gap_interval(test_scores, final_scores)
    welch = stats.ttest_ind(test_scores, final_scores, equal_var=False).confidence_interval(0.95)
    assert gap == pytest.approx(0.85 - 0.65)
    assert (low, high) == pytest.approx((welch.low, welch.high))
    assert gap_interval([0.8], [0.6, 0.7])[1] is None  # one test video: no interval
