"""Active-learning strategies, the stored queue, and MC-dropout scoring on cached features."""

from __future__ import annotations

import json

import numpy as np
import pytest

from surgenet_assist.core.store import LabelStore
from surgenet_assist.training_loop import acquisition as acq
from surgenet_assist.training_loop.acquisition import AcquisitionPool, FrameRef

GAP = 3.0


def _pool(seed: int = 0, videos: int = 3, frames: int = 40, mc: int = 4) -> AcquisitionPool:
    """Videos whose embeddings drift slowly (adjacent frames near-identical) and whose uncertainty is
    smooth in time, so plain top-k would take runs of neighbours."""
    rng = np.random.default_rng(seed)
    vids, idx, emb, phase, cvs, seg = [], [], [], [], [], []
    for v in range(videos):
        walk = np.cumsum(rng.normal(size=(frames, 32)) * 0.1, axis=0) + rng.normal(size=32) * 3
        sharp = 1 + 6 * (0.5 + 0.5 * np.sin(np.arange(frames) / 5 + v))  # smooth confidence over time
        logits = rng.normal(size=(frames, 7)) * sharp[:, None]
        p = np.exp(logits - logits.max(1, keepdims=True))
        vids += [10 + v] * frames
        idx += list(range(0, 2 * frames, 2))  # sampled every 2 frames; timestamps = index (1 fps)
        emb.append(walk)
        phase.append(p / p.sum(1, keepdims=True))
        cvs.append(1 / (1 + np.exp(-rng.normal(size=(frames, 3)) * sharp[:, None])))
        seg.append(1 / sharp)
    phase_probs, cvs_probs = np.concatenate(phase), np.concatenate(cvs)
    seg_u = np.concatenate(seg)
    noise = rng.dirichlet(np.ones(7) * 5, size=(mc, len(phase_probs)))
    return AcquisitionPool(
        video_ids=np.array(vids),
        frame_indices=np.array(idx),
        embeddings=np.concatenate(emb),
        phase_probs=phase_probs,
        cvs_probs=cvs_probs,
        seg_scores={m: seg_u for m in acq.MEASURES},
        mc_phase=0.7 * phase_probs[None] + 0.3 * noise,
        mc_cvs=np.clip(cvs_probs[None] + rng.normal(scale=0.1, size=(mc, *cvs_probs.shape)), 0, 1),
    )


def _assert_deduplicated(pool: AcquisitionPool, picked: list[FrameRef]) -> None:
    for i, a in enumerate(picked):
        for b in picked[i + 1 :]:
            if a.video_id == b.video_id:
                assert abs(a.frame_index - b.frame_index) >= GAP, (a, b)


@pytest.mark.parametrize("name", sorted(acq.STRATEGIES))
def test_every_strategy_returns_valid_unique_deduplicated_unlabelled_frames(name):
    pool = _pool()
    labelled = [pool.ref(0), pool.ref(41), FrameRef(999, 0)]  # a ref outside the pool is ignored
    strategy = acq.get_strategy(name, min_gap_s=GAP)
    picked = strategy.select(pool, 12, labelled)
    valid = {pool.ref(i) for i in range(len(pool))}
    assert len(picked) == 12
    assert len(set(picked)) == 12
    assert set(picked) <= valid
    assert not set(picked) & set(labelled)
    _assert_deduplicated(pool, picked)
    assert all(isinstance(r, FrameRef) for r in picked)


def test_plain_top_k_would_pick_neighbours_but_the_strategy_spaces_them():
    pool = _pool()
    u = pool.combined("entropy")
    top = [pool.ref(i) for i in np.argsort(-u)[:12]]
    adjacent = any(
        a.video_id == b.video_id and abs(a.frame_index - b.frame_index) < GAP
        for i, a in enumerate(top)
        for b in top[i + 1 :]
    )
    assert adjacent, "the constructed pool must tempt top-k into adjacent frames"
    _assert_deduplicated(pool, acq.get_strategy("entropy", min_gap_s=GAP).select(pool, 12))


def test_similar_embeddings_far_apart_in_time_are_also_suppressed():
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(30, 64))
    emb[20] = emb[0]  # a return to the same view later in the video
    probs = np.tile([0.9, 0.05, 0.05], (30, 1))
    probs[[0, 20]] = 1 / 3  # the two most uncertain frames
    pool = AcquisitionPool(np.zeros(30, int), np.arange(30), emb, phase_probs=probs)
    picked = acq.get_strategy("entropy", min_gap_s=0.0, max_similarity=0.99).select(pool, 5)
    assert (pool.ref(0) in picked) != (pool.ref(20) in picked)  # exactly one of the pair
    unguarded = acq.get_strategy("entropy", min_gap_s=0.0, max_similarity=None).select(pool, 5)
    assert {pool.ref(0), pool.ref(20)} <= set(unguarded)


