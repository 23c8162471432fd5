"""Time to show a random frame of a long video in the napari plugin, and peak memory vs video length.

    xvfb-run -a .venv/bin/python bench/napari_seek.py [--minutes 10] [--short-minutes 1] [--seeks 60]

Writes an indexed 854x480 25 fps video (each frame shows its own index as a bar code), opens it through the
plugin's reader in a shown napari viewer, then jumps to random frames with ``dims.set_current_step`` and
times until the new frame is sliced and the canvas has been redrawn (``NAPARI_ASYNC=0``, so slicing happens
inside the call; ``processEvents`` flushes the paint). Every seek is checked: the frame on screen must carry
the index asked for. Each video length runs in its own process, so peak RSS (ru_maxrss) is per length.
Target on 2 CPU cores: median < 200 ms, peak memory independent of the video's length.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FPS = 25.0
SIZE = (480, 854)


def run_one(path: Path, seeks: int, seed: int) -> dict:
    os.environ["NAPARI_ASYNC"] = "0"
    import napari
    from qtpy.QtWidgets import QApplication

    from surgenet_assist.core.synthetic import decode_frame_index

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    t0 = time.perf_counter()
    (layer,) = viewer.open(str(path), plugin="surgenet-assist")
    app.processEvents()
    open_s = time.perf_counter() - t0
    n = layer.data.shape[0]
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, n, seeks).tolist()
    times, wrong = [], 0
    for i in targets:
        t = time.perf_counter()
        viewer.dims.set_current_step(0, int(i))
        app.processEvents()
        times.append(time.perf_counter() - t)
        shown = np.asarray(layer._slice.image.raw)  # what the layer sliced for display (private, bench only)
        wrong += int(decode_frame_index(shown) != i)
    times_ms = np.array(times) * 1000
    viewer.close()
    return {
        "frames": n,
        "open_s": round(open_s, 2),
        "median_ms": round(float(np.median(times_ms)), 1),
        "p95_ms": round(float(np.percentile(times_ms, 95)), 1),
        "max_ms": round(float(times_ms.max()), 1),
        "wrong_frames": wrong,
        "seeks": seeks,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--short-minutes", type=float, default=1.0, help="shorter video, memory comparison")
    ap.add_argument("--seeks", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=None, help="where to keep the generated videos")
    ap.add_argument("--_child", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child is not None:
        print(json.dumps(run_one(args._child, args.seeks, args.seed)))
        return

    from surgenet_assist.core.synthetic import make_indexed_video

    folder = args.dir or Path(tempfile.mkdtemp(prefix="napari-seek-"))
    results = {}
    for minutes in (args.short_minutes, args.minutes):
        frames = int(round(minutes * 60 * FPS))
        path = folder / f"indexed-{frames}f-854x480.mp4"
        if not path.exists():
            t = time.perf_counter()
            make_indexed_video(path, num_frames=frames, fps=FPS, size=SIZE)
            print(f"wrote {path} ({frames} frames) in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        out = subprocess.run(
            [sys.executable, __file__, "--_child", str(path), "--seeks", str(args.seeks),
             "--seed", str(args.seed)],
            check=True, capture_output=True, text=True,
        )
        results[f"{minutes:g} min"] = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps({"cpu_cores": os.cpu_count(), "video": "854x480 25 fps mp4v", **results}, indent=2))


if __name__ == "__main__":
    main()
