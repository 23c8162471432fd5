"""Archive pre-annotation (core/archive.py, `predict` over many videos): which videos, balanced disjoint
shares, idempotent re-runs, resume after kill -9, a corrupt video among good ones, the store, torchrun."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from surgenet_assist.cli.main import app
from surgenet_assist.core.archive import (
    ArchiveVideo,
    Progress,
    VideoOutcome,
    assign_shards,
    collect_videos,
    describe_videos,
    looks_like_archive,
    shard_by_weight,
)
from surgenet_assist.core.errors import UsageError
from surgenet_assist.core.synthetic import write_h264

pytest.importorskip("av")
runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
FAST = ["--random-init", "--short-side", "64", "--overlay-every", "50"]


def frames(n: int, seed: int, h: int = 120, w: int = 160):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    for i in range(n):
        img = np.roll(base, 2 * i, axis=1)
        img[:10] = (i * 11) % 256
        yield img


def make_archive(root: Path, n: int, seconds: float = 2.0, corrupt: bool = False) -> Path:
    """n tiny H.264 videos (160x120, 25 fps, different lengths) in root/, optionally a corrupt one."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        length = int(25 * seconds) + 5 * i
        write_h264(root / f"case{i:02d}.mp4", frames(length, seed=i), fps=25, gop=25, preset="ultrafast")
    if corrupt:
        (root / "zz_broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x02" * 400)
    return root


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return make_archive(tmp_path_factory.mktemp("archive") / "videos", 3, corrupt=True)


# --- which videos ----------------------------------------------------------------------------------------
def test_collect_videos_from_folders_globs_and_manifests(tmp_path, archive):
    good = sorted(p.resolve() for p in archive.glob("case*.mp4"))
    assert collect_videos([archive]) == sorted(p.resolve() for p in archive.glob("*.mp4"))
    assert collect_videos([str(archive / "case*.mp4")]) == good
    (tmp_path / "list.txt").write_text("# the archive\n" + "\n".join(str(p) for p in good[:2]) + "\n\n")
    assert collect_videos([tmp_path / "list.txt"]) == good[:2]
    (tmp_path / "list.csv").write_text("path,site\n" + "".join(f"{p},a\n" for p in good))
    assert collect_videos([tmp_path / "list.csv"]) == good
    (tmp_path / "list.json").write_text(json.dumps([{"path": str(good[0])}, str(good[1]), str(good[0])]))
    assert collect_videos([tmp_path / "list.json"]) == good[:2]
    with pytest.raises(UsageError, match="no video files match"):
        collect_videos([str(tmp_path / "*.avi")])
    (tmp_path / "bad.txt").write_text("missing.mp4\n")
    with pytest.raises(UsageError, match="do not exist"):
        collect_videos([tmp_path / "bad.txt"])
    assert looks_like_archive([archive]) and looks_like_archive([str(archive / "*.mp4")])
    assert looks_like_archive([good[0], good[1]]) and looks_like_archive([tmp_path / "list.txt"])
    assert not looks_like_archive([good[0]])


def test_describe_reads_durations_and_unique_keys(tmp_path, archive):
    videos = describe_videos(collect_videos([archive]))
    by_key = {v.key: v for v in videos}
    assert set(by_key) == {"case00", "case01", "case02", "zz_broken"}
    assert by_key["case01"].frames == 55 and by_key["case01"].duration == pytest.approx(2.2, abs=0.05)
    assert by_key["zz_broken"].duration == 0.0  # unreadable: it fails later, by name
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.mp4").write_bytes(b"")
    (tmp_path / "a" / "x.mkv").write_bytes(b"")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.mp4").write_bytes(b"")
    keys = [v.key for v in describe_videos(collect_videos([tmp_path]))]
    assert sorted(keys) == ["a/x.mkv", "a/x.mp4", "b/x"]


# --- who does which ----------------------------------------------------------------------------------------
def _video(i: int, duration: float) -> ArchiveVideo:
    return ArchiveVideo(f"/v/{i}.mp4", f"v{i:03d}", duration, 25.0, int(duration * 25))


