"""DINO continued pretraining: EMA teacher, centering, multi-crop, and the validation gate on the backbone."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from surgenet_assist.core.backbone import load_backbone
from surgenet_assist.core.model import SurgeNetAssistModel
from surgenet_assist.core.store import LabelStore
from surgenet_assist.core.synthetic import generate_clip
from surgenet_assist.training_loop.datasets import load_splits
from surgenet_assist.training_loop.finetune import FinetuneConfig
from surgenet_assist.training_loop.nightly import NightlyConfig, pretrain_due
from surgenet_assist.training_loop.pretrain import (
    DINOConfig,
    DINOLoss,
    DINOTrainer,
    FramePool,
    MultiCrop,
    continue_pretraining,
    select_backbone,
)
from surgenet_assist.training_loop.synthetic_store import populate_store

SIZE = (64, 112)


def _tiny_cfg(**kw) -> DINOConfig:
    base = dict(
        steps=4,
        batch_size=4,
        global_size=64,
        local_size=32,
        local_crops=2,
        out_dim=256,
        warmup_steps=1,
        lr=1e-4,
        replay_fraction=0.5,
        checkpoint_path=None,
    )
    return DINOConfig(**(base | kw))


@pytest.fixture(scope="module")
def frames():
    return [f for f in generate_clip(41, 8, *SIZE).frames]


def test_multicrop_views_have_dino_shapes(frames):
    views = MultiCrop(64, 32, n_local=3)(torch.from_numpy(frames[0]).permute(2, 0, 1).contiguous())
    assert [tuple(v.shape) for v in views] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 3
    assert views[0].dtype == torch.float32 and not torch.equal(views[0], views[1])


def test_centering_is_an_ema_of_teacher_outputs():
    loss = DINOLoss(8, center_momentum=0.9, centering="ema")  # DINO v1's centre, the ablation's
    teacher = [torch.randn(4, 8), torch.randn(4, 8)]
    student = [torch.randn(4, 8) for _ in range(4)]
    value = loss(student, teacher)
    assert torch.isfinite(value)
    expected = 0.1 * torch.cat(teacher).mean(0, keepdim=True)
    assert torch.allclose(loss.center, expected, atol=1e-6)
    loss(student, teacher)
    assert torch.allclose(
        loss.center, 0.9 * expected + 0.1 * torch.cat(teacher).mean(0, keepdim=True), atol=1e-6
    )


def test_teacher_is_ema_of_student_and_losses_stay_finite(frames):
    torch.manual_seed(0)
    trainer = DINOTrainer(load_backbone(random_init=True), _tiny_cfg(steps=3), device="cpu")
    # teacher and student start equal (same backbone, same head)
    for pt, ps in zip(trainer.teacher.parameters(), trainer.student.parameters(), strict=True):
        assert torch.equal(pt, ps)
    teacher_before = copy.deepcopy(trainer.teacher)
    m = trainer.momentum_at(0)
    trainer.train_step(frames[:4])
    changed = 0
    for pt, pb, ps in zip(
        trainer.teacher.parameters(), teacher_before.parameters(), trainer.student.parameters(), strict=True
    ):
        assert torch.allclose(pt, m * pb + (1 - m) * ps, atol=1e-6)
        changed += int(not torch.equal(pt, pb))
    assert changed > 0
    assert trainer.momentum_at(0) < trainer.momentum_at(2) < trainer.momentum_at(3) == pytest.approx(1.0)
    assert trainer.loss.center.abs().sum() == 0  # Sinkhorn-Knopp centring (default) keeps no running centre
    assert len(trainer.teacher_stds) == len(trainer.koleo) == 1 and trainer.teacher_stds[0] > 0
    trainer.train_step(frames[4:8])
    assert all(np.isfinite(trainer.losses))
    adapted = trainer.adapted()
    assert not any(p.requires_grad for p in adapted.parameters())
    assert adapted.weights_origin == "continued-pretraining"


def test_replay_pool_mixes_old_frames(tmp_path, frames):
    folder = generate_clip(42, 4, *SIZE).write_frames(tmp_path / "old")
    old = FramePool([(str(folder), 1.0, i) for i in range(4)])
    new_folder = generate_clip(43, 4, *SIZE).write_frames(tmp_path / "new")
    new = FramePool([(str(new_folder), 1.0, i) for i in range(4)])
    seen = []
    trainer = DINOTrainer(load_backbone(random_init=True), _tiny_cfg(steps=2), device="cpu")
    trainer.train_step = lambda images: seen.append(images) or 0.0  # record what each batch holds
    trainer.train(new, old, progress=False)
    old_set = {generate_clip(42, 4, *SIZE).frames[i].tobytes() for i in range(4)}
    assert len(seen) == 2 and all(sum(im.tobytes() in old_set for im in batch) == 2 for batch in seen)


def test_pretraining_due_on_new_frames_and_gate_on_validation(tmp_path):
    store = LabelStore(f"sqlite:///{tmp_path}/s.db", migrate=True)
    populate_store(
        store,
        tmp_path / "clips",
        [51, 52, 53],
        frames=12,
        size=SIZE,
        splits=["train", "val", "test", "val"],  # the unlabelled video: a validation one
        unlabelled_seeds=[54],
        world="v1",  # the backbone gate's verdicts below were set on v1
    )
    cfg = NightlyConfig(
        db=store.url,
        random_init=True,
        frame_size=SIZE,
        progress=False,
        finetune=FinetuneConfig(epochs=4, temporal_epochs=3, short_side=64, batch_size=6),
    )
    cfg.pretrain.threshold_frames = 40
    assert pretrain_due(store, cfg) == (True, 48)
    cfg.pretrain.steps, cfg.pretrain.batch_size, cfg.pretrain.global_size = 2, 4, 64
    cfg.pretrain.local_size, cfg.pretrain.local_crops, cfg.pretrain.out_dim = 32, 2, 128
    torch.manual_seed(0)
    model = SurgeNetAssistModel.create(random_init=True)
    adapted, info = continue_pretraining(store, model.backbone, cfg)
    # the training-split video only: validation (the unlabelled one too) and test videos are never used
    assert info["steps"] == 2 and info["new_frames_pool"] == 12
    store.record_training_run(task="pretrain", status="finished", params={"total_frames": 48})
    assert pretrain_due(store, cfg) == (False, 0)

    # the backbone gate is the promotion gate's paired test over validation videos: it needs three
    populate_store(
        store, tmp_path / "clips", [55, 56], frames=12, size=SIZE, splits=["val", "val"], world="v1"
    )
    splits = load_splits(store, size=SIZE)
    broken = load_backbone(random_init=True)
    with torch.no_grad():
        for p in broken.trunk.parameters():
            p.zero_()  # constant features: nothing can be learned on top
    healthy = copy.deepcopy(model.backbone)
    bad_model = SurgeNetAssistModel(copy.deepcopy(broken))
    keep = select_backbone(bad_model, healthy, splits, cfg, "m")
    assert keep["kept"] and keep["val_scores"]["adapted"] > keep["val_scores"]["current"]
    assert keep["val_scores"]["paired_test"]["units"] == 3  # validation videos, the unit of the test
    reject = select_backbone(model, broken, splits, cfg, "m")
    assert not reject["kept"] and reject["model"].backbone is not broken


def test_continued_pretraining_never_sees_validation_or_test_frames(tmp_path):
    """The validation split decides whether the adapted backbone is kept and the test split decides
    promotion: only training-split videos feed the DINO pools (an unassigned video may become either)."""
    from surgenet_assist.training_loop.pretrain import frame_pools

    store = LabelStore(f"sqlite:///{tmp_path / 's.db'}", migrate=True)
    for name, split in (("a", "train"), ("b", "val"), ("c", "test"), ("d", None), ("e", "train")):
        store.add_video(f"/v/{name}.mp4", fps=1.0, frame_count=10, split=split)
    store.set_split(store.video_id("/v/d.mp4"), None)  # the store gives a split at entry; cleared by hand
    new, old = frame_pools(store, None, max_frames=1000, seen_videos={"/v/e.mp4"}, size=None)
    assert {p for p, _, _ in new.items} == {"/v/a.mp4"} and {p for p, _, _ in old.items} == {"/v/e.mp4"}
    assert len(new) == 10 and len(old) == 10
    store.close()


def test_a_collapsed_dino_run_is_recognised():
    """Uniform outputs over 1024 prototypes give a loss of ln(1024) = 6.93 at every step: nothing was learnt
    (what a few hundred CPU steps produced in bench/active_learning.py). A learning run is not flagged."""
    import math

    from surgenet_assist.training_loop.pretrain import dino_collapsed

    assert dino_collapsed([9.0, 8.0] + [math.log(1024)] * 10, 1024)
    assert not dino_collapsed([9.0, 8.0, 7.5, 6.0, 5.2, 4.8, 4.5, 4.4, 4.2, 4.1, 4.0, 3.9], 1024)
    assert not dino_collapsed([math.log(1024)] * 5, 1024)  # too few steps to tell