def test_strategy_never_exceeds_the_unlabelled_pool_and_never_returns_labelled():
    pool = _pool(videos=1, frames=10)
    labelled = [pool.ref(i) for i in range(0, 10, 2)]
    picked = acq.get_strategy("hybrid", min_gap_s=0.0, max_similarity=None).select(pool, 50, labelled)
    assert sorted(picked) == sorted(set(pool.ref(i) for i in range(10)) - set(labelled))


def test_hybrid_prefers_uncertain_frames_over_confident_ones():
    """Two interleaved halves with the same embedding spread: one half uncertain, one confident."""
    rng = np.random.default_rng(3)
    n = 40
    emb = rng.normal(size=(n, 16))
    uncertain = np.arange(n) % 2 == 0
    sharp = np.where(uncertain, 0.1, 8.0)
    logits = rng.normal(size=(n, 5)) * sharp[:, None] + np.eye(5)[np.arange(n) % 5] * sharp[:, None] * 2
    p = np.exp(logits - logits.max(1, keepdims=True))
    pool = AcquisitionPool(
        video_ids=np.arange(n), frame_indices=np.zeros(n, int), embeddings=emb,
        phase_probs=p / p.sum(1)[:, None],
    )
    picked = acq.get_strategy("hybrid").select(pool, 8)
    share = np.mean([uncertain[r.video_id] for r in picked])
    assert share >= 0.85, share
    # the diversity-only baseline on the same pool does not see uncertainty
    base = np.mean([uncertain[r.video_id] for r in acq.get_strategy("kcenter").select(pool, 8)])
    assert share > base


