"""Decoding that keeps up with the model: PyAV in worker processes, long videos split at keyframes.

At 1 frame per second from a 25 fps recording every sampled frame costs 25 decoded frames, so on an archive
the decoder, not the model, sets the pace. Threads cannot help much (the Python loop around the decoder holds
the GIL), so decoding runs in **worker processes** beside the model:

* :func:`probe` reads the container's packets without decoding them (milliseconds per minute of video): the
  presentation timestamp (pts) of every frame and where the keyframes are. A frame's index is the rank of its
  pts, exactly what a sequential decode counts, so the index means the same picture for every decoder.
* :func:`plan_segments` cuts the sampled frames into segments that start at keyframes; workers seek to a
  segment's keyframe and decode forward only as far as its last sampled frame, so several workers decode
  one video in parallel and no decoded frame is wasted beyond the last one needed.
* :class:`DecodePool` keeps N spawned workers for a whole run (no torch in them). A worker writes each sampled
  RGB frame into a shared-memory slot and sends only its slot number; the consumer copies the frame out once
  and frees the slot (no pickling, no pipe transfer of pixels). The consumer hands segments out at most
  ``workers + 1`` ahead of the one it is reading, so frames come back in order with bounded memory.
* :func:`iter_sampled_frames` picks the decoder: the pool (PyAV), torchcodec when it is installed and asked
  for (``decoder="torchcodec"``, NVDEC with ``device="cuda"``), and OpenCV's sequential reader
  (:mod:`.video`) as the fallback when PyAV is missing, for frame folders, and for ``decoder="opencv"``.

Frame accuracy (indices and pixels equal a sequential decode) is tested in ``tests/test_decode.py``.
Open-GOP streams stay exact: a segment decodes until the first frame at or past the next segment's keyframe,
so leading B-frames are decoded with their references by the segment before.
"""

from __future__ import annotations

import bisect
import contextlib
import importlib.util
import multiprocessing as mp
import os
import queue
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError, VideoReadError
from .video import VIDEO_EXTENSIONS, FrameRecord, open_video, sample_indices

__all__ = [
    "DECODERS",
    "DecodePool",
    "Segment",
    "VideoIndex",
    "available_decoders",
    "decode_sequential",
    "iter_sampled_frames",
    "plan_segments",
    "probe",
]

DECODERS = ("auto", "pyav", "opencv", "torchcodec")
# A segment decodes at least this many frames (seeks and decoder flushes are then a small share of its cost)
MIN_SEGMENT_FRAMES = 250
# ... and holds at most this many sampled frames (bounds the consumer's reorder buffer).
MAX_SEGMENT_SAMPLES = 64
_REENCODE_HINT = (
    "re-encode it with ffmpeg: ffmpeg -i INPUT -c:v libx264 -pix_fmt yuv420p -movflags +faststart OUTPUT.mp4"
)


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def available_decoders() -> list[str]:
    """Decoders importable here, best first (OpenCV is always there)."""
    return [name for name, mod in (("pyav", "av"), ("torchcodec", "torchcodec")) if _have(mod)] + ["opencv"]


# ---------------------------------------------------------------------------------------------------
# index: pts of every frame, keyframes, rate — from the packets, without decoding
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoIndex:
    """What a demux pass knows: frame ``i`` has pts ``pts[i]`` (presentation order); keyframe positions."""

    path: Path
    fps: float
    pts: np.ndarray  # (N,) int64, sorted
    keyframes: np.ndarray  # (K,) int64 frame indices of keyframes, sorted, first is 0 when decodable
    width: int
    height: int
    time_base: Fraction = field(default=Fraction(1, 1))

    @property
    def frame_count(self) -> int:
        return len(self.pts)

    @property
    def duration(self) -> float:
        return self.frame_count / self.fps if self.fps else 0.0

    def sample(self, sample_fps: float | None) -> list[int]:
        return sample_indices(self.fps, 0, self.frame_count, sample_fps)


