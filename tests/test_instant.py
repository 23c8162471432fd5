"""Instant heads: better with more labels on every task, weights_only artefact, validation on held-out videos,
the champion takes over unless the instant head beats it on the same validation frames, debounced refits."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from surgenet_assist.core.backbone import load_backbone
from surgenet_assist.core.embedding_cache import compute_features
from surgenet_assist.core.synthetic import generate_clip
from surgenet_assist.training_loop.instant import (
    INSTANT_STATUS,
    RETIRED_STATUS,
    InstantHeads,
    InstantUpdater,
    SegSample,
    choose_serving,
    fit_instant,
    fit_with_validation,
    latest_instant,
    register_instant,
    score_heads,
)

N = 40


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Two synthetic clips with their (random-init backbone) features at short side 64."""
    torch.manual_seed(0)
    backbone = load_backbone(random_init=True)
    out = []
    for seed in (1, 2):
        clip = generate_clip(seed=seed, num_frames=N, height=64, width=112)
        folder = clip.write_frames(tmp_path_factory.mktemp(f"clip{seed}"))
        out.append((clip, compute_features(folder, backbone, None, short_side=64)))
    return out


def _data(clips, picks):
    seg, phase, cvs = [], [], []
    for c, i in picks:
        clip, f = clips[c]
        seg.append(SegSample(np.asarray(f.stride8[i]), np.asarray(f.stride16[i]), clip.masks[i]))
        emb = np.asarray(f.embeddings[i], np.float32)
        phase.append((emb, int(clip.phases[i])))
        cvs.append((emb, clip.cvs[i]))
    return seg, phase, cvs


def test_instant_heads_improve_with_more_labels(clips):
    held_out = _data(clips, [(c, i) for c in (0, 1) for i in range(1, N, 2)])
    pool = [(c, i) for c in (0, 1) for i in range(0, N, 2)]
    rng = np.random.default_rng(0)
    scores = {}
    for n in (1, 20):
        picks = [pool[j] for j in rng.choice(len(pool), n, replace=False)]
        t0 = time.perf_counter()
        heads = fit_instant(*_data(clips, picks))
        assert time.perf_counter() - t0 < 30
        scores[n] = score_heads(heads, *held_out)
    for task in ("segmentation", "phase", "cvs"):
        assert scores[20][task] > scores[1][task] + 0.05, (task, scores)


def _videos(picks):
    names = [f"clip{c}" for c, _ in picks]
    return {"segmentation": names, "phase": names, "cvs": names}


def test_artefact_round_trip_loads_weights_only(clips, tmp_path):
    picks = [(c, i) for c in (0, 1) for i in range(0, N, 4)]
    seg, phase, cvs = _data(clips, picks)
    heads = fit_with_validation(seg, phase, cvs, videos=_videos(picks), meta={"label_version": 7})
    assert heads.meta["val"]["held_out"]["segmentation"] == 10 and heads.meta["val"]["primary"]
    folder = heads.save(tmp_path / "instant-x")
    raw = torch.load(folder / "heads.pt", weights_only=True)  # plain tensors only, no pickled objects
    assert all(isinstance(v, torch.Tensor) for v in raw.values()) and "seg_weight" in raw
    back = InstantHeads.load(folder)
    f = clips[0][1]
    np.testing.assert_allclose(
        back.seg_probs(f.stride8[1], f.stride16[1]), heads.seg_probs(f.stride8[1], f.stride16[1])
    )
    emb = np.asarray(f.embeddings[:5], np.float32)
    np.testing.assert_allclose(back.phase_probs(emb), heads.phase_probs(emb))
    np.testing.assert_allclose(back.cvs_probs(emb), heads.cvs_probs(emb))
    assert back.meta["label_version"] == 7


def test_single_class_and_fractional_cvs_targets():
    rng = np.random.default_rng(0)
    emb = [rng.normal(size=16).astype(np.float32) for _ in range(6)]
    heads = fit_instant([], [(e, 3) for e in emb], [(e, np.array([0.33, 0.67, 1.0])) for e in emb])
    assert heads.phase_probs(np.stack(emb)).argmax(1).tolist() == [3] * 6
    p = heads.cvs_probs(np.stack(emb))
    assert p.shape == (6, 3) and (p[:, 0] < 0.5).all() and (p[:, 2] > 0.5).all()