@settings(max_examples=60, deadline=None)
@given(
    durations=st.lists(st.floats(min_value=0, max_value=7200), min_size=0, max_size=60),
    world=st.integers(min_value=1, max_value=9),
)
def test_shards_are_disjoint_complete_and_balanced(durations, world):
    videos = [_video(i, d) for i, d in enumerate(durations)]
    shares = assign_shards(videos, world)
    assert len(shares) == world
    keys = [v.key for share in shares for v in share]
    assert sorted(keys) == sorted(v.key for v in videos) and len(keys) == len(set(keys))  # disjoint, complete
    known = sorted(d for d in durations if d > 0)
    fill = known[len(known) // 2] if known else 1.0
    loads = [sum(v.duration or fill for v in share) for share in shares]
    longest = max([v.duration or fill for v in videos], default=0)
    assert max(loads) - min(loads) <= longest + 1e-6  # greedy longest-first bound
    assert assign_shards(list(reversed(videos)), world) == shares  # every rank computes the same plan


def test_balance_by_duration_not_by_count():
    videos = [_video(0, 3600), *(_video(i, 600) for i in range(1, 7))]
    shares = assign_shards(videos, 2)
    assert [len(s) for s in shares] == [1, 6]
    assert shard_by_weight([1.0] * 5, 2) == [[0, 2, 4], [1, 3]]


# --- progress ----------------------------------------------------------------------------------------------
def test_progress_lines_give_rates_and_eta():
    now = [0.0]
    buf = io.StringIO()
    p = Progress(100, 2, rank=1, world_size=2, every_s=5, stream=buf, clock=lambda: now[0])
    v = _video(1, 4)
    p.start_video(v, 50)
    now[0] = 10.0
    p.frames(50)
    p.end_video(VideoOutcome(v.key, v.path, "done", frames=50, seconds=10.0))
    p.end_video(VideoOutcome("v002", "/v/2.mp4", "failed", error="cannot read video /v/2.mp4"))
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("[rank 1/2] video 1/2 v001: 50/50 frames, 5.0 frames/s")
    assert "all: 50/100 frames (50%), 5.0 frames/s, ETA 0m10s" in lines[0]
    assert lines[1].startswith("[rank 1/2] done 1/2 v001: 50 frames in 10.0 s (5.0 frames/s)")
    assert lines[2] == "[rank 1/2] FAILED 2/2 v002: cannot read video /v/2.mp4"


# --- the command ------------------------------------------------------------------------------------------
def _predict(*args: str):
    return runner.invoke(app, ["predict", *args, *FAST])


def test_archive_run_isolates_a_corrupt_video_and_reruns_idempotently(tmp_path, archive):
    out = tmp_path / "out"
    result = _predict(str(archive), "--out", str(out), "--fps", "5", "--decode-workers", "1")
    assert result.exit_code == 1, result.output  # one video failed, the others are done
    summary = json.loads((out / "archive-summary.json").read_text())
    assert summary["done"] == 3 and summary["failed"] == 1
    assert list(summary["failures"]) == [str((archive / "zz_broken.mp4").resolve())]
    assert "zz_broken.mp4" in result.stderr and "Fix:" in result.stderr
    for key, n in (("case00", 10), ("case01", 11), ("case02", 12)):
        assert json.loads((out / key / "summary.json").read_text())["frames"] == n
        assert len(list((out / key / "masks").glob("*.png"))) == n
    assert not list((out / ".partial").iterdir())
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("case*/summary.json")}

    again = _predict(str(archive), "--out", str(out), "--fps", "5", "--decode-workers", "1")
    assert again.exit_code == 1
    summary = json.loads((out / "archive-summary.json").read_text())
    assert summary["done"] == 0 and summary["skipped (finished before)"] == 3 and summary["failed"] == 1
    assert {p: p.stat().st_mtime_ns for p in out.glob("case*/summary.json")} == stamps  # untouched


def _store_run(tmp_path: Path, archive: Path, db: str, project: str) -> None:
    good = [str(p) for p in sorted(archive.glob("case*.mp4"))]
    for _ in range(2):  # the second run finds everything in the store and writes nothing
        result = _predict(*good, "--to-store", "--db", db, "--store-project", project, "--fps", "2")
        assert result.exit_code == 0, result.output
    from surgenet_assist.core.store import LabelStore

    with LabelStore(db, project=project) as store:
        assert store.videos_predicted_by("untrained", project=project) == {
            str(Path(p).resolve()) for p in good
        }
        videos = {v["path"]: v["id"] for v in store.videos(project)}
        seg = store.predictions_for(videos[str(Path(good[1]).resolve())], task="segmentation", latest=False)
        assert [p.frame_start for p in seg] == [0, 12, 25, 38, 50]  # 2 fps of 55 frames, each once
        assert seg[0].model_version == "untrained" and seg[0].payload["mask"].shape == (120, 160)
        phases = store.predictions_for(videos[str(Path(good[1]).resolve())], task="phase", latest=False)
        assert any(p.frame_end > p.frame_start for p in phases)  # the timeline as one range


