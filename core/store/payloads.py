"""Label payloads: validated against the label schema before anything is written, stored compactly.

Three tasks, one payload shape each (JSON in the ``payload`` column, mask pixels as PNG bytes beside it):

* ``segmentation``: a (H, W) uint8 class-id mask (``IGNORE_INDEX`` = unlabelled) -> lossless PNG bytes;
  the JSON part records size and the classes present.
* ``phase``: one frame ``{"phase": "<name>"}`` or a range ``{"segments": [[start, end, "<name>"], ...]}`` with
  0-based inclusive frame indices; names are canonicalised through the schema (aliases accepted).
* ``cvs``: ``{"values": [c1, c2, c3], "raters": [[...], ...] | None}``, each value in [0, 1]
  (Endoscapes ``ds`` is the mean of three raters, so fractional values are kept).

Unknown class ids, phase names or CVS criteria raise :class:`SchemaError`: a label is never silently mapped.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DatasetFormatError, SchemaError
from ..schema import DEFAULT_SCHEMA, TASKS, LabelSchema


@dataclass(frozen=True)
class Payload:
    """A validated payload: JSON-safe ``data`` plus optional PNG ``mask`` bytes (segmentation only)."""

    task: str
    data: dict[str, Any]
    mask: bytes | None = None

    def digest(self) -> str:
        """Content hash: equal payloads (same labels) give equal digests, used for idempotent ingestion."""
        h = hashlib.sha256(self.task.encode())
        h.update(json.dumps(self.data, sort_keys=True, separators=(",", ":")).encode())
        if self.mask is not None:
            h.update(self.mask)
        return h.hexdigest()


def check_task(task: str) -> str:
    if task not in TASKS:
        raise SchemaError(f"unknown task {task!r}", f"use one of {list(TASKS)}")
    return task


# ---------------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------------
def mask_to_png(mask: np.ndarray) -> bytes:
    """Lossless, compact storage of a class-id mask (a 854x480 mask is typically a few kB)."""
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(mask), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:  # pragma: no cover - cv2 only fails on unsupported dtypes, checked before
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def png_to_mask(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W) uint8; a damaged PNG raises DatasetFormatError instead of returning garbage."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            arr = np.asarray(img)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetFormatError(f"stored mask is not a readable PNG: {exc}", "re-import the label") from None
    if arr.ndim == 3:
        arr = arr[:, :, 0]
    return np.ascontiguousarray(arr, dtype=np.uint8)


def validate_mask(mask: np.ndarray, schema: LabelSchema = DEFAULT_SCHEMA) -> np.ndarray:
    """Check a class-id mask: 2-D, integer, every value a class id of ``schema`` or its ignore index."""
    arr = np.asarray(mask)
    if arr.ndim != 2 or arr.size == 0:
        raise SchemaError(f"a segmentation mask must be a non-empty 2-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise SchemaError(f"a segmentation mask must hold integer class ids, got {arr.dtype}")
    values, counts = np.unique(arr, return_counts=True)
    bad = [
        (int(v), int(c))
        for v, c in zip(values, counts, strict=True)
        if not (0 <= v < schema.num_classes or v == schema.ignore_index)
    ]
    if bad:
        raise SchemaError(
            f"mask holds class ids unknown to schema {schema.name!r}: "
            + ", ".join(f"{v} ({c} px)" for v, c in bad[:10]),
            f"use ids 0..{schema.num_classes - 1} or {schema.ignore_index} (ignore)",
        )
    return arr.astype(np.uint8, copy=False)


# ---------------------------------------------------------------------------------------------------
# payload builders
# ---------------------------------------------------------------------------------------------------
def segmentation_payload(mask: np.ndarray, schema: LabelSchema = DEFAULT_SCHEMA) -> Payload:
    arr = validate_mask(mask, schema)
    present = sorted(int(v) for v in np.unique(arr) if v != schema.ignore_index)
    data = {"height": int(arr.shape[0]), "width": int(arr.shape[1]), "classes": present}
    return Payload("segmentation", data, mask_to_png(arr))


def _phase_name(name: Any, schema: LabelSchema) -> str:
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
        if not 0 <= int(name) < schema.num_phases:
            raise SchemaError(f"unknown phase id {name}", f"use 0..{schema.num_phases - 1}")
        return schema.phase_names[int(name)]
    return schema.phase_names[schema.phase_id(str(name))]


def phase_payload(phase: Any, schema: LabelSchema = DEFAULT_SCHEMA) -> Payload:
    """One frame's phase (name, alias or id)."""
    return Payload("phase", {"phase": _phase_name(phase, schema)})


