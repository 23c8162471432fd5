"""Streaming, frame-accurate reading of surgical videos and frame folders with OpenCV.

Pre-annotations are stored per frame index, so a frame index must always mean the same picture: random
access verifies the decoder's position after a seek and falls back to decoding forward when it cannot be
trusted, and a video that stops decoding before the frame count its container claims is an error (naming the
last good frame), never a silently shorter clip. Iteration is a generator, so memory stays bounded on
hour-long recordings; sub-sampling skips frames with ``grab()`` without converting them.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .errors import FrameError, UsageError, VideoReadError

__all__ = [
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "FrameRecord",
    "VideoSource",
    "check_frame",
    "open_video",
    "sample_indices",
]

VIDEO_EXTENSIONS: frozenset[str] = frozenset(
    {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"}
)
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

_REENCODE_HINT = (
    "re-export the video, or re-encode it with ffmpeg: "
    "ffmpeg -i INPUT -c:v libx264 -pix_fmt yuv420p -movflags +faststart OUTPUT.mp4"
)
# Containers whose frame count OpenCV estimates from duration x fps (may be one frame off).
_ESTIMATED_COUNT = {".mkv", ".webm"}
# Forward decoding is cheaper than a seek for short hops (a seek decodes from the previous keyframe anyway).
_MAX_FORWARD_HOP = 48


@dataclass(frozen=True)
class FrameRecord:
    """One decoded frame with its position in the source."""

    index: int
    timestamp: float
    image: np.ndarray


def _natural_key(name: str) -> list[int | str]:
    """frame_2 before frame_10: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def _sniff_container(path: Path) -> str | None:
    """Name the container from magic bytes, so an unreadable file can be called truncated vs not-a-video."""
    try:
        with path.open("rb") as fh:
            head = fh.read(16)
    except OSError:
        return None
    if len(head) >= 8 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide"):
        return "MP4/MOV"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "AVI"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "Matroska/WebM"
    if head[:3] == b"\x00\x00\x01":
        return "MPEG"
    return None


def check_frame(frame: np.ndarray, name: str = "frame") -> np.ndarray:
    """Return ``frame`` as a contiguous (H, W, 3) uint8 RGB array, or raise :class:`FrameError`.

    Models and exporters assume uint8 RGB; grey (H, W) / (H, W, 1) is expanded to RGB and RGBA drops its
    alpha, because those conversions are unambiguous. Anything else (float images, other shapes) is refused
    with the actual and the expected dtype/shape rather than guessed at.
    """
    if not isinstance(frame, np.ndarray):
        raise FrameError(
            f"{name} must be a numpy array, got {type(frame).__name__}",
            "pass an (H, W, 3) uint8 RGB numpy array, e.g. np.asarray(PIL.Image.open(p).convert('RGB'))",
        )
    if frame.dtype != np.uint8:
        hint = (
            "convert it with (frame * 255).clip(0, 255).astype(np.uint8)"
            if frame.dtype.kind == "f"
            else ("convert it with frame.astype(np.uint8) after scaling to 0..255")
        )
        raise FrameError(f"{name} has dtype {frame.dtype}, expected uint8 (H, W, 3) RGB", hint)
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[..., 0]
    if frame.ndim == 2:
        frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    elif frame.ndim == 3 and frame.shape[2] == 4:
        frame = frame[..., :3]
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.shape[0] == 0 or frame.shape[1] == 0:
        raise FrameError(
            f"{name} has shape {tuple(frame.shape)}, expected (H, W, 3) uint8 RGB",
            "pass one frame as height x width x 3 channels (grey (H, W) and RGBA are also accepted)",
        )
    return np.ascontiguousarray(frame)


def sample_indices(fps: float, start: int, end: int, sample_fps: float | None) -> list[int]:
    """Frame indices of ``[start, end)`` kept when sampling ``sample_fps`` frames per second from a video at
    ``fps``: index k is the frame nearest to time ``start/fps + k/sample_fps`` (1 fps of 25 fps: 0, 25, 50,
    ...); ``None`` or a rate >= ``fps`` keeps every frame. One function, so every decoder (OpenCV here, PyAV
    in :mod:`.decode`) samples the same frames."""
    if sample_fps is None or sample_fps >= fps:
        return list(range(start, end))
    if sample_fps <= 0:
        raise UsageError(
            f"sampling rate must be > 0 frames/s, got {sample_fps}", "pass --fps 1 (or any rate > 0)"
        )
    step = fps / float(sample_fps)
    count = int(np.floor((end - 1 - start) / step + 1e-9)) + 1 if end > start else 0
    indices = start + np.round(np.arange(count) * step).astype(int)
    return [int(i) for i in indices if i < end]