def test_validation_holds_out_whole_videos_never_neighbouring_frames(clips):
    """Frames of one video are near-copies of each other: validating on every 5th frame of the videos the
    heads were fitted on flatters them. The held-out set is whole videos (the store's validation split when
    it has labels there)."""
    picks = [(c, i) for c in (0, 1) for i in range(0, N, 2)]
    seg, phase, cvs = _data(clips, picks)
    heads = fit_with_validation(seg, phase, cvs, videos=_videos(picks), val_videos={"clip1"})
    assert heads.meta["val"]["videos"] == ["clip1"] and heads.meta["val"]["held_out"]["phase"] == N // 2
    probe = fit_instant(*_data(clips, [(0, i) for i in range(0, N, 2)]))
    assert heads.meta["val"]["primary"] == score_heads(probe, *_data(clips, [(1, i) for i in range(0, N, 2)]))
    single = fit_with_validation(*_data(clips, picks[: N // 2]), videos=_videos(picks[: N // 2]))
    assert single.meta["val"]["primary"] == {}  # one video: nothing honest to validate on


def test_better_champion_replaces_instant_head(clips, tmp_path):
    from surgenet_assist.core.store import LabelStore

    store = LabelStore(f"sqlite:///{tmp_path / 'store.db'}", migrate=True)
    picks = [(c, i) for c in (0, 1) for i in range(0, N, 4)]
    seg, phase, cvs = _data(clips, picks)
    first = register_instant(
        store, fit_with_validation(seg, phase, cvs, videos=_videos(picks)), tmp_path / "instant"
    )
    heads = fit_with_validation(seg, phase, cvs, videos=_videos(picks))
    heads.meta["val"]["primary"] = {"segmentation": 0.40, "phase": 0.50}
    second = register_instant(store, heads, tmp_path / "instant")
    assert latest_instant(store)["version"] == second and second.startswith("instant-")
    assert {r["version"]: r["status"] for r in store.model_versions()} == {
        first: RETIRED_STATUS,
        second: INSTANT_STATUS,
    }
    assert choose_serving(None, latest_instant(store)).kind == "instant"

    def champion(version, val):
        store.register_model_version(
            version,
            bundle_path=str(tmp_path / version),
            metrics={"test": {}, "params": {"val": {"primary": val}}},
        )
        store.set_model_status(version, "champion")
        return [r for r in store.model_versions(status="champion")][0]

    worse = champion("v-worse", {"segmentation": 0.99, "phase": 0.99, "cvs": 0.99})
    # its own (video-held-out) validation numbers are not compared: only numbers on the same frames
    choice = choose_serving(worse, latest_instant(store))
    assert choice.kind == "champion" and "same frames" in choice.reason

    def compared(champion_version, champion_primary):
        row = dict(latest_instant(store))
        val = dict(row["metrics"]["val"], champion=champion_version, champion_primary=champion_primary)
        return dict(row, metrics=dict(row["metrics"], val=val))

    assert choose_serving(worse, compared("v-worse", {"segmentation": 0.30, "phase": 0.45})).kind == "instant"
    better = champion("v-better", {"segmentation": 0.01, "phase": 0.01})
    stale = compared("v-worse", {"segmentation": 0.30, "phase": 0.45})  # compared with another champion
    assert choose_serving(better, stale).kind == "champion"
    choice = choose_serving(better, compared("v-better", {"segmentation": 0.55, "phase": 0.60}))
    assert choice.kind == "champion" and choice.row["version"] == "v-better", choice.reason
    # the champion contract is untouched: one champion, the old one kept for rollback
    assert {r["version"]: r["status"] for r in store.model_versions() if r["version"].startswith("v-")} == {
        "v-worse": "previous-champion",
        "v-better": "champion",
    }
    store.close()


def test_updater_coalesces_bursts_and_survives_errors():
    calls = []

    def update():
        calls.append(time.monotonic())
        if len(calls) == 2:
            raise RuntimeError("boom")
        return f"instant-{len(calls)}"

    up = InstantUpdater(update, debounce_s=0.2)
    for _ in range(5):
        up.notify()
        time.sleep(0.02)
    assert up.wait_idle(10) and len(calls) == 1 and up.version == "instant-1"
    up.notify()
    assert up.wait_idle(10) and up.error and "boom" in up.error
    up.notify()
    assert up.wait_idle(10) and up.version == "instant-3" and up.error is None and up.updates == 2
    up.close()
