"""Pre-annotating a whole archive: which videos, who does which, what is finished, and the per-video loop.

One process or ``torchrun --nproc-per-node N --nnodes M`` run the same code (the CLI reads the ranks; this
module takes them as arguments and imports no front-end):

* :func:`collect_videos` turns folders, glob patterns and manifest files into a list of video paths;
  :func:`describe_videos` reads each one's duration from the container header (no decoding).
* :func:`assign_shards` gives every rank a disjoint share, balanced by duration (longest first, each to the
  least loaded rank): the shares together are exactly the pending videos.
* A video is **finished** when every requested output holds it: its output folder (written under
  ``.partial/`` and renamed into place in one step, so a folder ``out/<key>/`` is always complete) and/or the
  label store (all of a video's predictions of a model version are one transaction,
  :meth:`LabelStore.record_video_predictions`). A re-run, or a run after ``kill -9``, skips finished videos
  and redoes the others from the start; nothing is ever half-written.
* :func:`run_archive` predicts a rank's share one video at a time with the decoder of :mod:`.decode`;
  an unreadable video is reported by name and the others go on. :class:`Progress` prints per video and
  overall lines (frames/s, ETA) at most every few seconds.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .errors import SurgenetAssistError, UsageError, VideoReadError
from .video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

__all__ = [
    "MANIFEST_SUFFIXES",
    "ArchiveOptions",
    "ArchiveVideo",
    "Progress",
    "VideoOutcome",
    "assign_shards",
    "collect_videos",
    "describe_videos",
    "finished",
    "looks_like_archive",
    "run_archive",
    "shard_by_weight",
    "summarise_outcomes",
]

MANIFEST_SUFFIXES = frozenset({".txt", ".lst", ".csv", ".json", ".jsonl"})
PARTIAL = ".partial"
DONE_FILE = "summary.json"  # the last file written into a video's folder before it is renamed into place


# ---------------------------------------------------------------------------------------------------
# which videos
# ---------------------------------------------------------------------------------------------------
def _is_video(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS


def _read_manifest(path: Path) -> list[Path]:
    """A manifest: one path per line (``#`` comments), a CSV with a ``path`` column, a JSON list of paths
    or of objects with ``path``, or JSON lines; relative paths are relative to the manifest's folder."""
    text = path.read_text()
    suffix = path.suffix.lower()
    entries: list[str]
    try:
        if suffix == ".json":
            data = json.loads(text)
            entries = [d["path"] if isinstance(d, dict) else d for d in data]
        elif suffix == ".jsonl":
            entries = [json.loads(line)["path"] for line in text.splitlines() if line.strip()]
        elif suffix == ".csv":
            rows = list(csv.DictReader(text.splitlines()))
            if rows and "path" not in rows[0]:
                raise KeyError("path")
            entries = [r["path"] for r in rows]
        else:
            lines = (ln.strip() for ln in text.splitlines())
            entries = [ln for ln in lines if ln and not ln.startswith("#")]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UsageError(
            f"manifest {path} cannot be read ({type(exc).__name__}: {exc})",
            "give one video path per line (.txt), a CSV with a 'path' column, or a JSON list of paths",
        ) from None
    return [p if p.is_absolute() else path.parent / p for p in (Path(e).expanduser() for e in entries)]


def collect_videos(inputs: Sequence[str | Path]) -> list[Path]:
    """Video files named by ``inputs``: video files, folders (searched recursively), glob patterns
    (``'archive/**/*.mp4'``) and manifest files; duplicates removed, sorted. Raises :class:`UsageError`
    naming what matched nothing."""
    found: list[Path] = []
    for item in inputs:
        text = str(item)
        path = Path(text).expanduser()
        if any(ch in text for ch in "*?[") and not path.exists():
            matches = [Path(m) for m in glob.glob(os.path.expanduser(text), recursive=True)]
            videos = [m for m in matches if _is_video(m)]
            if not videos:
                raise UsageError(
                    f"no video files match {text!r}", "check the pattern (quote it so the shell leaves it)"
                )
            found += videos
        elif path.is_dir():
            videos = [p for p in path.rglob("*") if _is_video(p) and PARTIAL not in p.parts]
            if not videos:
                raise UsageError(
                    f"folder {path} holds no video files",
                    f"videos need one of the extensions {', '.join(sorted(VIDEO_EXTENSIONS))}",
                )
            found += videos
        elif path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
            found += _read_manifest(path)
        elif path.is_file():
            found.append(path)
        else:
            raise UsageError(f"{text} does not exist", "check the path, folder, pattern or manifest")
    unique = sorted({p.resolve() for p in found})
    missing = [p for p in unique if not p.exists()]
    if missing:
        raise UsageError(
            f"{len(missing)} video(s) of the manifest do not exist, e.g. {missing[0]}",
            "fix the manifest (relative paths are read from the manifest's folder)",
        )
    return unique


def looks_like_archive(inputs: Sequence[str | Path]) -> bool:
    """True when ``inputs`` name more than one video: several paths, a glob, a manifest, or a folder that
    holds video files (a folder of images is one video as frames)."""
    if len(inputs) != 1:
        return True
    text = str(inputs[0])
    path = Path(text).expanduser()
    if any(ch in text for ch in "*?[") and not path.exists():
        return True
    if path.is_file():
        return path.suffix.lower() in MANIFEST_SUFFIXES
    if path.is_dir():
        return not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir() if p.is_file())
    return False