class VideoSource:
    """An opened video file or frame folder; use as a context manager or call :meth:`close`."""

    def __init__(self, path: Path, fps: float | None = None) -> None:
        self.path = path
        self.is_folder = path.is_dir()
        self._cap: cv2.VideoCapture | None = None
        self._pos = 0  # index of the frame the persistent capture returns next
        self._files: list[Path] = []
        self._estimated_count = False
        if self.is_folder:
            self._open_folder(fps)
        else:
            self._open_file(fps)

    # --- opening ------------------------------------------------------------------------------------------
    def _open_folder(self, fps: float | None) -> None:
        files = [p for p in self.path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if not files:
            raise VideoReadError(
                f"frame folder {self.path} contains no images",
                f"put the frames there as {', '.join(sorted(IMAGE_EXTENSIONS))} files (e.g. frame_000001.png)"
                ", or pass the video file instead",
            )
        self._files = sorted(files, key=lambda p: _natural_key(p.name))
        first = self._read_image(0)
        self.height, self.width = first.shape[:2]
        self.frame_count = len(self._files)
        self.fps = float(fps) if fps else 1.0

    def _open_file(self, fps: float | None) -> None:
        path = self.path
        suffix = path.suffix.lower()
        if suffix not in VIDEO_EXTENSIONS:
            raise VideoReadError(
                f"{path} is not a supported video file (extension {suffix or 'none'!r})",
                f"use one of {', '.join(sorted(VIDEO_EXTENSIONS))}, or a folder of frame images",
            )
        if path.stat().st_size == 0:
            raise VideoReadError(
                f"video file {path} is empty (0 bytes)",
                "the copy or export did not finish; copy or export the video again",
            )
        cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
        if not cap.isOpened():
            cap.release()
            container = _sniff_container(path)
            if container:
                raise VideoReadError(
                    f"cannot read video {path}: it looks like an {container} file but FFmpeg cannot open it "
                    "(truncated, still being written, or corrupt)",
                    "wait for the copy/recording to finish, or " + _REENCODE_HINT,
                )
            raise VideoReadError(
                f"cannot read video {path}: the file is not a video (its content is not a known container)",
                "check that the path points at the recording itself; " + _REENCODE_HINT,
            )
        self._cap = cap
        container_fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps else float(container_fps)
        if not self.fps or not np.isfinite(self.fps) or self.fps <= 0:
            self.close()
            raise VideoReadError(
                f"video {path} reports no frame rate", "pass fps=... to open_video, or " + _REENCODE_HINT
            )
        self.width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        self.height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        self._estimated_count = suffix in _ESTIMATED_COUNT
        if count <= 0:  # no count in the container: count by decoding once (exact, and only then)
            count = 0
            while cap.grab():
                count += 1
            self._reopen()
        self.frame_count = count
        ok, _ = self._cap.read()
        if not ok or self.frame_count == 0:
            self.close()
            raise VideoReadError(
                f"video {path} opened but its first frame cannot be decoded (truncated or unsupported codec)",
                _REENCODE_HINT,
            )
        self._pos = 1

    def _reopen(self) -> cv2.VideoCapture:
        if self._cap is not None:
            self._cap.release()
        self._cap = cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG)
        self._pos = 0
        return self._cap

    def _read_image(self, index: int) -> np.ndarray:
        file = self._files[index]
        image = cv2.imread(str(file), cv2.IMREAD_COLOR)
        if image is None:
            raise VideoReadError(
                f"cannot read image {file} (frame {index} of folder {self.path}): not a readable image",
                "re-export or delete that file; frames must be png/jpg/bmp/tif images",
            )
        if index and image.shape[:2] != (self.height, self.width):
            raise VideoReadError(
                f"image {file} is {image.shape[1]}x{image.shape[0]} but the folder's frames are "
                f"{self.width}x{self.height}",
                "resize or remove it: all frames of a folder must have the same size",
            )
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    # --- basics ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.frame_count

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "folder" if self.is_folder else "video"
        return f"VideoSource({kind}={str(self.path)!r}, frames={self.frame_count}, fps={self.fps:g})"

    def close(self) -> None:
        """Release the decoder (idempotent)."""
        cap = getattr(self, "_cap", None)
        if cap is not None:
            cap.release()
            self._cap = None

    # --- indices --------------------------------------------------------------------------------------------
    def _range(self, start: int, end: int | None) -> tuple[int, int]:
        end = self.frame_count if end is None else min(int(end), self.frame_count)
        start = max(0, int(start))
        return start, max(start, end)

    def sample_indices(
        self, sample_fps: float | None = None, start: int = 0, end: int | None = None
    ) -> list[int]:
        """Frame indices kept when sampling ``sample_fps`` frames per second from ``[start, end)``.

        Index k is the frame nearest to time ``start/fps + k/sample_fps``; e.g. 1 fps of a 25 fps video gives
        0, 25, 50, ... ``None`` (or a rate >= the video's) keeps every frame.
        """
        start, end = self._range(start, end)
        return sample_indices(self.fps, start, end, sample_fps)

    # --- reading --------------------------------------------------------------------------------------------
    def iter_frames(
        self, sample_fps: float | None = None, start: int = 0, end: int | None = None
    ) -> Iterator[FrameRecord]:
        """Stream frames of ``[start, end)`` (optionally sub-sampled) one at a time.

        Uses its own decoder, so :meth:`read_frame` calls during iteration do not disturb it. Raises
        :class:`VideoReadError` if decoding stops before the frames the container claims.
        """
        indices = self.sample_indices(sample_fps, start, end)
        if not indices:
            return
        if self.is_folder:
            for i in indices:
                yield FrameRecord(i, i / self.fps, self._read_image(i))
            return
        cap = cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG)
        try:
            pos = self._seek(cap, 0, indices[0])
            for i in indices:
                while pos < i:
                    if not cap.grab():
                        self._decode_stopped(pos - 1)
                        return
                    pos += 1
                if not cap.grab():
                    self._decode_stopped(pos - 1)
                    return
                ok, bgr = cap.retrieve()
                if not ok:
                    self._decode_stopped(pos - 1)
                    return
                pos += 1
                yield FrameRecord(i, i / self.fps, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        finally:
            cap.release()

    def _decode_stopped(self, last_good: int) -> None:
        """Decoding ended early: an error, except for a one-frame overestimate in mkv/webm headers."""
        if self._estimated_count and self.frame_count - (last_good + 1) <= 1:
            warnings.warn(
                f"{self.path}: container estimated {self.frame_count} frames, decoded {last_good + 1}",
                stacklevel=3,
            )
            self.frame_count = last_good + 1
            return
        raise VideoReadError(
            f"decoding {self.path} stopped early: last good frame index {last_good}, but the container "
            f"claims {self.frame_count} frames (the file is truncated or corrupt)",
            _REENCODE_HINT,
        )

    def _seek(self, cap: cv2.VideoCapture, pos: int, index: int) -> int:
        """Put ``cap`` (next frame ``pos``) at ``index``; returns the verified new position.

        Short forward hops decode forward (always exact). Longer jumps use ``CAP_PROP_POS_FRAMES`` and check
        the position the decoder reports; if it disagrees, decode forward from the start instead.
        """
        if pos <= index <= pos + _MAX_FORWARD_HOP:
            return pos
        if cap.set(cv2.CAP_PROP_POS_FRAMES, index) and int(round(cap.get(cv2.CAP_PROP_POS_FRAMES))) == index:
            return index
        cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
        if int(round(cap.get(cv2.CAP_PROP_POS_FRAMES))) != 0:
            cap.open(str(self.path), cv2.CAP_FFMPEG)
        return 0

    def read_frame(self, index: int) -> np.ndarray:
        """Random access to frame ``index`` as (H, W, 3) uint8 RGB, exact even after backward seeks."""
        index = int(index)
        if not 0 <= index < self.frame_count:
            raise IndexError(f"frame {index} out of range for {self.path} ({self.frame_count} frames)")
        if self.is_folder:
            return self._read_image(index)
        cap = self._cap if self._cap is not None else self._reopen()
        pos = self._seek(cap, self._pos, index)
        while pos < index:
            if not cap.grab():
                self._pos = pos
                self._decode_stopped(pos - 1)
                raise IndexError(f"frame {index} is past the last decodable frame of {self.path}")
            pos += 1
        ok, bgr = cap.read()
        if not ok:
            self._pos = pos
            self._decode_stopped(index - 1)
            raise IndexError(f"frame {index} is past the last decodable frame of {self.path}")
        self._pos = index + 1
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def open_video(path: str | Path, fps: float | None = None) -> VideoSource:
    """Open a video file or a folder of frame images (natural numeric order).

    ``fps`` sets the rate of a frame folder (default 1.0) and overrides the rate a video container reports.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise VideoReadError(
            f"video or frame folder not found: {path}",
            f"check the path (relative paths are resolved from the current directory {Path.cwd()})",
        )
    return VideoSource(path, fps)


def load_image(path: str | Path) -> np.ndarray:
    """Read one image file as RGB uint8, with a clear error for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"image {path} does not exist", "check the path")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise VideoReadError(
            f"image {path} cannot be decoded (corrupt, truncated or not an image)",
            "re-export the frame as PNG or JPEG",
        )
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
