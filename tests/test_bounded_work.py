"""Bounded work per frame and per cache, whatever the image: the model input's long side is clamped in one
place (``core.model.target_size``) that every path goes through, the click engine refines huge frames scaled
down, and the in-memory feature caches are bounded by bytes.

Memory is asserted as the growth of the resident set's peak during a call (``rss_probe``), not as timings.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from rss_probe import peak_rss_growth

from surgenet_assist.core.embedding_cache import (
    ByteLRU,
    EmbeddingCache,
    compute_features,
    image_stages,
    resident_nbytes,
)
from surgenet_assist.core.errors import UsageError
from surgenet_assist.core.interactive import Click, ClickSegmenter, Prompt
from surgenet_assist.core.model import (
    DEFAULT_MAX_ASPECT,
    MAX_ASPECT_ENV,
    SurgeNetAssistModel,
    max_input_aspect,
    target_size,
)
from surgenet_assist.core.synthetic import generate_clip

MB = 1 << 20


@pytest.fixture(scope="module")
def model() -> SurgeNetAssistModel:
    torch.manual_seed(0)
    return SurgeNetAssistModel.create(random_init=True)


class InputShapes:
    """Records the (H, W) of every batch the backbone gets."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        self.seen: list[tuple[int, int]] = []
        self._handle = backbone.register_forward_pre_hook(self._record)

    def _record(self, _module: torch.nn.Module, args: tuple) -> None:
        self.seen.append(tuple(args[0].shape[-2:]))

    def take(self) -> set[tuple[int, int]]:
        seen, self.seen = set(self.seen), []
        return seen

    def close(self) -> None:
        self._handle.remove()


@pytest.fixture()
def shapes(model):
    recorder = InputShapes(model.backbone)
    yield recorder
    recorder.close()


# ---------------------------------------------------------------------------------------------------------
# target_size
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("height", "width"),
    [(480, 854), (720, 1280), (1080, 1920), (2160, 3840), (480, 640), (720, 960), (1080, 2560), (1080, 3840)],
)
def test_usual_frames_keep_their_size(height, width, monkeypatch):
    """16:9, 4:3, 21:9 and side-by-side stereo frames are sized as without a clamp."""
    monkeypatch.delenv(MAX_ASPECT_ENV, raising=False)
    for short in (192, 224, 256):
        assert target_size(height, width, short) == target_size(height, width, short, max_aspect=math.inf)
        assert target_size(width, height, short) == target_size(width, height, short, max_aspect=math.inf)


def test_thin_and_huge_images_get_a_bounded_input(monkeypatch):
    monkeypatch.delenv(MAX_ASPECT_ENV, raising=False)
    assert target_size(1, 4000, 256, max_aspect=math.inf) == (256, 1024000)  # what main fed the backbone
    assert target_size(1, 4000, 256) == (32, 1024)
    assert target_size(4000, 1, 256) == (1024, 32)
    assert target_size(4000, 4000, 256) == (256, 256)
    assert target_size(256, 2048, 256) == (128, 1024)  # aspect kept, the short side gives way


@settings(max_examples=300, deadline=None)
@given(
    height=st.integers(1, 200_000),
    width=st.integers(1, 200_000),
    short=st.sampled_from([64, 128, 192, 224, 256, 384]),
    aspect=st.floats(1.0, 8.0),
)
@example(height=1, width=23335, short=224, aspect=3.5)  # 784.0000001 px once rounded past the 784 px clamp
def test_the_input_never_exceeds_the_clamp(height, width, short, aspect):
    h, w = target_size(height, width, short, max_aspect=aspect)
    assert h % 32 == 0 and w % 32 == 0 and min(h, w) >= 32
    assert max(h, w) <= max(32, round(aspect * short / 32) * 32)
    assert min(h, w) <= max(32, round(short / 32) * 32)


def test_the_clamp_is_configured_by_the_environment(monkeypatch):
    monkeypatch.delenv(MAX_ASPECT_ENV, raising=False)
    assert max_input_aspect() == DEFAULT_MAX_ASPECT == 4.0
    monkeypatch.setenv(MAX_ASPECT_ENV, "2")
    assert max_input_aspect() == 2.0
    assert target_size(480, 1280, 256) == (192, 512)
    for bad in ("wide", "0.5", "nan", "inf", "1e400", "100"):
        monkeypatch.setenv(MAX_ASPECT_ENV, bad)
        with pytest.raises(UsageError, match=MAX_ASPECT_ENV) as err:
            target_size(480, 854, 256)
        assert "1 to 64" in err.value.hint
    from surgenet_assist.backend.settings import BackendSettings

    with pytest.raises(UsageError, match=MAX_ASPECT_ENV):
        BackendSettings().check()  # the server refuses it at start, not on its first frame
    monkeypatch.setenv(MAX_ASPECT_ENV, "3")
    BackendSettings().check()
    with pytest.raises(UsageError, match="MAX_PROMPT_REGIONS=0"):
        BackendSettings(max_prompt_regions=0).check()


