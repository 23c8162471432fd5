"""npe2 reader: surgical videos (mp4/avi/mkv/...) and frame folders as a lazy ``(T, H, W, 3)`` image layer.

Pre-annotations and corrections are stored per frame index, so the picture napari shows for frame ``i``
must be exactly frame ``i``: decoding goes through :func:`surgenet_assist.core.video.open_video` (seek
verified, decode forward on doubt). Only the frames being looked at are decoded (plus a few cached), so
memory does not grow with the video's length.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from surgenet_assist.core.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, VideoSource, open_video

AXIS_LABELS = ("frame", "y", "x")
#: key in ``layer.metadata`` under which the reader records where the frames came from
SOURCE_KEY = "surgenet_source"

LayerData = tuple[Any, dict[str, Any], str]


class LazyVideo:
    """A read-only, numpy-like ``(T, H, W, 3)`` uint8 view of a video that decodes frames on demand.

    napari slices it as ``video[t]`` (or with a tuple of ints/slices); each access decodes only the frames
    asked for, through one persistent, lock-protected decoder (napari may slice from a worker thread).
    """

    def __init__(self, path: str | Path, fps: float | None = None, cache_frames: int = 4) -> None:
        self.source: VideoSource = open_video(path, fps=fps)
        self.path = Path(self.source.path)
        self.fps = float(self.source.fps)
        self.shape = (int(self.source.frame_count), int(self.source.height), int(self.source.width), 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_frames = max(1, cache_frames)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __repr__(self) -> str:
        return f"LazyVideo({str(self.path)!r}, shape={self.shape})"

    def frame(self, index: int) -> np.ndarray:
        """Frame ``index`` as (H, W, 3) uint8 RGB (exact; a few recent frames are kept)."""
        index = int(index)
        if index < 0:
            index += self.shape[0]
        with self._lock:
            hit = self._cache.get(index)
            if hit is not None:
                self._cache.move_to_end(index)
                return hit
            image = self.source.read_frame(index)
            image.setflags(write=False)
            self._cache[index] = image
            while len(self._cache) > self._cache_frames:
                self._cache.popitem(last=False)
            return image

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        first, rest = key[0], key[1:]
        if isinstance(first, (int, np.integer)):
            return self.frame(int(first))[rest] if rest else self.frame(int(first))
        if isinstance(first, slice):
            frames = [self.frame(i) for i in range(*first.indices(self.shape[0]))]
            stack = np.stack(frames) if frames else np.zeros((0, *self.shape[1:]), np.uint8)
            return stack[(slice(None), *rest)] if rest else stack
        if first is Ellipsis and not rest:
            return self[:]
        idx = np.asarray(first)
        if idx.dtype.kind in "iu":
            stack = np.stack([self.frame(int(i)) for i in idx.ravel()]).reshape(*idx.shape, *self.shape[1:])
            return stack[(Ellipsis, *rest)] if rest else stack
        raise TypeError(f"LazyVideo does not support index {key!r}; index frames with ints or slices")

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Whole-clip conversion (decodes everything: only for short clips)."""
        arr = self[:]
        return arr.astype(dtype) if dtype is not None else arr

    def close(self) -> None:
        self.source.close()


def _is_frame_folder(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir() if p.is_file())


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """npe2 reader hook: a callable for one video file or frame folder, ``None`` for anything else."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS:
        return read_video
    if _is_frame_folder(p):
        return read_video
    return None


def video_layer_data(path: str | Path, fps: float | None = None, name: str | None = None) -> LayerData:
    """The image layer tuple for ``path``: lazy data, axis labels ``frame, y, x``, provenance in metadata."""
    video = LazyVideo(path, fps=fps)
    meta = {
        SOURCE_KEY: {
            "path": str(video.path.resolve()),
            "fps": video.fps,
            "frame_count": video.shape[0],
            "height": video.shape[1],
            "width": video.shape[2],
        }
    }
    kwargs = {
        "name": name or video.path.name,
        "rgb": True,
        "contrast_limits": (0, 255),
        "multiscale": False,
        "axis_labels": AXIS_LABELS,
        "metadata": meta,
    }
    return video, kwargs, "image"


def read_video(path: str | list[str]) -> list[LayerData]:
    """Open one video file or frame folder; a file that cannot be read raises :class:`VideoReadError`, which
    names the file and the fix (napari shows it as the open error)."""
    if isinstance(path, list):
        path = path[0]
    return [video_layer_data(path)]
