"""Label encoders shared by the store, the importers/exporters and the Label Studio backend.

* Label Studio brush RLE (``BrushLabels`` ``value.rle``): our own vectorised port of
  ``label_studio_sdk.converter.brush.mask2rle`` / ``decode_rle``. It is bit-identical to the SDK
  (property-tested against the SDK's code in ``tests/test_encoders.py``) but builds the bit stream with numpy
  instead of Python strings, so a noisy full-HD mask encodes in under a second, not seconds, and it
  does not pull the SDK's dependency tree (which pins numpy/opencv versions) into the core.
* Phase timelines: per-frame labels <-> contiguous segments with 1-based inclusive ranges, as Label Studio's
  ``timelinelabels`` use them.
* COCO RLE via pycocotools (the reference implementation COCO tools expect).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import DatasetFormatError

#: Label Studio's brush RLE parameters (``encode_rle(arr, wordsize=8, rle_sizes=[3, 4, 8, 16])``).
_WORDSIZE = 8
_RLE_SIZES = (3, 4, 8, 16)


# ----------------------------------------------------------------------------------------------------
# Label Studio brush RLE
# ----------------------------------------------------------------------------------------------------
def _runs(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run lengths and values of a 1-D array (same runs as the SDK's ``base_rle_encode``)."""
    change = np.flatnonzero(flat[1:] != flat[:-1])
    ends = np.append(change, flat.size - 1)
    lengths = np.diff(np.append(-1, ends))
    return lengths.astype(np.int64), flat[ends].astype(np.int64)