def _open_av(path: Path) -> Any:
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoReadError(
            f"cannot read video {path}: {type(exc).__name__}: {exc} (truncated, still being written, or not "
            "a video)",
            "wait for the copy/recording to finish, or " + _REENCODE_HINT,
        ) from None
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{path} has no video stream", "pass the recording itself, not an audio file")
    return container


def probe(path: str | Path) -> VideoIndex:
    """Index a video by demuxing its packets (no decoding): frame pts, keyframes, fps and size.

    Raises :class:`VideoReadError` naming the file when it is not a readable video."""
    import av

    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"video not found: {path}", "check the path")
    if path.stat().st_size == 0:
        raise VideoReadError(f"video file {path} is empty (0 bytes)", "copy or export the video again")
    container = _open_av(path)
    try:
        stream = container.streams.video[0]
        pts: list[int] = []
        key_pts: list[int] = []
        try:
            for packet in container.demux(stream):
                if packet.pts is None:  # flush packet
                    continue
                pts.append(int(packet.pts))
                if packet.is_keyframe:
                    key_pts.append(int(packet.pts))
        except av.error.FFmpegError as exc:
            raise VideoReadError(
                f"cannot read video {path}: demuxing failed after {len(pts)} frames ({exc})",
                "the file is truncated or corrupt; " + _REENCODE_HINT,
            ) from None
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
        time_base = stream.time_base or Fraction(1, 1)
    finally:
        container.close()
    if not pts:
        raise VideoReadError(f"video {path} has no frames", "the file is truncated; " + _REENCODE_HINT)
    if fps <= 0:
        raise VideoReadError(f"video {path} reports no frame rate", _REENCODE_HINT)
    order = np.array(sorted(pts), dtype=np.int64)
    keys = np.searchsorted(order, np.array(sorted(key_pts), dtype=np.int64))
    if not len(keys) or keys[0] != 0:
        keys = np.concatenate([[0], keys])  # decoding from the start always works
    return VideoIndex(path, fps, order, np.unique(keys), width, height, Fraction(time_base))


# ---------------------------------------------------------------------------------------------------
# segments
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """Decode from keyframe ``start`` (a frame index) and keep ``targets`` (sorted frame indices >= start)."""

    number: int
    start: int
    targets: tuple[int, ...]


def plan_segments(
    index: VideoIndex,
    targets: Sequence[int],
    min_frames: int = MIN_SEGMENT_FRAMES,
    max_samples: int = MAX_SEGMENT_SAMPLES,
) -> list[Segment]:
    """Group the sampled frames into segments that each start at a keyframe.

    A new segment starts at a keyframe once the current one spans at least ``min_frames`` frames (so the seek
    is cheap relative to the decoding) or holds ``max_samples`` sampled frames (so memory stays bounded)."""
    keys = [int(k) for k in index.keyframes]
    segments: list[Segment] = []
    current: list[int] = []
    start = 0
    for t in targets:
        key = keys[bisect.bisect_right(keys, t) - 1]
        if current and key > start and (key - start >= min_frames or len(current) >= max_samples):
            segments.append(Segment(len(segments), start, tuple(current)))
            current, start = [], key
        current.append(int(t))
    if current:
        segments.append(Segment(len(segments), start, tuple(current)))
    return segments


# ---------------------------------------------------------------------------------------------------
# decoding one segment (runs in a worker; also the reference of the tests)
# ---------------------------------------------------------------------------------------------------
def _segment_task(index: VideoIndex, seg: Segment) -> tuple[str, int, dict[int, int]]:
    """What a worker needs for one segment (small to pickle): path, keyframe pts, {pts: frame index}."""
    return str(index.path), int(index.pts[seg.start]), {int(index.pts[t]): int(t) for t in seg.targets}


