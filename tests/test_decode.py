"""The archive decoder (core/decode.py): worker processes and keyframe segments give exactly the frames,
indices and pixels of a sequential decode; corrupt and truncated files are errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from surgenet_assist.core.decode import (
    DecodePool,
    decode_sequential,
    iter_sampled_frames,
    plan_segments,
    probe,
)
from surgenet_assist.core.errors import UsageError, VideoReadError
from surgenet_assist.core.synthetic import write_h264
from surgenet_assist.core.video import open_video

pytest.importorskip("av")


def frames(n: int, seed: int = 0, h: int = 120, w: int = 160):
    """Every frame different (a rolled noise picture + a bar that encodes the index)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    for i in range(n):
        img = np.roll(base, 3 * i, axis=1)
        img[:12] = (i * 37) % 256
        yield img


@pytest.fixture(scope="module")
def h264(tmp_path_factory) -> Path:
    """4 s of 160x120 H.264 at 25 fps, keyframe every 20 frames, B-frames."""
    path = tmp_path_factory.mktemp("decode") / "clip.mp4"
    return write_h264(path, frames(100), fps=25, gop=20, bframes=2, preset="ultrafast")


@pytest.fixture(scope="module")
def pool():
    with DecodePool(2, min_segment_frames=1) as p:
        yield p


def test_probe_reads_packets_not_pixels(h264):
    index = probe(h264)
    assert index.frame_count == 100 and index.fps == 25.0 and (index.width, index.height) == (160, 120)
    assert list(index.keyframes) == list(range(0, 100, 20))
    assert np.all(np.diff(index.pts) > 0)
    assert index.sample(1.0) == [0, 25, 50, 75]


def test_segments_start_at_keyframes_and_partition_the_targets(h264):
    index = probe(h264)
    targets = index.sample(5.0)
    segments = plan_segments(index, targets, min_frames=1, max_samples=3)
    assert [t for s in segments for t in s.targets] == targets
    for s in segments:
        assert s.start in set(index.keyframes.tolist()) and s.start <= s.targets[0]
    assert len(segments) > 2
    assert len(plan_segments(index, targets, min_frames=1000)) == 1


@pytest.mark.parametrize("sample_fps", [1.0, 7.0, None])
def test_workers_equal_a_sequential_decode(h264, pool, sample_fps):
    index = probe(h264)
    targets = index.sample(sample_fps)
    reference = {r.index: r.image for r in decode_sequential(h264, targets)}
    got = list(iter_sampled_frames(h264, sample_fps, pool=pool))
    assert [r.index for r in got] == targets
    for r in got:
        assert np.array_equal(r.image, reference[r.index]), f"frame {r.index} differs"
        assert r.timestamp == pytest.approx(r.index / 25.0)
    # the same, decoded in this process segment by segment
    inline = list(iter_sampled_frames(h264, sample_fps))
    assert [r.index for r in inline] == targets
    assert all(np.array_equal(r.image, reference[r.index]) for r in inline)


def test_same_pixels_as_the_opencv_reader(h264, pool):
    with open_video(h264) as video:
        cv = {r.index: r.image for r in video.iter_frames(sample_fps=5.0)}
    got = {r.index: r.image for r in iter_sampled_frames(h264, 5.0, pool=pool)}
    assert sorted(cv) == sorted(got)
    for i in cv:
        assert np.abs(cv[i].astype(int) - got[i].astype(int)).mean() < 1.0


def test_pool_survives_many_videos_and_an_abandoned_one(h264, pool):
    first = iter_sampled_frames(h264, None, pool=pool)
    next(first)
    first.close()  # abandoned mid-video: its frames in flight are drained, slots come back
    for _ in range(3):
        assert len(list(iter_sampled_frames(h264, 2.0, pool=pool))) == 8
    assert pool.healthy()


def test_corrupt_and_truncated_videos_name_the_file(h264, pool, tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 500)
    with pytest.raises(VideoReadError, match="garbage.mp4"):
        probe(garbage)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoReadError, match="empty"):
        probe(empty)
    # an mkv cut in the middle: the header is fine, the packets stop
    mkv = write_h264(tmp_path / "long.mkv", frames(100), fps=25, gop=20, preset="ultrafast")
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(mkv.read_bytes()[: mkv.stat().st_size // 2])
    index = probe(cut)
    assert 0 < index.frame_count < 100  # what is there is decodable, and only that is promised
    assert len(list(iter_sampled_frames(cut, 5.0, pool=pool))) == len(index.sample(5.0))
    assert pool.healthy()


def test_decoder_choice(h264, tmp_path):
    from surgenet_assist.core.decode import resolve_decoder

    assert resolve_decoder("auto", h264) == "pyav"
    assert resolve_decoder("opencv", h264) == "opencv"
    assert resolve_decoder("auto", tmp_path) == "opencv"  # a frame folder
    with pytest.raises(UsageError, match="unknown decoder"):
        resolve_decoder("ffmpeg-cli", h264)
    ocv = [r.index for r in iter_sampled_frames(h264, 1.0, decoder="opencv")]
    assert ocv == [0, 25, 50, 75]
