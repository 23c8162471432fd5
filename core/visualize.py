"""Pictures people look at: overlays, phase timelines, learning curves, confusion matrices (PNG).

Figures are built with `matplotlib.figure.Figure`, never pyplot, so library code picks no GUI backend and
leaves no global figure state behind (napari and the backend run Qt and threads beside it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from .schema import LabelSchema


def colorize_mask(mask: np.ndarray, schema: LabelSchema) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) RGB in the schema's class colours."""
    return schema.palette()[mask]


def overlay(image: np.ndarray, mask: np.ndarray, schema: LabelSchema, alpha: float = 0.45) -> np.ndarray:
    """Blend class colours over the frame, with class boundaries drawn solid so small regions stay visible."""
    color = colorize_mask(mask, schema)
    out = cv2.addWeighted(image, 1 - alpha, color, alpha, 0)
    edges = cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    out[edges] = color[edges]
    return out


def write_png(path: str | Path, rgb_or_ids: np.ndarray) -> Path:
    """Write a PNG (RGB or single-channel); raises on failure instead of OpenCV's silent False."""
    path = Path(path)
    image = rgb_or_ids if rgb_or_ids.ndim == 2 else cv2.cvtColor(rgb_or_ids, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")
    return path


def timeline_png(
    path: str | Path,
    schema: LabelSchema,
    tracks: dict[str, np.ndarray],
    timestamps: np.ndarray | None = None,
    title: str = "Surgical phases",
    cvs: np.ndarray | None = None,
) -> Path:
    """One colour strip per track (e.g. 'predicted', 'ground truth'), a legend, optional CVS curves."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    names = list(tracks)
    n = len(next(iter(tracks.values())))
    x = np.asarray(timestamps if timestamps is not None else np.arange(n), dtype=float)
    step = float(np.median(np.diff(x))) if n > 1 else 1.0
    rows = len(names) + (1 if cvs is not None else 0)
    fig = Figure(figsize=(11, 0.7 * len(names) + (1.6 if cvs is not None else 0) + 1.2))
    axes = fig.subplots(
        rows,
        1,
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": [1] * len(names) + ([2.2] if cvs is not None else [])},
    )
    colors = np.array([p.color for p in schema.phases]) / 255.0
    for ax, name in zip(axes[:, 0], names, strict=False):
        labels = np.asarray(tracks[name])
        ax.broken_barh(
            [(float(x[i]), step) for i in range(n)], (0, 1), facecolors=[colors[int(lab)] for lab in labels]
        )
        ax.set_yticks([0.5], [name])
        ax.set_ylim(0, 1)
    if cvs is not None:
        ax = axes[-1, 0]
        for j, key in enumerate(schema.cvs_keys):
            ax.plot(x, cvs[:, j], label=f"CVS {key}")
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("probability")
        ax.legend(loc="upper left", fontsize=7, ncol=3)
    axes[-1, 0].set_xlabel("time (s)" if timestamps is not None else "frame")
    handles = [Patch(color=colors[p.id], label=p.name) for p in schema.phases]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def learning_curves_png(
    path: str | Path, curves: dict[str, Sequence[float]], title: str = "Training loss"
) -> Path:
    """Loss per epoch, one line per curve."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for name, values in curves.items():
        if len(values):
            ax.plot(range(1, len(values) + 1), values, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def confusion_png(path: str | Path, confusion: np.ndarray, names: Sequence[str], title: str) -> Path:
    """A row-normalised confusion matrix (rows: ground truth, columns: prediction)."""
    from matplotlib.figure import Figure

    conf = np.asarray(confusion, float)
    norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)