def encode_brush_rle(flat: np.ndarray) -> list[int]:
    """Encode a flat uint8 RGBA array exactly as ``label_studio_sdk.converter.brush.encode_rle`` does."""
    flat = np.ascontiguousarray(flat).ravel()
    if not flat.size:
        return _encode_runs(np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
    lengths, values = _runs(flat)
    return _encode_runs(lengths, values, int(flat.size))


def _encode_runs(lengths: np.ndarray, values: np.ndarray, num: int) -> list[int]:
    """The SDK's token stream for given runs, assembled 32 bits at a time with numpy (no per-bit arrays)."""
    header = (num << 21) | ((_WORDSIZE - 1) << 16)
    for i, size in enumerate(_RLE_SIZES):
        header |= (size - 1) << (12 - 4 * i)
    codes: list[np.ndarray] = [np.array([header], dtype=np.int64)]
    nbits: list[np.ndarray] = [np.array([53], dtype=np.int64)]
    if num:
        # Runs longer than 2**16 are split like the SDK: full pieces of 65536, then the remainder (1..65536),
        # every piece of an originally long run written with the 16-bit size.
        long = lengths > 256
        pieces = np.where(long, (lengths - 1) // 65536 + 1, 1)
        tok_len = np.repeat(lengths, pieces)
        tok_val = np.repeat(values, pieces)
        tok_long = np.repeat(long, pieces)
        first = np.repeat(np.cumsum(pieces) - pieces, pieces)
        k = np.arange(tok_len.size) - first
        last = k == np.repeat(pieces, pieces) - 1
        piece_len = np.where(last, tok_len - 65536 * k, 65536)
        single = tok_len == 1
        size_idx = np.select(
            [single, tok_len <= 8, tok_len <= 16, ~tok_long], [0, 0, 1, 2], default=3
        ).astype(np.int64)
        size_bits = np.array([3, 4, 8, 16], dtype=np.int64)[size_idx]
        count = np.where(single, 0, np.where(tok_long, piece_len - 1, tok_len - 1))
        flag = np.where(single, 0, 1)
        code = (((flag << 2) | size_idx) << size_bits | count) << 8 | tok_val
        codes.append(code)
        nbits.append(3 + size_bits + 8)
    code = np.concatenate(codes)
    lens = np.concatenate(nbits)
    total = int(lens.sum())
    pad = 8 - total % 8  # the SDK always pads, even a full byte when already aligned
    nbytes = (total + pad) // 8
    # The 53-bit header is written first on its own; every token has <= 27 bits, so it touches at most two
    # 32-bit big-endian words. Its bits in each word are disjoint from every other token's, so summing the
    # per-word contributions (exact in float64, each word < 2**32) is the same as OR-ing them.
    words = np.zeros((nbytes + 3) // 4 + 2, dtype=np.float64)
    head_bits, head = 53, int(code[0])
    words[0] = head >> (head_bits - 32)
    words[1] = (head & ((1 << (head_bits - 32)) - 1)) << (64 - head_bits)
    if code.size > 1:
        c, n = code[1:], lens[1:]
        end = head_bits + np.cumsum(n)  # bit position just after each token
        start = end - n
        w = start >> 5
        used = (start & 31) + n  # bits from the start of word w to the end of the token
        fits = used <= 32
        hi = np.where(fits, c << np.where(fits, 32 - used, 0), c >> np.where(fits, 0, used - 32))
        lo = np.where(fits, 0, (c << (64 - used)) & 0xFFFFFFFF)
        words += np.bincount(w, weights=hi.astype(np.float64), minlength=words.size)
        words += np.bincount(w + 1, weights=lo.astype(np.float64), minlength=words.size)[: words.size]
    return list(words.astype(np.uint64).astype(">u4").tobytes()[:nbytes])


def mask_to_brush_rle(mask: np.ndarray) -> list[int]:
    """2-D uint8 mask -> Label Studio brush RLE (each pixel repeated into 4 RGBA bytes; use 255 for 'on').

    The runs of the RGBA stream are the mask's runs times four, so they are found on the mask itself."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"brush masks must be 2-D uint8, got shape {mask.shape} dtype {mask.dtype}")
    flat = np.ascontiguousarray(mask).ravel()
    if not flat.size:
        return _encode_runs(np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
    lengths, values = _runs(flat)
    return _encode_runs(lengths * 4, values, int(flat.size) * 4)


def decode_brush_rle(rle: Sequence[int]) -> np.ndarray:
    """Label Studio brush RLE -> flat uint8 array (RGBA interleaved), like the SDK's ``decode_rle``."""
    try:
        data = bytes(int(x) for x in rle)
    except (TypeError, ValueError) as exc:
        raise DatasetFormatError(f"brush RLE is not a list of bytes: {exc}", "pass value.rle as is") from None
    if len(data) < 7:
        raise DatasetFormatError("brush RLE is shorter than its 53-bit header", "the RLE was truncated")
    stream = format(int.from_bytes(data, "big"), f"0{len(data) * 8}b")
    end = len(stream)
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        if pos + n > end:
            raise DatasetFormatError("brush RLE ends in the middle of a run", "the RLE was truncated")
        value = int(stream[pos : pos + n], 2)
        pos += n
        return value

    num = read(32)
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, dtype=np.uint8)
    i = 0
    while i < num:
        x = read(1)
        j = i + 1 + read(sizes[read(2)])
        if j > num:
            raise DatasetFormatError(f"brush RLE run overflows its {num} values", "the RLE is corrupt")
        if x:
            out[i:j] = read(word)
            i = j
        else:
            while i < j:
                out[i] = read(word)
                i += 1
    return out


def brush_rle_to_mask(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """Label Studio brush RLE -> (height, width) uint8 alpha mask."""
    flat = decode_brush_rle(rle)
    if flat.size != height * width * 4:
        raise DatasetFormatError(
            f"brush RLE holds {flat.size // 4} pixels but the region says {width}x{height}",
            "check original_width/original_height of the region",
        )
    return flat.reshape(height, width, 4)[:, :, 3].copy()


# ----------------------------------------------------------------------------------------------------
# Phase timelines
# ----------------------------------------------------------------------------------------------------
def labels_to_segments(labels: Sequence[int] | np.ndarray, missing: int = -1) -> list[tuple[int, int, int]]:
    """Per-frame label ids -> ``[(start, end, label)]`` with **1-based inclusive** frames (LS timelinelabels).

    Frames whose label is ``missing`` start no segment (gaps stay unlabelled).
    """
    arr = np.asarray(labels, dtype=np.int64).ravel()
    if arr.size == 0:
        return []
    change = np.flatnonzero(arr[1:] != arr[:-1]) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [arr.size]])
    return [(int(s) + 1, int(e), int(arr[s])) for s, e in zip(starts, ends, strict=True) if arr[s] != missing]


def segments_to_labels(
    segments: Sequence[tuple[int, int, int]], length: int, missing: int = -1
) -> np.ndarray:
    """``[(start, end, label)]`` (1-based inclusive) -> per-frame ids of ``length``; later segments win."""
    out = np.full(length, missing, dtype=np.int64)
    for start, end, label in segments:
        if start < 1 or end < start or end > length:
            raise DatasetFormatError(
                f"timeline range {start}..{end} is outside 1..{length}",
                "ranges are 1-based and inclusive; check the video's frame count",
            )
        out[start - 1 : end] = label
    return out


# ----------------------------------------------------------------------------------------------------
# COCO RLE (pycocotools)
# ----------------------------------------------------------------------------------------------------
def coco_rle_encode(binary: np.ndarray) -> dict[str, Any]:
    """Binary (H, W) mask -> COCO compressed RLE ``{"size": [h, w], "counts": str}`` (JSON-serialisable)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(binary, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE (compressed string or uncompressed list counts) -> (H, W) uint8 0/1 mask."""
    from pycocotools import mask as mask_utils

    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
        if isinstance(counts, list):
            obj = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
        else:
            obj = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        return np.asarray(mask_utils.decode(obj), dtype=np.uint8)
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetFormatError(f"malformed COCO RLE: {exc!r}", "give 'size' and 'counts'") from None


def coco_rle_area_bbox(rle: dict[str, Any]) -> tuple[int, list[float]]:
    """Area and ``[x, y, w, h]`` bbox of a COCO RLE, via pycocotools."""
    from pycocotools import mask as mask_utils

    obj = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return int(mask_utils.area(obj)), [float(v) for v in mask_utils.toBbox(obj)]
