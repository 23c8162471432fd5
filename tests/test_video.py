"""Video and frame-folder reading: frame-accurate seeks, exact sampling, clear errors on bad input."""

from __future__ import annotations

import inspect
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest

from surgenet_assist.core.errors import FrameError, VideoReadError
from surgenet_assist.core.synthetic import decode_frame_index, make_indexed_video
from surgenet_assist.core.video import FrameRecord, check_frame, open_video

N_FRAMES = 200
SIZE = (120, 214)


@pytest.fixture(scope="module", params=[("mp4", "mp4v"), ("avi", "XVID"), ("avi", "MJPG")], ids=str)
def indexed_video(request, tmp_path_factory) -> Path:
    ext, codec = request.param
    path = tmp_path_factory.mktemp("idx") / f"indexed_{codec}.{ext}"
    return make_indexed_video(path, N_FRAMES, fps=25.0, size=SIZE, codec=codec)


def test_metadata(indexed_video):
    with open_video(indexed_video) as video:
        assert (video.frame_count, len(video), video.fps) == (N_FRAMES, N_FRAMES, 25.0)
        assert (video.height, video.width) == SIZE
        assert not video.is_folder


def test_random_seeks_are_frame_accurate(indexed_video):
    rng = np.random.default_rng(0)
    targets = [int(i) for i in rng.integers(0, N_FRAMES, 30)] + [N_FRAMES - 1, 0, 150, 3, 4, 5, 199, 1]
    with open_video(indexed_video) as video:
        for i in targets:
            frame = video.read_frame(i)
            assert frame.shape == (*SIZE, 3) and frame.dtype == np.uint8
            assert decode_frame_index(frame) == i
        with pytest.raises(IndexError):
            video.read_frame(N_FRAMES)


def test_iter_every_frame_and_sampled(indexed_video):
    with open_video(indexed_video) as video:
        frames = video.iter_frames()
        assert inspect.isgenerator(frames)
        records = list(frames)
        assert [r.index for r in records] == list(range(N_FRAMES))
        assert all(decode_frame_index(r.image) == r.index for r in records)

        sampled = list(video.iter_frames(sample_fps=1.0))
        assert [r.index for r in sampled] == [0, 25, 50, 75, 100, 125, 150, 175]
        assert [r.timestamp for r in sampled] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
        assert all(decode_frame_index(r.image) == r.index for r in sampled)

        window = list(video.iter_frames(sample_fps=5.0, start=103, end=130))
        assert [r.index for r in window] == [103, 108, 113, 118, 123, 128]
        assert all(decode_frame_index(r.image) == r.index for r in window)
        assert video.sample_indices(10.0, 0, 10) == [0, 2, 5, 8]  # 2.5 frames apart, rounded (half to even)


def test_read_during_iteration_does_not_disturb_it(indexed_video):
    with open_video(indexed_video) as video:
        seen = []
        for record in video.iter_frames(sample_fps=2.0, end=80):
            assert (
                decode_frame_index(video.read_frame(N_FRAMES - 1 - record.index))
                == N_FRAMES - 1 - record.index
            )
            seen.append(decode_frame_index(record.image))
        assert seen == video.sample_indices(2.0, end=80)


def test_iteration_memory_is_bounded(tmp_path):
    path = make_indexed_video(tmp_path / "long.mp4", 300, fps=25.0, size=(240, 427))
    frame_bytes = 240 * 427 * 3
    with open_video(path) as video:
        tracemalloc.start()
        count = 0
        for record in video.iter_frames():
            assert isinstance(record, FrameRecord)
            count += 1
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert count == 300
    assert peak < 20 * frame_bytes  # a list of all frames would need 300x


def test_frame_folder_natural_sort(tmp_path):
    names = ["frame_10.png", "frame_2.png", "frame_1.jpg", "frame_100.png", "notes.txt"]
    for value, name in zip([10, 2, 1, 100, 0], names, strict=True):
        if name.endswith(".txt"):
            (tmp_path / name).write_text("not a frame")
            continue
        cv2.imwrite(str(tmp_path / name), np.full((20, 30, 3), value, np.uint8))
    (tmp_path / "masks").mkdir()  # sub-folders are ignored
    with open_video(tmp_path, fps=5.0) as video:
        assert video.is_folder and video.frame_count == 4 and video.fps == 5.0
        assert (video.height, video.width) == (20, 30)
        records = list(video.iter_frames())
        assert [int(r.image[0, 0, 0]) for r in records] == [1, 2, 10, 100]
        assert [r.timestamp for r in records] == [0.0, 0.2, 0.4, 0.6]
        assert int(video.read_frame(2)[0, 0, 1]) == 10
    assert open_video(tmp_path).fps == 1.0