def test_to_store_is_one_transaction_per_video_and_idempotent_sqlite(tmp_path, archive):
    _store_run(tmp_path, archive, f"sqlite:///{tmp_path / 'store.db'}", "archive")


def test_to_store_on_postgresql(tmp_path, archive, postgres_url):
    _store_run(tmp_path, archive, postgres_url, f"archive-test-{os.getpid()}-{time.time_ns()}")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "surgenet_assist.cli.main", "predict", *args, *FAST]


def test_resume_after_kill_minus_9_redoes_only_the_unfinished(tmp_path):
    """A real process killed with SIGKILL as soon as its first video is finished: the re-run skips that
    one, redoes the rest, and the folders are complete; the decoder workers exit on their own."""
    import psutil

    videos = make_archive(tmp_path / "videos", 3, seconds=2.0)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        _cli(str(videos), "--out", str(out), "--fps", "5", "--decode-workers", "1"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(out.glob("case*/summary.json")):
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done_before = sorted(p.parent.name for p in out.glob("case*/summary.json"))
    assert 1 <= len(done_before) < 3, done_before
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    rerun = subprocess.run(
        _cli(str(videos), "--out", str(out), "--fps", "5", "--decode-workers", "1"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads((out / "archive-summary.json").read_text())
    assert summary["skipped (finished before)"] == len(done_before)
    assert summary["done"] == 3 - len(done_before)
    redone = {"case00", "case01", "case02"} - set(done_before)
    assert sorted(summary["videos_by_rank"]["0"]) == sorted(redone)
    for key in ("case00", "case01", "case02"):
        n = json.loads((out / key / "summary.json").read_text())["frames"]
        assert len(list((out / key / "masks").glob("*.png"))) == n
    assert not list((out / ".partial").iterdir())  # the killed run's partial folder was cleared


def test_torchrun_two_ranks_share_the_archive(tmp_path):
    """`torchrun --nproc-per-node 2` on CPU (gloo): every video done exactly once, disjoint shares."""
    videos = make_archive(tmp_path / "videos", 4, seconds=1.0)
    out = tmp_path / "out"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    started = time.monotonic()
    proc = subprocess.run(
        [
            str(torchrun),
            "--nproc-per-node",
            "2",
            "--master-port",
            str(29500 + os.getpid() % 1000),
            "-m",
            "surgenet_assist.cli.main",
            "predict",
            str(videos),
            "--out",
            str(out),
            "--fps",
            "5",
            "--decode-workers",
            "1",
            *FAST,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "archive-summary.json").read_text())
    assert summary["ranks"] == 2 and summary["done"] == 4 and summary["failed"] == 0
    by_rank = summary["videos_by_rank"]
    assert len(by_rank["0"]) == 2 and len(by_rank["1"]) == 2
    assert sorted(by_rank["0"] + by_rank["1"]) == ["case00", "case01", "case02", "case03"]
    for r in (0, 1):
        assert {o["key"] for o in json.loads((out / ".archive" / f"rank-{r}.json").read_text())} == set(
            by_rank[str(r)]
        )
    assert "[rank 1/2]" in proc.stderr and time.monotonic() - started < 120


def test_ls_preannotate_state_files_per_rank_are_read_together(tmp_path, monkeypatch):
    from surgenet_assist.backend.ls_client import _load_state, _save_state, _state_file

    monkeypatch.setenv("SURGENET_ASSIST_HOME", str(tmp_path))
    r0 = _state_file("http://ls:8080", 3, 0, 2)
    r1 = _state_file("http://ls:8080", 3, 1, 2)
    assert r0 != r1
    _save_state(r0, "m1", {1, 3})
    _save_state(r1, "m1", {2})
    _save_state(_state_file("http://ls:8080", 4), "m1", {99})  # another project is not read
    assert _load_state(r0, "m1") == {1, 2, 3} == _load_state(_state_file("http://ls:8080", 3), "m1")


def test_multi_node_is_read_from_torchruns_environment(monkeypatch):
    """predict --to-store refuses SQLite when multi_node() (a file per machine would split the store)."""
    from surgenet_assist.training_loop import distributed

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert distributed.multi_node() and distributed.launch_rank_and_size() == (3, 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert not distributed.multi_node()
