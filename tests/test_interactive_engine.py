"""The click-to-mask engine (core/interactive): masks from clicks and boxes, errors, cache, the annotator."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from surgenet_assist.core.backbone import load_backbone
from surgenet_assist.core.errors import FrameError
from surgenet_assist.core.interactive import (
    DAY_ONE,
    Box,
    Click,
    ClickSegmenter,
    Prompt,
    PromptError,
    click_maps,
    next_click,
    noc,
    simulate,
    summarize,
)
from surgenet_assist.core.interactive.clicker import iou
from surgenet_assist.core.synthetic import generate_clip


@pytest.fixture(scope="module")
def segmenter() -> ClickSegmenter:
    return ClickSegmenter(load_backbone(random_init=True))


def _scene(height: int = 241, width: int = 333, seed: int = 0) -> np.ndarray:
    """Textured pinkish tissue (noise) on which objects are drawn."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = (190, 120, 115)
    noise = cv2.GaussianBlur(rng.normal(0, 12, (height, width)).astype(np.float32), (0, 0), 2)
    return np.clip(image + noise[..., None], 0, 255).astype(np.uint8)


def _disc(shape: tuple[int, int], centre: tuple[int, int], radius: int) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.circle(mask, centre[::-1], radius, 1, -1)
    return mask.astype(bool)


def test_positive_click_inside_an_object_gives_its_mask_at_input_size(segmenter: ClickSegmenter) -> None:
    image = _scene()
    obj = _disc(image.shape[:2], (120, 150), 45)
    image[obj] = (210, 190, 90)  # yellow fat on pink tissue
    result = segmenter.segment(image, Prompt((Click(120, 150),)))
    assert result.mask.shape == image.shape[:2] and result.mask.dtype == bool
    assert result.probability.shape == image.shape[:2]
    assert iou(result.mask, obj) > 0.85
    assert result.level == DAY_ONE and result.model_version.startswith("clicks-day-one-")
    assert 0.5 <= result.score <= 1.0


def test_negative_click_removes_a_false_region(segmenter: ClickSegmenter) -> None:
    image = _scene(seed=1)
    left = _disc(image.shape[:2], (120, 110), 40)
    right = _disc(image.shape[:2], (120, 185), 40)  # touches the left disc: same colour, one blob
    image[left | right] = (210, 190, 90)
    first = segmenter.segment(image, Prompt((Click(120, 95),)), key="two-discs")
    assert first.mask[120, 200], "the look-alike right disc is included at first (same tissue, connected)"
    prompt = Prompt((Click(120, 95), Click(120, 205, positive=False)), previous_mask=first.mask)
    corrected = segmenter.segment(image, prompt, key="two-discs")
    assert not corrected.mask[120, 205] and not corrected.mask[120, 200]
    assert corrected.mask[120, 95]
    assert iou(corrected.mask, left) > iou(first.mask, left) + 0.2


def test_box_alone_segments_the_object_inside_it(segmenter: ClickSegmenter) -> None:
    image = _scene(seed=2)
    obj = _disc(image.shape[:2], (100, 200), 35)
    image[obj] = (120, 40, 40)  # dark red liver
    result = segmenter.segment(image, Prompt(box=Box(55, 155, 145, 245)))
    assert iou(result.mask, obj) > 0.75
    assert not result.mask[:55].any() and not result.mask[:, :155].any()


def test_synthetic_frame_objects_improve_with_simulated_clicks(segmenter: ClickSegmenter) -> None:
    clip = generate_clip(seed=7, num_frames=1, height=240, width=427, world="v1")  # the level was set on v1
    frame, labels = clip.frames[0], clip.masks[0]
    classes = [k for k in np.unique(labels) if k != 0 and (labels == k).mean() > 0.05]
    assert classes
    sessions = [
        simulate(lambda p: segmenter.segment(frame, p, key="synthetic").mask, labels == k, max_clicks=5)
        for k in classes
    ]
    summary = summarize(sessions, max_clicks=5)
    assert summary["iou@5"] > 0.6
    assert summary["iou@5"] >= summary["iou@1"]


