"""Endoscapes2023 CVS labels from COCO JSON (``annotation_ds_coco.json`` / ``annotation_coco_vid.json``).

``images[].ds`` = [C1, C2, C3], each the mean of three raters' 0/1 votes: the fractional value is kept as
is. Per-rater values are kept when present, either on the image (``cvs_annotator_1..3``) or in the
dataset's ``all_metadata.csv`` (columns ``vid``, ``frame``, ``cvs_annotator_1..3``). Images flagged
``is_ds_keyframe: false`` carry the last labelled value forward (a causal fill), not a rater's label, so
they are skipped. File names are ``<video>_<frame>.jpg``.
"""

from __future__ import annotations

import ast
import csv
import json
import re
from pathlib import Path
from typing import Any

from ..errors import DatasetFormatError, SchemaError
from ..schema import DEFAULT_SCHEMA, LabelSchema
from ..store import LabelStore
from ..store.payloads import cvs_payload
from . import ImportReport, PendingLabel, VideoInfo, progress_iter, write_labels

NAME_RE = re.compile(r"^(\d+)_(\d+)\.\w+$")
JSON_NAMES = ("annotation_ds_coco.json", "annotation_coco_vid.json", "annotation_coco.json")


def _rater_list(value: Any) -> list[float] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return None
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return None


def _metadata(folder: Path) -> dict[tuple[int, int], list[list[float]]]:
    """Per-rater CVS from ``all_metadata.csv`` next to or above the JSON, if there is one."""
    for candidate in (folder / "all_metadata.csv", folder.parent / "all_metadata.csv"):
        if candidate.exists():
            out = {}
            with candidate.open(newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh):
                    raters = [_rater_list(row.get(f"cvs_annotator_{i}")) for i in (1, 2, 3)]
                    if all(r is not None for r in raters) and row.get("vid") and row.get("frame"):
                        out[(int(float(row["vid"])), int(float(row["frame"])))] = raters
            return out
    return {}


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetFormatError(
            f"cannot read COCO JSON {path}: {exc}", "pass an Endoscapes COCO file"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetFormatError(
            f"{path} has no 'images' list", "Endoscapes COCO JSON needs images[] with file_name and ds"
        )
    return data


def import_endoscapes(
    store: LabelStore,
    path: str | Path,
    *,
    project: str | None = None,
    schema: LabelSchema = DEFAULT_SCHEMA,
    progress: bool = False,
) -> ImportReport:
    """Import CVS labels from one COCO JSON or every Endoscapes JSON under a folder (split = its folder)."""
    path = Path(path)
    if path.is_dir():
        files = [p for name in JSON_NAMES for p in sorted(path.rglob(name))]
        # one JSON per split folder is enough: prefer the ds file, which has the keyframes
        by_dir: dict[Path, Path] = {}
        for f in files:
            by_dir.setdefault(f.parent, f)
        files = sorted(by_dir.values())
    else:
        files = [path]
    if not files or not files[0].exists():
        raise DatasetFormatError(f"no Endoscapes COCO JSON at {path}", f"expected one of {list(JSON_NAMES)}")
    report = ImportReport("endoscapes", str(path))
    labels: list[PendingLabel] = []
    videos: dict[str, VideoInfo] = {}
    seen: set[tuple[str, int]] = set()
    for f in progress_iter(files, progress, "endoscapes"):
        data = _load(f)
        raters_csv = _metadata(f.parent)
        split = f.parent.name if f.parent.name in ("train", "val", "test") else None
        problems: list[str] = []
        for i, img in enumerate(data["images"]):
            where = f"{f.name}: images[{i}]"
            if not isinstance(img, dict):
                problems.append(f"{where} is not an object")
                continue
            missing = [k for k in ("id", "file_name") if k not in img]
            if missing:
                problems.append(f"{where} lacks {missing}")
                continue
            m = NAME_RE.match(Path(str(img["file_name"])).name)
            if not m:
                problems.append(f"{where} file_name {img['file_name']!r} is not <video>_<frame>.jpg")
                continue
            vid, frame = int(m.group(1)), int(m.group(2))
            if img.get("ds") is None:
                report.skip(f"{f.name}:{img['file_name']}", "no 'ds' (not a CVS keyframe)")
                continue
            if img.get("is_ds_keyframe") is False:
                report.skip(f"{f.name}:{img['file_name']}", "not a ds keyframe (carried-forward value)")
                continue
            raters = [_rater_list(img.get(f"cvs_annotator_{k}")) for k in (1, 2, 3)]
            rater_vals = raters if all(r is not None for r in raters) else raters_csv.get((vid, frame))
            try:
                payload = cvs_payload(img["ds"], rater_vals, schema)
            except SchemaError as exc:
                problems.append(f"{where} ({img['file_name']}): {exc.message}")
                continue
            video = f"endoscapes/{vid}"
            if (video, frame) in seen:
                report.skip(f"{f.name}:{img['file_name']}", "same frame already read from another file")
                continue
            seen.add((video, frame))
            info = videos.setdefault(video, VideoInfo(split=split))
            info.frame_count = max(info.frame_count or 0, frame + 1)
            labels.append(
                PendingLabel(
                    video=video,
                    frame_start=frame,
                    task="cvs",
                    payload=payload,
                    author="endoscapes2023",
                    image_path=str(f.parent / img["file_name"]),
                )
            )
        if problems:
            raise DatasetFormatError(
                f"{f} is not valid Endoscapes COCO ({len(problems)} problem(s)): " + "; ".join(problems[:5]),
                "every image needs id, file_name '<video>_<frame>.jpg' and ds = [C1, C2, C3] in [0, 1]",
            )
        if data.get("annotations"):
            report.skip(
                f"{f.name}: {len(data['annotations'])} object annotations",
                "detection/instance annotations are not imported (CVS only)",
            )
    report.counts["cvs labels read"] = len(labels)
    write_labels(store, videos, labels, report, project)
    return report
