"""What Label Studio annotations *say*, for comparing exports: independent of region ids and order, of how a
mask is split into strokes or regions, and of RLE bytes. Decoded with the SDK's own brush decoder, never ours.

Fields that matter, per task (keyed by its data): for every non-cancelled annotation, its author
(``completed_by``) and per control (``from_name`` -> ``to_name``, ``type``): the composed class mask of brush
regions (later regions on top, alpha > 127 painted), the set of chosen choices, the labelled frames of a
timeline. Polygons are compared as masks by the tests that use them, not here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from label_studio_sdk.converter.brush import decode_rle

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "label_studio"


def fixture(name: str) -> Any:
    text = (FIXTURES / name).read_text(encoding="utf-8")
    return text if name.endswith(".xml") else json.loads(text)


def _mask(regions: list[dict[str, Any]]) -> tuple[tuple[int, int], dict[str, bytes]]:
    h, w = int(regions[0]["original_height"]), int(regions[0]["original_width"])
    canvas = np.full((h, w), -1, np.int32)
    names: list[str] = []
    for r in regions:
        label = r["value"]["brushlabels"][0]
        if label not in names:
            names.append(label)
        alpha = np.asarray(decode_rle(r["value"]["rle"])).reshape(h, w, 4)[:, :, 3]
        canvas[alpha > 127] = names.index(label)
    return (h, w), {n: np.packbits(canvas == i).tobytes() for i, n in enumerate(names) if (canvas == i).any()}


def annotation_semantics(annotation: dict[str, Any]) -> dict[str, Any]:
    by_control: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in annotation.get("result") or []:
        by_control.setdefault((r["from_name"], r["to_name"], r["type"]), []).append(r)
    out: dict[str, Any] = {"completed_by": annotation.get("completed_by")}
    for (name, to, kind), regions in sorted(by_control.items()):
        key = f"{kind}:{name}->{to}"
        if kind == "brushlabels":
            out[key] = _mask(regions)
        elif kind == "choices":
            out[key] = sorted(c for r in regions for c in r["value"]["choices"])
        elif kind == "timelinelabels":
            out[key] = sorted(
                (f, label)
                for r in regions
                for label in r["value"]["timelinelabels"]
                for rng in r["value"]["ranges"]
                for f in range(int(rng["start"]), int(rng["end"]) + 1)
            )
        else:
            out[key] = sorted(json.dumps(r["value"], sort_keys=True) for r in regions)
    return out


def task_key(task: dict[str, Any]) -> str:
    return json.dumps(task.get("data") or {}, sort_keys=True)


def export_semantics(tasks: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Task data -> the semantics of its non-cancelled, non-empty annotations (tasks without any left out)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for task in tasks:
        anns = [
            annotation_semantics(a)
            for a in task.get("annotations") or []
            if not a.get("was_cancelled") and a.get("result")
        ]
        if anns:
            out[task_key(task)] = sorted(anns, key=lambda a: json.dumps(a, sort_keys=True, default=str))
    return out


def assert_same_annotations(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> None:
    """Our export says what Label Studio's export says, task by task (a readable diff on failure)."""
    a, b = export_semantics(ours), export_semantics(theirs)
    assert sorted(a) == sorted(b), f"tasks differ: ours {sorted(a)} vs Label Studio {sorted(b)}"
    for key in b:
        assert len(a[key]) == len(b[key]), f"{key}: {len(a[key])} annotations vs {len(b[key])}"
        for x, y in zip(a[key], b[key], strict=True):
            assert x.keys() == y.keys(), f"{key}: controls {sorted(x)} vs {sorted(y)}"
            for k in y:
                assert x[k] == y[k], f"{key} {k}: ours {str(x[k])[:200]} vs Label Studio {str(y[k])[:200]}"