def phase_segments_payload(
    segments: Sequence[tuple[int, int, Any]], schema: LabelSchema = DEFAULT_SCHEMA
) -> Payload:
    """Phase ranges ``[(start, end, phase)]``, 0-based inclusive frames, non-overlapping and in order."""
    out: list[list[Any]] = []
    prev_end = -1
    for seg in segments:
        start, end, phase = int(seg[0]), int(seg[1]), seg[2]
        if start < 0 or end < start or start <= prev_end:
            raise SchemaError(
                f"phase segment {start}..{end} is empty, negative or overlaps the previous (ends {prev_end})",
                "give segments in frame order, 0-based and inclusive",
            )
        out.append([start, end, _phase_name(phase, schema)])
        prev_end = end
    if not out:
        raise SchemaError("a phase range payload needs at least one segment")
    return Payload("phase", {"segments": out})


def cvs_payload(
    values: Sequence[float] | dict[str, float],
    raters: Sequence[Sequence[float]] | None = None,
    schema: LabelSchema = DEFAULT_SCHEMA,
) -> Payload:
    """CVS criteria values in [0, 1] (a dict may use keys like ``C1`` or criterion names)."""
    if isinstance(values, dict):
        vec = [0.0] * schema.num_cvs
        for key, v in values.items():
            vec[schema.cvs_id(str(key))] = v
        values = vec
    vals = _unit_vector(values, schema, "CVS values")
    rater_vals = None
    if raters is not None:
        rater_vals = [_unit_vector(r, schema, f"rater {i + 1} CVS values") for i, r in enumerate(raters)]
    return Payload("cvs", {"values": vals, "raters": rater_vals})


def _unit_vector(values: Sequence[Any], schema: LabelSchema, what: str) -> list[float]:
    try:
        vals = [float(v) for v in values]
    except (TypeError, ValueError):
        raise SchemaError(f"{what} must be numbers, got {values!r}") from None
    if len(vals) != schema.num_cvs or not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in vals):
        raise SchemaError(
            f"{what} must be {schema.num_cvs} numbers in [0, 1] ({schema.cvs_keys}), got {vals}",
            "Endoscapes 'ds' is [C1, C2, C3], each the mean of the raters' 0/1 votes",
        )
    return [round(v, 6) for v in vals]


def build_payload(task: str, value: Any, schema: LabelSchema = DEFAULT_SCHEMA) -> Payload:
    """Coerce what a front-end hands us into a validated :class:`Payload`.

    ``value`` may already be a Payload; a numpy mask (segmentation); a phase name / id, ``{"phase": ...}`` or
    ``{"segments": [...]}`` (phase); a list of 3 floats or ``{"values": [...], "raters": [...]}`` (cvs).
    """
    check_task(task)
    if isinstance(value, Payload):
        if value.task != task:
            raise SchemaError(f"payload is for task {value.task!r}, not {task!r}")
        return value
    if task == "segmentation":
        return segmentation_payload(np.asarray(value), schema)
    if task == "phase":
        if isinstance(value, dict) and "segments" in value:
            return phase_segments_payload(value["segments"], schema)
        if isinstance(value, dict):
            if "phase" not in value:
                raise SchemaError("a phase payload needs 'phase' or 'segments'")
            value = value["phase"]
        return phase_payload(value, schema)
    if isinstance(value, dict) and "values" in value:
        return cvs_payload(value["values"], value.get("raters"), schema)
    return cvs_payload(value, None, schema)


def decode_payload(task: str, data: dict[str, Any] | None, mask: bytes | None) -> dict[str, Any]:
    """Stored row -> dict for callers; segmentation gains ``mask`` (decoded numpy array)."""
    out = dict(data or {})
    if task == "segmentation" and mask is not None:
        out["mask"] = png_to_mask(mask)
    return out
