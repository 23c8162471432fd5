"""Seeded procedural laparoscopic clips with exact ground truth: masks, phases, CVS, tools, scene state.

Real surgical data cannot ship with the project, yet tests, the demo, training and benchmarks need clips
whose labels are known exactly. A clip comes from a *world*, a versioned scene model and renderer:

- ``v2`` (the default, :data:`DEFAULT_WORLD`): the benchmark world. Cholec80's seven instruments appear in
  the phases that use them (EndoNet, Twinanda et al. 2016), the three CVS criteria are visible as the
  Strasberg / Endoscapes protocol defines them, and videos differ in lighting, smoke, blood, specular
  highlights, motion blur, camera motion and zoom; 480x854 by default. See ``world_v2.py`` and
  ``docs/performance.md`` ("Benchmark world").
- ``v1``: the first world (grasper and L-hook only, 240x427 by default), frozen: old seeds keep producing
  exactly the clips that earlier tests and recorded figures used (``generate_clip(..., world="v1")``).

Every world shares the same API and conventions: masks hold the schema's class ids (CholecSeg8k's by default)
and ``schema.ignore_index`` (255) where the schema has no class for what is drawn; labels (phases, CVS,
tools, scene state, cuts) depend only on the seed and length, never on the frame size. Every clip records
the world it came from (``SyntheticClip.world``), so results can be stamped with it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np

from ..errors import FrameError, UsageError, VideoReadError
from ..schema import DEFAULT_SCHEMA, LabelSchema
from ._types import TOOL_NAMES, SceneStates

__all__ = [
    "DEFAULT_WORLD",
    "TOOL_NAMES",
    "WORLDS",
    "SceneStates",
    "SyntheticClip",
    "clip_timeline",
    "decode_frame_index",
    "generate_clip",
    "generate_dataset",
    "iter_clip",
    "make_indexed_video",
    "scene_states",
    "world_default_size",
    "write_h264",
]

#: Every world this version of the code can render, oldest first. A world, once published, never changes.
WORLDS = ("v1", "v2")
#: The world new callers get. Tests and figures that depend on an older world name it explicitly.
DEFAULT_WORLD = "v2"


def _world(world: str) -> ModuleType:
    """The module that renders ``world``; a clear error for a name that is not a world."""
    if world not in WORLDS:
        raise UsageError(
            f"unknown synthetic world {world!r}",
            f"use one of {list(WORLDS)} (default {DEFAULT_WORLD!r}; 'v1' reproduces clips made before v2)",
        )
    return importlib.import_module(f".world_{world}", __name__)


def world_default_size(world: str = DEFAULT_WORLD) -> tuple[int, int]:
    """(height, width) a world renders at when the caller names no size: 480x854 for v2, 240x427 for v1."""
    return tuple(_world(world).DEFAULT_SIZE)


# --------------------------------------------------------------------------------------------------------
# public clip container
# --------------------------------------------------------------------------------------------------------
@dataclass
class SyntheticClip:
    """Frames plus exact labels of one generated clip, and the world that made it."""

    frames: np.ndarray
    masks: np.ndarray
    phases: np.ndarray
    cvs: np.ndarray
    fps: float
    seed: int
    cut_frames: list[int] = field(default_factory=list)
    #: The world that rendered the clip (``WORLDS``); stamp results with it.
    world: str = DEFAULT_WORLD
    #: True scene state and tool presence per frame (None only for clips built by hand).
    states: SceneStates | None = None

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    @property
    def tools(self) -> np.ndarray:
        """(frames, 7) Cholec80 tool presence, columns as ``TOOL_NAMES``."""
        if self.states is None:
            raise UsageError("this clip carries no scene state", "make it with generate_clip")
        return self.states.tools

    def write_video(self, path: str | Path, fps: float | None = None, codec: str = "mp4v") -> Path:
        """Encode the frames with OpenCV, so readers can be tested on a real container file.

        Video codecs store 4:2:0 chroma and need even sizes: an odd height/width (e.g. the default 427) is
        cropped by its last row/column, exactly as FFmpeg would, so compare with ``frames[:, :h, :w]``.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        height, width = (d - d % 2 for d in self.frames.shape[1:3])
        writer = _open_writer(path, fps or self.fps, (width, height), codec)
        try:
            for frame in self.frames:
                writer.write(cv2.cvtColor(frame[:height, :width], cv2.COLOR_RGB2BGR))
        finally:
            writer.release()
        return path

    def write_frames(self, directory: str | Path, ext: str = "png", masks: bool = False) -> Path:
        """Write ``frame_000000.<ext>`` ...; with ``masks=True`` also ``masks/masks_000000.png`` (class ids).

        Masks go to a sub-folder so that the frame folder itself stays readable by ``open_video``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ext = ext.lstrip(".").lower()
        mask_dir = directory / "masks"
        if masks:
            mask_dir.mkdir(exist_ok=True)
        for i, frame in enumerate(self.frames):
            target = directory / f"frame_{i:06d}.{ext}"
            if not cv2.imwrite(str(target), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)):
                raise VideoReadError(
                    f"cannot write {target}", "check that the folder is writable and the extension"
                )
            if masks:
                cv2.imwrite(str(mask_dir / f"masks_{i:06d}.png"), self.masks[i])
        return directory


def _open_writer(path: Path, fps: float, size_wh: tuple[int, int], codec: str) -> cv2.VideoWriter:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), float(fps), size_wh)
    if not writer.isOpened():
        raise VideoReadError(
            f"OpenCV cannot write {path} with codec {codec!r}",
            "use codec 'mp4v' for .mp4 or 'MJPG'/'XVID' for .avi, and check that the folder is writable",
        )
    return writer


# --------------------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------------------
# public generators
# --------------------------------------------------------------------------------------------------------
def _size(world: str, height: int | None, width: int | None) -> tuple[int, int]:
    default_h, default_w = world_default_size(world)
    return (default_h if height is None else int(height)), (default_w if width is None else int(width))


def iter_clip(
    seed: int,
    num_frames: int,
    height: int | None = None,
    width: int | None = None,
    fps: float = 1.0,
    camera_cuts: int = 0,
    schema: LabelSchema = DEFAULT_SCHEMA,
    world: str = DEFAULT_WORLD,
) -> Iterator[tuple[np.ndarray, np.ndarray, int, np.ndarray]]:
    """Yield ``(frame, mask, phase, cvs)`` one frame at a time in constant memory (long clips, benchmarks).

    Content is identical to :func:`generate_clip` with the same arguments; ``fps`` only matters for the
    container and is accepted for symmetry. Tools and scene state: :func:`scene_states`.
    """
    del fps
    module = _world(world)
    height, width = _size(world, height, width)
    yield from module.iter_frames(int(seed), int(num_frames), height, width, int(camera_cuts), schema)


def generate_clip(
    seed: int = 0,
    num_frames: int = 120,
    height: int | None = None,
    width: int | None = None,
    fps: float = 1.0,
    camera_cuts: int = 0,
    schema: LabelSchema = DEFAULT_SCHEMA,
    world: str = DEFAULT_WORLD,
) -> SyntheticClip:
    """Render a whole clip in memory with exact masks, phases, CVS, tool presence, scene state and cuts.

    ``height``/``width`` default to the world's size (:func:`world_default_size`).
    """
    height, width = _size(world, height, width)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    masks = np.empty((num_frames, height, width), np.uint8)
    phases = np.empty(num_frames, np.int64)
    cvs = np.empty((num_frames, 3), np.float32)
    for t, (frame, mask, phase, c) in enumerate(
        iter_clip(seed, num_frames, height, width, fps, camera_cuts, schema, world)
    ):
        frames[t], masks[t], phases[t], cvs[t] = frame, mask, phase, c
    _, _, cut_frames = clip_timeline(seed, num_frames, camera_cuts, world)
    states = scene_states(seed, num_frames, camera_cuts, world)
    return SyntheticClip(
        frames, masks, phases, cvs, float(fps), int(seed), list(cut_frames), world=world, states=states
    )


def generate_dataset(
    seeds: Sequence[int],
    num_frames: int,
    height: int | None = None,
    width: int | None = None,
    fps: float = 1.0,
    world: str = DEFAULT_WORLD,
) -> list[SyntheticClip]:
    """One clip per seed; different seeds give different layouts, colours, timings and camera paths."""
    return [generate_clip(int(s), num_frames, height, width, fps, world=world) for s in seeds]


def clip_timeline(
    seed: int, num_frames: int, camera_cuts: int = 0, world: str = DEFAULT_WORLD
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Phases, CVS and cut indices of a clip without rendering it (cheap; same as ``generate_clip``)."""
    return _world(world).timeline(int(seed), int(num_frames), int(camera_cuts))


