"""Independent test labels (issue 22 item 4), in the training loop: what the gate needs to show its verdict
without the test videos a compared model helped label, and the split rule of instant heads (a video without a
split, or a test or final video, fits none)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surgenet_assist.core.backbone import load_backbone
from surgenet_assist.core.embedding_cache import EmbeddingCache
from surgenet_assist.core.store import LabelStore, Provenance
from surgenet_assist.training_loop.assist import DayOneAssist
from surgenet_assist.training_loop.datasets import (
    combined_manifest_hash,
    label_origins,
    load_split,
    videos_started_from,
    without_videos,
)
from surgenet_assist.training_loop.instant import fits_instant_heads
from surgenet_assist.training_loop.synthetic_store import populate_store

SIZE = (48, 80)


def test_the_gate_can_leave_out_test_videos_labelled_from_a_compared_model(tmp_path):
    store = LabelStore(f"sqlite:///{tmp_path / 's.db'}", migrate=True)
    a, b, c = populate_store(store, tmp_path / "clips", [1, 2, 3], frames=4, size=SIZE, splits=["test"] * 3)
    mask = np.zeros(SIZE, np.uint8)
    # video a: one frame corrected from the candidate's pre-annotation; video b: from an unknown model's
    store.record_annotation(
        a, 2, "segmentation", mask, source="napari", author="dr", provenance=Provenance.started_from("cand-7")
    )
    store.record_annotation(
        b, 1, "cvs", [1.0, 0.0, 0.0], source="label-studio", author="ls-user:3",
        provenance=Provenance.started_from(None),
    )
    origins = label_origins(store, "test")
    assert origins[a].started_from == {"cand-7": 1} and origins[b].started_from == {None: 1}
    assert origins[c].independent and origins[a].labels == origins[c].labels  # every label of the video
    # an unknown model might be the candidate: both go; a model neither helped with: only the unknown one
    assert videos_started_from(origins, {"cand-7", "champ-6"}) == {a, b}
    assert videos_started_from(origins, {"champ-6"}) == {b}
    assert videos_started_from(origins) == {a, b}
    data = load_split(store, "test", size=SIZE)
    kept = without_videos(data, videos_started_from(origins, {"cand-7"}))
    assert {v for v, _ in kept.frame_keys} == {c} and len(kept.frames) == 4
    assert set(np.unique(kept.frames.video_ids)) == {c}
    assert kept.manifest and {e["video"] for e in kept.manifest} == {kept.video_keys[c]}
    assert combined_manifest_hash({"test": kept}) != combined_manifest_hash({"test": data})
    assert without_videos(data, []).manifest_hash == data.manifest_hash


def test_unreviewed_labels_are_left_out_of_the_split_unless_asked(tmp_path):
    store = LabelStore(f"sqlite:///{tmp_path / 's.db'}", migrate=True)
    (vid,) = populate_store(store, tmp_path / "clips", [4], frames=3, size=SIZE, splits=["train"])
    painted = np.full(SIZE, 5, np.uint8)
    store.record_annotation(  # newer than the synthetic label, but nobody looked at it
        vid, 0, "segmentation", painted, source="label-studio", author="ls-user:1", ls_annotation_id=9,
        provenance=Provenance.started_from("champ-1", reviewed=False),
    )
    default = load_split(store, "train", size=SIZE)
    trusting = load_split(store, "train", size=SIZE, unreviewed=True)
    row = default.frame_keys.index((vid, 0))
    assert not (default.frames.masks[row] == 5).all() and (trusting.frames.masks[row] == 5).all()
    assert default.manifest_hash != trusting.manifest_hash
    assert label_origins(store, "train")[vid].independent
    assert label_origins(store, "train", unreviewed=True)[vid].started_from == {"champ-1": 1}


@pytest.mark.parametrize(
    ("split", "fits"), [("train", True), ("val", True), ("test", False), ("final", False), (None, False)]
)
def test_split_rule_of_instant_heads(split, fits):
    assert fits_instant_heads(split) is fits


def test_a_video_without_a_split_trains_no_instant_head(tmp_path):
    store = LabelStore(f"sqlite:///{tmp_path / 's.db'}", migrate=True)
    train, cleared, test = populate_store(
        store, tmp_path / "clips", [5, 6, 7], frames=3, size=SIZE, splits=["train", "train", "test"]
    )
    store.set_split(cleared, None)  # a split cleared by hand: it might become a test video tomorrow
    torch.manual_seed(0)
    assist = DayOneAssist(
        store, load_backbone(random_init=True), short_side=64, sample_fps=None,
        cache=EmbeddingCache(tmp_path / "emb"), instant_root=tmp_path / "instant", worker=False,
    )
    seg, phase, cvs, videos = assist.training_data()
    paths = {v["id"]: v["path"] for v in store.videos()}
    assert set(videos["segmentation"]) == set(videos["cvs"]) == set(videos["phase"]) == {paths[train]}
    assert len(seg) == len(cvs) == 3 and len(phase) == 3
    store.set_split(cleared, "val")  # once it has a split that may fit them, its labels count
    assert set(assist.training_data()[3]["segmentation"]) == {paths[train], paths[cleared]}


@pytest.mark.slow
def test_the_cycle_tells_the_gate_which_test_videos_a_model_helped_label(
    tmp_path, _isolated_home, monkeypatch
):
    from surgenet_assist.training_loop import nightly

    url = f"sqlite:///{tmp_path / 's.db'}"
    store = LabelStore(url, migrate=True)
    splits = ["train", "train", "val", "test", "test"]
    ids = populate_store(store, tmp_path / "clips", [11, 12, 13, 14, 15], frames=4, size=SIZE, splits=splits)
    helped = ids[3]
    started = Provenance.started_from("v0")
    store.record_annotation(
        helped, 1, "cvs", [1.0, 0.0, 1.0], source="napari", author="dr", provenance=started
    )
    seen = {}
    judge = nightly.judge_candidate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return judge(*args, **kwargs)

    monkeypatch.setattr(nightly, "judge_candidate", spy)
    cfg = {
        "db": url, "random_init": True, "frame_size": list(SIZE), "progress": False, "click_head": False,
        "finetune": {"epochs": 1, "temporal_epochs": 1, "short_side": 64, "batch_size": 8},
        "pretrain": {"enabled": False}, "rescore_max_frames_per_video": 2,
    }
    report = nightly.run_cycle(nightly.NightlyConfig.from_dict(cfg))
    assert report["candidate"] and seen["model_started_videos"] == {helped}
    store.close()
