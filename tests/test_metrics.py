"""Evaluation metrics on small hand-computed examples (the arithmetic is in the comments).

Phase: Cholec80 ``Evaluate.m``/``Main.m`` (per video, then per phase over videos), strict and relaxed
boundary, rules chosen by the dataset. Segmentation: dataset-level IoU/Dice, ASSD. CVS: AP and balanced
accuracy with ONE ground-truth binarisation (rater mean >= 0.5).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from surgenet_assist.core.errors import SchemaError
from surgenet_assist.core.model import Preprocessing
from surgenet_assist.core.schema import AUTOLAPARO_SCHEMA, DEFAULT_SCHEMA, LabelSchema
from surgenet_assist.core.store import LabelStore
from surgenet_assist.training_loop import evaluate as evaluate_mod
from surgenet_assist.training_loop.finetune import LabelledFrames
from surgenet_assist.training_loop.metrics import (
    SegmentationAccumulator,
    assd,
    calibrate_cvs_thresholds,
    cvs_metrics,
    cvs_metrics_thresholded,
    cvs_positive,
    phase_video_metrics,
    relaxed_diff,
)

# fps 0.2 makes the 10-second relaxed window t = 10 * 0.2 = 2 frames, so the sequences stay tiny
FPS = 0.2


def _fake_model(schema: LabelSchema = DEFAULT_SCHEMA, temporal_fps: float = 1.0) -> SimpleNamespace:
    """What ``evaluate_model`` reads of a model when ``predict_frames`` is replaced: schema and contract."""
    contract = Preprocessing(short_side=64, mean=(0.5,) * 3, std=(0.5,) * 3, temporal_fps=temporal_fps)
    return SimpleNamespace(schema=schema, preprocessing_contract=lambda: contract)


# --- phase -------------------------------------------------------------------------------------------------
def test_relaxed_phase_metrics_use_relaxed_correctness_everywhere():
    gt = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 0, 0, 0, 1, 1, 1])  # late transition: frame 4 still predicted 0 (diff -1)
    strict = phase_video_metrics([(pred, gt)], 7, fps=FPS)
    # strict, phase 0: #gt 4, #pred 5, TP 4 -> P 4/5, R 4/4, J 4/5 (union 5), F1 2*0.8*1/1.8 = 8/9
    #         phase 1: #gt 4, #pred 3, TP 3 -> P 3/3, R 3/4, J 3/4 (union 4), F1 2*1*0.75/1.75 = 6/7
    assert strict["accuracy"] == pytest.approx(7 / 8)
    assert strict["jaccard_per_phase"][:2] == pytest.approx([4 / 5, 3 / 4])
    assert strict["jaccard"] == pytest.approx((4 / 5 + 3 / 4) / 2)  # 0.775
    assert strict["precision"] == pytest.approx((4 / 5 + 1) / 2)  # 0.9
    assert strict["recall"] == pytest.approx((1 + 3 / 4) / 2)  # 0.875
    assert strict["f1"] == pytest.approx((8 / 9 + 6 / 7) / 2)
    assert strict["macro_f1"] == pytest.approx((8 / 9 + 6 / 7) / 2)  # one video: same number
    assert strict["jaccard_per_phase"][2:] == [None] * 5  # phases absent from the ground truth

    # relaxed: frame 4 is in the first t = 2 frames of the phase-1 segment with diff -1 -> correct
    assert (relaxed_diff(pred, gt, FPS, cholec80_rules=False) == 0).all()
    relaxed = phase_video_metrics([(pred, gt)], 7, relaxed=True, fps=FPS)
    # phase 0: union = frames 0-4 (5), TP 5 -> J 5/5; P 5/#pred 5 = 1; R 5/#gt 4 -> clipped to 1
    # phase 1: union = frames 4-7 (4), TP 4 -> J 1; P 4/#pred 3 -> clipped to 1; R 4/4 = 1; F1 1
    assert relaxed["accuracy"] == 1.0
    assert relaxed["jaccard"] == 1.0
    assert relaxed["precision"] == 1.0 and relaxed["recall"] == 1.0
    assert relaxed["f1"] == 1.0
    assert relaxed["macro_f1"] == 1.0  # was the strict 0.873 before: F1 ignored the relaxation


def test_cholec80_rules_for_cholec80_only_not_for_every_7_phase_schema():
    # +2 jump at the end of 1-based phase 4 (GallbladderDissection -> CleaningCoagulation)
    gt = np.array([3, 3, 3, 3, 4, 4, 4, 4])
    pred = np.array([3, 3, 3, 5, 4, 4, 4, 4])  # frame 3: diff +2, in the last t = 2 frames of the segment
    assert DEFAULT_SCHEMA.phase_protocol == "cholec80"
    assert AUTOLAPARO_SCHEMA.phase_protocol is None and AUTOLAPARO_SCHEMA.num_phases == 7

    chole = phase_video_metrics([(pred, gt)], 7, True, FPS, protocol=DEFAULT_SCHEMA.phase_protocol)
    # Cholec80 forgives +1/+2 at the end of phases 4-7: 8/8 correct
    # phase 3: union frames 0-3 (4), TP 4 -> J 1; phase 4: J 1; phase 5 absent from gt -> not scored
    assert chole["accuracy"] == 1.0 and chole["jaccard"] == 1.0

    auto = phase_video_metrics([(pred, gt)], 7, True, FPS, protocol=AUTOLAPARO_SCHEMA.phase_protocol)
    # general rule forgives only +1: frame 3 wrong -> accuracy 7/8
    # phase 3: union 4, TP 3 -> J 3/4, P 3/3, R 3/4; phase 4: J 1 -> mean J (3/4 + 1)/2 = 0.875
    assert auto["accuracy"] == pytest.approx(7 / 8)
    assert auto["jaccard"] == pytest.approx(0.875)
    assert auto["recall_per_phase"][3] == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="phase protocol"):
        phase_video_metrics([(pred, gt)], 7, relaxed=True, protocol="m2cai")


def test_cholec80_late_transition_by_two_at_the_start_of_phases_6_7():
    gt = np.array([4, 4, 4, 4, 5, 5, 5, 5])  # 1-based phases 5 then 6
    pred = np.array([4, 4, 4, 4, 3, 5, 5, 5])  # frame 4: diff -2 in the first t = 2 frames of phase 6
    assert relaxed_diff(pred, gt, FPS, cholec80_rules=True).tolist() == [0] * 8
    assert relaxed_diff(pred, gt, FPS, cholec80_rules=False).tolist() == [0, 0, 0, 0, -2, 0, 0, 0]


def test_schema_protocol_is_chosen_by_dataset_and_survives_files(tmp_path):
    seven = {"name": "other", "phases": [f"P{i}" for i in range(7)]}
    assert LabelSchema.from_dict(seven).phase_protocol is None  # 7 phases, not Cholec80's
    old_bundle = DEFAULT_SCHEMA.to_dict()
    del old_bundle["phase_protocol"]  # written before the field existed
    assert LabelSchema.from_dict(old_bundle) == DEFAULT_SCHEMA
    assert LabelSchema.from_dict(seven | {"phase_protocol": "cholec80"}).phase_protocol == "cholec80"
    path = tmp_path / "autolaparo.yaml"
    AUTOLAPARO_SCHEMA.to_file(path)
    assert LabelSchema.from_file(path) == AUTOLAPARO_SCHEMA
    with pytest.raises(SchemaError, match="phase_protocol"):
        LabelSchema.from_dict(seven | {"phase_protocol": "m2cai"})


@pytest.mark.parametrize(("schema", "accuracy"), [(DEFAULT_SCHEMA, 1.0), (AUTOLAPARO_SCHEMA, 7 / 8)])
def test_evaluate_model_relaxes_by_the_schema_protocol(monkeypatch, schema, accuracy):
    gt = np.array([3, 3, 3, 3, 4, 4, 4, 4])
    pred = np.array([3, 3, 3, 5, 4, 4, 4, 4])  # as above: 8/8 with Cholec80 rules, 7/8 without
    onehot = np.eye(7)[pred]
    fake = {"phase_probs": onehot, "phase_timeline": onehot, "cvs_probs": np.zeros((8, 3))}
    monkeypatch.setattr(evaluate_mod, "predict_frames", lambda *a, **k: fake)
    data = LabelledFrames(np.zeros((8, 2, 2, 3), np.uint8), phases=gt, video_ids=np.zeros(8, np.int64))
    out = evaluate_mod.evaluate_model(_fake_model(schema), data, fps=FPS)
    assert out["phase_relaxed"]["accuracy"] == pytest.approx(accuracy)
    assert out["phase"]["accuracy"] == pytest.approx(7 / 8)  # strict never relaxes
    assert out["primary"]["phase"] == out["phase"]["jaccard"]


def test_phase_scores_per_video_then_per_phase():
    v1 = (np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1]))  # perfect: J, P, R, F1 = 1 for phases 0 and 1
    v2 = (np.array([0, 0, 1, 1]), np.array([0, 0, 0, 0]))  # phase 0: TP 2, union 4, #pred 2, #gt 4
    m = phase_video_metrics([v1, v2], 7)
    # v2 phase 0: J 2/4, P 2/2, R 2/4, F1 2*1*0.5/1.5 = 2/3; phase 1 absent from v2's gt -> NaN there
    # per phase over videos: J0 (1 + 1/2)/2 = 3/4, J1 = 1 (v1 only) -> jaccard (3/4 + 1)/2 = 7/8
    # (pooling the frames instead would give J0 4/6 and J1 2/4)
    assert m["jaccard_per_phase"][:2] == pytest.approx([3 / 4, 1.0])
    assert m["jaccard"] == pytest.approx(7 / 8)
    assert m["jaccard_std_phases"] == pytest.approx(1 / 8)  # std of [3/4, 1]
    assert m["precision"] == pytest.approx(1.0)  # P0 (1 + 1)/2, P1 1
    assert m["recall"] == pytest.approx(7 / 8)  # R0 (1 + 1/2)/2 = 3/4, R1 1
    assert m["f1"] == pytest.approx((5 / 6 + 1) / 2)  # F1_0 (1 + 2/3)/2 = 5/6, F1_1 1 -> 11/12
    assert m["macro_f1"] == pytest.approx(5 / 6)  # per video: v1 1, v2 2/3 -> mean 5/6
    assert m["accuracy"] == pytest.approx(3 / 4)  # v1 1, v2 2/4
    assert m["accuracy_std_videos"] == pytest.approx(1 / 4)


def test_phase_never_predicted_scores_zero_precision():
    gt, pred = np.array([0, 0, 1, 1]), np.array([0, 0, 0, 0])
    m = phase_video_metrics([(pred, gt)], 2)
    # phase 1: never predicted -> P 0 (not NaN), R 0/2, F1 0, J 0/2; phase 0: P 2/4, R 1, J 2/4
    assert m["precision_per_phase"] == pytest.approx([0.5, 0.0])
    assert m["f1_per_phase"] == pytest.approx([2 / 3, 0.0])  # 2*0.5*1/1.5
    assert m["jaccard"] == pytest.approx(0.25)


# --- segmentation ----------------------------------------------------------------------------------------
def test_iou_dice_accumulate_over_the_dataset_not_per_image():
    acc = SegmentationAccumulator(3)
    acc.update(np.array([[1, 1, 0, 0]]), np.array([[1, 1, 0, 0]]))  # class 1: I 2, U 2 (per image IoU 1)
    acc.update(np.array([[1, 0, 0, 0]]), np.array([[1, 1, 1, 1]]))  # class 1: I 1, U 4 (per image IoU 1/4)
    r = acc.result()
    # class 1: IoU (2 + 1)/(2 + 4) = 1/2, not the per-image mean (1 + 1/4)/2 = 5/8
    #          Dice 2*3/(#gt 6 + #pred 3) = 2/3, not the per-image mean (1 + 2*1/(4+1))/2 = 7/10
    # class 0: I 2 + 0, U 2 + 3 -> IoU 2/5; Dice 2*2/(#gt 2 + #pred 5) = 4/7
    # class 2: in neither prediction nor ground truth -> None, left out of the means
    assert r["iou_per_class"] == pytest.approx([2 / 5, 1 / 2, None])
    assert r["dice_per_class"] == pytest.approx([4 / 7, 2 / 3, None])
    assert r["mIoU"] == pytest.approx((2 / 5 + 1 / 2) / 2)
    assert r["mDice"] == pytest.approx((4 / 7 + 2 / 3) / 2)
    assert "assd_per_class" not in r  # surface distances only when asked for


def test_assd_two_squares_offset_by_a_known_distance():
    gt = np.zeros((10, 12), bool)
    gt[2:5, 2:5] = True  # 3x3 square, rows 2-4, cols 2-4: surface = its 8 outer pixels (centre is inside)
    far = np.zeros_like(gt)
    far[2:5, 7:10] = True  # same square 5 columns to the right
    # gt -> far: rows 2 and 4: cols 2, 3, 4 are 5, 4, 3 from col 7; row 3: cols 2, 4 -> 5, 3
    #   sum = 2*(5 + 4 + 3) + (5 + 3) = 32 over 8 surface pixels; far -> gt is the mirror image: 32 over 8
    # ASSD = (32 + 32)/(8 + 8) = 4.0 (not 5: the facing edges are only 3 apart)
    assert assd(far, gt) == pytest.approx(4.0)
    near = np.zeros_like(gt)
    near[2:5, 4:7] = True  # offset 2, overlapping column 4
    # gt -> near: cols 2, 3, 4 are 2, 1, 0 from near's left edge (col 4); row 3: cols 2, 4 -> 2, 0
    #   sum = 2*(2 + 1 + 0) + (2 + 0) = 8 over 8 -> symmetric ASSD (8 + 8)/16 = 1.0
    assert assd(near, gt) == pytest.approx(1.0)
    assert assd(gt, gt) == 0.0
    assert assd(np.zeros_like(gt), gt) == float("inf")  # one side empty: undefined
    assert assd(np.zeros_like(gt), np.zeros_like(gt)) == 0.0


def test_assd_per_class_over_images_and_absent_classes():
    gt = np.zeros((10, 12), np.uint8)
    gt[2:5, 2:5] = 1
    far = np.zeros_like(gt)
    far[2:5, 7:10] = 1
    acc = SegmentationAccumulator(3, surface_distance=True)
    acc.update(far, gt)  # class 1 ASSD 4 (above)
    acc.update(gt, gt)  # class 1 ASSD 0
    acc.update(np.zeros_like(gt), gt)  # class 1 only in the ground truth: undefined, counted apart
    missed = gt.copy()
    missed[0, 0] = 2  # class 2 only in the prediction: undefined
    acc.update(missed, gt)  # class 1 ASSD 0 again
    r = acc.result()
    # class 1: images with the class in both: 4, 0, 0 -> 4/3; class 0 (background): defined in all four
    assert r["assd_per_class"][1] == pytest.approx(4 / 3)
    assert r["assd_per_class"][2] is None
    assert r["assd_undefined_per_class"] == [0, 1, 1]
    assert r["mASSD"] == pytest.approx(np.mean([r["assd_per_class"][0], 4 / 3]))
    ignored = np.full_like(gt, 255)
    ignored[:, :6] = gt[:, :6]
    acc2 = SegmentationAccumulator(3, surface_distance=True)
    acc2.update(np.where(ignored == 255, 1, ignored), ignored)  # class 1 predicted in ignored pixels only
    assert acc2.result()["assd_per_class"][1] == 0.0  # pixels with ground truth 255 take no part


# --- CVS -------------------------------------------------------------------------------------------------
def test_cvs_rater_mean_of_one_half_is_positive_everywhere():
    flags = cvs_positive(np.array([0.5, 0.49, 2 / 3, 1 / 3, np.nan]))
    assert flags.tolist() == [True, False, True, False, False]
    target = np.array([[1.0], [0.5], [0.0], [0.0]])  # rater means; 0.5 -> positive: y = 1, 1, 0, 0
    probs = np.array([[0.9], [0.6], [0.7], [0.1]])
    out = cvs_metrics_thresholded(probs, target, ["C1"])
    # ranked by score: 0.9 (pos), 0.7 (neg), 0.6 (pos), 0.1 (neg)
    # AP = sum (R_n - R_n-1) P_n = 0.5 * 1/1 + 0 * 1/2 + 0.5 * 2/3 = 5/6   (np.round(0.5) = 0 would give 1.0)
    assert out["ap_per_criterion"]["C1"] == pytest.approx(5 / 6)
    assert out["mAP"] == pytest.approx(5 / 6)
    # at 0.5: predicted 1, 1, 1, 0 -> sensitivity 2/2, specificity 1/2 -> balanced accuracy 3/4
    assert out["balanced_accuracy"] == pytest.approx(3 / 4)
    same = cvs_metrics(probs, target, ["C1"])
    assert same["mAP"] == pytest.approx(5 / 6) and same["balanced_accuracy"] == pytest.approx(3 / 4)
    # calibration binarises the same way: y = 1, 1, 0, 0 with scores 0.9, 0.4, 0.2, 0.1 is separated
    # (balanced accuracy 1) by the grid thresholds 2/9 and 3/9; the one closest to 0.5 is 3/9
    assert calibrate_cvs_thresholds(np.array([[0.9], [0.4], [0.2], [0.1]]), target) == pytest.approx([1 / 3])


def test_cvs_unknown_targets_skipped_and_thresholds_applied():
    target = np.array([[1.0], [np.nan], [0.0], [0.0]])
    probs = np.array([[0.4], [0.9], [0.3], [0.5]])
    out = cvs_metrics_thresholded(probs, target, ["C1"], thresholds=[0.35])
    # known rows y = 1, 0, 0 with scores 0.4, 0.3, 0.5: ranked 0.5 (neg), 0.4 (pos) -> AP 1 * 1/2 = 1/2
    # at 0.35: predicted 1, 0, 1 -> sensitivity 1/1, specificity 1/2 -> 3/4
    assert out["ap_per_criterion"]["C1"] == pytest.approx(1 / 2)
    assert out["balanced_accuracy_per_criterion"]["C1"] == pytest.approx(3 / 4)


def test_annotation_efficiency_binarises_cvs_like_the_metrics(tmp_path):
    store = LabelStore(f"sqlite:///{tmp_path}/s.db", migrate=True)
    vid = store.add_video(str(tmp_path / "v.mp4"), fps=1.0, frame_count=10)
    store.add_prediction(vid, 0, "cvs", [0.7, 0.2, 0.1], model_version="m1")
    store.record_annotation(vid, 0, "cvs", [0.5, 0.0, 0.0], source="label-studio", author="a")
    eff = evaluate_mod.annotation_efficiency(store)["cvs"]
    # label 0.5 -> positive, prediction 0.7 -> positive: all three criteria agree (np.round(0.5) = 0 did not)
    assert eff["accepted_unchanged"] == 1.0
    assert eff["mean_edit"] == pytest.approx((0.2 + 0.2 + 0.1) / 3)


# --- phase rows, the relaxed window in seconds, whole-video context, the published script ----------------
def test_relaxed_window_at_5_fps_is_50_rows():
    gt = np.array([0] * 100 + [1] * 100)
    late_50 = np.array([0] * 150 + [1] * 50)  # the first 50 rows of phase 1 still predicted 0 (diff -1)
    late_51 = np.array([0] * 151 + [1] * 49)
    assert (relaxed_diff(late_50, gt, fps=5.0, cholec80_rules=False) == 0).all()  # 10 s at 5 fps = 50 rows
    assert (relaxed_diff(late_51, gt, fps=5.0, cholec80_rules=False) != 0).sum() == 1  # the 51st row is not
    assert (relaxed_diff(late_51, gt, fps=1.0, cholec80_rules=False) != 0).sum() == 41  # at 1 fps: 10 rows


def test_phase_is_scored_on_the_temporal_grid_at_its_rate(monkeypatch):
    """A 25 fps video, a temporal model at 5 fps: its rows are every 5th frame (200 grid rows = 40 s), and a
    burst of segmentation keyframes between them (frames 1-4 and 501-504, phase labels inherited, predicted
    wrong on purpose) is not scored. The relaxed window is 10 s = 50 grid rows."""
    grid = np.arange(0, 1000, 5)
    burst = np.array([1, 2, 3, 4, 501, 502, 503, 504])
    frames = np.concatenate([grid, burst])
    gt = np.where(frames < 500, 0, 1)
    pred = np.where(frames < 750, 0, 1)  # phase 1 starts at frame 500, predicted from 750: 50 rows late
    pred[len(grid) :] = 5  # the burst rows: wrong
    onehot = np.eye(7)[pred]
    fake = {"phase_probs": onehot, "phase_timeline": onehot, "cvs_probs": np.zeros((len(frames), 3))}
    monkeypatch.setattr(evaluate_mod, "predict_frames", lambda *a, **k: fake)
    n = len(frames)
    data = LabelledFrames(
        np.zeros((n, 2, 2, 3), np.uint8), phases=gt, video_ids=np.zeros(n, np.int64),
        frame_indices=frames, fps=np.full(n, 25.0),
    )
    out = evaluate_mod.evaluate_model(_fake_model(AUTOLAPARO_SCHEMA, temporal_fps=5.0), data)
    assert out["phase_rows"] == {"rows": 200, "labelled_rows": 208, "fps": {"0": 5.0}}
    assert out["phase_relaxed"]["accuracy"] == 1.0  # 50 late rows at 5 fps: inside the 10 s window
    assert out["phase"]["accuracy"] == pytest.approx(150 / 200)  # strict; the burst's 8 wrong rows not in it
    assert out["phase_frame_only"]["accuracy"] == pytest.approx(150 / 200)
    assert sum(map(sum, out["phase_confusion"])) == 200
    with pytest.raises(ValueError, match="wrong unit"):
        evaluate_mod.evaluate_model(_fake_model(temporal_fps=5.0), data, fps=1.0)


def test_matlab_compat_reproduces_the_published_script_on_a_hand_computed_case():
    """``Evaluate.m`` + ``Main.m`` followed line by line on one video, fps 0.2 (t = 10 * 0.2 = 2 rows);
    1-based phases as the script numbers them: gt 1 1 1 1 2 2 2 2 3 3, pred 1 4 1 2 2 2 2 2 2 2.

    diff = pred - gt = 0 3 0 1 | 0 0 0 0 | -1 -1
    phase 1 (rows 1-4, curDiff 0 3 0 1): head rule curDiff(curDiff(1:2)==-1) = 0 changes nothing; end rule
      curDiff(curDiff(3:4)==1) = 0: the mask [0 1] is computed on rows 3-4 but indexes rows 1-2, so row 2
      (the +3 error!) becomes 0 and the early transition at row 4 stays 1 -> 0 0 0 1
    phase 2 (rows 5-8): all 0; phase 3 (rows 9-10, curDiff -1 -1): head rule forgives both -> 0 0
    updatedDiff = 0 0 0 1 0 0 0 0 0 0 -> accuracy 9/10
    phase 1: union gt{1-4} u pred{1,3} = 4 rows, TP 3 (row 4 is 1) -> J 3/4; P 3/#pred 2 = 150 % -> 100 %
      (Main.m clips); R 3/4
    phase 2: union gt{5-8} u pred{4-10} = 7 rows, TP 6 (row 4 is 1) -> J 6/7; P 6/7; R 6/4 -> 100 %
    phase 3: never predicted: union = gt{9,10}, TP 2 -> J 1; P 2/0 = Inf -> 100 % (ours: 0); R 1
    phases 4-7 absent from gt: NaN. Main.m: mean(meanJaccPerPhase) over all 7 -> NaN (it uses mean, not
    nanmean), nanmean for precision -> (1 + 6/7 + 1)/3.
    The intent instead forgives row 4 (early transition) and keeps row 2 wrong: phase 2 J 7/7.
    """
    gt = np.array([1, 1, 1, 1, 2, 2, 2, 2, 3, 3]) - 1
    pred = np.array([1, 4, 1, 2, 2, 2, 2, 2, 2, 2]) - 1
    matlab = relaxed_diff(pred, gt, FPS, cholec80_rules=True, matlab_compat=True)
    assert matlab.tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    assert relaxed_diff(pred, gt, FPS, cholec80_rules=True).tolist() == [0, 3, 0, 0, 0, 0, 0, 0, 0, 0]

    m = phase_video_metrics([(pred, gt)], 7, True, FPS, protocol="cholec80", matlab_compat=True)
    assert m["accuracy"] == pytest.approx(9 / 10)
    assert m["jaccard_per_phase"] == pytest.approx([3 / 4, 6 / 7, 1.0, None, None, None, None])
    assert m["precision_per_phase"][:3] == pytest.approx([1.0, 6 / 7, 1.0])
    assert m["recall_per_phase"][:3] == pytest.approx([3 / 4, 1.0, 1.0])
    assert np.isnan(m["jaccard"]) and np.isnan(m["recall"])  # Main.m's mean over phases absent from gt
    assert m["precision"] == pytest.approx((1 + 6 / 7 + 1) / 3)  # its nanmean
    assert m["precision_std_phases"] == pytest.approx(np.std([1, 6 / 7, 1], ddof=1))  # MATLAB's N-1 std
    assert "f1" not in m and m["matlab_compat"] is True

    ours = phase_video_metrics([(pred, gt)], 7, True, FPS, protocol="cholec80")
    assert ours["jaccard_per_phase"][:3] == pytest.approx([3 / 4, 1.0, 1.0])
    assert ours["precision_per_phase"][2] == 0.0  # never predicted
    with pytest.raises(ValueError, match="Cholec80 relaxed"):
        phase_video_metrics([(pred, gt)], 7, True, FPS, protocol=None, matlab_compat=True)


def test_matlab_compat_aggregates_over_videos_as_main_m():
    """Two 3-phase videos (all phases present in the union of videos): per phase nanmean over videos, then
    mean over phases, with MATLAB's N-1 std over phases and over videos."""
    v1 = (np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 1, 1, 2, 2]))  # perfect
    v2 = (np.array([0, 0, 0, 0, 1, 1]), np.array([0, 0, 0, 0, 1, 1]))  # perfect, no phase 2
    # fps 0.1: t = 1 row. Both videos perfect: J = 1 per phase present; phase 2 only in v1.
    m = phase_video_metrics([v1, v2], 3, True, 0.1, protocol="cholec80", matlab_compat=True)
    assert m["jaccard"] == 1.0 and m["jaccard_std_phases"] == 0.0 and m["accuracy_std_videos"] == 0.0
    v3 = (np.array([0, 0, 0, 0, 0, 0]), np.array([0, 0, 1, 1, 2, 2]))  # phases 1-2 never predicted
    m = phase_video_metrics([v1, v3], 3, True, 0.1, protocol="cholec80", matlab_compat=True)
    # v3, relaxed per segment (t = 1): phase 0 correct; phase 1 rows 2-3: diff -1 -1, the head row 2 is
    # forgiven, the end rule finds no +1; phase 2 rows 4-5: diff -2 -2 (1-based phase 3: general rule, none
    # forgiven). updated = 0 0 0 -1 -2 -2 -> accuracy 3/6.
    # Phase 0: union rows 0-5 (pred 0 everywhere) = 6, TP 3 -> J 1/2, P 3/6, R 3/2 -> 1.
    # Phase 1: union {2, 3}, TP 1 -> J 1/2, P 1/0 = Inf -> 1, R 1/2. Phase 2: union {4, 5}, TP 0 -> J 0,
    # P 0/0 = NaN, R 0.
    assert m["accuracy"] == pytest.approx((1 + 0.5) / 2)
    assert m["accuracy_std_videos"] == pytest.approx(np.std([1, 0.5], ddof=1))
    assert m["jaccard_per_phase"] == pytest.approx([0.75, 0.75, 0.5])
    assert m["precision_per_phase"] == pytest.approx([0.75, 1.0, 1.0])  # v3 phase 2 NaN skipped by nanmean
    assert m["jaccard"] == pytest.approx(2 / 3)
    assert m["jaccard_std_phases"] == pytest.approx(np.std([0.75, 0.75, 0.5], ddof=1))


