"""Label Studio: JSON exports and webhook bodies in, tasks with predictions out.

Results understood (``label-studio.md`` §3): ``brushlabels`` (brush RLE; all regions of one annotation form
one class-id mask, unpainted pixels are unlabelled), ``choices`` (CVS criteria C1-C3 -> 1.0 when chosen, or a
per-frame phase), ``timelinelabels`` (1-based inclusive frame ranges -> one phase-range label). Other result
types are reported as skipped.

Tasks name their frame with ``data.video_name`` + ``data.frame_index`` (what :func:`export_label_studio`
writes); otherwise ``<video>_<frame>.<ext>`` is parsed from ``data.image``. Video tasks
(``timelinelabels``) name their video with ``data.video_name`` or ``data.video``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..encoders import brush_rle_to_mask, labels_to_segments, mask_to_brush_rle
from ..errors import DatasetFormatError, SchemaError
from ..schema import DEFAULT_SCHEMA, LabelSchema
from ..store import LabelStore, to_utc
from ..store.payloads import cvs_payload, phase_payload, phase_segments_payload, segmentation_payload
from . import ImportReport, PendingLabel, VideoInfo, progress_iter, write_labels

IMAGE_RE = re.compile(r"^(?P<video>.+?)[_-](?:frame[_-]?)?(?P<frame>\d+)(?:_endo)?\.\w+$")
TRAIN_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
DELETE_ACTIONS = ("ANNOTATION_DELETED", "ANNOTATIONS_DELETED")


def _target(task: dict[str, Any]) -> tuple[str, int | None] | None:
    data = task.get("data") or {}
    if data.get("video_name") is not None:
        frame = data.get("frame_index")
        return str(data["video_name"]), None if frame is None else int(frame)
    image = data.get("image")
    if isinstance(image, str):
        m = IMAGE_RE.match(Path(image.split("?")[0]).name)
        if m:
            return m.group("video"), int(m.group("frame"))
    video = data.get("video")
    if isinstance(video, str):
        return Path(video.split("?")[0]).stem, None
    return None


def _author(annotation: dict[str, Any]) -> str | None:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return None if who is None else str(who)


def parse_annotation(
    task: dict[str, Any], annotation: dict[str, Any], schema: LabelSchema = DEFAULT_SCHEMA
) -> tuple[list[PendingLabel], list[str]]:
    """One Label Studio annotation -> labels to store, and reasons for the results it skipped.

    Raises DatasetFormatError (naming task and annotation) for labels unknown to the schema or broken RLE.
    """
    where = f"task {task.get('id')} annotation {annotation.get('id')}"
    target = _target(task)
    if target is None:
        raise DatasetFormatError(
            f"{where}: cannot tell which video/frame the task shows",
            "give the task data video_name and frame_index (export_label_studio writes them)",
        )
    video, frame = target
    common = dict(
        video=video,
        author=_author(annotation),
        source="label-studio",
        updated_at=to_utc(annotation.get("updated_at") or annotation.get("created_at")),
        ls_task_id=task.get("id"),
        ls_annotation_id=annotation.get("id"),
    )
    labels: list[PendingLabel] = []
    skipped: list[str] = []
    brush: list[dict[str, Any]] = []
    timeline: list[tuple[int, int, str]] = []
    try:
        for res in annotation.get("result") or []:
            kind = res.get("type")
            value = res.get("value") or {}
            if kind == "brushlabels":
                brush.append(res)
            elif kind == "choices":
                choices = value.get("choices") or []
                if frame is None:
                    skipped.append("choices on a video task (whole-clip labels are not stored)")
                elif choices and all(_is_cvs(c, schema) for c in choices):
                    vec = [0.0] * schema.num_cvs
                    for c in choices:
                        vec[schema.cvs_id(c)] = 1.0
                    labels.append(
                        PendingLabel(
                            frame_start=frame, task="cvs", payload=cvs_payload(vec, None, schema), **common
                        )
                    )
                elif len(choices) == 1:
                    labels.append(
                        PendingLabel(
                            frame_start=frame,
                            task="phase",
                            payload=phase_payload(choices[0], schema),
                            **common,
                        )
                    )
                else:
                    raise SchemaError(
                        f"choices {choices} are neither CVS criteria nor one phase",
                        f"use {schema.cvs_keys} or one of {schema.phase_names}",
                    )
            elif kind == "timelinelabels":
                for name in value.get("timelinelabels") or []:
                    for rng in value.get("ranges") or []:
                        timeline.append((int(rng["start"]) - 1, int(rng["end"]) - 1, name))
            else:
                skipped.append(f"unsupported result type {kind!r}")
        if brush:
            if frame is None:
                raise DatasetFormatError(f"{where}: brush labels on a task without a frame")
            h, w = int(brush[0]["original_height"]), int(brush[0]["original_width"])
            mask = np.full((h, w), schema.ignore_index, dtype=np.uint8)
            for res in brush:
                names = res["value"].get("brushlabels") or []
                if len(names) != 1:
                    raise DatasetFormatError(f"{where}: a brush region needs exactly one label, got {names}")
                alpha = brush_rle_to_mask(res["value"]["rle"], h, w)
                mask[alpha > 127] = schema.class_id(names[0])
            labels.append(
                PendingLabel(
                    frame_start=frame,
                    task="segmentation",
                    payload=segmentation_payload(mask, schema),
                    **common,
                )
            )
        if timeline:
            timeline.sort()
            labels.append(
                PendingLabel(
                    frame_start=timeline[0][0],
                    frame_end=max(t[1] for t in timeline),
                    task="phase",
                    payload=phase_segments_payload(timeline, schema),
                    **common,
                )
            )
    except (SchemaError, KeyError, TypeError, ValueError) as exc:
        msg = exc.message if isinstance(exc, SchemaError) else f"malformed result: {exc!r}"
        hint = exc.hint if isinstance(exc, SchemaError) else "check the export against label-studio.md §3"
        raise DatasetFormatError(f"{where}: {msg}", hint) from None
    return labels, skipped


def _is_cvs(name: str, schema: LabelSchema) -> bool:
    try:
        schema.cvs_id(name)
        return True
    except SchemaError:
        return False


def _collect(
    tasks: Sequence[dict[str, Any]], report: ImportReport, schema: LabelSchema, progress: bool
) -> tuple[list[PendingLabel], dict[str, VideoInfo]]:
    labels: list[PendingLabel] = []
    videos: dict[str, VideoInfo] = {}
    for task in progress_iter(tasks, progress, "label-studio", len(tasks)):
        if not isinstance(task, dict):
            raise DatasetFormatError("a Label Studio export must be a list of task objects")
        fps = (task.get("data") or {}).get("fps")
        for ann in task.get("annotations") or []:
            name = f"task {task.get('id')} annotation {ann.get('id')}"
            if ann.get("was_cancelled"):
                report.skip(name, "annotation was cancelled (skipped) in Label Studio")
                continue
            found, skipped = parse_annotation(task, ann, schema)
            for reason in skipped:
                report.skip(name, reason)
            for lab in found:
                videos.setdefault(lab.video, VideoInfo(fps=float(fps) if fps else None))
            labels.extend(found)
        if not task.get("annotations"):
            report.skip(f"task {task.get('id')}", "no annotations")
    return labels, videos


def import_label_studio(
    store: LabelStore,
    path: str | Path,
    *,
    project: str | None = None,
    schema: LabelSchema = DEFAULT_SCHEMA,
    progress: bool = False,
) -> ImportReport:
    """Import a Label Studio JSON export (list of tasks with annotations) in one transaction."""
    path = Path(path)
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetFormatError(f"cannot read Label Studio export {path}: {exc}", "export as JSON") from None
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list):
        raise DatasetFormatError(f"{path} is not a list of tasks", "use Label Studio's JSON export")
    report = ImportReport("label-studio", str(path))
    labels, videos = _collect(tasks, report, schema, progress)
    report.counts["labels read"] = len(labels)
    write_labels(store, videos, labels, report, project)
    return report


def ingest_webhook(
    store: LabelStore,
    body: dict[str, Any],
    *,
    project: str | None = None,
    schema: LabelSchema = DEFAULT_SCHEMA,
) -> dict[str, Any]:
    """Apply a Label Studio webhook body (``ANNOTATION_CREATED/UPDATED/DELETED``); other actions are ignored.

    Redelivery of the same body is a no-op (see LabelStore's idempotency rules).
    """
    action = body.get("action")
    if action in TRAIN_ACTIONS:
        report = ImportReport("label-studio-webhook", str(action))
        labels, videos = _collect(
            [dict(body.get("task") or {}, annotations=[body.get("annotation") or {}])], report, schema, False
        )
        write_labels(store, videos, labels, report, project)
        return {"action": action, **report.to_dict()}
    if action in DELETE_ACTIONS:
        anns = body.get("annotations") or [body.get("annotation") or {}]
        deleted = sum(
            store.delete_ls_annotation(int(a["id"]), a.get("updated_at")) for a in anns if "id" in a
        )
        return {"action": action, "deleted": deleted}
    return {"action": action, "ignored": True}


def _regions_for(task: str, payload: dict[str, Any], schema: LabelSchema, fps: float | None) -> list[dict]:
    if task == "segmentation":
        mask = payload["mask"]
        h, w = mask.shape
        return [
            {
                "id": f"seg{c}",
                "from_name": "seg",
                "to_name": "image",
                "type": "brushlabels",
                "original_width": int(w),
                "original_height": int(h),
                "image_rotation": 0,
                "value": {
                    "format": "rle",
                    "rle": mask_to_brush_rle(((mask == c) * 255).astype(np.uint8)),
                    "brushlabels": [schema.class_names[c]],
                },
            }
            for c in payload.get("classes", [])
        ]
    if task == "cvs":
        chosen = [k for k, v in zip(schema.cvs_keys, payload["values"], strict=True) if v >= 0.5]
        return (
            [
                {
                    "id": "cvs",
                    "from_name": "cvs",
                    "to_name": "image",
                    "type": "choices",
                    "value": {"choices": chosen},
                }
            ]
            if chosen
            else []
        )
    if "segments" in payload:
        ids = {n: i for i, n in enumerate(schema.phase_names)}
        end = max(s[1] for s in payload["segments"]) + 1
        labels = np.full(end, -1)
        for s, e, name in payload["segments"]:
            labels[s : e + 1] = ids[name]
        return [
            {
                "id": f"ph{i}",
                "from_name": "phases",
                "to_name": "video",
                "type": "timelinelabels",
                "value": {"ranges": [{"start": s, "end": e}], "timelinelabels": [schema.phase_names[p]]},
            }
            for i, (s, e, p) in enumerate(labels_to_segments(labels))
        ]
    return [
        {
            "id": "phase",
            "from_name": "phase",
            "to_name": "image",
            "type": "choices",
            "value": {"choices": [payload["phase"]]},
        }
    ]


def export_label_studio(
    store: LabelStore,
    out: str | Path,
    *,
    schema: LabelSchema = DEFAULT_SCHEMA,
    model_version: str | None = None,
) -> int:
    """Write Label Studio import tasks with the newest prediction per frame/task; returns the task count."""
    videos = {v["id"]: v for v in store.videos()}
    tasks: dict[tuple[int, int | None], dict[str, Any]] = {}
    for p in store.predictions_for(model_version=model_version):
        v = videos.get(p.video_id)
        if v is None:
            continue
        single = p.frame_start == p.frame_end and "segments" not in p.payload
        key = (p.video_id, p.frame_start if single else None)
        if key not in tasks:
            data: dict[str, Any] = {"video_name": v["path"]}
            if single:
                data.update(image=f"{v['path']}#frame={p.frame_start}", frame_index=p.frame_start)
            else:
                data.update(video=v["path"], fps=v["fps"])
            tasks[key] = {
                "data": data,
                "predictions": [{"model_version": p.model_version, "score": 0.0, "result": []}],
            }
        pred = tasks[key]["predictions"][0]
        pred["result"].extend(_regions_for(p.task, p.payload, schema, v["fps"]))
        if p.score is not None:
            pred["score"] = max(pred["score"], float(p.score))
        if p.model_version:
            pred["model_version"] = p.model_version
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(list(tasks.values()), indent=1), encoding="utf-8")
    return len(tasks)
