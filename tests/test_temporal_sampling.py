"""The temporal phase model trains on uniform sequences at its recorded fps: a 25 fps burst of segmentation
keyframes trains the frame heads but never enters the 1 fps phase sequences."""

from __future__ import annotations

import numpy as np

from surgenet_assist.core.model import SurgeNetAssistModel
from surgenet_assist.core.store import AnnotationInput, LabelStore, build_payload
from surgenet_assist.core.synthetic import generate_clip
from surgenet_assist.training_loop import finetune
from surgenet_assist.training_loop.datasets import load_split
from surgenet_assist.training_loop.finetune import FinetuneConfig, finetune_heads, temporal_sequences
from surgenet_assist.training_loop.synthetic_store import phase_segments

FPS = 25.0
FRAMES = 110  # 4.4 s at 25 fps: grid frames 0, 25, 50, 75, 100
BURST = range(30, 50)  # 25 fps keyframes between two grid frames


def _store_with_burst(tmp_path) -> LabelStore:
    store = LabelStore(f"sqlite:///{tmp_path}/store.db", migrate=True)
    clip = generate_clip(7, FRAMES, 48, 80, fps=FPS)
    folder = clip.write_frames(tmp_path / "clip")
    vid = store.add_video(str(folder), fps=FPS, frame_count=len(clip), split="train")
    items = [
        AnnotationInput(
            video_id=vid,
            frame_start=0,
            frame_end=len(clip) - 1,
            task="phase",
            payload=build_payload("phase", {"segments": phase_segments(clip.phases)}, store.schema),
            source="import",
            author="test",
        )
    ]
    items += [
        AnnotationInput(
            video_id=vid,
            frame_start=i,
            task="segmentation",
            payload=build_payload("segmentation", clip.masks[i], store.schema),
            source="import",
            author="test",
        )
        for i in BURST
    ]
    store.record_annotations(items)
    return store


def test_temporal_sequences_are_uniform_at_the_temporal_fps_without_burst_frames(tmp_path):
    store = _store_with_burst(tmp_path)
    data = load_split(store, "train").frames
    store.close()
    # the frame-level training set keeps every labelled frame, burst included
    assert set(BURST) <= set(data.frame_indices.tolist())
    assert {0, 25, 50, 75, 100} <= set(data.frame_indices.tolist())
    assert (data.phases >= 0).all()

    sequences = temporal_sequences(data, temporal_fps=1.0)
    assert len(sequences) == 1
    indices = data.frame_indices[sequences[0]]
    assert indices.tolist() == [0, 25, 50, 75, 100]
    assert set(np.diff(indices).tolist()) == {int(FPS / 1.0)}
    assert not set(indices.tolist()) & set(BURST)

    # at 5 fps the stride is 5 frames: burst frames on that grid join, the others do not, and a sequence is
    # cut wherever a grid position has no frame
    five = [data.frame_indices[s].tolist() for s in temporal_sequences(data, temporal_fps=5.0)]
    assert five == [[0], [25, 30, 35, 40, 45, 50], [75], [100]]


def test_finetune_trains_the_temporal_model_on_the_sampled_sequences(tmp_path, monkeypatch):
    store = _store_with_burst(tmp_path)
    data = load_split(store, "train").frames
    store.close()
    seen = []
    real = finetune.train_temporal

    def spy(model, embeddings, phases, sequences, cfg, progress=True):
        seen.extend(data.frame_indices[s].tolist() for s in sequences)
        return real(model, embeddings, phases, sequences, cfg, progress)

    monkeypatch.setattr(finetune, "train_temporal", spy)
    model = SurgeNetAssistModel.create(random_init=True)
    cfg = FinetuneConfig(epochs=1, temporal_epochs=2, short_side=32, batch_size=8, device="cpu")
    finetune_heads(model, data, cfg, progress=False)
    assert seen == [[0, 25, 50, 75, 100]]
    assert bool(model.phase_head.temporal_trained)
    assert model.preprocessing.temporal_fps == 1.0 and model.preprocessing.short_side == 32


def test_evaluation_runs_the_temporal_model_on_the_same_uniform_sequences(tmp_path):
    """At evaluation the timeline comes from the temporal model on the 1 fps grid frames only; burst frames
    keep their frame-level phase probabilities (the temporal model never saw 25 fps steps)."""
    import torch

    from surgenet_assist.training_loop.evaluate import predict_frames

    store = _store_with_burst(tmp_path)
    data = load_split(store, "train").frames
    store.close()
    model = SurgeNetAssistModel.create(random_init=True)
    model.phase_head.temporal_trained.fill_(True)
    torch.manual_seed(0)
    for p in model.phase_head.temporal.parameters():
        torch.nn.init.normal_(p, std=0.5)
    out = predict_frames(model, data, short_side=48)
    grid = np.isin(data.frame_indices, [0, 25, 50, 75, 100])
    burst = np.isin(data.frame_indices, list(BURST))
    np.testing.assert_allclose(out["phase_timeline"][burst], out["phase_probs"][burst])
    assert not np.allclose(out["phase_timeline"][grid], out["phase_probs"][grid])
    order = np.argsort(data.frame_indices[grid])
    emb = torch.from_numpy(out["embeddings"][grid][order])[None]
    with torch.inference_mode():
        expected = torch.softmax(model.phase_head.temporal(emb)[-1][0].float(), -1).numpy()
    np.testing.assert_allclose(out["phase_timeline"][grid][order], expected, atol=1e-5)
