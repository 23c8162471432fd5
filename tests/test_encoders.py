"""Encoders: brush RLE bit-identical to Label Studio's SDK code, timelines, COCO RLE."""

from __future__ import annotations

import ls_brush_reference as sdk
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from surgenet_assist.core.encoders import (
    brush_rle_to_mask,
    coco_rle_decode,
    coco_rle_encode,
    decode_brush_rle,
    encode_brush_rle,
    labels_to_segments,
    mask_to_brush_rle,
    segments_to_labels,
)
from surgenet_assist.core.errors import DatasetFormatError

shapes = st.tuples(st.integers(1, 40), st.integers(1, 40))
masks = shapes.flatmap(
    lambda s: st.one_of(
        arrays(np.uint8, s, elements=st.sampled_from([0, 255])),
        arrays(np.uint8, s, elements=st.integers(0, 255)),
        arrays(np.uint8, s, elements=st.sampled_from([0, 1, 7])),
    )
)


@settings(max_examples=150, deadline=None)
@given(masks)
def test_brush_rle_is_bit_identical_to_the_sdk(mask):
    ours = mask_to_brush_rle(mask)
    assert ours == sdk.mask2rle(mask)
    np.testing.assert_array_equal(brush_rle_to_mask(ours, *mask.shape), mask)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 70_000), st.integers(0, 255)), min_size=1, max_size=4))
def test_long_runs_match_the_sdk(runs):
    """Runs around the 8/16/256/65536 size boundaries, on flat arrays (what encode_rle sees)."""
    flat = np.concatenate([np.full(n, v, dtype=np.uint8) for n, v in runs])
    assert encode_brush_rle(flat) == sdk.encode_rle(flat)
    np.testing.assert_array_equal(decode_brush_rle(encode_brush_rle(flat)), flat)
    np.testing.assert_array_equal(sdk.decode_rle(encode_brush_rle(flat)), flat)


@pytest.mark.parametrize("n", [1, 8, 9, 16, 17, 256, 257, 65536, 65537, 131073])
def test_run_length_boundaries(n):
    flat = np.full(n, 200, dtype=np.uint8)
    assert encode_brush_rle(flat) == sdk.encode_rle(flat)


def test_corrupt_rle_is_an_error():
    rle = mask_to_brush_rle(np.full((10, 10), 255, np.uint8))
    with pytest.raises(DatasetFormatError):
        decode_brush_rle(rle[:3])
    with pytest.raises(DatasetFormatError, match="width"):
        brush_rle_to_mask(rle, 10, 11)
    with pytest.raises(ValueError):
        mask_to_brush_rle(np.zeros((3, 3), np.int64))


@given(st.lists(st.integers(-1, 6), max_size=200))
def test_segments_roundtrip(labels):
    segs = labels_to_segments(labels)
    assert all(1 <= s <= e <= len(labels) for s, e, _ in segs)  # 1-based inclusive
    assert all(a[1] < b[0] for a, b in zip(segs, segs[1:], strict=False))
    np.testing.assert_array_equal(segments_to_labels(segs, len(labels)), np.asarray(labels, dtype=np.int64))


def test_segments_example_matches_label_studio_convention():
    assert labels_to_segments([0, 0, 0, 2, 2, -1, 2]) == [(1, 3, 0), (4, 5, 2), (7, 7, 2)]
    with pytest.raises(DatasetFormatError):
        segments_to_labels([(0, 3, 1)], 5)


@settings(max_examples=50, deadline=None)
@given(shapes.flatmap(lambda s: arrays(np.uint8, s, elements=st.integers(0, 1))))
def test_coco_rle_roundtrip(binary):
    rle = coco_rle_encode(binary)
    assert rle["size"] == list(binary.shape) and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(coco_rle_decode(rle), binary)


def test_coco_uncompressed_counts():
    # column-major runs: 2 zeros, 3 ones, 1 zero in a 3x2 mask
    mask = coco_rle_decode({"size": [3, 2], "counts": [2, 3, 1]})
    np.testing.assert_array_equal(mask, np.array([[0, 1], [0, 1], [1, 0]], np.uint8))
