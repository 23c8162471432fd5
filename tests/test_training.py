"""Training loop on synthetic data: datasets from the store, fine-tuning, metrics, registry and gate."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from surgenet_assist.core.model import SurgeNetAssistModel
from surgenet_assist.core.store import LabelStore
from surgenet_assist.core.synthetic import generate_dataset
from surgenet_assist.training_loop import finetune as ft_mod
from surgenet_assist.training_loop.datasets import assign_splits, load_split, load_splits
from surgenet_assist.training_loop.evaluate import annotation_efficiency, evaluate_model
from surgenet_assist.training_loop.finetune import FinetuneConfig, LabelledFrames, finetune_heads
from surgenet_assist.training_loop.metrics import (
    SegmentationAccumulator,
    calibrate_cvs_thresholds,
    cvs_metrics_thresholded,
    phase_video_metrics,
    relaxed_diff,
)
from surgenet_assist.training_loop.registry import Registry, RegistryError, gate
from surgenet_assist.training_loop.synthetic_store import populate_store

SIZE = (64, 112)


def _frames(clips) -> LabelledFrames:
    return LabelledFrames(
        images=np.concatenate([c.frames for c in clips]),
        masks=np.concatenate([c.masks for c in clips]),
        phases=np.concatenate([c.phases for c in clips]),
        cvs=np.concatenate([c.cvs for c in clips]),
        video_ids=np.concatenate([np.full(len(c), i) for i, c in enumerate(clips)]),
    )


@pytest.fixture(scope="module")
def trained():
    """(untrained model, fine-tuned model, test frames): 4 training clips, 2 held-out clips."""
    clips = generate_dataset([11, 12, 13, 14, 15, 16], 24, *SIZE, world="v1")  # margins were set on v1
    train, test = _frames(clips[:4]), _frames(clips[4:])
    torch.manual_seed(0)
    untrained = SurgeNetAssistModel.create(random_init=True)
    model = copy.deepcopy(untrained)
    cfg = FinetuneConfig(epochs=12, temporal_epochs=30, short_side=64, batch_size=16, seed=0)
    history = finetune_heads(model, train, cfg, progress=False)
    return untrained, model, test, history


def test_short_finetune_beats_untrained_model_on_every_task(trained):
    untrained, model, test, history = trained
    before = evaluate_model(untrained, test, short_side=64)
    after = evaluate_model(model, test, short_side=64)
    for task in ("segmentation", "phase", "cvs"):
        assert after["primary"][task] > before["primary"][task] + 0.05, (
            task,
            before["primary"],
            after["primary"],
        )
    assert after["phase"]["accuracy"] > before["phase"]["accuracy"]
    assert history.losses["segmentation"][-1] < history.losses["segmentation"][0]
    assert bool(model.phase_head.temporal_trained)


def test_gate_rejects_worse_candidate_and_keeps_champion(trained, tmp_path):
    untrained, model, test, _ = trained
    store = LabelStore(f"sqlite:///{tmp_path}/s.db", migrate=True)
    registry = Registry(store, root=tmp_path / "registry")
    champ_metrics = evaluate_model(model, test, short_side=64)
    champ = registry.register_candidate(
        model, metrics=champ_metrics["primary"], manifest_hash="m1", seeds={"finetune": 0}, parent=None
    )
    registry.promote(champ)
    cand_metrics = evaluate_model(untrained, test, short_side=64)
    cand = registry.register_candidate(
        untrained, metrics=cand_metrics["primary"], manifest_hash="m2", seeds={"finetune": 0}, parent=champ
    )
    decision = gate(
        cand_metrics["primary"], champ_metrics["primary"], margin=0.005, tolerance=0.02,
        per_video=_agreeing_videos(cand_metrics["primary"], champ_metrics["primary"]),
    )
    assert not decision.promote
    registry.set_status(cand, "rejected")
    assert registry.champion()["version"] == champ
    rows = {r["version"]: r for r in registry.versions()}
    assert rows[cand]["status"] == "rejected"
    assert rows[cand]["metrics"]["parent"] == champ and rows[cand]["metrics"]["manifest_hash"] == "m2"
    assert rows[cand]["metrics"]["code_version"]
    # the better model does pass against the worse one
    better, worse = champ_metrics["primary"], cand_metrics["primary"]
    assert gate(better, worse, per_video=_agreeing_videos(better, worse)).promote


def _agreeing_videos(candidate: dict, champion: dict, videos: int = 3) -> dict:
    """Per-video numbers of test videos that each show the split's scores (the gate needs 3 test videos;
    its statistics are tested in test_gate.py)."""
    return {v: (candidate, champion) for v in range(videos)}


def test_gate_margin_and_per_task_tolerance():
    champ = {"segmentation": 0.50, "phase": 0.60, "cvs": 0.70}

    def judged(cand, **kw):
        return gate(cand, champ, per_video=_agreeing_videos(cand, champ), **kw)

    assert not judged({"segmentation": 0.502, "phase": 0.60, "cvs": 0.70}, margin=0.005).promote
    assert judged({"segmentation": 0.53, "phase": 0.60, "cvs": 0.70}, margin=0.005).promote
    # mean improves a lot but one task regresses beyond the tolerance
    regress = judged({"segmentation": 0.80, "phase": 0.55, "cvs": 0.70}, margin=0.005, tolerance=0.02)
    assert not regress.promote and any("phase 0.5500 is more than 0.02 below" in r for r in regress.reasons)
    assert gate({"segmentation": 0.1}, None).promote


def test_promote_rollback_and_pointer(trained, tmp_path):
    untrained, model, _, _ = trained
    store = LabelStore(f"sqlite:///{tmp_path}/s.db", migrate=True)
    registry = Registry(store, root=tmp_path / "registry")
    with pytest.raises(RegistryError):
        registry.rollback()
    a = registry.register_candidate(untrained, metrics={}, manifest_hash="a", seeds={}, parent=None)
    b = registry.register_candidate(model, metrics={}, manifest_hash="b", seeds={}, parent=a)
    registry.promote(a)
    registry.promote(b)
    status = {r["version"]: r["status"] for r in registry.versions()}
    assert status == {a: "previous-champion", b: "champion"}
    assert registry.rollback() == a
    status = {r["version"]: r["status"] for r in registry.versions()}
    assert status[a] == "champion" and status[b] != "champion"
    import json

    assert json.loads((tmp_path / "registry" / "CHAMPION").read_text())["version"] == a
    with pytest.raises(RegistryError):
        registry.promote("nope")


@pytest.mark.slow
def test_resume_after_crash_continues_from_last_checkpoint(tmp_path, monkeypatch):
    clips = generate_dataset([21], 16, *SIZE)
    data = _frames(clips)
    cfg = FinetuneConfig(
        epochs=3,
        temporal_epochs=3,
        short_side=64,
        batch_size=4,
        checkpoint_every=3,
        checkpoint_dir=str(tmp_path / "ckpt"),
    )
    torch.manual_seed(0)
    base = SurgeNetAssistModel.create(random_init=True)
    reference = copy.deepcopy(base)
    ref_cfg = FinetuneConfig(**{**cfg.__dict__, "checkpoint_dir": None})
    finetune_heads(reference, data, ref_cfg, progress=False)

    real_save, saves = ft_mod._atomic_save, []

    def crash_after_second_checkpoint(obj, path):
        real_save(obj, path)
        saves.append(obj["step"])
        if len(saves) == 2:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(ft_mod, "_atomic_save", crash_after_second_checkpoint)
    crashed = copy.deepcopy(base)
    with pytest.raises(KeyboardInterrupt):
        finetune_heads(crashed, data, cfg, progress=False)
    monkeypatch.setattr(ft_mod, "_atomic_save", real_save)
    resumed = copy.deepcopy(base)
    history = finetune_heads(resumed, data, cfg, progress=False)
    assert history.resumed_from_step == saves[-1] == 6
    assert history.steps == 3 * 4
    for (k, v), (_, r) in zip(
        resumed.heads_state_dict().items(), reference.heads_state_dict().items(), strict=True
    ):
        assert torch.allclose(v.float(), r.float(), atol=1e-5), k
    # a different config does not pick up the checkpoint
    other = FinetuneConfig(**{**cfg.__dict__, "lr": 1e-3, "epochs": 1, "temporal_epochs": 0})
    assert finetune_heads(copy.deepcopy(base), data, other, progress=False).resumed_from_step is None


def test_splits_by_video_are_stable_and_manifest_tracks_revisions(tmp_path):
    store = LabelStore(f"sqlite:///{tmp_path}/s.db", migrate=True)
    ids = populate_store(store, tmp_path / "clips", [1, 2, 3, 4, 5], frames=8, size=SIZE)
    first = assign_splits(store)
    assert set(first) == set(ids) and set(first.values()) == {"train", "val", "test"}
    populate_store(store, tmp_path / "clips", [6, 7], frames=8, size=SIZE)
    second = assign_splits(store)
    assert all(second[v] == s for v, s in first.items())
    # a final split that no decision reads appears as the store grows (10% of the videos)
    populate_store(store, tmp_path / "clips", [8, 9, 10], frames=8, size=SIZE)
    third = assign_splits(store)
    assert list(third.values()).count("final") == 1 and all(third[v] == s for v, s in second.items())
    assert set(assign_splits(store, (0.7, 0.15, 0.15)).values()) <= {"train", "val", "test", "final"}
    splits = load_splits(store, size=SIZE)
    videos = [set(v for v, _ in d.frame_keys) for d in splits.values()]
    assert all(not (a & b) for i, a in enumerate(videos) for b in videos[i + 1 :])
    assert sum(len(d.frames) for d in splits.values()) == 10 * 8
    train = splits["train"]
    before = train.manifest_hash
    vid, idx = train.frame_keys[0]
    corrected = np.zeros(SIZE, np.uint8)
    corrected[:, :10] = 5
    store.record_annotation(vid, idx, "segmentation", corrected, source="napari", author="dr")
    again = load_split(store, "train", size=SIZE)
    assert again.manifest_hash != before
    row = again.frame_keys.index((vid, idx))
    np.testing.assert_array_equal(again.frames.masks[row], corrected)  # newest human revision only


def test_metrics_follow_benchmark_definitions():
    # segmentation: dataset-level sums, not the mean of per-image IoUs
    acc = SegmentationAccumulator(2)
    acc.update(np.array([[0, 0, 0, 1]]), np.array([[0, 0, 0, 1]]))  # per-image IoU class 1 = 1
    acc.update(np.zeros((1, 100), int), np.concatenate([np.zeros(50), np.ones(50)])[None].astype(int))
    iou1 = acc.result()["iou_per_class"][1]
    assert iou1 == pytest.approx(1 / 51)
    # relaxed boundary: a late transition inside the first 10 s of a segment is forgiven
    gt = np.array([0] * 20 + [1] * 20)
    pred = np.array([0] * 25 + [1] * 15)
    assert (relaxed_diff(pred, gt, fps=1.0) == 0).all()
    strict = phase_video_metrics([(pred, gt)], 7)
    relaxed = phase_video_metrics([(pred, gt)], 7, relaxed=True)
    assert strict["accuracy"] == pytest.approx(35 / 40) and relaxed["accuracy"] == 1.0
    # per video, then averaged (a long perfect video does not swamp a short bad one)
    m = phase_video_metrics(
        [(np.zeros(100, int), np.zeros(100, int)), (np.ones(10, int), np.zeros(10, int))], 7
    )
    assert m["accuracy"] == pytest.approx(0.5)
    # CVS: rater means rounded (2/3 -> positive, 1/3 -> negative)
    target = np.array([[2 / 3, 0, 1], [1 / 3, 1, 0], [1, 0, 1], [0, 1, 0]], float)
    probs = np.array([[0.9, 0.1, 0.8], [0.2, 0.9, 0.3], [0.8, 0.2, 0.7], [0.1, 0.7, 0.2]])
    out = cvs_metrics_thresholded(probs, target, ["C1", "C2", "C3"])
    assert out["mAP"] == 1.0 and out["balanced_accuracy"] == 1.0
    thr = calibrate_cvs_thresholds(probs * 0.3, target)
    assert all(t < 0.5 for t in thr)


def test_annotation_efficiency_from_store(tmp_path):
    store = LabelStore(f"sqlite:///{tmp_path}/s.db", migrate=True)
    vid = store.add_video(str(tmp_path / "v.mp4"), fps=1.0, frame_count=10)
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 2
    for i in (0, 1):
        store.add_prediction(vid, i, "segmentation", mask, model_version="m1")
    store.record_annotation(vid, 0, "segmentation", mask, source="label-studio", author="a")  # accepted
    edited = mask.copy()
    edited[:, :4] = 5
    store.record_annotation(vid, 1, "segmentation", edited, source="label-studio", author="a")
    eff = annotation_efficiency(store)["segmentation"]
    assert eff["labels_with_prediction"] == 2
    assert eff["accepted_unchanged"] == 0.5
    assert 0 < eff["mean_edit"] < 1


def test_cli_models_and_evaluate(trained, tmp_path):
    import json

    from typer.testing import CliRunner

    from surgenet_assist.cli.main import app

    untrained, model, _, _ = trained
    url = f"sqlite:///{tmp_path}/s.db"
    store = LabelStore(url, migrate=True)
    populate_store(store, tmp_path / "clips", [71, 72], frames=8, size=SIZE, splits=["val", "test"])
    registry = Registry(store)
    a = registry.register_candidate(untrained, metrics={}, manifest_hash="a", seeds={}, parent=None)
    b = registry.register_candidate(model, metrics={}, manifest_hash="b", seeds={}, parent=a)
    runner = CliRunner()
    res = runner.invoke(app, ["models", "rollback", "--db", url])
    assert res.exit_code == 2 and "Error:" in res.output and "Fix:" in res.output
    for version in (a, b):
        assert runner.invoke(app, ["models", "promote", version, "--db", url]).exit_code == 0
    listed = json.loads(runner.invoke(app, ["models", "list", "--db", url, "--json"]).output)
    assert {r["version"]: r["status"] for r in listed} == {a: "previous-champion", b: "champion"}
    res = runner.invoke(app, ["models", "rollback", "--db", url])
    assert res.exit_code == 0 and a in res.output
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"frame_size: [{SIZE[0]}, {SIZE[1]}]\nrandom_init: true\nfinetune: {{short_side: 64}}\n")
    res = runner.invoke(app, ["evaluate", "--model", b, "--db", url, "--config", str(cfg), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{") :])
    assert out["model"] == b and out["counts"]["frames"] == 8
    assert set(out["metrics"]["primary"]) == {"segmentation", "phase", "cvs"}
    res = runner.invoke(app, ["evaluate", "--model", "nope", "--db", url, "--json"])
    assert res.exit_code == 2 and "no model version" in res.output


def test_per_video_numbers_come_from_one_pass_and_equal_evaluating_each_video(tmp_path):
    """The gate's per-video headline metrics are computed from the whole-split predictions; they must be
    exactly what evaluating each video on its own gives."""
    store = LabelStore(f"sqlite:///{tmp_path}/s.db", migrate=True)
    populate_store(store, tmp_path / "clips", [61, 62], frames=6, size=SIZE, splits=["test", "test"])
    data = load_split(store, "test", size=SIZE).frames
    torch.manual_seed(0)
    model = SurgeNetAssistModel.create(random_init=True)
    whole = evaluate_model(model, data, short_side=48, per_video=True, surface_distance=False)
    subsets = [data.subset(data.video_ids == v) for v in np.unique(data.video_ids)]
    alone = [evaluate_model(model, d, short_side=48, surface_distance=False)["primary"] for d in subsets]
    assert len(whole["per_video_primary"]) == 2
    for got, want in zip(whole["per_video_primary"], alone, strict=True):
        assert got.keys() == want.keys()
        for task in want:
            assert got[task] == pytest.approx(want[task], abs=1e-9)