def _decode_segment(container: Any, path: str, start_pts: int, wanted: dict[int, int]) -> Iterator[tuple]:
    """Seek to the keyframe at ``start_pts`` and yield ``(frame index, av.VideoFrame)`` for the wanted pts,
    in order; stops after the last one.

    Frames no other frame refers to (non-reference B-frames) are not decoded unless wanted: the decoder's
    ``skip_frame`` is set per packet (exact with slice threading, where it is read at each packet's
    decode), which saves their share of the decoding and leaves every wanted frame's pixels unchanged."""
    import av

    stream = container.streams.video[0]
    codec = stream.codec_context
    container.seek(start_pts, stream=stream, backward=True, any_frame=False)
    last = max(wanted)
    remaining = len(wanted)
    try:
        for packet in container.demux(stream):
            if packet.pts is not None:
                codec.skip_frame = "DEFAULT" if int(packet.pts) in wanted else "NONREF"
            else:
                codec.skip_frame = "DEFAULT"  # the flush packet at the end
            for frame in codec.decode(packet):
                if frame.pts is None:
                    continue
                if frame.pts > last:
                    return
                t = wanted.get(int(frame.pts))
                if t is not None:
                    yield t, frame
                    remaining -= 1
                    if remaining == 0:
                        return
    except av.error.FFmpegError as exc:
        raise VideoReadError(
            f"decoding {path} failed near frame {min(wanted.values())} ({exc})",
            "the file is corrupt; " + _REENCODE_HINT,
        ) from None
    finally:
        codec.skip_frame = "DEFAULT"
    if remaining:
        raise VideoReadError(
            f"decoding {path} stopped early: {remaining} of the frames from {min(wanted.values())} to "
            f"{max(wanted.values())} did not decode (the file is truncated or corrupt)",
            _REENCODE_HINT,
        )


def decode_sequential(path: str | Path, targets: Sequence[int] | None = None) -> Iterator[FrameRecord]:
    """The reference: decode every frame from the start with PyAV, counting them, keep ``targets``."""
    import av

    path = Path(path)
    container = _open_av(path)
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 1.0
        keep = None if targets is None else set(int(t) for t in targets)
        for i, frame in enumerate(container.decode(stream)):
            if keep is None or i in keep:
                yield FrameRecord(i, i / fps, frame.to_ndarray(format="rgb24"))
    except av.error.FFmpegError as exc:
        raise VideoReadError(f"decoding {path} failed ({exc})", _REENCODE_HINT) from None
    finally:
        container.close()


# ---------------------------------------------------------------------------------------------------
# worker processes
# ---------------------------------------------------------------------------------------------------
def _worker(tasks: Any, results: Any, free: Any, slot_names: list[str], slot_bytes: int) -> None:
    """Decode segments from ``tasks``; each kept frame goes into a free shared-memory slot (or, without
    slots, through the queue). Messages: ("frame", job, seg, index, slot | array, shape), ("done", job, seg),
    ("error", job, seg, message, hint)."""
    from multiprocessing import shared_memory

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    parent = os.getppid()

    def get(q: Any) -> Any:
        """Wait for the next item; exit when the parent is gone (killed with -9: no one says stop)."""
        while True:
            try:
                return q.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent:
                    raise SystemExit(0) from None

    slots = [shared_memory.SharedMemory(name=n) for n in slot_names]
    containers: dict[str, Any] = {}
    try:
        while True:
            task = get(tasks)
            if task is None:
                return
            job, number, (key, start_pts, wanted) = task
            try:
                if key not in containers:
                    for old in containers.values():
                        old.close()
                    containers.clear()
                    containers[key] = _open_av(Path(key))
                    containers[key].streams.video[0].thread_type = "SLICE"
                for t, frame in _decode_segment(containers[key], key, start_pts, wanted):
                    rgb = frame.to_ndarray(format="rgb24")
                    if slots and rgb.nbytes <= slot_bytes:
                        slot = get(free)
                        np.ndarray(rgb.shape, np.uint8, buffer=slots[slot].buf)[...] = rgb
                        results.put(("frame", job, number, t, slot, rgb.shape))
                    else:
                        results.put(("frame", job, number, t, rgb, rgb.shape))
                results.put(("done", job, number))
            except VideoReadError as exc:
                containers.pop(key, None)
                results.put(("error", job, number, exc.message, exc.hint))
            except Exception as exc:  # noqa: BLE001 - reported to the consumer, which names the video
                containers.pop(key, None)
                results.put(("error", job, number, f"decoding {key} failed: {exc!r}", None))
    finally:
        for c in containers.values():
            c.close()
        for s in slots:
            s.close()


