"""Annotation effort: the time model, the simulated annotator and the `effort` command's refusals.

The speed and savings targets are the bench's (``bench/effort.py``), not a test's: these check that the
pricing is the arithmetic it claims, that a perfect pre-annotation costs only the review, and that a video
without labels is refused with a message that says what to do.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from surgenet_assist.cli.main import app
from surgenet_assist.core.effort import (
    TARGET_IOU,
    Actions,
    TimeModel,
    annotate_masks,
    correct_object,
    cvs_toggles,
    phase_edits,
    polygon_fix,
    trace_object,
)
from surgenet_assist.core.schema import DEFAULT_SCHEMA
from surgenet_assist.training_loop.effort import LabelledVideo, annotate_video

IGNORE = DEFAULT_SCHEMA.ignore_index


def test_time_model_reproduces_a_hand_computed_case() -> None:
    model = TimeModel(click_s=2.0, vertex_s=1.0, boundary_edit_s=5.0, toggle_s=1.5, frame_review_s=3.0)
    actions = Actions(clicks=4, vertices=10, boundary_edits=2, toggles=3, frames_reviewed=5)
    # 4 x 2 + 10 x 1 + 2 x 5 + 3 x 1.5 + 5 x 3 = 8 + 10 + 10 + 4.5 + 15
    assert model.seconds(actions) == pytest.approx(47.5)
    assert (actions + Actions(clicks=1)).clicks == 5
    assert TimeModel().seconds(Actions(clicks=1)) == TimeModel().click_s


def _rectangles(t: int) -> np.ndarray:
    """64 x 96 frame: class 2 everywhere, a class-5 and a class-10 rectangle that move with ``t``."""
    mask = np.full((64, 96), 2, np.uint8)
    mask[10 + t : 30 + t, 10:40] = 5
    mask[20:50, 55 + t : 80 + t] = 10
    return mask


def _video(frames: int = 3) -> LabelledVideo:
    masks = np.stack([_rectangles(t) for t in range(frames)])
    images = np.stack([np.dstack([m * 20, m * 10, 255 - m * 20]).astype(np.uint8) for m in masks])
    phases = np.array([0, 0, 1][:frames])
    cvs = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]][:frames], np.float32)
    return LabelledVideo("rects", images, masks, phases, cvs)


def test_a_rectangle_is_four_vertices_and_exact() -> None:
    gt = np.zeros((40, 50), bool)
    gt[5:25, 10:30] = True
    vertices, mask = trace_object(gt)
    assert vertices == 4
    assert np.array_equal(mask, gt)


def test_workflow_a_costs_exactly_the_polygon_models_time() -> None:
    video = _video()
    model = TimeModel()
    effort = annotate_video(video, "a", None, time_model=model)
    # per frame: the background class (image border, 4 vertices, plus two rectangular holes of 4) and two
    # rectangles of 4 -> 20 vertices; phase [0, 0, 1]: 2 segments -> 1 boundary + 2 labels = 3 edits;
    # CVS ticks from all-unticked: 1 + 2 + 0 = 3 toggles; 3 keyframes reviewed
    expected = Actions(vertices=60, boundary_edits=3, toggles=3, frames_reviewed=3)
    assert effort.actions == expected
    assert effort.seconds == pytest.approx(
        60 * model.vertex_s + 3 * model.boundary_edit_s + 3 * model.toggle_s + 3 * model.frame_review_s
    )
    assert effort.quality_met and effort.min_object_iou >= TARGET_IOU


class _PerfectChampion:
    """Pre-annotates exactly the truth (what a perfect model would hand the annotator)."""

    version = "perfect"

    def __init__(self, video: LabelledVideo) -> None:
        self.video = video

    def masks(self, video: LabelledVideo) -> np.ndarray:
        return video.masks.copy()

    def phases(self, video: LabelledVideo) -> np.ndarray:
        return video.phases.copy()

    def cvs(self, video: LabelledVideo) -> np.ndarray:
        return video.cvs.copy()


class _NoClicks:
    """A click engine that must not be used: a perfect pre-annotation needs no corrections."""

    def embedding_from_stages(self, *args: object) -> None:
        raise AssertionError("the annotator clicked on a perfect pre-annotation")

    def segment(self, *args: object) -> None:
        raise AssertionError("the annotator clicked on a perfect pre-annotation")


@pytest.mark.parametrize("workflow", ["b", "d"])
def test_perfect_model_reaches_the_targets_with_zero_corrections(workflow: str) -> None:
    video = _video()
    champion = _PerfectChampion(video)
    no_propagation = [None] * len(video)  # (d) without propagation: the champion's masks are kept
    effort = annotate_video(video, workflow, champion, _NoClicks(), propagated=no_propagation)
    assert effort.actions == Actions(frames_reviewed=len(video))
    assert effort.quality_met
    assert effort.min_object_iou == 1.0 and effort.phase_exact and effort.cvs_exact
    assert set(effort.how) == {"accepted"}


def test_corrections_count_what_is_wrong() -> None:
    truth = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    assert phase_edits(truth, truth)[0] == 0
    shifted = np.array([0, 0, 1, 1, 1, 2, 2, 2])  # one boundary one frame early: one move
    assert phase_edits(truth, shifted)[0] == 1
    relabelled = np.array([0, 0, 0, 3, 3, 2, 2, 2])  # right boundaries, one wrong label
    assert phase_edits(truth, relabelled)[0] == 1
    edits, reached = phase_edits(truth, None)
    assert edits == 5 and np.array_equal(reached, truth)
    assert cvs_toggles(np.array([1, 0, 1]), np.array([0.9, 0.8, 0.2]))[0] == 2
    # a pre-annotated class that is not there is deleted with one click
    gt = _rectangles(0)
    pre = gt.copy()
    pre[0:5, 0:5] = 7
    frame = annotate_masks(gt, pre, IGNORE)
    deleted = [o for o in frame.objects if o.class_id == 7]
    assert deleted and deleted[0].how == "deleted" and deleted[0].actions == Actions(clicks=1)


def test_polygon_corrections_reach_the_target_and_cost_less_than_a_redraw() -> None:
    gt = np.zeros((100, 140), np.uint8)
    cv2.ellipse(gt, (70, 50), (55, 38), 0, 0, 360, 1, -1)
    gt = gt.astype(bool)
    start = gt.copy()
    start[35:65, 55:85] = False  # a square missed inside the object: IoU about 0.86
    assert (start & gt).sum() / (start | gt).sum() < TARGET_IOU
    redraw, _ = trace_object(gt)
    vertices, fixed = polygon_fix(start, gt)
    assert vertices == 4 < redraw  # the square's outline, not the ellipse's
    assert (fixed & gt).sum() / (fixed | gt).sum() >= TARGET_IOU
    result = correct_object(5, gt, start)
    assert result.iou >= TARGET_IOU and result.how == "polygon" and result.actions == Actions(vertices=4)


def _write_video(folder: Path, video: LabelledVideo, labels: bool) -> None:
    folder.mkdir(parents=True)
    for t, image in enumerate(video.frames):
        cv2.imwrite(str(folder / f"frame_{t:06d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not labels:
        return
    (folder / "labels").mkdir()
    for t, mask in enumerate(video.masks):
        cv2.imwrite(str(folder / "labels" / f"frame_{t:06d}.png"), mask)
    with open(folder / "labels" / "phases.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["frame", "phase"])
        w.writerows([t, DEFAULT_SCHEMA.phases[int(p)].name] for t, p in enumerate(video.phases))
    with open(folder / "labels" / "cvs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["frame", *DEFAULT_SCHEMA.cvs_keys])
        w.writerows([t, *map(int, v)] for t, v in enumerate(video.cvs))


def test_effort_refuses_videos_without_labels(tmp_path: Path) -> None:
    _write_video(tmp_path / "labelled", _video(), labels=True)
    _write_video(tmp_path / "unlabelled", _video(), labels=False)
    result = CliRunner().invoke(app, ["effort", "--videos", str(tmp_path), "--random-init"])
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert "video unlabelled has no labels" in out
    assert "Fix:" in out and "phases.csv" in out


def test_effort_refuses_keyframes_missing_a_label(tmp_path: Path) -> None:
    _write_video(tmp_path / "one", _video(), labels=True)
    _write_video(tmp_path / "two", _video(), labels=True)
    (tmp_path / "two" / "labels" / "cvs.csv").write_text("frame,C1,C2,C3\n0,1,0,0\n")
    result = CliRunner().invoke(app, ["effort", "--videos", str(tmp_path), "--random-init"])
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert "video two: 2 of 3 keyframes have no CVS label" in out


def test_effort_runs_on_labelled_videos(tmp_path: Path) -> None:
    for name in ("one", "two"):
        _write_video(tmp_path / name, _video(), labels=True)
    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        app,
        ["effort", "--videos", str(tmp_path), "--random-init", "--short-side", "64", "--out", str(report)],
    )
    assert result.exit_code == 0, result.output
    import json

    data = json.loads(report.read_text())
    assert data["videos"] == ["one", "two"]
    scratch = data["workflows"]["a (from scratch)"]
    assert scratch["hours_per_video"] > 0 and scratch["min_object_iou"] >= TARGET_IOU
    for w in ("b (correct pre-annotation)", "c (+ propagation)", "d (+ click engine)"):
        assert data["workflows"][w]["min_object_iou"] >= TARGET_IOU
