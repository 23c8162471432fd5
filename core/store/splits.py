"""Which split a video belongs to: decided once, when the video enters the store, by the video alone.

Why at entry: a video without a split could shape what is served (instant heads) or trained on and only
later become a test video, so the gate would judge a model on frames that model had already learnt from. Why
by the video alone (a hash of its store path), not by the order videos arrive in: the backend must know a
task's split *before* its video is stored (it does not pre-annotate test videos), and the same video must land
in the same split whichever way it arrives (an import, a webhook, a napari session, a re-import into a fresh
store).

The price of a hash: in a project with a handful of videos the shares are uneven (with five videos, no test
video about 44% of the time). A split given explicitly (``add_video(split=...)``, ``set_split``) wins over the
rule, and a stored split never changes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from ..errors import UsageError

#: ``final`` is a last test split no selection decision reads (the gate reads ``test``): reported only, so the
#: numbers it gives stay an unbiased estimate however many promotions the ``test`` split has decided.
SPLITS = ("train", "val", "test", "final")
#: splits that judge or report models: never pre-annotated by default, never fit instant heads
HELD_OUT_SPLITS = ("test", "final")
#: shares of train, val, test, final for videos that enter the store without a split
DEFAULT_SPLIT_FRACTIONS = (0.6, 0.15, 0.15, 0.1)


def check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    """Shares of train, val, test (and final), normalised to sum to one; anything else is a UsageError."""
    values = tuple(float(f) for f in fractions)
    if not 3 <= len(values) <= len(SPLITS) or any(not f >= 0 for f in values) or sum(values) <= 0:
        raise UsageError(
            f"split fractions {list(fractions)} are not 3 or 4 non-negative shares",
            "give the shares of train, val, test (and final), e.g. [0.6, 0.15, 0.15, 0.1]",
        )
    total = sum(values)
    return tuple(f / total for f in values)


def video_position(path: str) -> float:
    """Where a video falls in [0, 1): the first 8 bytes of the SHA-256 of its store path."""
    return int.from_bytes(hashlib.sha256(str(path).encode()).digest()[:8], "big") / 2**64


def split_for_video(path: str, fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS) -> str:
    """The split of a video that enters the store without one: its position against the cumulative shares."""
    position, upper = video_position(path), 0.0
    shares = check_fractions(fractions)
    for name, share in zip(SPLITS, shares, strict=False):
        upper += share
        if position < upper:
            return name
    return SPLITS[len(shares) - 1]  # rounding at the top end
