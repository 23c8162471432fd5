"""Cholec80 phase files: ``videoXX-phase.txt``, header ``Frame<TAB>Phase``, one row per frame at 25 fps.

A video's phases are stored as ONE range label (contiguous segments), so a 1-hour video (90,000 rows)
imports in well under a second. Unknown phase names and frames that do not increase are errors with the
file and line; nothing is written then.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ..errors import DatasetFormatError, SchemaError
from ..schema import DEFAULT_SCHEMA, LabelSchema
from ..store import LabelStore
from ..store.payloads import phase_segments_payload
from . import ImportReport, PendingLabel, VideoInfo, progress_iter, write_labels

CHOLEC80_FPS = 25.0


def video_name(path: Path) -> str:
    m = re.match(r"^(.*?)-phase\.txt$", path.name)
    return m.group(1) if m else path.stem


ROW_HINT = "each row after the header is '<frame number><TAB><phase name>', frames increasing from 0"


def parse_phase_file(path: str | Path, schema: LabelSchema = DEFAULT_SCHEMA) -> tuple[np.ndarray, np.ndarray]:
    """Frames and phase ids of one file; raises DatasetFormatError with ``file:line`` on bad rows."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetFormatError(
            f"cannot read {path}: {exc}", "pass a Cholec80 videoXX-phase.txt file"
        ) from None
    if not lines or [h.strip().lower() for h in lines[0].split("\t")] != ["frame", "phase"]:
        raise DatasetFormatError(
            f"{path}:1: header is {lines[0][:60] if lines else '(empty file)'!r}, not 'Frame<TAB>Phase'",
            "Cholec80 phase files are tab-separated with the header Frame<TAB>Phase",
        )
    cache: dict[str, int] = {}
    frames = np.empty(len(lines) - 1, dtype=np.int64)
    phases = np.empty(len(lines) - 1, dtype=np.int64)
    n = 0
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise DatasetFormatError(
                f"{path}:{lineno}: expected 'frame<TAB>phase', got {line[:60]!r}", ROW_HINT
            )
        try:
            frame = int(parts[0])
        except ValueError:
            raise DatasetFormatError(
                f"{path}:{lineno}: frame {parts[0]!r} is not an integer", ROW_HINT
            ) from None
        name = parts[1].strip()
        pid = cache.get(name)
        if pid is None:
            try:
                pid = cache[name] = schema.phase_id(name)
            except SchemaError as exc:
                raise DatasetFormatError(f"{path}:{lineno}: unknown phase {name!r}", exc.hint) from None
        if n and frame <= frames[n - 1]:
            raise DatasetFormatError(
                f"{path}:{lineno}: frame {frame} does not follow frame {frames[n - 1]} (must increase)",
                "sort the rows by frame and remove duplicates",
            )
        if frame < 0:
            raise DatasetFormatError(f"{path}:{lineno}: negative frame {frame}", ROW_HINT)
        frames[n], phases[n] = frame, pid
        n += 1
    if n == 0:
        raise DatasetFormatError(f"{path}: no rows after the header", ROW_HINT)
    return frames[:n], phases[:n]


def to_segments(frames: np.ndarray, phases: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of one phase over consecutive frames -> ``[(start, end, phase)]`` (0-based, inclusive)."""
    brk = np.flatnonzero((np.diff(phases) != 0) | (np.diff(frames) != 1)) + 1
    starts = np.concatenate([[0], brk])
    ends = np.concatenate([brk, [frames.size]]) - 1
    return [(int(frames[s]), int(frames[e]), int(phases[s])) for s, e in zip(starts, ends, strict=True)]


def import_cholec80(
    store: LabelStore,
    path: str | Path,
    *,
    project: str | None = None,
    schema: LabelSchema = DEFAULT_SCHEMA,
    fps: float = CHOLEC80_FPS,
    progress: bool = False,
) -> ImportReport:
    """Import one phase file or every ``*-phase.txt`` under a folder (all parsed before one write)."""
    path = Path(path)
    files = sorted(path.rglob("*-phase.txt")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise DatasetFormatError(f"no Cholec80 phase files at {path}", "expected videoXX-phase.txt files")
    report = ImportReport("cholec80", str(path))
    if path.is_dir():
        for other in sorted(path.rglob("*.txt")):
            if other not in files:
                report.skip(str(other.relative_to(path)), "not a *-phase.txt file (e.g. tool annotations)")
    labels, videos = [], {}
    for f in progress_iter(files, progress, "cholec80"):
        frames, phases = parse_phase_file(f, schema)
        name = video_name(f)
        if name in videos:
            raise DatasetFormatError(f"two phase files for video {name!r}", "keep one file per video")
        videos[name] = VideoInfo(fps=fps, frame_count=int(frames[-1]) + 1)
        labels.append(
            PendingLabel(
                video=name,
                frame_start=int(frames[0]),
                frame_end=int(frames[-1]),
                task="phase",
                payload=phase_segments_payload(to_segments(frames, phases), schema),
                author="cholec80",
                updated_at=datetime.fromtimestamp(f.stat().st_mtime, UTC).replace(tzinfo=None),
            )
        )
        report.counts["frames"] += int(frames.size)
    write_labels(store, videos, labels, report, project)
    return report


def export_cholec80(store: LabelStore, out: str | Path, *, schema: LabelSchema = DEFAULT_SCHEMA) -> int:
    """Write ``<video>-phase.txt`` for every video with human phase labels; returns the number of files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = schema.phase_names
    n = 0
    for video in store.videos():
        labels = store.phase_labels(video["id"])
        idx = np.flatnonzero(labels >= 0)
        if idx.size == 0:
            continue
        rows = "\n".join(f"{i}\t{names[labels[i]]}" for i in idx)
        (out / f"{Path(video['path']).name}-phase.txt").write_text(
            "Frame\tPhase\n" + rows + "\n", encoding="utf-8"
        )
        n += 1
    return n
