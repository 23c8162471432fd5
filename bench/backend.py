"""Label Studio backend benchmark: /predict latency and throughput over HTTP, and brush-RLE encoding speed.

    python bench/backend.py [--reps 8] [--batch-reps 3] [--clients 8] [--short-side 256] [--bundle DIR]

* ``/predict`` p50/p95 for one 854x480 frame and for a 32-task batch, served by the real app (the
  server `serve` runs, on 127.0.0.1, media read from the local-files root), random-init model unless
  ``--bundle``;
* throughput with N concurrent clients sending one-frame requests (must finish without errors);
* our RLE encoder vs the SDK's ``mask2rle`` on a smooth 1920x1080 mask and a noisy one; target >= 10x faster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import requests


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def bench_rle(reps: int) -> dict[str, dict[str, float]]:
    from label_studio_sdk.converter.brush import mask2rle

    from surgenet_assist.core.encoders import mask_to_brush_rle

    smooth = np.zeros((1080, 1920), np.uint8)
    cv2.ellipse(smooth, (960, 540), (600, 300), 20, 0, 360, 255, -1)
    noisy = (np.random.default_rng(0).random((1080, 1920)) < 0.5).astype(np.uint8) * 255
    out = {}
    for name, mask in (("smooth", smooth), ("noisy", noisy)):
        assert mask_to_brush_rle(mask) == list(mask2rle(mask)), "encoders disagree"
        times = {}
        for label, fn, n in (("ours", mask_to_brush_rle, reps), ("sdk", mask2rle, max(1, reps // 3))):
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn(mask)
                ts.append(time.perf_counter() - t0)
            times[label] = min(ts)
        out[name] = {
            "ours_ms": times["ours"] * 1e3,
            "sdk_ms": times["sdk"] * 1e3,
            "speedup": times["sdk"] / times["ours"],
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=8, help="single-frame requests for p50/p95")
    ap.add_argument("--batch-reps", type=int, default=3, help="32-task requests for p50/p95")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument("--short-side", type=int, default=256, help="model input short side (854x480 -> 448x256)")
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--skip-http", action="store_true", help="only the RLE benchmark")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="surgenet-bench-"))
    # the SDK reads LOCAL_FILES_DOCUMENT_ROOT when it is first imported: set it before anything imports it
    os.environ["LOCAL_FILES_DOCUMENT_ROOT"] = str(tmp / "root")
    report: dict[str, object] = {"rle": bench_rle(5)}
    for name, r in report["rle"].items():
        print(
            f"RLE {name:6s} 1920x1080: ours {r['ours_ms']:8.1f} ms  sdk {r['sdk_ms']:8.1f} ms  "
            f"ratio {r['speedup']:6.1f}x  (target >= 10x)"
        )
    if args.skip_http:
        return 0

    import torch

    from surgenet_assist.backend.app import BackendSettings, create_app
    from surgenet_assist.backend.labeling_configs import image_config
    from surgenet_assist.core.model import SurgeNetAssistModel
    from surgenet_assist.core.predictor import Predictor
    from surgenet_assist.core.store import LabelStore
    from surgenet_assist.core.synthetic import generate_clip

    frames_dir = tmp / "root" / "frames"
    frames_dir.mkdir(parents=True)
    clip = generate_clip(1, args.batch, 480, 854)
    for i, f in enumerate(clip.frames):
        cv2.imwrite(str(frames_dir / f"{i:04d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    if args.bundle:
        predictor = Predictor.from_bundle(
            args.bundle, batch_size=8, short_side=args.short_side, allow_download=False
        )
    else:
        model = SurgeNetAssistModel.create(random_init=True)
        predictor = Predictor(model, batch_size=8, short_side=args.short_side, model_version="bench")
    store = LabelStore(f"sqlite:///{tmp / 'store.db'}", migrate=True)
    settings = BackendSettings(local_files_document_root=str(tmp / "root"))
    app = create_app(settings, predictor=predictor, store=store)
    from surgenet_assist.backend.server import InProcessServer

    server = InProcessServer(app)  # as `surgenet-assist serve` serves it
    url = f"{server.url}/predict"
    cfg = image_config()

    def tasks(lo: int, n: int) -> list[dict]:
        return [
            {"id": i + 1, "data": {"image": f"/data/local-files/?d=frames/{i % args.batch:04d}.png"}}
            for i in range(lo, lo + n)
        ]

    def call(body: dict) -> float:
        t0 = time.perf_counter()
        r = requests.post(url, json=body, timeout=600)
        dt = time.perf_counter() - t0
        answered = r.status_code == 200 and len(r.json()["results"]) == len(body["tasks"])
        if not answered or r.json().get("failed") or not all(p["result"] for p in r.json()["results"]):
            raise RuntimeError(f"bad response {r.status_code}: {r.text[:300]}")
        return dt

    call({"tasks": tasks(0, 1), "label_config": cfg})  # warm-up
    single = [call({"tasks": tasks(i, 1), "label_config": cfg}) for i in range(args.reps)]
    batch = [call({"tasks": tasks(0, args.batch), "label_config": cfg}) for _ in range(args.batch_reps)]
    errors = 0

    def client(k: int) -> int:
        ok = 0
        for j in range(args.per_client):
            try:
                call({"tasks": tasks(k * args.per_client + j, 1), "label_config": cfg})
                ok += 1
            except Exception:  # noqa: BLE001 - counted
                pass
        return ok

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        oks = list(pool.map(client, range(args.clients)))
    wall = time.perf_counter() - t0
    total = args.clients * args.per_client
    errors = total - sum(oks)
    server.stop()
    store.close()
    report["http"] = {
        "device": str(predictor.device),
        "torch_threads": torch.get_num_threads(),
        "short_side": args.short_side,
        "single_p50_s": statistics.median(single),
        "single_p95_s": pct(single, 95),
        "batch_p50_s": statistics.median(batch),
        "batch_p95_s": pct(batch, 95),
        "batch_per_task_s": statistics.median(batch) / args.batch,
        "concurrent_clients": args.clients,
        "concurrent_requests": total,
        "concurrent_errors": errors,
        "concurrent_throughput_rps": sum(oks) / wall,
    }
    h = report["http"]
    print(
        f"/predict 1 x 854x480 : p50 {h['single_p50_s'] * 1e3:7.0f} ms  p95 {h['single_p95_s'] * 1e3:7.0f} ms"
    )
    print(
        f"/predict {args.batch} tasks    : p50 {h['batch_p50_s']:7.2f} s   p95 {h['batch_p95_s']:7.2f} s "
        f"({h['batch_per_task_s'] * 1e3:.0f} ms/task)"
    )
    print(
        f"{args.clients} concurrent clients: {h['concurrent_throughput_rps']:.2f} req/s, "
        f"{errors} errors of {total}"
    )
    print(json.dumps(report, indent=1, default=float))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