def test_every_path_that_feeds_the_backbone_sizes_its_input_with_target_size(
    model, shapes, tmp_path, monkeypatch
):
    """Predictor (``/predict``, ``predict``), single-frame features (day one, instant heads), the video
    feature cache (propagation), clicks, fine-tuning, evaluation and acquisition scoring: with the clamp set
    to 2, a 4:1 frame reaches the backbone as (32, 128) on every one of them (unclamped: (64, 256))."""
    from surgenet_assist.core.predictor import Predictor
    from surgenet_assist.training_loop.acquisition import build_pool
    from surgenet_assist.training_loop.evaluate import predict_frames
    from surgenet_assist.training_loop.finetune import LabelledFrames, extract_features

    clip = generate_clip(seed=3, num_frames=2, height=64, width=256)
    frame = clip.frames[0]
    video = clip.write_video(tmp_path / "wide.avi", fps=2, codec="MJPG")
    segmenter = ClickSegmenter(model.backbone, short_side=64)
    paths = {
        "predictor": lambda: Predictor(model, short_side=64, device="cpu").predict([frame]),
        "single frame (day one, instant heads)": lambda: image_stages(model.backbone, frame, 64),
        "video features (propagation)": lambda: compute_features(video, model.backbone, None, 64),
        "clicks": lambda: segmenter.segment(frame, Prompt((Click(30, 100),))),
        "fine-tuning": lambda: extract_features(model, clip.frames, 64, progress=False),
        "evaluation": lambda: predict_frames(model, LabelledFrames(images=clip.frames), 64),
        "acquisition": lambda: build_pool(
            model, [(1, r) for r in _records(clip.frames)], 64, progress=False
        ),
    }
    monkeypatch.delenv(MAX_ASPECT_ENV, raising=False)
    paths["predictor"]()
    assert shapes.take() == {(64, 256)}  # within the default clamp: unchanged
    monkeypatch.setenv(MAX_ASPECT_ENV, "2")
    for name, run in paths.items():
        segmenter.cache.clear()
        run()
        assert shapes.take() == {(32, 128)}, name


def _records(frames):
    from surgenet_assist.core.video import FrameRecord

    return [FrameRecord(i, float(i), f) for i, f in enumerate(frames)]


# ---------------------------------------------------------------------------------------------------------
# clicks on thin and huge images
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("height", "width", "backbone_input"),
    [(1, 4000, (32, 1024)), (4000, 1, (1024, 32)), (4000, 4000, (256, 256))],
)
def test_a_click_on_a_thin_or_huge_image_does_bounded_work(
    model, shapes, monkeypatch, height, width, backbone_input
):
    """On main a 1 x 4000 image gave a 256 x 1,024,000 backbone input (the worker grew to 23 GB), and a
    4000 x 4000 frame was refined at full size (46-93 s per click, peak +656 MB, ~170 MB cached per task);
    here its first click's peak grows by about 200 MB (the frame-size mask and probability)."""
    monkeypatch.delenv(MAX_ASPECT_ENV, raising=False)
    segmenter = ClickSegmenter(model.backbone)
    image = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    row, col = height // 2, width // 2
    result, grew = peak_rss_growth(lambda: segmenter.segment(image, Prompt((Click(row, col),)), key="task"))
    assert shapes.take() == {backbone_input}
    assert result.mask.shape == (height, width) and result.mask[row, col], "mask at the image's size"
    assert grew < 400 * MB, f"peak memory grew by {grew / MB:.0f} MB"
    emb = segmenter.embed(image, key="task")
    assert emb.size == (height, width) and emb.work_size[0] * emb.work_size[1] <= segmenter.max_pixels
    assert segmenter.cache.nbytes == emb.nbytes < 32 * MB, "a cached frame costs what a 1080p frame does"
    again = segmenter.segment(image, Prompt((Click(row, col), Click(0, 0, positive=False))), key="task")
    assert shapes.take() == set(), "the second click reuses the features"
    assert not again.mask[0, 0] and again.mask[row, col]


