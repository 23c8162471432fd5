"""Peak resident memory of a call, sampled: what "bounded memory" tests assert instead of timings.

``ru_maxrss`` is the process's peak since it started, so in a test session it says nothing about one call;
this samples the resident set size (psutil) on a thread every millisecond while the call runs and reports the
growth of the peak over the size before the call. Allocations large enough to matter (hundreds of MB) take
far longer than a millisecond to fill, so the sampler sees them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psutil


def peak_rss_growth(call: Callable[[], Any], interval_s: float = 0.001) -> tuple[Any, int]:
    """``call()``'s result and how many bytes the process's resident set grew at its peak during it."""
    process = psutil.Process()
    before = process.memory_info().rss
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            done.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = call()
    finally:
        done.set()
        thread.join()
    peak = max(peak, process.memory_info().rss)
    return result, peak - before