def scene_states(seed: int, num_frames: int, camera_cuts: int = 0, world: str = DEFAULT_WORLD) -> SceneStates:
    """The renderer's true scene state and Cholec80 tool presence per frame, without rendering (cheap).

    Benchmarks use it for privileged ceilings: how well phase and CVS can be predicted from a perfect
    perception of the scene (``bench/ceilings.py``).
    """
    return _world(world).states(int(seed), int(num_frames), int(camera_cuts))


# --------------------------------------------------------------------------------------------------------
# frame-index videos for seek tests
# --------------------------------------------------------------------------------------------------------
_GRID_ROWS, _GRID_COLS = 4, 5
_DATA_BITS = 16
_GUARD = (1, 0, 1)  # cells 17..19: fixed pattern that tells a code frame from anything else


def _index_bits(index: int) -> list[int]:
    bits = [(index >> b) & 1 for b in range(_DATA_BITS)]
    return bits + [sum(bits) % 2] + list(_GUARD)


def make_indexed_video(
    path: str | Path,
    num_frames: int,
    fps: float = 25.0,
    size: tuple[int, int] = (480, 854),
    codec: str = "mp4v",
) -> Path:
    """Write a video whose frames show their own index as 16 big black/white blocks + parity + guard.

    Large flat blocks survive lossy codecs, so :func:`decode_frame_index` proves a seek landed on the exact
    frame. ``size`` is (height, width).
    """
    if not 0 < num_frames <= 1 << _DATA_BITS:
        raise UsageError(
            f"num_frames must be in 1..{1 << _DATA_BITS}, got {num_frames}", "ask for fewer frames"
        )
    height, width = size
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = _open_writer(path, fps, (width, height), codec)
    ys = np.linspace(0, height, _GRID_ROWS + 1).astype(int)
    xs = np.linspace(0, width, _GRID_COLS + 1).astype(int)
    try:
        frame = np.empty((height, width, 3), np.uint8)
        for i in range(num_frames):
            frame[:] = 128
            for k, bit in enumerate(_index_bits(i)):
                r, c = divmod(k, _GRID_COLS)
                frame[ys[r] + 2 : ys[r + 1] - 2, xs[c] + 2 : xs[c + 1] - 2] = 255 if bit else 0
            writer.write(frame)
    finally:
        writer.release()
    return path


