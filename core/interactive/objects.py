"""What one *object* of interactive segmentation is: the single definition training, the gate and the bench
share (issue 21: training and the gate once used whole classes while the bench scored connected parts, so
45 % of the training objects were several objects at once and the gate judged another task than the bench).

An object is one connected part (8-connectivity) of one class in a class-id mask, covering at least
``min_fraction`` of the frame (1 %, the bench's pre-registered rule in ``bench/README.md``: smaller parts are
not what an annotator clicks) and at most ``max_fraction`` of it (a part that is nearly the whole frame
teaches and measures nothing). The background class and the ignore label are never objects.
"""

from __future__ import annotations

import cv2
import numpy as np

from ..schema import IGNORE_INDEX

#: An object covers at least this fraction of the frame (pre-registered in bench/README.md).
MIN_OBJECT_FRACTION = 0.01
#: ... and at most this fraction.
MAX_OBJECT_FRACTION = 0.9
#: Class id of the background (CholecSeg8k's "Black Background"); the ignore label is the schema's.
BACKGROUND = 0


def click_objects(
    mask: np.ndarray,
    *,
    min_fraction: float = MIN_OBJECT_FRACTION,
    max_fraction: float = MAX_OBJECT_FRACTION,
    background: int | None = BACKGROUND,
    ignore_index: int | None = IGNORE_INDEX,
) -> list[tuple[int, np.ndarray]]:
    """(class id, (H, W) bool mask) of every object of a class-id ``mask``, classes in increasing order and
    each class's parts in OpenCV's labelling order (deterministic: the same mask gives the same list)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"click_objects needs a (H, W) class-id mask, got shape {mask.shape}")
    total = mask.size
    low, high = min_fraction * total, max_fraction * total
    out: list[tuple[int, np.ndarray]] = []
    for k in np.unique(mask):
        k = int(k)
        if k in (background, ignore_index):
            continue
        binary = (mask == k).astype(np.uint8)
        count, parts, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
        for p in range(1, count):
            area = int(stats[p, cv2.CC_STAT_AREA])
            if low <= area <= high:
                out.append((k, parts == p))
    return out