@dataclass(frozen=True)
class ArchiveVideo:
    """One video of the archive: where it is, its output folder name, and how long it is."""

    path: str
    key: str  # output folder name under --out, unique in the run
    duration: float  # seconds, from the container header (0 when unknown)
    fps: float
    frames: int

    def expected_samples(self, sample_fps: float | None) -> int:
        if not self.frames:
            return 0
        if sample_fps is None or not self.fps or sample_fps >= self.fps:
            return self.frames
        return max(1, round(self.duration * sample_fps))


def _header(path: Path) -> tuple[float, float, int]:
    """(duration s, fps, frames) from the container header only; (0, 0, 0) when it cannot be read (the
    video then fails, by name, when its rank gets to it)."""
    try:
        import av
    except ImportError:  # OpenCV reads the same header fields
        import cv2

        cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
        fps, n = float(cap.get(cv2.CAP_PROP_FPS) or 0), int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        cap.release()
        return (n / fps if fps else 0.0), fps, n
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            if stream.duration is not None and stream.time_base:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000
            else:
                duration = 0.0
            frames = int(stream.frames) or int(round(duration * fps))
            return duration, fps, frames
    except Exception:  # noqa: BLE001 - any unreadable header: reported when the video is processed
        return 0.0, 0.0, 0


def _keys(paths: Sequence[Path]) -> list[str]:
    """Output folder names: the path under the videos' common folder without its suffix (with it when two
    videos differ only by suffix), '/' kept so folders mirror the archive."""
    if not paths:
        return []
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    rel = [p.relative_to(root) for p in paths]
    stems = [r.with_suffix("").as_posix() for r in rel]
    return [r.as_posix() if stems.count(s) > 1 else s for r, s in zip(rel, stems, strict=True)]


def describe_videos(paths: Sequence[Path]) -> list[ArchiveVideo]:
    """Duration, fps and frame count of each video from its header (cheap: no frame is decoded)."""
    return [
        ArchiveVideo(str(p), key, *_header(p))
        for p, key in zip(paths, _keys(paths), strict=True)
    ]


