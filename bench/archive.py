"""Archive pre-annotation: decoder throughput, pipeline vs bare model, and a 2-rank torchrun with kill -9.

    python bench/archive.py [--seconds-480 120] [--seconds-1080 60] [--skip-torchrun] [--keep DIR]

On H.264 videos made here with PyAV (854x480 and 1920x1080, 25 fps, keyframe every 250 frames, B-frames;
lengths configurable so a quick run is possible), all sampled at 1 fps:

(a) today's loop: OpenCV's sequential reader (``VideoSource.iter_frames``), sampled frames/s — the baseline;
(b) the new decoder (core/decode.py: PyAV, keyframe segments) with 1 and 2 worker processes, as ratios
    against (a) measured in the same run (target on 2 cores: >= 1.8x with 2 workers);
(c) the whole pipeline (decoder workers + Predictor, 1080p) against the bare model forward rate on the same
    frames, already decoded and resized (target on CPU: >= 90 %);
(d) `torchrun --nproc-per-node 2` on CPU over 6 small videos: every video done exactly once; then a run
    whose rank 1 is killed with SIGKILL, and a re-run that redoes only what was unfinished.

Prints one JSON object with everything and the ratios; the load average before and after each part says
whether other jobs shared the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from surgenet_assist.core.decode import DecodePool, iter_sampled_frames, probe
from surgenet_assist.core.synthetic import generate_clip, write_h264
from surgenet_assist.core.video import open_video

REPO = Path(__file__).resolve().parents[1]


def load() -> float:
    return round(os.getloadavg()[0], 2)


def clip_frames(seconds: float, height: int, width: int, fps: int = 25):
    """Synthetic laparoscopic frames (24 distinct, cycled) with a moving bar so no two frames are equal."""
    clip = generate_clip(seed=7, num_frames=24, height=height, width=width)
    for i in range(int(seconds * fps)):
        img = clip.frames[i % 24].copy()
        img[: height // 60, : (i * 7) % width] = 255
        yield img


def make_video(path: Path, seconds: float, height: int, width: int) -> Path:
    if path.exists():
        return path
    t = time.perf_counter()
    write_h264(path, clip_frames(seconds, height, width), fps=25, gop=250, bframes=2, preset="veryfast")
    print(f"wrote {path.name}: {seconds:g} s {width}x{height} H.264 in {time.perf_counter() - t:.0f} s",
          file=sys.stderr)
    return path


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rate_opencv(path: Path) -> tuple[float, int, float]:
    """(sampled frames/s, frames, CPU seconds per sampled frame: all threads, so other load does not count)"""
    t, c = time.perf_counter(), _cpu_self()
    with open_video(path) as video:
        n = sum(1 for _ in video.iter_frames(sample_fps=1.0))
    return n / (time.perf_counter() - t), n, (_cpu_self() - c) / n


def rate_pool(path: Path, pool: DecodePool) -> tuple[float, int, float]:
    import psutil

    procs = [psutil.Process(p.pid) for p in pool._procs]

    def cpu() -> float:
        return _cpu_self() + sum(sum(p.cpu_times()[:2]) for p in procs)

    t, c = time.perf_counter(), cpu()
    n = sum(1 for _ in iter_sampled_frames(path, 1.0, pool=pool))
    return n / (time.perf_counter() - t), n, (cpu() - c) / n


def decoders(paths: dict[str, Path]) -> dict:
    out: dict = {}
    for name, path in paths.items():
        res: dict = {"load_before": load()}
        index = probe(path)
        res["frames"] = index.frame_count
        res["opencv_sampled_fps"], res["sampled"], res["opencv_cpu_s_per_sample"] = rate_opencv(path)
        for workers in (1, 2):
            with DecodePool(workers) as pool:
                list(iter_sampled_frames(path, 0.05, pool=pool))  # workers started and warm
                res[f"pyav_{workers}w_sampled_fps"], n, res[f"pyav_{workers}w_cpu_s_per_sample"] = rate_pool(
                    path, pool
                )
                assert n == res["sampled"], (n, res["sampled"])
            rate = res[f"pyav_{workers}w_sampled_fps"]
            res[f"ratio_{workers}w_vs_opencv"] = rate / res["opencv_sampled_fps"]
        res["cpu_ratio_opencv_vs_pyav"] = res["opencv_cpu_s_per_sample"] / res["pyav_1w_cpu_s_per_sample"]
        # what one busy core gives, from CPU time (robust to other jobs on the machine)
        res["pyav_sampled_per_core_s"] = 1 / res["pyav_1w_cpu_s_per_sample"]
        res["opencv_sampled_per_core_s"] = 1 / res["opencv_cpu_s_per_sample"]
        res["load_after"] = load()
        out[name] = res
    return out


def pipeline(path: Path, batch: int, workers_list: tuple[int, ...]) -> dict:
    """Pipeline (decoder workers + Predictor) vs bare forward on the same frames, 1 fps of a 1080p video."""
    import torch

    from surgenet_assist.core.model import SurgeNetAssistModel
    from surgenet_assist.core.predictor import Predictor

    torch.manual_seed(0)
    model = SurgeNetAssistModel.create(random_init=True).eval()
    predictor = Predictor(model, device="cpu", batch_size=batch, short_side=256)
    res: dict = {"load_before": load(), "torch_threads": torch.get_num_threads(), "batch": batch}
    frames = [r.image for r in iter_sampled_frames(path, 1.0, decoder="opencv")]
    res["frames"] = len(frames)
    resized = np.stack([predictor._resize(f) for f in frames])
    res["model_input"] = list(resized.shape[1:3])
    # bare: the same frames, already decoded and resized, forward only
    with torch.inference_mode():
        predictor._run(predictor.to_tensor(resized[:batch]))  # warm-up
        t = time.perf_counter()
        for lo in range(0, len(resized), batch):
            predictor._run(predictor.to_tensor(resized[lo : lo + batch]))
        res["bare_forward_fps"] = len(resized) / (time.perf_counter() - t)
    for workers in workers_list:
        with DecodePool(workers) as pool:
            list(iter_sampled_frames(path, 0.05, pool=pool))
            t = time.perf_counter()
            n = 0
            for _ in predictor.stream_with_frames(iter_sampled_frames(path, 1.0, pool=pool)):
                n += 1
            res[f"pipeline_{workers}w_fps"] = n / (time.perf_counter() - t)
        res[f"pipeline_{workers}w_vs_bare"] = res[f"pipeline_{workers}w_fps"] / res["bare_forward_fps"]
    t = time.perf_counter()
    with open_video(path) as video:
        n = sum(1 for _ in predictor.stream(video.iter_frames(sample_fps=1.0)))
    res["pipeline_today_opencv_thread_fps"] = n / (time.perf_counter() - t)
    res["pipeline_today_vs_bare"] = res["pipeline_today_opencv_thread_fps"] / res["bare_forward_fps"]
    res["load_after"] = load()
    return res


def _torchrun(videos: Path, out: Path, port: int) -> list[str]:
    return [
        str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", "2", "--master-port", str(port),
        "-m", "surgenet_assist.cli.main", "predict", str(videos), "--out", str(out), "--fps", "5",
        "--random-init", "--short-side", "64", "--overlay-every", "100", "--decode-workers", "1",
    ]


def torchrun_check(tmp: Path) -> dict:
    """6 videos on 2 ranks: exactly once; then kill -9 of rank 1 mid-run and a re-run."""
    import psutil

    videos = tmp / "tr-videos"
    for i in range(6):
        make_video(videos / f"case{i}.mp4", 4 + i, 120, 160)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    res: dict = {"load_before": load()}
    out = tmp / "tr-out"
    t = time.perf_counter()
    proc = subprocess.run(_torchrun(videos, out, 29611), env=env, capture_output=True, text=True)
    res["clean_run_s"] = time.perf_counter() - t
    summary = json.loads((out / "archive-summary.json").read_text())
    by_rank = summary["videos_by_rank"]
    done = by_rank.get("0", []) + by_rank.get("1", [])
    res["clean_run"] = {
        "returncode": proc.returncode,
        "videos_by_rank": by_rank,
        "every_video_exactly_once": sorted(done) == [f"case{i}" for i in range(6)],
    }

    out = tmp / "tr-kill"
    runner = subprocess.Popen(_torchrun(videos, out, 29612), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    while len(list(out.glob("case*/summary.json"))) < 2 and runner.poll() is None:
        time.sleep(0.05)
    children = psutil.Process(runner.pid).children()
    ranks = [p for p in children if "surgenet_assist.cli.main" in " ".join(p.cmdline())]
    victim = next((p for p in ranks if "RANK" in p.environ() and p.environ()["RANK"] == "1"), ranks[-1])
    victim.send_signal(signal.SIGKILL)
    runner.wait()
    before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("case*/summary.json")}
    proc = subprocess.run(_torchrun(videos, out, 29613), env=env, capture_output=True, text=True)
    summary = json.loads((out / "archive-summary.json").read_text())
    redone = summary["videos_by_rank"].get("0", []) + summary["videos_by_rank"].get("1", [])
    after = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("case*/summary.json")}
    res["kill_rerun"] = {
        "finished_before_kill": sorted(before),
        "rerun_returncode": proc.returncode,
        "rerun_did": sorted(redone),
        "rerun_skipped": summary["skipped (finished before)"],
        "only_unfinished_redone": sorted(redone) == sorted(set(after) - set(before))
        and all(after[k] == v for k, v in before.items()),
        "all_six_done": len(after) == 6,
    }
    res["load_after"] = load()
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds-480", type=float, default=120.0, help="length of the 854x480 video")
    parser.add_argument("--seconds-1080", type=float, default=60.0, help="length of the 1920x1080 video")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--skip-torchrun", action="store_true")
    parser.add_argument("--keep", type=Path, help="folder for the generated videos (reused next time)")
    args = parser.parse_args()
    print(f"cores={os.cpu_count()} load={load()}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp_name:
        work = args.keep or Path(tmp_name)
        work.mkdir(parents=True, exist_ok=True)
        paths = {
            "854x480": make_video(work / f"h264-480-{args.seconds_480:g}s.mp4", args.seconds_480, 480, 854),
            "1920x1080": make_video(
                work / f"h264-1080-{args.seconds_1080:g}s.mp4", args.seconds_1080, 1080, 1920
            ),
        }
        results: dict = {"decoders": decoders(paths)}
        print(json.dumps(results["decoders"], indent=2), file=sys.stderr)
        if not args.skip_pipeline:
            results["pipeline_1080p"] = pipeline(paths["1920x1080"], args.batch_size, (1, 2))
            print(json.dumps(results["pipeline_1080p"], indent=2), file=sys.stderr)
        if not args.skip_torchrun:
            results["torchrun"] = torchrun_check(Path(tmp_name))
    print(json.dumps(results, indent=2))
    for name, r in results["decoders"].items():
        print(f"{name}: new decoder / today's OpenCV loop = {r['ratio_1w_vs_opencv']:.2f}x (1 worker), "
              f"{r['ratio_2w_vs_opencv']:.2f}x (2 workers; target >= 1.8x); CPU per sampled frame "
              f"OpenCV / new = {r['cpu_ratio_opencv_vs_pyav']:.2f}x; per busy core: "
              f"{r['pyav_sampled_per_core_s']:.1f} (new) vs {r['opencv_sampled_per_core_s']:.1f} "
              "sampled frames/s")
    if "pipeline_1080p" in results:
        p = results["pipeline_1080p"]
        print(f"1080p pipeline / bare model: {p['pipeline_1w_vs_bare']:.0%} (1 worker), "
              f"{p['pipeline_2w_vs_bare']:.0%} (2 workers), today's {p['pipeline_today_vs_bare']:.0%} "
              "(target >= 90%)")


if __name__ == "__main__":
    main()