@pytest.mark.parametrize(
    ("prompt", "problem"),
    [
        (Prompt(), "no click and no box"),
        (Prompt((Click(10, 10, positive=False),)), "only negative clicks"),
        (Prompt((Click(-1, 10),)), "outside the"),
        (Prompt((Click(10, 333),)), "outside the"),
        (Prompt((Click(float("nan"), 10),)), "outside the"),
        (Prompt(box=Box(10, 10, 5, 50)), "is empty"),
        (Prompt(box=Box(300, 10, 400, 50)), "outside the"),
        (Prompt((Click(10, 10),), previous_mask=np.zeros((5, 5), bool)), "previous mask"),
    ],
)
def test_bad_prompts_are_clear_errors(segmenter: ClickSegmenter, prompt: Prompt, problem: str) -> None:
    with pytest.raises(PromptError, match=problem) as err:
        segmenter.segment(_scene(), prompt)
    assert err.value.hint


def test_bad_frames_and_levels_are_clear_errors(segmenter: ClickSegmenter) -> None:
    with pytest.raises(FrameError):
        segmenter.segment(np.zeros((20, 20), np.uint8), Prompt((Click(5, 5),)))
    with pytest.raises(PromptError, match="no learned click head"):
        segmenter.segment(_scene(), Prompt((Click(5, 5),)), level="learned")
    with pytest.raises(PromptError, match="unknown level"):
        segmenter.segment(_scene(), Prompt((Click(5, 5),)), level="best")


def test_features_are_computed_once_per_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    from surgenet_assist.core.interactive import engine

    calls = []
    real = engine.image_stages
    monkeypatch.setattr(engine, "image_stages", lambda *a: calls.append(1) or real(*a))
    seg = ClickSegmenter(load_backbone(random_init=True), cache_size=2)
    image = _scene()
    for click in (Click(50, 50), Click(60, 70), Click(100, 100, positive=False)):
        seg.segment(image, Prompt((Click(50, 50), click)), key=("task", 1))
    assert len(calls) == 1
    seg.segment(image.copy(), Prompt((Click(50, 50),)))  # no key: the content identifies the frame
    seg.segment(image.copy(), Prompt((Click(50, 60),)))
    assert len(calls) == 2
    for k in range(3):  # the cache holds two frames: the oldest is evicted
        seg.segment(image, Prompt((Click(50, 50),)), key=("other", k))
    seg.segment(image, Prompt((Click(50, 50),)), key=("task", 1))
    assert len(calls) == 6


def test_click_maps_encode_clicks_box_and_previous_mask() -> None:
    prev = np.zeros((80, 160), bool)
    prev[:40] = True
    prompt = Prompt((Click(8, 8), Click(72, 150, positive=False)), Box(40, 80, 80, 160), prev)
    maps = click_maps(prompt, (10, 20), (80, 160), radius=1.0)
    assert maps.shape == (4, 10, 20)
    assert maps[0, 1, 1] == 1 and maps[0].sum() <= 5 and maps[1, 9, 18] == 1
    assert maps[2, 5:, 10:].all() and not maps[2, :5].any()
    assert np.allclose(maps[3, :5], 1) and np.allclose(maps[3, 5:], 0)


def test_simulated_annotator_follows_the_ritm_protocol() -> None:
    gt = np.zeros((40, 60), bool)
    gt[10:30, 10:40] = True  # 20 x 30 box
    first = next_click(gt, np.zeros_like(gt))
    assert first == Click(19.0, 19.0, True)  # deepest point, first in raster order (as RITM)
    too_big = np.zeros_like(gt)
    too_big[5:35, 5:55] = True
    assert not next_click(gt, too_big).positive
    assert next_click(gt, gt) is None
    assert noc([0.5, 0.86, 0.91], 0.85) == 2 and noc([0.5, 0.86, 0.91], 0.9) == 3 and noc([0.1], 0.9) == 20

    def perfect_after_two(prompt: Prompt) -> np.ndarray:
        return gt if len(prompt.clicks) >= 2 else np.zeros_like(gt)

    session = simulate(perfect_after_two, gt, stop_at=0.9)
    assert session.ious == [0.0, 1.0] and session.noc(0.9) == 2 and len(session.clicks) == 2
    assert session.clicks[1].positive