# ---------------------------------------------------------------------------------------------------
# who does which
# ---------------------------------------------------------------------------------------------------
def shard_by_weight(weights: Sequence[float], world_size: int) -> list[list[int]]:
    """Positions of ``weights`` split into ``world_size`` disjoint shares of near-equal total weight:
    heaviest first, each to the least loaded share (ties to the lowest rank); stable for equal weights, so
    every rank computes the same split from the same list."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    shares: list[list[int]] = [[] for _ in range(world_size)]
    load = [0.0] * world_size
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        r = min(range(world_size), key=lambda k: (load[k], k))
        shares[r].append(i)
        load[r] += weights[i]
    return shares


def assign_shards(videos: Sequence[ArchiveVideo], world_size: int) -> list[list[ArchiveVideo]]:
    """Disjoint shares of ``videos``, one per rank, balanced by duration (unknown durations count as the
    median). Deterministic for the same input."""
    known = sorted(v.duration for v in videos if v.duration > 0)
    fill = known[len(known) // 2] if known else 1.0
    ordered = sorted(videos, key=lambda v: v.key)
    shares = shard_by_weight([v.duration or fill for v in ordered], world_size)
    return [[ordered[i] for i in share] for share in shares]


# ---------------------------------------------------------------------------------------------------
# what is finished
# ---------------------------------------------------------------------------------------------------
def _output_done(out: Path, video: ArchiveVideo) -> bool:
    return (out / video.key / DONE_FILE).is_file()


def finished(
    videos: Iterable[ArchiveVideo],
    *,
    out: Path | None,
    store: Any = None,
    model_version: str | None = None,
    store_project: str | None = None,
) -> set[str]:
    """Keys of the videos every requested output already holds (folder complete; store has the model
    version's predictions)."""
    videos = list(videos)
    in_store = (
        store.videos_predicted_by(model_version, project=store_project) if store is not None else None
    )
    done = set()
    for v in videos:
        if out is not None and not _output_done(out, v):
            continue
        if in_store is not None and v.path not in in_store:
            continue
        done.add(v.key)
    return done


# ---------------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------------
def _eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """One line per update: this video's frames and rate, and the share's frames, rate and ETA.

    Prints at most every ``every_s`` seconds while a video runs, and always when one ends; under torchrun
    every line starts with the rank, so interleaved output stays readable."""

    def __init__(
        self,
        total_frames: int,
        total_videos: int,
        rank: int = 0,
        world_size: int = 1,
        every_s: float = 5.0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total_frames = max(0, total_frames)
        self.total_videos = total_videos
        self.prefix = f"[rank {rank}/{world_size}] " if world_size > 1 else ""
        self.every_s = every_s
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.start = clock()
        self.frames_done = 0
        self.videos_done = 0
        self._video: ArchiveVideo | None = None
        self._video_frames = 0
        self._video_total = 0
        self._video_start = self.start
        self._last = 0.0

    def _print(self, text: str) -> None:
        print(self.prefix + text, file=self.stream, flush=True)

    def start_video(self, video: ArchiveVideo, expected: int) -> None:
        self._video, self._video_frames, self._video_total = video, 0, expected
        self._video_start = self.clock()

    def frames(self, n: int = 1) -> None:
        self._video_frames += n
        self.frames_done += n
        now = self.clock()
        if now - self._last >= self.every_s:
            self._last = now
            self._print(self.line(now))

    def rate(self, now: float | None = None) -> float:
        elapsed = (now if now is not None else self.clock()) - self.start
        return self.frames_done / elapsed if elapsed > 0 else 0.0

    def line(self, now: float | None = None) -> str:
        now = now if now is not None else self.clock()
        v_el = now - self._video_start
        v_rate = self._video_frames / v_el if v_el > 0 else 0.0
        rate = self.rate(now)
        left = max(0, self.total_frames - self.frames_done)
        name = self._video.key if self._video else "-"
        total = f"/{self._video_total}" if self._video_total else ""
        share = f"{100 * self.frames_done / self.total_frames:.0f}%" if self.total_frames else "?"
        return (
            f"video {self.videos_done + 1}/{self.total_videos} {name}: {self._video_frames}{total} frames, "
            f"{v_rate:.1f} frames/s | all: {self.frames_done}/{self.total_frames} frames ({share}), "
            f"{rate:.1f} frames/s, ETA {_eta(left / rate) if rate > 0 else '?'}"
        )

    def end_video(self, outcome: VideoOutcome) -> None:
        self.videos_done += 1
        if outcome.status == "done":
            self._print(
                f"done {self.videos_done}/{self.total_videos} {outcome.key}: {outcome.frames} frames in "
                f"{outcome.seconds:.1f} s ({outcome.frames / max(outcome.seconds, 1e-9):.1f} frames/s) | "
                + self.line().split(" | ")[1]
            )
        else:
            self._print(f"FAILED {self.videos_done}/{self.total_videos} {outcome.key}: {outcome.error}")


# ---------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------
@dataclass
class ArchiveOptions:
    """What to produce and how to read. ``out`` and/or ``store`` (a LabelStore) must be given."""

    out: Path | None = None
    store: Any = None
    store_project: str | None = None
    sample_fps: float | None = 1.0
    decoder: str = "auto"
    decode_workers: int = 2
    overlay_every: int = 1
    progress_every_s: float = 5.0


@dataclass
class VideoOutcome:
    """How one video went: ``done``, ``skipped`` (finished before) or ``failed`` (``error`` says why)."""

    key: str
    path: str
    status: str
    frames: int = 0
    seconds: float = 0.0
    error: str | None = None
    rank: int = 0
    outputs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _store_items(pred: Any, schema: Any, version: str) -> list[dict[str, Any]]:
    """A frame's segmentation as a ready PNG payload (a few kB instead of the full mask until commit)."""
    from .store.payloads import segmentation_payload

    return [
        {
            "frame_index": pred.index,
            "task": "segmentation",
            "payload": segmentation_payload(pred.mask, schema),
            "uncertainty": pred.uncertainty["segmentation"],
            "score": pred.score,
            "model_version": version,
        }
    ]


def _summary_items(result: Any, version: str) -> list[dict[str, Any]]:
    """Per-frame smoothed phase and CVS, and the phase timeline as one range prediction."""
    items: list[dict[str, Any]] = []
    for i, idx in enumerate(result.indices):
        base = {"frame_index": int(idx), "model_version": version}
        items.append(
            base
            | {
                "task": "phase",
                "payload": int(result.phase_labels[i]),
                "probabilities": result.phase_timeline_probs[i].tolist(),
                "uncertainty": float(result.uncertainty["phase"][i]),
            }
        )
        items.append(
            base
            | {
                "task": "cvs",
                "payload": [min(1.0, max(0.0, float(c))) for c in result.cvs_probs[i]],
                "probabilities": result.cvs_probs[i].tolist(),
                "uncertainty": float(result.uncertainty["cvs"][i]),
            }
        )
    if result.segments:
        first, last = result.segments[0][0], result.segments[-1][1]
        items.append(
            {
                "frame_index": int(first),
                "frame_end": int(last),
                "task": "phase",
                "payload": {"segments": [[int(s), int(e), int(p)] for s, e, p in result.segments]},
                "model_version": version,
            }
        )
    return items


def _predict_video(
    video: ArchiveVideo,
    predictor: Any,
    opts: ArchiveOptions,
    pool: Any,
    progress: Progress,
    write_files: bool,
    write_store: bool,
) -> VideoOutcome:
    from .decode import iter_sampled_frames, probe, resolve_decoder
    from .prediction_writer import PredictionWriter

    started = time.monotonic()
    path = Path(video.path)
    kind = resolve_decoder(opts.decoder, path)
    index = probe(path) if kind == "pyav" else None
    fps = index.fps if index is not None else video.fps
    expected = len(index.sample(opts.sample_fps)) if index is not None else video.expected_samples(
        opts.sample_fps
    )
    progress.start_video(video, expected)
    version = predictor.model_version
    writer = tmp = None
    if write_files:
        assert opts.out is not None
        final = opts.out / video.key
        partial_root = opts.out / PARTIAL
        for stale in partial_root.glob(f"{video.key.replace('/', '__')}.*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a run that was killed on this video
        tmp = partial_root / f"{video.key.replace('/', '__')}.{socket.gethostname()}-{os.getpid()}"
        writer = PredictionWriter(tmp, predictor.schema, overlay_every=opts.overlay_every)
    items: list[dict[str, Any]] = []
    kept = []
    frames = iter_sampled_frames(path, opts.sample_fps, decoder=kind, pool=pool, index=index,
                                 device=str(predictor.device))
    for pred, image in predictor.stream_with_frames(frames, keep_masks=True):
        if writer is not None:
            writer(pred, image)
        if write_store:
            items += _store_items(pred, predictor.schema, version)
        pred.mask = pred.confidence = None
        kept.append(pred)
        progress.frames(1)
    if not kept:
        raise VideoReadError(f"video {path} gave no frames at {opts.sample_fps} fps", "check the video")
    sample_fps = opts.sample_fps if opts.sample_fps else fps
    result = predictor.summarise(kept, fps=sample_fps)
    outputs = []
    if writer is not None and tmp is not None:
        writer.finish(result, extra={"model_version": version, "input": video.path})
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # an incomplete folder from before atomic writes: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        outputs.append(str(final))
    if write_store:
        items += _summary_items(result, version)
        frame_count = index.frame_count if index is not None else video.frames
        opts.store.record_video_predictions(
            video.path, items, fps=fps, frame_count=frame_count or None, project=opts.store_project
        )
        outputs.append("store")
    return VideoOutcome(video.key, video.path, "done", len(kept), time.monotonic() - started, outputs=outputs)


def run_archive(
    videos: Sequence[ArchiveVideo],
    predictor: Any,
    opts: ArchiveOptions,
    *,
    rank: int = 0,
    world_size: int = 1,
    progress_stream: TextIO | None = None,
) -> list[VideoOutcome]:
    """Predict this rank's ``videos`` one by one; finished ones are skipped, failures isolated by video.

    ``predictor`` is a :class:`~.predictor.Predictor` (its ``model_version`` marks store predictions)."""
    if opts.out is None and opts.store is None:
        raise UsageError("nothing to write the predictions to", "give --out FOLDER and/or --to-store")
    version = predictor.model_version
    done_before = finished(
        videos, out=opts.out, store=opts.store, model_version=version, store_project=opts.store_project
    )
    todo = [v for v in videos if v.key not in done_before]
    outcomes = [VideoOutcome(v.key, v.path, "skipped", rank=rank) for v in videos if v.key in done_before]
    progress = Progress(
        sum(v.expected_samples(opts.sample_fps) for v in todo),
        len(todo),
        rank=rank,
        world_size=world_size,
        every_s=opts.progress_every_s,
        stream=progress_stream,
    )
    in_store: set[str] = set()
    if opts.store is not None:
        in_store = opts.store.videos_predicted_by(version, project=opts.store_project)
    pool = _pool(opts, todo)
    try:
        for video in todo:
            write_files = opts.out is not None and not _output_done(opts.out, video)
            write_store = opts.store is not None and video.path not in in_store
            try:
                outcome = _predict_video(video, predictor, opts, pool, progress, write_files, write_store)
            except SurgenetAssistError as exc:
                outcome = VideoOutcome(video.key, video.path, "failed", error=_one_line(exc), rank=rank)
            except Exception as exc:  # noqa: BLE001 - one bad video must not stop the archive
                outcome = VideoOutcome(
                    video.key, video.path, "failed", error=f"{type(exc).__name__}: {exc}", rank=rank
                )
            outcome.rank = rank
            if outcome.status == "failed" and pool is not None and not pool.healthy():
                pool.close()
                pool = _pool(opts, todo)
            outcomes.append(outcome)
            progress.end_video(outcome)
    finally:
        if pool is not None:
            pool.close()
    return outcomes


def _one_line(exc: SurgenetAssistError) -> str:
    text = " ".join(exc.message.split())
    return text + (" Fix: " + " ".join(exc.hint.split()) if exc.hint else "")


def _pool(opts: ArchiveOptions, todo: Sequence[ArchiveVideo]) -> Any:
    """The decoder workers for this run (none when nothing needs PyAV)."""
    from .decode import DecodePool, resolve_decoder

    if not todo or opts.decode_workers < 1:
        return None
    if not any(resolve_decoder(opts.decoder, Path(v.path)) == "pyav" for v in todo):
        return None
    return DecodePool(opts.decode_workers)


def summarise_outcomes(outcomes: Sequence[VideoOutcome], seconds: float) -> dict[str, Any]:
    """The final summary of a run (all ranks): counts, frames, rate, and each failure by video."""
    done = [o for o in outcomes if o.status == "done"]
    frames = sum(o.frames for o in done)
    return {
        "videos": len(outcomes),
        "done": len(done),
        "skipped (finished before)": sum(o.status == "skipped" for o in outcomes),
        "failed": sum(o.status == "failed" for o in outcomes),
        "frames": frames,
        "seconds": round(seconds, 2),
        "frames_per_s": round(frames / seconds, 2) if seconds > 0 else 0.0,
        "failures": {o.path: o.error for o in outcomes if o.status == "failed"},
        "videos_by_rank": {
            str(r): sorted(o.key for o in outcomes if o.rank == r and o.status == "done")
            for r in sorted({o.rank for o in outcomes})
        },
    }
