"""Rendering speed of the synthetic worlds: frames/s of world v2 against v1 (the baseline) in the same run.

    .venv/bin/python bench/synthetic.py [--frames 40] [--rounds 3] [--threads 1]

Per size (480x854, the v2 default; 240x427; 96x171 and 64x112, the sizes tests use) and world: a clip of
``--frames`` frames rendered through ``iter_clip`` (plan, renderer set-up and every frame: what a test pays),
``--rounds`` times with the worlds interleaved, median reported. OpenCV and torch run on ``--threads``
threads, so the figures mean one core of the shared 2-core machine. Target: v2 renders test sizes at >= 100
frames/s and 480x854 at >= 10 frames/s on one core (tests then spend seconds, not minutes, on clips).
"""

from __future__ import annotations

import argparse
import os
import time

import cv2
import numpy as np

from surgenet_assist.core.synthetic import iter_clip

SIZES = ((480, 854), (240, 427), (96, 171), (64, 112))
TARGETS = {(480, 854): 10.0, (96, 171): 100.0, (64, 112): 100.0}


def frames_per_second(world: str, size: tuple[int, int], frames: int, seed: int) -> float:
    start = time.perf_counter()
    for _ in iter_clip(seed, frames, size[0], size[1], world=world):
        pass
    return frames / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    cv2.setNumThreads(args.threads)
    load = os.getloadavg()[0]
    print(f"load average at start {load:.1f}; {args.threads} OpenCV thread(s); {args.frames} frames per clip")
    print("| size | v1 frames/s (baseline) | v2 frames/s | v2 / v1 | target (v2) |")
    print("|---|---|---|---|---|")
    for size in SIZES:
        runs = {"v1": [], "v2": []}
        for r in range(args.rounds):
            for world in ("v1", "v2"):
                runs[world].append(frames_per_second(world, size, args.frames, seed=r + 1))
        v1, v2 = (float(np.median(runs[w])) for w in ("v1", "v2"))
        target = TARGETS.get(size)
        verdict = "—" if target is None else f">= {target:g}: {'met' if v2 >= target else 'NOT met'}"
        print(f"| {size[0]}x{size[1]} | {v1:.1f} | {v2:.1f} | {v2 / v1:.2f}x | {verdict} |")
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
