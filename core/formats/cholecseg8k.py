"""CholecSeg8k: ``videoXX/videoXX_<start>/frame_<n>_endo_color_mask.png`` (+ ``_watershed_mask.png``).

Colour masks are mapped through the schema's 13-class colour table; white (the 1-px border and unlabelled
pixels) becomes the ignore index. Any other colour is an error naming the colour and its pixel count: a
mask is never silently mapped to a wrong class. Frames with only a watershed mask use the watershed codes
(0 and 255 = unlabelled).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ..errors import DatasetFormatError
from ..schema import DEFAULT_SCHEMA, LabelSchema
from ..store import LabelStore
from ..store.payloads import segmentation_payload
from . import ImportReport, PendingLabel, VideoInfo, progress_iter, write_labels

FRAME_RE = re.compile(r"^frame_(\d+)_endo_(color_mask|watershed_mask)\.png$")
WHITE = (255, 255, 255)
CHOLEC80_FPS = 25.0


def read_png(path: Path, mode: str) -> np.ndarray:
    """Read a PNG fully (a truncated or corrupt file raises DatasetFormatError naming it)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img.convert(mode))
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetFormatError(
            f"cannot decode {path}: {exc}", "the file is truncated or not a PNG"
        ) from None


def colour_to_ids(rgb: np.ndarray, schema: LabelSchema = DEFAULT_SCHEMA, where: str = "mask") -> np.ndarray:
    """(H, W, 3) colour mask -> class ids; white -> ignore; unknown colours -> DatasetFormatError."""
    packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    values, inverse, counts = np.unique(packed.ravel(), return_inverse=True, return_counts=True)
    table = {(r << 16) | (g << 8) | b: c.id for c in schema.classes for r, g, b in [c.color]}
    table[(255 << 16) | (255 << 8) | 255] = schema.ignore_index
    unknown = [(int(v), int(n)) for v, n in zip(values, counts, strict=True) if int(v) not in table]
    if unknown:
        listed = ", ".join(f"RGB({v >> 16},{(v >> 8) & 255},{v & 255}): {n} px" for v, n in unknown[:8])
        raise DatasetFormatError(
            f"{where} has {len(unknown)} colour(s) outside the CholecSeg8k colour table: {listed}",
            "fix the mask (or the schema's class colours); unknown colours are never mapped silently",
        )
    lut = np.array([table[int(v)] for v in values], dtype=np.uint8)
    return lut[inverse].reshape(packed.shape)


def watershed_to_ids(
    grey: np.ndarray, schema: LabelSchema = DEFAULT_SCHEMA, where: str = "mask"
) -> np.ndarray:
    """(H, W) watershed codes -> class ids; 0 and 255 (unlabelled / border) -> ignore."""
    lut = np.full(256, -1, dtype=np.int32)
    for c in schema.classes:
        if c.watershed is not None:
            lut[c.watershed] = c.id
    lut[0] = lut[255] = schema.ignore_index
    ids = lut[grey]
    if (ids < 0).any():
        values, counts = np.unique(grey[ids < 0], return_counts=True)
        listed = ", ".join(f"{int(v)}: {int(n)} px" for v, n in zip(values[:8], counts[:8], strict=True))
        raise DatasetFormatError(
            f"{where} has watershed values outside the CholecSeg8k table: {listed}",
            "fix the mask; unknown values are never mapped silently",
        )
    return ids.astype(np.uint8)


def _video_of(frame_dir: Path) -> str:
    m = re.match(r"^(video\d+)_\d+$", frame_dir.name)
    return m.group(1) if m else frame_dir.name


def import_cholecseg8k(
    store: LabelStore,
    root: str | Path,
    *,
    project: str | None = None,
    schema: LabelSchema = DEFAULT_SCHEMA,
    progress: bool = False,
) -> ImportReport:
    """Import every frame mask under ``root``; all masks are decoded and checked before one write."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetFormatError(
            f"{root} is not a folder", "pass the CholecSeg8k root (with videoXX folders)"
        )
    report = ImportReport("cholecseg8k", str(root))
    frames: dict[tuple[Path, int], dict[str, Path]] = {}
    for path in sorted(root.rglob("frame_*_endo*.png")):
        m = FRAME_RE.match(path.name)
        if m:
            frames.setdefault((path.parent, int(m.group(1))), {})[m.group(2)] = path
        elif not path.name.endswith(("_endo.png", "_endo_mask.png")):
            report.skip(str(path.relative_to(root)), "file name is not frame_<n>_endo_*_mask.png")
    for img in sorted(root.rglob("frame_*_endo.png")):
        m = re.match(r"^frame_(\d+)_endo\.png$", img.name)
        if m and (img.parent, int(m.group(1))) not in frames:
            report.skip(str(img.relative_to(root)), "image without colour or watershed mask")
    if not frames:
        raise DatasetFormatError(
            f"no CholecSeg8k masks under {root}",
            "expected videoXX/videoXX_<start>/frame_<n>_endo_color_mask.png files",
        )
    labels: list[PendingLabel] = []
    videos: dict[str, VideoInfo] = {}
    for (folder, n), files in progress_iter(sorted(frames.items()), progress, "cholecseg8k", len(frames)):
        if "color_mask" in files:
            src = files["color_mask"]
            ids = colour_to_ids(read_png(src, "RGB"), schema, str(src))
        else:
            src = files["watershed_mask"]
            ids = watershed_to_ids(read_png(src, "L"), schema, str(src))
        video = _video_of(folder)
        info = videos.setdefault(video, VideoInfo(fps=CHOLEC80_FPS))
        info.frame_count = max(info.frame_count or 0, n + 1)
        image = folder / f"frame_{n}_endo.png"
        labels.append(
            PendingLabel(
                video=video,
                frame_start=n,
                task="segmentation",
                payload=segmentation_payload(ids, schema),
                author="cholecseg8k",
                updated_at=datetime.fromtimestamp(src.stat().st_mtime, UTC).replace(tzinfo=None),
                image_path=str(image) if image.exists() else None,
            )
        )
    report.counts["masks read"] = len(labels)
    write_labels(store, videos, labels, report, project)
    return report


def export_cholecseg8k(
    store: LabelStore,
    out: str | Path,
    *,
    split: str | None = None,
    schema: LabelSchema = DEFAULT_SCHEMA,
) -> int:
    """Write the training labels as CholecSeg8k colour + watershed PNGs; returns the number of frames."""
    import cv2

    out = Path(out)
    palette = schema.palette()
    palette[schema.ignore_index] = WHITE
    ws = np.zeros(256, dtype=np.uint8)
    for c in schema.classes:
        ws[c.id] = c.watershed if c.watershed is not None else 0
    ws[schema.ignore_index] = 0
    n = 0
    for lab in store.training_labels("segmentation", split):
        if lab.frame_start != lab.frame_end:
            continue
        video = Path(lab.video_path).name
        f = lab.frame_start
        folder = out / video / f"{video}_{f - f % 80:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        mask = lab.payload["mask"]
        cv2.imwrite(str(folder / f"frame_{f}_endo_color_mask.png"), palette[mask][:, :, ::-1])
        cv2.imwrite(str(folder / f"frame_{f}_endo_watershed_mask.png"), ws[mask])
        n += 1
    return n