def test_frames_up_to_the_work_size_are_refined_at_their_own_size(model):
    segmenter = ClickSegmenter(model.backbone, short_side=64)
    frame = generate_clip(seed=1, num_frames=1, height=120, width=160).frames[0]
    emb = segmenter.embed(frame)
    assert emb.work_size == emb.size == (120, 160) and emb.original_size is None
    small = ClickSegmenter(model.backbone, short_side=64, max_pixels=60 * 80)
    scaled = small.embed(frame)
    assert scaled.size == (120, 160) and scaled.work_size == (60, 80)
    result = small.segment(scaled, Prompt((Click(60, 80),)))
    assert result.mask.shape == (120, 160) and result.mask[60, 80]


# ---------------------------------------------------------------------------------------------------------
# caches bounded by bytes
# ---------------------------------------------------------------------------------------------------------
def test_byte_lru_evicts_least_recently_used_past_its_budget():
    cache: ByteLRU[bytes] = ByteLRU(10, len)
    for key in "abcde":
        cache.put(key, b"xxx")
        assert cache.nbytes <= 10
    assert [k for k in "abcde" if k in cache] == ["c", "d", "e"] and cache.nbytes == 9
    assert cache.get("c") == b"xxx"  # now the most recently used
    cache.put("f", b"xxx")
    assert "c" in cache and "d" not in cache
    assert cache.put("huge", b"x" * 11) == b"x" * 11 and "huge" not in cache and cache.nbytes == 9
    cache.put("c", b"x")  # replacing an entry counts its new size
    assert cache.nbytes == 7
    counted: ByteLRU[bytes] = ByteLRU(100, len, max_items=1)
    counted.put("a", b"x")
    counted.put("b", b"x")
    assert len(counted) == 1 and "b" in counted


def test_memory_mapped_features_cost_nothing_resident(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 1000), np.float32))
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert resident_nbytes(mapped, mapped[1], np.asarray(mapped[2:])) == 0
    assert resident_nbytes(np.zeros(1000, np.float32), torch.zeros(10)) == 4040


def test_the_click_cache_never_exceeds_its_budget_under_many_tasks(model):
    frames = generate_clip(seed=2, num_frames=12, height=96, width=128).frames
    probe = ClickSegmenter(model.backbone, short_side=64)
    per_frame = probe.embed(frames[0]).nbytes
    budget = int(3.5 * per_frame)
    segmenter = ClickSegmenter(model.backbone, short_side=64, cache_bytes=budget)
    sizes = {}
    for task, frame in enumerate(frames):
        emb = segmenter.embed(frame, key=("task", task))
        sizes[("task", task)] = emb.nbytes
        segmenter.segment(emb, Prompt((Click(40, 60),)))
        held = sum(n for key, n in sizes.items() if key in segmenter.cache)
        assert segmenter.cache.nbytes == held <= budget
    kept = [key for key in sizes if key in segmenter.cache]
    assert kept == [("task", 9), ("task", 10), ("task", 11)], "the least recently used went first"
    learned = segmenter.with_head(_IdentityHead(), "head-1")
    assert learned.cache is segmenter.cache, "every project's engine shares one budget"
    assert learned.model_version == "head-1" and segmenter.model_version.startswith("clicks-day-one-")
    shared = ClickSegmenter(model.backbone, short_side=64, cache=ByteLRU(budget, lambda e: e.nbytes))
    assert ClickSegmenter(model.backbone, cache=shared.cache).cache is shared.cache  # even while empty


class _IdentityHead(torch.nn.Module):
    def forward(self, s8, s16, maps):
        return maps[:, -1:]


def test_the_day_one_feature_cache_never_exceeds_its_budget(model, tmp_path):
    from surgenet_assist.training_loop.assist import DayOneAssist

    clip = generate_clip(seed=5, num_frames=12, height=64, width=96)
    video = clip.write_video(tmp_path / "v.avi", fps=4, codec="MJPG")
    per_frame = resident_nbytes(*image_stages(model.backbone, clip.frames[0], 64))
    budget = int(4.5 * per_frame)
    assist = DayOneAssist(
        None, model.backbone, short_side=64, sample_fps=1.0, cache=EmbeddingCache(tmp_path / "cache"),
        worker=False, feature_cache_bytes=budget,
    )  # fmt: skip
    feats = assist.video_features(video)
    assert list(feats.indices) == [0, 4, 8]
    assert resident_nbytes(feats.stride8, feats.stride16) == 0, "a computed video is served memory-mapped"
    unsampled = [i for i in range(12) if i % 4]
    for frame in unsampled:
        s8, _, _ = assist.frame_stages(str(video), frame)
        assert s8.shape[-2:] == (8, 12)
        assert assist.features_in_memory.nbytes <= budget
    assert len(assist.features_in_memory) <= 5
    assert ("frame", str(video), unsampled[-1]) in assist.features_in_memory
