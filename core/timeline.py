"""Phase timelines: smoothing per-frame phase labels into contiguous, plausible segments."""

from __future__ import annotations

import numpy as np


def mode_filter(labels: np.ndarray, window: int, num_classes: int) -> np.ndarray:
    """Majority vote over a centred window (odd); removes single-frame flicker."""
    labels = np.asarray(labels, dtype=np.int64)
    if window <= 1 or len(labels) < 2:
        return labels.copy()
    half = window // 2
    onehot = np.eye(num_classes, dtype=np.float32)[labels]
    padded = np.pad(onehot, ((half, half), (0, 0)), mode="edge")
    counts = np.cumsum(np.vstack([np.zeros((1, num_classes), np.float32), padded]), axis=0)
    votes = counts[window:] - counts[:-window]
    return votes.argmax(axis=1)


def runs(labels: np.ndarray) -> list[tuple[int, int, int]]:
    """Contiguous runs as (start, end_exclusive, label), 0-based."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        return []
    change = np.flatnonzero(np.diff(labels)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(labels)]])
    return [(int(s), int(e), int(labels[s])) for s, e in zip(starts, ends, strict=True)]


def merge_short_runs(labels: np.ndarray, min_length: int) -> np.ndarray:
    """Give runs shorter than ``min_length`` to the longer neighbour, shortest first."""
    out = np.asarray(labels, dtype=np.int64).copy()
    if min_length <= 1:
        return out
    while True:
        segs = runs(out)
        short = [i for i, (s, e, _) in enumerate(segs) if e - s < min_length]
        if not short or len(segs) == 1:
            return out
        i = min(short, key=lambda j: segs[j][1] - segs[j][0])
        s, e, _ = segs[i]
        left = segs[i - 1] if i > 0 else None
        right = segs[i + 1] if i + 1 < len(segs) else None
        pick = max((n for n in (left, right) if n), key=lambda n: n[1] - n[0])
        out[s:e] = pick[2]


def smooth_phase_labels(probs: np.ndarray, window: int = 5, min_length: int = 3) -> np.ndarray:
    """Phase labels from (T, P) probabilities: argmax, majority filter, no run shorter than min_length."""
    probs = np.asarray(probs)
    labels = probs.argmax(axis=1)
    labels = mode_filter(labels, window if window % 2 else window + 1, probs.shape[1])
    return merge_short_runs(labels, min_length)
