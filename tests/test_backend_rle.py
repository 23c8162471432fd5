"""Our brush-RLE encoder (``core.encoders``, used by the backend) is bit-identical to the SDK's ``mask2rle``,
and our decoder reads what the SDK writes: random and structured masks, against the installed SDK."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from surgenet_assist.core.encoders import brush_rle_to_mask, mask_to_brush_rle

shapes = st.tuples(st.integers(1, 40), st.integers(1, 40))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes.flatmap(lambda s: arrays(np.uint8, s, elements=st.sampled_from([0, 1, 7, 128, 255]))))
def test_random_masks_bit_identical(mask):
    ours = mask_to_brush_rle(mask)
    assert ours == list(mask2rle(mask))
    np.testing.assert_array_equal(brush_rle_to_mask(ours, *mask.shape), mask)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 120), st.integers(2, 120), st.integers(0, 2**31 - 1))
def test_blobs_bit_identical(h, w, seed):
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(1, 4)):
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(1, w)), int(rng.integers(1, h)))
        cv2.ellipse(mask, c, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    assert mask_to_brush_rle(mask) == list(mask2rle(mask))


@pytest.mark.parametrize(
    "mask",
    [
        np.full((300, 300), 255, np.uint8),  # one run > 65536 values (split into 16-bit pieces)
        np.zeros((257, 64), np.uint8),
        np.tile(np.array([[0, 255]], np.uint8), (50, 33)),  # runs of exactly 4 (every pixel flips)
        np.pad(np.full((16, 16), 255, np.uint8), ((0, 0), (0, 1))),  # runs of 64 and 4
        np.eye(70, dtype=np.uint8) * 255,
    ],
    ids=["long-run", "all-zero", "stripes", "square", "diagonal"],
)
def test_structured_masks_bit_identical_and_sdk_decodes_ours(mask):
    ours = mask_to_brush_rle(mask)
    assert ours == list(mask2rle(mask))
    decoded = np.reshape(decode_rle(ours), (*mask.shape, 4))[:, :, 3]
    np.testing.assert_array_equal(decoded, mask)
    np.testing.assert_array_equal(brush_rle_to_mask(ours, *mask.shape), mask)
