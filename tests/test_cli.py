"""The command line as a user runs it: weights, predict, demo, and friendly errors."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from surgenet_assist.cli.main import app
from surgenet_assist.core.synthetic import generate_clip

runner = CliRunner()


def test_weights_list_json():
    result = runner.invoke(app, ["weights", "list", "--json"])
    assert result.exit_code == 0, result.output
    entries = json.loads(result.stdout)
    xl = next(e for e in entries if e["name"] == "surgenetxl")
    assert xl["file_name"] == "SurgeNetXL_checkpoint_epoch0050_teacher.pth" and xl["cached"] is False
    assert xl["url"].startswith("https://huggingface.co/TimJaspersTue/SurgeNetModels/")


def test_weights_inspect_json(surgenetxl_test_checkpoint):
    result = runner.invoke(app, ["weights", "inspect", str(surgenetxl_test_checkpoint), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["num_params"] == 23_237_888
    assert info["architecture"] == "caformer_s18"


def test_weights_inspect_reports_bad_fit(tmp_path, surgenetxl_test_checkpoint):
    import torch

    state = torch.load(surgenetxl_test_checkpoint, weights_only=True)
    state.pop("norm.weight")
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    result = runner.invoke(app, ["weights", "inspect", str(path), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["missing_keys"] == ["head.norm.weight"]


def test_download_offline_is_a_friendly_error(monkeypatch):
    from surgenet_assist.core import weights

    monkeypatch.setenv("SURGENET_ASSIST_OFFLINE", "1")
    result = runner.invoke(app, ["predict", "nothing.mp4", "--out", "x"])
    assert result.exit_code == 2
    assert "Error:" in result.stderr and "Fix:" in result.stderr and "Traceback" not in result.stderr
    assert "SurgeNetXL_checkpoint_epoch0050_teacher.pth" in result.stderr
    assert str(weights.weights_cache_dir()) in result.stderr


def test_predict_video_writes_everything(tmp_path):
    clip = generate_clip(seed=5, num_frames=8, height=96, width=170)
    video = clip.write_video(tmp_path / "case01.avi", fps=4, codec="MJPG")
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["predict", str(video), "--out", str(out), "--random-init", "--fps", "2", "--short-side", "64"]
    )
    assert result.exit_code == 0, result.output
    masks = sorted((out / "masks").glob("*.png"))
    assert [m.name for m in masks] == [f"frame_{i:06d}.png" for i in (0, 2, 4, 6)]
    mask = cv2.imread(str(masks[0]), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (96, 170) and mask.dtype == np.uint8 and mask.max() < 13
    assert len(list((out / "overlays").glob("*.png"))) == 4
    with open(out / "phases.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["frame"]) for r in rows] == [0, 2, 4, 6] and rows[1]["timestamp"] == "0.500"
    with open(out / "cvs.csv") as fh:
        cvs_rows = list(csv.DictReader(fh))
    assert set(cvs_rows[0]) >= {"C1", "C2", "C3"}
    assert (out / "timeline.png").stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text())["frames"] == 4


def test_predict_single_image_and_corrupt_inputs(tmp_path):
    clip = generate_clip(seed=5, num_frames=1, height=64, width=96)
    image = tmp_path / "frame.png"
    cv2.imwrite(str(image), clip.frames[0][..., ::-1])
    result = runner.invoke(
        app, ["predict", str(image), "--out", str(tmp_path / "o"), "--random-init", "--short-side", "64"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "masks" / "frame_000000.png").exists()

    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    result = runner.invoke(app, ["predict", str(broken), "--out", str(tmp_path / "b"), "--random-init"])
    assert result.exit_code == 2 and "broken.mp4" in result.stderr and "Fix:" in result.stderr

    bad_png = tmp_path / "bad.png"
    bad_png.write_bytes(image.read_bytes()[:60])
    result = runner.invoke(app, ["predict", str(bad_png), "--out", str(tmp_path / "c"), "--random-init"])
    assert result.exit_code == 2 and "bad.png" in result.stderr


@pytest.mark.slow
def test_demo_small_run(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(
        app,
        [
            "demo",
            "--out",
            str(out),
            "--train-videos",
            "1",
            "--frames-per-video",
            "16",
            "--epochs",
            "2",
            "--short-side",
            "64",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["test_frames"] == 16 and "random-init" in summary["backbone"]
    assert 0 <= summary["metrics"]["segmentation"]["mIoU"] <= 1
    for name in (
        "metrics.md",
        "learning_curves.png",
        "pre-annotations/timeline.png",
        "model-bundle/bundle.json",
    ):
        assert (out / name).exists(), name
    assert len(list((out / "pre-annotations" / "overlays").glob("*.png"))) == 16
