"""One preprocessing contract per model: a bundle trained by the nightly cycle serves and evaluates exactly
as the cycle measured it (Predictor.from_bundle and the `evaluate` CLI give the numbers the registry
recorded)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from surgenet_assist.cli.main import app
from surgenet_assist.core.bundle import read_bundle_info
from surgenet_assist.core.predictor import Predictor
from surgenet_assist.core.store import LabelStore
from surgenet_assist.core.video import open_video
from surgenet_assist.training_loop.datasets import load_split
from surgenet_assist.training_loop.metrics import (
    SegmentationAccumulator,
    cvs_metrics_thresholded,
    phase_video_metrics,
)
from surgenet_assist.training_loop.nightly import NightlyConfig, run_cycle
from surgenet_assist.training_loop.registry import Registry
from surgenet_assist.training_loop.synthetic_store import populate_store

CLIP = (64, 112)  # the videos' own size
FRAME_SIZE = (48, 84)  # what the cycle resizes frames to (not the videos' size, not the default)
SHORT_SIDE = 48  # not the backbone's default (256) nor the cycle's default (224)
TOL = 1e-4


@pytest.fixture(scope="module")
def cycle(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    home = root / "home"
    mp = pytest.MonkeyPatch()
    mp.setenv("SURGENET_ASSIST_HOME", str(home))
    url = f"sqlite:///{root}/store.db"
    store = LabelStore(url, migrate=True)
    populate_store(
        store, root / "clips", [41, 42, 43, 44, 45], frames=10, size=CLIP,
        splits=["train", "train", "train", "val", "test"],
    )
    cfg = NightlyConfig.from_dict(
        {
            "db": url,
            "random_init": True,
            "frame_size": list(FRAME_SIZE),
            "finetune": {"epochs": 3, "temporal_epochs": 5, "short_side": SHORT_SIDE, "batch_size": 8},
            "pretrain": {"enabled": False},
            "rescore_max_frames_per_video": 2,
            "progress": False,
            "click_head": False,  # the interactive stage is not what this checks (test_click_head.py)
        }
    )
    report = run_cycle(cfg)
    assert "final_split" in report  # reported, never decided on (frames 0 until the store has a final video)
    row = Registry(store).get(report["candidate"])
    yield {"url": url, "store": store, "report": report, "row": row}
    store.close()
    mp.undo()


def test_bundle_records_how_it_was_trained(cycle):
    info = read_bundle_info(cycle["row"]["bundle_path"])
    pre = info.preprocessing
    assert pre.source == "training"
    assert pre.short_side == SHORT_SIDE and pre.frame_size == FRAME_SIZE and pre.temporal_fps == 1.0
    assert pre.mean == info.mean and pre.std == info.std
    raw = json.loads((info.path / "bundle.json").read_text())["preprocessing"]
    assert raw["short_side"] == SHORT_SIDE and raw["frame_size"] == list(FRAME_SIZE)


def test_predictor_from_bundle_reproduces_the_recorded_test_metrics(cycle):
    row, store = cycle["row"], cycle["store"]
    recorded = row["metrics"]["test"]
    thresholds = row["metrics"]["params"]["cvs_thresholds"]
    predictor = Predictor.from_bundle(row["bundle_path"], device="cpu", allow_download=False)
    assert predictor.short_side == SHORT_SIDE and predictor.frame_size == FRAME_SIZE

    test = load_split(store, "test", size=predictor.frame_size).frames
    preds = predictor.predict(list(test.images))
    schema = predictor.schema
    seg = SegmentationAccumulator(schema.num_classes, schema.ignore_index)
    for p, truth in zip(preds, test.masks, strict=True):
        seg.update(p.mask, truth)
    seg_result = seg.result()
    frame_probs = np.stack([p.phase_probs for p in preds])
    timeline = predictor.phase_timeline(np.stack([p.embedding for p in preds]), frame_probs)
    vids = test.video_ids
    phase = phase_video_metrics(
        [(timeline.argmax(1)[vids == v], test.phases[vids == v]) for v in np.unique(vids)], schema.num_phases
    )
    cvs_probs = np.stack([p.cvs_probs for p in preds])
    cvs = cvs_metrics_thresholded(cvs_probs, test.cvs, schema.cvs_keys, thresholds)

    assert seg_result["mIoU"] == pytest.approx(recorded["segmentation"]["mIoU"], abs=TOL)
    assert seg_result["pixel_accuracy"] == pytest.approx(recorded["segmentation"]["pixel_accuracy"], abs=TOL)
    assert phase["jaccard"] == pytest.approx(recorded["phase"]["jaccard"], abs=TOL)
    assert phase["accuracy"] == pytest.approx(recorded["phase"]["accuracy"], abs=TOL)
    assert cvs["mAP"] == pytest.approx(recorded["cvs"]["mAP"], abs=TOL)
    assert recorded["primary"] == pytest.approx(
        {"segmentation": seg_result["mIoU"], "phase": phase["jaccard"], "cvs": cvs["mAP"]}, abs=TOL
    )

    # the videos' own frames (not pre-resized) go through the same contract: the same model input
    video = next(v for v in store.videos() if v["split"] == "test")
    with open_video(video["path"], fps=video["fps"]) as source:
        native = [source.read_frame(i) for i in range(len(test))]
    assert native[0].shape[:2] == CLIP
    again = predictor.predict(native, keep_masks=False)
    np.testing.assert_allclose(np.stack([p.phase_probs for p in again]), frame_probs, atol=1e-5)


def test_evaluate_cli_reads_the_bundle_contract(cycle):
    row, url = cycle["row"], cycle["url"]
    recorded = row["metrics"]["test"]
    result = CliRunner().invoke(app, ["evaluate", "--model", row["version"], "--db", url, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout[result.stdout.index("{") :])
    assert out["counts"]["frames"] == recorded["frames"]
    assert out["metrics"]["primary"] == pytest.approx(recorded["primary"], abs=TOL)
    assert out["metrics"]["segmentation"]["mIoU"] == pytest.approx(recorded["segmentation"]["mIoU"], abs=TOL)


def test_explicit_short_side_override_is_logged(cycle, caplog):
    with caplog.at_level("WARNING", logger="surgenet_assist.core.predictor"):
        predictor = Predictor.from_bundle(cycle["row"]["bundle_path"], short_side=64, allow_download=False)
    assert predictor.short_side == 64
    assert "explicit override" in caplog.text and "48" in caplog.text
