"""Predictor throughput against a naive baseline measured in the same run, plus GFLOP/s and peak memory.

    python bench/predictor.py [--frames 48] [--batch-size 8 | 0 = by device] [--device cpu|cuda]
                              [--minutes 10] [--compile] [--cuda-graphs]

Prints: naive frames/s (the same model called frame by frame in fp32 with PIL preprocessing and
full-size upsampling), Predictor frames/s end to end from an 854x480 video file, the bare model's
forward rate on ready tensors, their ratios, effective GFLOP/s against this machine's torch.matmul
GFLOP/s, and (in a fresh subprocess) peak RSS while pre-annotating a long video sampled at 1 fps. On a
GPU: bf16, the share of the device's measured bf16 matmul peak, and with --cuda-graphs the CUDA-graph rate.
Targets on 2 CPU cores: >= 1.3x the naive baseline, >= 85% of the bare forward rate, < 2 GB RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from surgenet_assist.core.model import SurgeNetAssistModel
from surgenet_assist.core.predictor import Predictor, target_size
from surgenet_assist.core.synthetic import generate_clip
from surgenet_assist.core.video import open_video

H, W = 480, 854


def make_video(path: Path, frames: int, fps: float = 25.0, distinct: int = 24) -> Path:
    """An 854x480 video cycling through ``distinct`` synthetic frames (cheap to write, real to decode)."""
    clip = generate_clip(seed=11, num_frames=distinct, height=H, width=W)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (W, H))
    for i in range(frames):
        writer.write(cv2.cvtColor(clip.frames[i % distinct], cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def naive_rate(model: SurgeNetAssistModel, video: Path, frames: int) -> float:
    """Frame by frame, fp32, PIL resize + torchvision-style normalise, full-size logits argmax."""
    mean = torch.tensor(model.backbone.mean).view(3, 1, 1)
    std = torch.tensor(model.backbone.std).view(3, 1, 1)
    th, tw = target_size(H, W, 256)
    start = time.perf_counter()
    with open_video(video) as src, torch.no_grad():
        for n, rec in enumerate(src.iter_frames()):
            if n == frames:
                break
            img = Image.fromarray(rec.image).resize((tw, th), Image.BILINEAR)
            x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)
            out = model(((x - mean) / std)[None])
            logits = F.interpolate(out.seg_logits, size=(H, W), mode="bilinear", align_corners=False)
            torch.softmax(logits, 1).max(1)
            torch.softmax(out.phase_logits, 1), torch.sigmoid(out.cvs_logits)
    return frames / (time.perf_counter() - start)


def predictor_rate(predictor: Predictor, video: Path, frames: int) -> float:
    start = time.perf_counter()
    with open_video(video) as src:
        count = sum(1 for _ in predictor.stream(src.iter_frames(end=frames)))
    assert count == frames
    return frames / (time.perf_counter() - start)


def bare_rate(model: SurgeNetAssistModel, batch: int, device: torch.device, amp: bool, frames: int) -> float:
    th, tw = target_size(H, W, 256)
    x = torch.randn(batch, 3, th, tw, device=device).contiguous(memory_format=torch.channels_last)
    steps = max(1, frames // batch)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def flops_per_frame(model: SurgeNetAssistModel) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    th, tw = target_size(H, W, 256)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, th, tw))
    return counter.get_total_flops()


def matmul_gflops(
    device: torch.device, n: int = 2048, reps: int = 10, dtype: torch.dtype = torch.float32
) -> float:
    """Achievable dense matmul rate: the 'peak' the model's effective rate is compared with (bf16 on GPU)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def long_video_rss(minutes: float, batch: int) -> dict:
    """Run in a fresh process: pre-annotate a long 25 fps video at 1 fps, report peak RSS."""
    code = f"""
import json, resource, tempfile, time, pathlib, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from predictor import make_video
from surgenet_assist.core.model import SurgeNetAssistModel
from surgenet_assist.core.predictor import Predictor
tmp = pathlib.Path(tempfile.mkdtemp())
frames = int({minutes} * 60 * 25)
video = make_video(tmp / "long.mp4", frames)
model = SurgeNetAssistModel.create(random_init=True)
p = Predictor(model, batch_size={batch})
t = time.perf_counter()
result = p.predict_video(video, sample_fps=1.0, on_frame=lambda pred, img: None)
print(json.dumps({{"sampled_frames": len(result.indices), "seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--minutes", type=float, default=10.0, help="long video for the RSS check (0: skip)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="also measure torch.compile with CUDA graphs (GPU)"
    )
    args = parser.parse_args()
    if args.batch_size <= 0:  # 0: the Predictor's choice for the device
        from surgenet_assist.core.predictor import default_batch_size

        args.batch_size = default_batch_size(args.device)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = SurgeNetAssistModel.create(random_init=True).eval()
    print(
        f"device={device} threads={torch.get_num_threads()} cores={os.cpu_count()} torch={torch.__version__}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        video = make_video(Path(tmp) / "bench.mp4", args.frames + 8)
        results = {}
        if device.type == "cpu":
            results["naive_fps"] = naive_rate(model, video, args.frames)
        predictor = Predictor(model, device=device, batch_size=args.batch_size)
        predictor_rate(predictor, video, args.batch_size)  # warm-up
        results["predictor_fps"] = predictor_rate(predictor, video, args.frames)
        results["bare_forward_fps"] = bare_rate(
            predictor.model, args.batch_size, device, predictor.amp, args.frames
        )
        if args.compile:
            compiled = Predictor(model, device=device, batch_size=args.batch_size, compile=True)
            predictor_rate(compiled, video, args.batch_size)
            results["predictor_compiled_fps"] = predictor_rate(compiled, video, args.frames)
        if args.cuda_graphs and device.type == "cuda":
            graphed = Predictor(model, device=device, batch_size=args.batch_size, cuda_graphs=True)
            predictor_rate(graphed, video, args.batch_size)
            results["predictor_cuda_graphs_fps"] = predictor_rate(graphed, video, args.frames)
            results["bare_cuda_graphs_fps"] = bare_rate(
                graphed._forward, args.batch_size, device, True, args.frames
            )
    gflop = flops_per_frame(model.cpu()) / 1e9
    results["gflop_per_frame"] = gflop
    results["effective_gflops"] = gflop * results["predictor_fps"]
    results["matmul_gflops"] = matmul_gflops(device)
    if device.type == "cuda":
        results["device_name"] = torch.cuda.get_device_name(device)
        results["batch_size"] = args.batch_size
        results["bf16_matmul_tflops"] = matmul_gflops(device, n=8192, reps=20, dtype=torch.bfloat16) / 1e3
        best = max(results.get("bare_cuda_graphs_fps", 0.0), results["bare_forward_fps"])
        results["bare_share_of_bf16_peak"] = gflop * best / 1e3 / results["bf16_matmul_tflops"]
    print(json.dumps(results, indent=2))
    if "bf16_matmul_tflops" in results:
        print(
            f"GPU {results['device_name']}: bare forward {results['bare_forward_fps']:.0f} frames/s, "
            f"end to end {results['predictor_fps']:.0f} frames/s (batch {args.batch_size}); "
            f"{results['bare_share_of_bf16_peak']:.0%} of the measured bf16 matmul peak "
            f"({results['bf16_matmul_tflops']:.0f} TFLOP/s)"
        )
    if "naive_fps" in results:
        print(
            f"Predictor / naive baseline: {results['predictor_fps'] / results['naive_fps']:.2f}x "
            "(target >= 1.3x)"
        )
    if "predictor_compiled_fps" in results and "naive_fps" in results:
        print(
            f"Predictor with torch.compile / naive baseline: "
            f"{results['predictor_compiled_fps'] / results['naive_fps']:.2f}x"
        )
    print(
        f"Predictor end to end / bare forward: {results['predictor_fps'] / results['bare_forward_fps']:.0%} "
        "(target >= 85%)"
    )
    print(
        f"Effective {results['effective_gflops']:.1f} GFLOP/s = "
        f"{results['effective_gflops'] / results['matmul_gflops']:.0%} of torch.matmul's "
        f"{results['matmul_gflops']:.1f} GFLOP/s ({gflop:.1f} GFLOP per 256x448 frame)"
    )
    if args.minutes > 0:
        rss = long_video_rss(args.minutes, args.batch_size)
        print(
            f"{args.minutes:g}-minute 25 fps video at 1 fps: {rss['sampled_frames']} frames in "
            f"{rss['seconds']:.0f} s, peak RSS {rss['peak_rss_mb']:.0f} MB (target < 2048 MB)"
        )


if __name__ == "__main__":
    main()