class DecodePool:
    """``workers`` decoder processes kept for a whole run; :meth:`frames` streams one video's sampled frames.

    Shared-memory slots hold ``slot_frames`` frames of at most ``max_pixels`` pixels each (default: 1080p),
    sized to stay well under Docker's default 64 MB ``/dev/shm`` for two workers; larger frames, or a
    machine without shared memory, go through the queue instead (slower, still correct)."""

    def __init__(
        self,
        workers: int = 2,
        max_pixels: int = 1920 * 1080,
        slot_frames: int | None = None,
        min_segment_frames: int = MIN_SEGMENT_FRAMES,
    ) -> None:
        if workers < 1:
            raise UsageError(f"decode workers must be >= 1, got {workers}", "pass --decode-workers 1 or more")
        from multiprocessing import shared_memory

        self.workers = int(workers)
        self.min_segment_frames = int(min_segment_frames)
        ctx = mp.get_context("spawn")  # fork after torch/OpenMP threads started is unsafe
        self._tasks = ctx.Queue()
        self._results = ctx.Queue()
        self._free = ctx.Queue()
        self._slot_bytes = int(max_pixels) * 3
        n_slots = slot_frames if slot_frames is not None else 2 * self.workers + 2
        self._slots: list[Any] = []
        try:
            for _ in range(n_slots):
                self._slots.append(shared_memory.SharedMemory(create=True, size=self._slot_bytes))
        except OSError:  # no /dev/shm, or too small: frames travel through the queue
            for s in self._slots:
                s.close()
                s.unlink()
            self._slots = []
        for i in range(len(self._slots)):
            self._free.put(i)
        names = [s.name for s in self._slots]
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(self._tasks, self._results, self._free, names, self._slot_bytes),
                daemon=True,
                name=f"surgenet-decode-{i}",
            )
            for i in range(self.workers)
        ]
        for p in self._procs:
            p.start()
        self._job = 0

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers and free the shared memory (idempotent)."""
        procs, self._procs = getattr(self, "_procs", []), []
        for _ in procs:
            self._tasks.put(None)
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
        for s in getattr(self, "_slots", []):
            s.close()
            with contextlib.suppress(FileNotFoundError):
                s.unlink()
        self._slots = []

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()

    def healthy(self) -> bool:
        """Every worker still alive (a worker killed by the OOM killer breaks the pool: make a new one)."""
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def _get(self) -> tuple:
        while True:
            try:
                return self._results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.name for p in self._procs if not p.is_alive()]
                if dead:
                    raise VideoReadError(
                        f"decoder worker {dead[0]} died (out of memory, or killed)",
                        "run again with fewer --decode-workers; finished videos are skipped",
                    ) from None

    def frames(self, index: VideoIndex, targets: Sequence[int]) -> Iterator[FrameRecord]:
        """The frames ``targets`` of an indexed video, in order, decoded by the workers."""
        segments = plan_segments(index, targets, min_frames=self.min_segment_frames)
        if not segments:
            return
        self._job += 1
        job = self._job
        ahead = self.workers + 1
        sent = 0
        pending: dict[int, dict[int, np.ndarray]] = {}
        finished: set[int] = set()
        error: tuple[str, str | None] | None = None
        try:
            while sent < min(ahead, len(segments)):
                self._tasks.put((job, sent, _segment_task(index, segments[sent])))
                sent += 1
            for seg in segments:
                while seg.number not in finished:
                    msg = self._get()
                    if msg[1] != job:  # a late message of an abandoned video: free its slot
                        if msg[0] == "frame" and isinstance(msg[4], int):
                            self._free.put(msg[4])
                        continue
                    if msg[0] == "frame":
                        _, _, number, t, where, shape = msg
                        if isinstance(where, int):
                            buf = self._slots[where].buf
                            image = np.ndarray(shape, np.uint8, buffer=buf).copy()
                            self._free.put(where)
                        else:
                            image = where
                        pending.setdefault(number, {})[t] = image
                    elif msg[0] == "done":
                        finished.add(msg[2])
                        if sent < len(segments):
                            self._tasks.put((job, sent, _segment_task(index, segments[sent])))
                            sent += 1
                    else:
                        error = (msg[3], msg[4])
                        finished.add(msg[2])
                if error is not None:
                    raise VideoReadError(error[0], error[1] or _REENCODE_HINT)
                got = pending.pop(seg.number, {})
                for t in seg.targets:
                    yield FrameRecord(t, t / index.fps, got[t])
        finally:
            # drain what is still in flight for this job so the next video starts clean and slots come back
            outstanding = set(range(sent)) - finished
            while outstanding:
                msg = self._get()
                if msg[0] == "frame" and isinstance(msg[4], int):
                    self._free.put(msg[4])
                elif msg[0] in ("done", "error") and msg[1] == job:
                    outstanding.discard(msg[2])


# ---------------------------------------------------------------------------------------------------
# choosing a decoder
# ---------------------------------------------------------------------------------------------------
def resolve_decoder(decoder: str, path: Path) -> str:
    """The decoder that will read ``path``: ``auto`` is PyAV when installed, else OpenCV; frame folders and
    image files always go through OpenCV."""
    if decoder not in DECODERS:
        raise UsageError(f"unknown decoder {decoder!r}", f"use one of {', '.join(DECODERS)}")
    if path.is_dir() or path.suffix.lower() not in VIDEO_EXTENSIONS:
        return "opencv"
    if decoder == "auto":
        return "pyav" if _have("av") else "opencv"
    if decoder != "opencv" and not _have({"pyav": "av"}.get(decoder, decoder)):
        raise UsageError(
            f"decoder {decoder!r} is not installed", f"pip install {'av' if decoder == 'pyav' else decoder}"
        )
    return decoder


def _torchcodec_frames(
    path: Path, sample_fps: float | None, device: str, batch: int = 32
) -> Iterator[FrameRecord]:
    """torchcodec (NVDEC with ``device='cuda'``) in exact seek mode. Not installed on the development
    machine: kept small and only used when asked for."""
    from torchcodec.decoders import VideoDecoder  # type: ignore[import-not-found]

    dec = VideoDecoder(str(path), device=device, seek_mode="exact")
    meta = dec.metadata
    fps = float(meta.average_fps)
    indices = sample_indices(fps, 0, int(meta.num_frames), sample_fps)
    for lo in range(0, len(indices), batch):
        chunk = indices[lo : lo + batch]
        frames = dec.get_frames_at(chunk).data.permute(0, 2, 3, 1).cpu().numpy()
        for i, image in zip(chunk, frames, strict=True):
            yield FrameRecord(i, i / fps, image)


def iter_sampled_frames(
    path: str | Path,
    sample_fps: float | None,
    *,
    decoder: str = "auto",
    pool: DecodePool | None = None,
    index: VideoIndex | None = None,
    device: str = "cpu",
) -> Iterator[FrameRecord]:
    """Sampled frames of one video from the chosen decoder (see the module docstring)."""
    path = Path(path)
    kind = resolve_decoder(decoder, path)
    if kind == "pyav":
        index = index or probe(path)
        targets = index.sample(sample_fps)
        if pool is not None:
            yield from pool.frames(index, targets)
        else:
            container = _open_av(path)
            container.streams.video[0].thread_type = "SLICE"  # skip_frame is exact per packet
            try:
                for seg in plan_segments(index, targets):
                    for t, frame in _decode_segment(container, *_segment_task(index, seg)):
                        yield FrameRecord(t, t / index.fps, frame.to_ndarray(format="rgb24"))
            finally:
                container.close()
    elif kind == "torchcodec":
        yield from _torchcodec_frames(path, sample_fps, device)
    else:
        with open_video(path) as video:
            yield from video.iter_frames(sample_fps=sample_fps)
