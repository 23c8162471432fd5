"""Writes a video's predictions to a folder: masks, overlays, phases.csv, cvs.csv, timeline PNG, summary."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from .predictor import FramePrediction, VideoPrediction
from .schema import LabelSchema
from .visualize import overlay, timeline_png, write_png


def write_csv(path: Path, header: list[str], rows) -> None:  # noqa: ANN001 - any iterable of lists
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


class PredictionWriter:
    """Streaming sink for :meth:`Predictor.predict_video`'s ``on_frame``; ``finish`` writes the summaries.

    Layout: ``masks/frame_000123.png`` (class ids), ``overlays/frame_000123.png`` (every
    ``overlay_every``-th frame), ``phases.csv``, ``cvs.csv``, ``timeline.png``, ``summary.json``.
    """

    def __init__(self, out_dir: str | Path, schema: LabelSchema, overlay_every: int = 1) -> None:
        self.out = Path(out_dir)
        self.schema = schema
        self.overlay_every = max(1, overlay_every)
        (self.out / "masks").mkdir(parents=True, exist_ok=True)
        (self.out / "overlays").mkdir(parents=True, exist_ok=True)
        self.count = 0

    def __call__(self, pred: FramePrediction, image: np.ndarray) -> None:
        name = f"frame_{pred.index:06d}.png"
        write_png(self.out / "masks" / name, pred.mask)
        if self.count % self.overlay_every == 0:
            write_png(self.out / "overlays" / name, overlay(image, pred.mask, self.schema))
        self.count += 1

    def finish(
        self, video: VideoPrediction, ground_truth_phases: np.ndarray | None = None, extra: dict | None = None
    ) -> dict:
        schema = self.schema
        rows = range(len(video.indices))

        def lead(i: int) -> list:
            return [int(video.indices[i]), f"{video.timestamps[i]:.3f}"]

        write_csv(
            self.out / "phases.csv",
            [
                "frame",
                "timestamp",
                "phase_id",
                "phase",
                "frame_phase_id",
                *[f"p_{n}" for n in schema.phase_names],
            ],
            (
                lead(i)
                + [
                    int(video.phase_labels[i]),
                    schema.phases[int(video.phase_labels[i])].name,
                    int(video.phase_probs[i].argmax()),
                    *[f"{p:.4f}" for p in video.phase_timeline_probs[i]],
                ]
                for i in rows
            ),
        )
        tasks = ("segmentation", "phase", "cvs")
        write_csv(
            self.out / "cvs.csv",
            ["frame", "timestamp", *schema.cvs_keys, *[f"uncertainty_{k}" for k in tasks]],
            (
                lead(i)
                + [
                    *[f"{p:.4f}" for p in video.cvs_probs[i]],
                    *[f"{video.uncertainty[k][i]:.4f}" for k in tasks],
                ]
                for i in rows
            ),
        )
        tracks = {"predicted": video.phase_labels}
        if ground_truth_phases is not None:
            tracks["ground truth"] = np.asarray(ground_truth_phases)
        timeline_png(self.out / "timeline.png", schema, tracks, video.timestamps, cvs=video.cvs_probs)
        summary = {
            "frames": int(len(video.indices)),
            "segments": [
                {"start_frame": s, "end_frame": e, "phase": schema.phases[p].name}
                for s, e, p in video.segments
            ],
            "mean_uncertainty": {k: float(np.mean(v)) for k, v in video.uncertainty.items()},
        } | (extra or {})
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