def test_temporal_model_sees_the_whole_video_in_evaluation_as_in_serving(tmp_path):
    """Phase labelled on the second half of a clip only: evaluation decodes the unlabelled first half for the
    causal temporal model's context, so its timeline on the labelled rows equals what serving
    (``Predictor.predict_video``) gives for those frames; the labelled fragment alone gives another."""
    import torch

    from surgenet_assist.core.model import SurgeNetAssistModel
    from surgenet_assist.core.predictor import Predictor
    from surgenet_assist.core.store import AnnotationInput, build_payload
    from surgenet_assist.core.synthetic import generate_clip
    from surgenet_assist.training_loop.datasets import load_split

    size = (64, 112)
    clip = generate_clip(3, 16, *size, fps=1.0)
    folder = clip.write_frames(tmp_path / "clip")
    store = LabelStore(f"sqlite:///{tmp_path}/s.db", migrate=True)
    vid = store.add_video(str(folder), fps=1.0, frame_count=16, split="test")
    segments = {"segments": [[8, 15, 2]]}
    store.record_annotations([AnnotationInput(
        video_id=vid, frame_start=8, frame_end=15, task="phase",
        payload=build_payload("phase", segments, store.schema), source="import", author="t",
    )])
    split = load_split(store, "test", size=size)
    assert split.frames.frame_indices.tolist() == list(range(8, 16))
    torch.manual_seed(0)
    model = SurgeNetAssistModel.create(random_init=True)
    model.phase_head.temporal_trained.fill_(True)
    model.preprocessing = Preprocessing(
        short_side=64, mean=tuple(model.backbone.mean), std=tuple(model.backbone.std), frame_size=size
    )
    whole = evaluate_mod.predict_frames(model, split.frames, device="cpu", video_paths=split.video_paths)
    fragment = evaluate_mod.predict_frames(model, split.frames, device="cpu")
    served = Predictor(model, device="cpu").predict_video(folder)
    np.testing.assert_allclose(whole["phase_timeline"], served.phase_timeline_probs[8:], atol=1e-4)
    assert not np.allclose(fragment["phase_timeline"], served.phase_timeline_probs[8:], atol=1e-4)
    store.close()