def test_kcenter_covers_clusters_before_repeating_one():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 16)) * 10
    emb = np.concatenate([c + rng.normal(size=(10, 16)) * 0.1 for c in centres])
    pool = AcquisitionPool(
        video_ids=np.arange(40), frame_indices=np.zeros(40, int), embeddings=emb,
        phase_probs=np.full((40, 3), 1 / 3),
    )
    picked = acq.get_strategy("kcenter", max_similarity=None).select(pool, 4)
    assert len({r.video_id // 10 for r in picked}) == 4


def test_video_phase_strategy_spreads_frames_over_the_most_uncertain_videos():
    pool = _pool(videos=4, frames=30)
    u = pool.uncertainty("entropy", "phase")
    means = {v: u[pool.video_ids == v].mean() for v in np.unique(pool.video_ids)}
    best2 = set(sorted(means, key=means.get)[-2:])
    picked = acq.get_strategy("video-phase", videos_per_batch=2).select(pool, 8)
    assert {r.video_id for r in picked} == best2
    for v in best2:
        frames = sorted(r.frame_index for r in picked if r.video_id == v)
        assert frames[-1] - frames[0] >= 30  # spread over the video, not a run


def test_uncertainty_measures_and_bald():
    uniform, onehot = np.full((1, 4), 0.25), np.eye(4)[:1]
    for m in ("entropy", "margin", "least-confidence"):
        assert acq.class_uncertainty(uniform, m)[0] == pytest.approx(1.0)
        assert acq.class_uncertainty(onehot, m)[0] == pytest.approx(0.0, abs=1e-6)
    same = np.stack([np.tile([[0.5, 0.5]], (3, 1))] * 5)
    disagree = np.stack([np.tile([[0.99, 0.01]], (3, 1)), np.tile([[0.01, 0.99]], (3, 1))] * 3)
    assert acq.bald(same).max() == pytest.approx(0.0, abs=1e-6)
    assert acq.bald(disagree).min() > 0.8
    seg = np.random.default_rng(0).dirichlet(np.ones(5), size=(2, 8, 8)).transpose(0, 3, 1, 2)
    seg[1] = np.eye(5)[0][:, None, None]  # confident everywhere
    other = seg.copy()
    other[0] = seg[0, ::-1]  # passes disagree on frame 0 only
    scores = acq.segmentation_scores(seg, np.stack([seg, other]))
    assert set(scores) == set(acq.MEASURES)
    assert all(s[0] > s[1] for s in scores.values())


def test_mc_dropout_passes_on_cached_features_differ_and_give_bald():
    import torch

    from surgenet_assist.core.model import SurgeNetAssistModel
    from surgenet_assist.training_loop.finetune import extract_features

    model = SurgeNetAssistModel.create(random_init=True)
    images = np.random.default_rng(0).integers(0, 255, size=(6, 64, 96, 3), dtype=np.uint8)
    feats, _ = extract_features(model, images, 64, progress=False)
    det1 = acq.head_outputs(model, feats)
    det2 = acq.head_outputs(model, feats)
    np.testing.assert_allclose(det1["phase"], det2["phase"])  # dropout off outside the MC passes
    mc = acq.head_outputs(model, feats, mc_passes=4)
    assert mc["mc_phase"].shape == (4, 6, model.schema.num_phases)
    assert not np.allclose(mc["mc_phase"][0], mc["mc_phase"][1])
    assert "bald" in mc["seg"] and (mc["seg"]["bald"] > 0).all()
    assert not model.training and not any(m.training for m in acq._dropout_modules(model))
    pool = acq.pool_from_outputs([mc], [1] * 6, range(0, 60, 10))
    assert len(acq.get_strategy("bald").select(pool, 3)) == 3
    assert torch.is_tensor(feats[0])


def test_queue_survives_a_restart_and_skips_labelled_frames(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = LabelStore(url, migrate=True)
    vids = [store.add_video(f"/videos/v{i}.mp4", fps=1.0, frame_count=200) for i in range(3)]
    pool = _pool()
    pool.video_ids = np.array([vids[v - 10] for v in pool.video_ids])
    counts = acq.save_queue(store, pool, "v1", queue_size=15)
    assert counts == {"segmentation": 15, "phase": 15, "cvs": 15}
    before = [(q.video_id, q.frame_index) for q in store.labelling_queue("segmentation", limit=15)]
    store.close()

    store = LabelStore(url)
    after = store.labelling_queue("segmentation", limit=15)
    assert [(q.video_id, q.frame_index) for q in after] == before
    assert {q.method for q in after} == {"hybrid"}
    assert [q.score for q in after] == sorted((q.score for q in after), reverse=True)
    first = after[0]
    mask = np.zeros((8, 8), np.uint8)
    store.record_annotation(first.video_id, first.frame_index, "segmentation", mask, source="napari")
    again = store.labelling_queue("segmentation", limit=15)
    assert (first.video_id, first.frame_index) not in {(q.video_id, q.frame_index) for q in again}
    # plain entropy rows stay for older readers
    assert store.acquisition_queue("segmentation", method="entropy", limit=1000, exclude_labelled=False)
    store.close()


def test_cli_al_score_then_next_reads_the_same_rows(tmp_path):
    from typer.testing import CliRunner

    from surgenet_assist.cli.main import app
    from surgenet_assist.core.model import SurgeNetAssistModel
    from surgenet_assist.training_loop.registry import Registry
    from surgenet_assist.training_loop.synthetic_store import populate_store

    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = LabelStore(url, migrate=True)
    populate_store(store, tmp_path / "clips", [41, 42], frames=10, size=(64, 112), splits=["train", "test"],
                   unlabelled_seeds=[43])
    registry = Registry(store)
    version = registry.register_candidate(
        SurgeNetAssistModel.create(random_init=True), metrics={}, manifest_hash="x", seeds={}, parent=None
    )
    registry.promote(version)
    runner = CliRunner()
    args = ["--db", url, "--short-side", "64", "--max-frames", "8", "--split", "", "--json"]
    res = runner.invoke(app, ["al", "score", *args])
    assert res.exit_code == 0, res.output
    scored = json.loads(res.output)
    assert scored["strategy"] == "hybrid" and scored["frames_scored"] > 0
    res = runner.invoke(app, ["al", "next", "--n", "5", "--db", url, "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert 0 < len(rows) <= 5
    assert all(r["method"] == "hybrid" and r["model_version"] == version for r in rows)
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    labels = store.training_labels("segmentation", with_payload=False)
    labelled = {(r.video_id, r.frame_start) for r in labels}
    assert labelled, "the store must hold labelled frames for this check to mean anything"
    assert not labelled & {(r["video_id"], r["frame_index"]) for r in rows}
    bad = runner.invoke(app, ["al", "score", "--db", url, "--strategy", "nope"])
    assert bad.exit_code == 2 and "unknown strategy" in bad.output