def decode_frame_index(frame: np.ndarray) -> int:
    """Read back the index written by :func:`make_indexed_video` (any size, RGB/BGR or grey)."""
    arr = np.asarray(frame)
    if arr.ndim == 3:
        arr = arr.mean(axis=2)
    if arr.ndim != 2 or arr.shape[0] < _GRID_ROWS * 4 or arr.shape[1] < _GRID_COLS * 4:
        raise FrameError(
            f"cannot decode a frame index from an array of shape {np.shape(frame)}",
            "pass a frame of a video written by make_indexed_video",
        )
    height, width = arr.shape
    ys = np.linspace(0, height, _GRID_ROWS + 1)
    xs = np.linspace(0, width, _GRID_COLS + 1)
    bits = []
    for k in range(_DATA_BITS + 1 + len(_GUARD)):
        r, c = divmod(k, _GRID_COLS)
        y0, y1 = ys[r] + 0.3 * (ys[r + 1] - ys[r]), ys[r + 1] - 0.3 * (ys[r + 1] - ys[r])
        x0, x1 = xs[c] + 0.3 * (xs[c + 1] - xs[c]), xs[c + 1] - 0.3 * (xs[c + 1] - xs[c])
        bits.append(int(arr[int(y0) : int(y1), int(x0) : int(x1)].mean() > 127.5))
    data = bits[:_DATA_BITS]
    if tuple(bits[_DATA_BITS + 1 :]) != _GUARD or sum(data) % 2 != bits[_DATA_BITS]:
        raise FrameError(
            "frame does not carry a valid index code (guard or parity mismatch)",
            "pass a frame of a video written by make_indexed_video, decoded without cropping",
        )
    return sum(bit << b for b, bit in enumerate(data))


def write_h264(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: float = 25.0,
    gop: int = 250,
    bframes: int = 2,
    preset: str = "veryfast",
) -> Path:
    """Encode RGB frames as H.264 (yuv420p, libx264 through PyAV) with a keyframe every ``gop`` frames and
    up to ``bframes`` B-frames: the codec and GOP structure of real recordings, which OpenCV's writers
    (mp4v, MJPG) do not produce. Tests and ``bench/archive.py`` decode these."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = None
        for frame in frames:
            if stream is None:
                stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.options = {"preset": preset, "g": str(gop), "bf": str(bframes), "crf": "23"}
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        if stream is None:
            raise UsageError("no frames to encode", "pass at least one frame")
        for packet in stream.encode():
            out.mux(packet)
    return path
