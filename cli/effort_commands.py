"""`surgenet-assist effort --videos DIR`: the annotation-effort workflows on a team's own labelled videos.

Layout of ``DIR`` (``docs/effort.md``): one folder per video holding its 1 fps keyframes as ``frame_*.png``
(RGB, e.g. ``SyntheticClip.write_frames``) and ``labels/`` in the format ``surgenet-assist propagate
--labels`` reads: ``frame_*.png`` class-id masks (same names as the frames), ``phases.csv`` (columns
``frame``, ``phase``) and ``cvs.csv`` (``frame``, ``C1``, ``C2``, ``C3``). Every keyframe needs all three
labels: the simulated annotator must know the quality it is asked to reach.

Workflows (a)-(d) run as in ``bench/effort.py``; the champion that pre-annotates a video is fitted on the
other videos of ``DIR`` (instant heads), as a team's model is trained on what it already labelled. The
loop (e) needs validation videos and batches and is the bench's alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import cv2
import numpy as np
import typer
from rich.console import Console

from surgenet_assist.core.errors import DatasetFormatError
from surgenet_assist.core.schema import DEFAULT_SCHEMA, LabelSchema


def _frame_paths(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("frame_*.png") if p.is_file())


def load_labelled_video(folder: Path, schema: LabelSchema = DEFAULT_SCHEMA) -> Any:
    """One video folder of the layout above as a :class:`LabelledVideo`; a clear error when labels are
    missing (the problem, which video and frames, and the fix)."""
    from surgenet_assist.cli.propagate import _read_label_folder
    from surgenet_assist.training_loop.effort import LabelledVideo

    frames = _frame_paths(folder)
    if not frames:
        raise DatasetFormatError(
            f"video folder {folder} holds no keyframes (frame_*.png)",
            "write each video's 1 fps keyframes as frame_000000.png, frame_000001.png, ... (docs/effort.md)",
        )
    labels = folder / "labels"
    fix = (
        f"put the video's labels in {labels}/: frame_*.png class-id masks named like the keyframes, "
        "phases.csv (frame, phase) and cvs.csv (frame, C1, C2, C3), as docs/effort.md describes; "
        "or move the video out of the folder"
    )
    if not labels.is_dir():
        raise DatasetFormatError(f"video {folder.name} has no labels ({labels} does not exist)", fix)
    masks, phases, cvs = _read_label_folder(labels, schema)
    indices = [int(p.stem.split("_")[-1]) for p in frames]
    for what, have in (("mask", masks), ("phase", phases), ("CVS", cvs)):
        missing = [i for i in indices if i not in have]
        if missing:
            raise DatasetFormatError(
                f"video {folder.name}: {len(missing)} of {len(indices)} keyframes have no {what} label "
                f"(frames {missing[:5]}{'...' if len(missing) > 5 else ''})",
                fix,
            )
    images = []
    for p in frames:
        image = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if image is None:
            raise DatasetFormatError(f"{p} is not a readable image", "write keyframes as RGB PNG files")
        images.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    shapes = {im.shape for im in images} | {(*masks[i].shape, 3) for i in indices}
    if len(shapes) != 1:
        raise DatasetFormatError(
            f"video {folder.name}: keyframes and masks differ in size ({sorted(shapes)})",
            "give every keyframe and its mask the same height and width",
        )
    return LabelledVideo(
        folder.name,
        np.stack(images),
        np.stack([masks[i] for i in indices]).astype(np.uint8),
        np.array([phases[i] for i in indices], np.int64),
        np.stack([np.asarray(cvs[i], np.float32) for i in indices]),
    )


def load_videos(root: Path) -> list[Any]:
    """Every video folder under ``root`` (at least two: each video's champion is fitted on the others)."""
    if not root.is_dir():
        raise DatasetFormatError(f"{root} is not a folder", "pass the folder that holds one folder per video")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if len(folders) < 2:
        raise DatasetFormatError(
            f"{root} holds {len(folders)} video folder(s); the effort workflows need at least two",
            "add labelled videos: the champion that pre-annotates each video is fitted on the others",
        )
    return [load_labelled_video(f) for f in folders]


def run_effort(
    root: Path,
    weights: Path | None = None,
    random_init: bool = False,
    short_side: int = 256,
    threads: int = 1,
    progress: Any = None,
) -> dict[str, Any]:
    """Workflows (a)-(d) on every video of ``root``; the same summaries as ``bench/effort.py``."""
    from surgenet_assist.core.backbone import load_backbone
    from surgenet_assist.core.effort import TimeModel
    from surgenet_assist.core.interactive import ClickSegmenter
    from surgenet_assist.training_loop.effort import (
        WORKFLOW_NAMES,
        annotate_video,
        fit_champion,
        keyframe_features,
        propagated_masks,
        ratio_interval,
        set_threads,
        summarize,
    )

    videos = load_videos(root)  # labels are checked before any model work
    set_threads(threads)
    backbone = load_backbone(weights=weights, random_init=random_init)
    for v in videos:
        v.features = keyframe_features(backbone, v.frames, short_side)
    segmenter = ClickSegmenter(backbone, short_side=short_side)
    model = TimeModel()
    per_workflow: dict[str, list] = {w: [] for w in "abcd"}
    for i, v in enumerate(videos):
        champion = fit_champion([o for j, o in enumerate(videos) if j != i], [], f"without-{v.name}")
        moved = propagated_masks(v)
        for w in per_workflow:
            per_workflow[w].append(annotate_video(v, w, champion, segmenter, model, propagated=moved))
        if progress:
            progress(f"{v.name}: " + ", ".join(f"({w}) {per_workflow[w][-1].hours:.3f} h" for w in "abcd"))
    a = [e.hours for e in per_workflow["a"]]
    ratios = {}
    for w in "bcd":
        r, lo, hi = ratio_interval([e.hours for e in per_workflow[w]], a)
        ratios[w] = {"ratio": round(r, 4), "ci95": [round(lo, 4), round(hi, 4)]}
    return {
        "videos": [v.name for v in videos],
        "time_model": model.as_dict(),
        "workflows": {f"{w} ({WORKFLOW_NAMES[w]})": summarize(e) for w, e in per_workflow.items()},
        "ratios_vs_a": ratios,
        "per_video": {w: [e.as_dict() for e in efforts] for w, efforts in per_workflow.items()},
    }


def register(app: typer.Typer) -> None:
    """Add ``effort`` to the CLI."""

    @app.command()
    def effort(
        videos: Annotated[
            Path, typer.Option("--videos", help="folder with one folder per labelled video (docs/effort.md)")
        ],
        out: Annotated[Path | None, typer.Option("--out", help="write the JSON report here")] = None,
        weights: Annotated[Path | None, typer.Option(help="backbone checkpoint")] = None,
        random_init: Annotated[bool, typer.Option("--random-init", help="random backbone (testing)")] = False,
        short_side: Annotated[int, typer.Option(help="feature input short side")] = 256,
        threads: Annotated[int, typer.Option(help="CPU threads")] = 1,
    ) -> None:
        """Estimated annotator hours to label these videos from scratch and with pre-annotation,
        propagation and the click engine, at the same quality (docs/effort.md)."""
        console = Console(stderr=True)
        report = run_effort(videos, weights, random_init, short_side, threads, progress=console.print)
        for name, s in report["workflows"].items():
            console.print(
                f"{name}: {s['hours_per_video']:.3f} ± {s['hours_per_video_ci95']:.3f} h per video, "
                f"{s['hours_total']:.2f} h in total"
            )
        text = json.dumps(report, indent=2)
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
        typer.echo(json.dumps({"workflows": report["workflows"], "ratios_vs_a": report["ratios_vs_a"]}))