def test_frame_folder_rgb_order(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.array([[[255, 0, 0]]], np.uint8))  # BGR blue on disk
    assert open_video(tmp_path).read_frame(0)[0, 0].tolist() == [0, 0, 255]


# --- errors ---------------------------------------------------------------------------------------
def _assert_error(exc: pytest.ExceptionInfo, name: str, *hint_words: str) -> None:
    assert name in exc.value.message
    assert exc.value.hint
    for word in hint_words:
        assert word in exc.value.hint


def test_missing_path(tmp_path):
    with pytest.raises(VideoReadError) as exc:
        open_video(tmp_path / "nope.mp4")
    _assert_error(exc, "nope.mp4", "path")
    assert "not found" in exc.value.message


def test_empty_file(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoReadError) as exc:
        open_video(tmp_path / "empty.mp4")
    _assert_error(exc, "empty.mp4")
    assert "empty" in exc.value.message


@pytest.mark.parametrize(
    "name,content",
    [("random.mp4", np.random.default_rng(1).bytes(5000)), ("text.avi", b"hello, I am a text file\n" * 50)],
)
def test_not_a_video(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(VideoReadError) as exc:
        open_video(tmp_path / name)
    _assert_error(exc, name, "ffmpeg")
    assert "not a video" in exc.value.message


def test_unsupported_extension(tmp_path):
    (tmp_path / "clip.txt").write_text("x")
    with pytest.raises(VideoReadError) as exc:
        open_video(tmp_path / "clip.txt")
    _assert_error(exc, "clip.txt", ".mp4")


def test_truncated_mp4(tmp_path):
    path = make_indexed_video(tmp_path / "cut.mp4", 60, size=SIZE)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoReadError) as exc, open_video(path) as video:
        list(video.iter_frames())
    _assert_error(exc, "cut.mp4", "ffmpeg")
    assert "truncated" in exc.value.message


@pytest.mark.parametrize("codec", ["XVID", "MJPG"])
def test_truncated_avi_names_last_good_frame(tmp_path, codec):
    path = make_indexed_video(tmp_path / "cut.avi", 60, size=SIZE, codec=codec)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with open_video(path) as video:
        assert video.frame_count == 60  # the header still claims all frames
        got = []
        with pytest.raises(VideoReadError) as exc:
            for record in video.iter_frames():
                got.append(record.index)
        _assert_error(exc, "cut.avi", "ffmpeg")
        assert f"last good frame index {got[-1]}" in exc.value.message
        assert "60 frames" in exc.value.message
        assert 10 < len(got) < 60
        with pytest.raises(VideoReadError):
            video.read_frame(59)


def test_empty_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("no frames here")
    with pytest.raises(VideoReadError) as exc:
        open_video(tmp_path)
    _assert_error(exc, str(tmp_path), ".png")
    assert "no images" in exc.value.message


def test_unreadable_image_in_folder(tmp_path):
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"frame_{i}.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "frame_1.png").write_bytes(b"\x89PNG broken")
    with open_video(tmp_path) as video, pytest.raises(VideoReadError) as exc:
        list(video.iter_frames())
    _assert_error(exc, "frame_1.png")


# --- check_frame ----------------------------------------------------------------------------------
def test_check_frame_accepts_and_converts():
    rgb = np.zeros((4, 5, 3), np.uint8)
    assert check_frame(rgb) is rgb
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5)
    out = check_frame(grey)
    assert out.shape == (4, 5, 3) and (out[..., 0] == grey).all() and (out[..., 2] == grey).all()
    rgba = np.dstack([rgb + 7, np.full((4, 5), 255, np.uint8)])
    out = check_frame(rgba)
    assert out.shape == (4, 5, 3) and out.flags.c_contiguous and (out == 7).all()
    assert check_frame(grey[..., None]).shape == (4, 5, 3)


@pytest.mark.parametrize(
    "frame,words",
    [
        (np.zeros((4, 5, 3), np.float32), ["float32", "uint8"]),
        (np.zeros((4, 5, 3), np.uint16), ["uint16", "uint8"]),
        (np.zeros((2, 4, 5, 3), np.uint8), ["(2, 4, 5, 3)", "(H, W, 3)"]),
        (np.zeros((4, 5, 2), np.uint8), ["(4, 5, 2)", "(H, W, 3)"]),
        (np.zeros((0, 5, 3), np.uint8), ["(0, 5, 3)"]),
    ],
)
def test_check_frame_rejects(frame, words):
    with pytest.raises(FrameError) as exc:
        check_frame(frame, name="image")
    assert exc.value.message.startswith("image")
    for word in words:
        assert word in exc.value.message
    assert exc.value.hint


def test_check_frame_rejects_non_arrays():
    with pytest.raises(FrameError):
        check_frame([[1, 2, 3]])  # type: ignore[arg-type]
