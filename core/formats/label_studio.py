"""Label Studio <-> label store: the one translator of Label Studio JSON.

The importer (JSON exports), the exporter, webhook ingestion and reconciliation
(:mod:`surgenet_assist.core.label_studio_sync`) and the ML backend's prediction builder all go through this
module; control names always come from a labeling config (:mod:`.ls_config`): the project's, or
the one ``surgenet-assist ls config`` generates (brush control ``mask``, choices ``cvs`` and ``phase``,
timeline ``phases``).

One policy for each question (label-studio.md section 3 for the result shapes):

* **Which frame a task shows** (:func:`task_target`). Image tasks name their frame with ``data.source_video``
  and ``data.frame_index`` (what ``ls setup-project`` imports and :func:`export_label_studio` writes;
  ``data.video_name``, written by earlier exports, is read too); without them the file name
  ``<video>_<frame>.<ext>`` (``video01_frame_000120.png``, also behind Label Studio's upload prefix) names it;
  otherwise the image URL itself is a one-frame video (frame 0). Video tasks are their ``source_video`` or
  their video URL, and their labels carry frame ranges.
* **Identity of a label**: the Label Studio annotation id, the store video, the frame(s) and the task -- the
  store's own :func:`~surgenet_assist.core.store.annotation_key` for ``ls_annotation_id``. An update of the
  same annotation appends a revision, a redelivery changes nothing current, and an import of an export of what
  webhooks already delivered adds nothing.
* **Author**: ``ls-user:<id>`` from the annotation's ``completed_by`` (:func:`ls_author`); the exporter writes
  the id back.
* **Labels the schema does not know** are refused with a :class:`SchemaError` that names the task, the
  annotation, the label and the fix; never skipped, never mapped to something else (a config may map its
  label values to the schema's names with ``predicted_values``). Regions of controls that are not ours (a
  rectangle, a "quality" choice) are skipped with a reason.
* **Masks**: the brush and polygon regions of an annotation form one class-id mask (later regions on top;
  unpainted pixels are unlabelled). **Phases**: a single choice per frame, or ``timelinelabels`` ranges
  (1-based inclusive in Label Studio, 0-based inclusive in the store; counted at the config's ``frameRate``,
  which ``ls setup-project`` sets to the video's FPS). **CVS**: a multiple choice of criteria,
  or one yes/no control per criterion. Choices on a video task (a whole-clip CVS) have no store label and are
  skipped with a reason.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from ..encoders import brush_rle_to_mask, mask_to_brush_rle
from ..errors import DatasetFormatError, SchemaError, SurgenetAssistError
from ..schema import DEFAULT_SCHEMA, TASKS, LabelSchema
from ..store import LabelRecord, LabelStore, Provenance, to_utc
from ..store.payloads import cvs_payload, phase_payload, phase_segments_payload, segmentation_payload
from ..store.records import SOURCES
from . import ImportReport, PendingLabel, VideoInfo, progress_iter, write_labels
from .ls_config import (
    BRUSH,
    CVS_CRITERION,
    CVS_MULTI,
    PHASE_CHOICE,
    POLYGON,
    TIMELINE,
    ConfigPlan,
    ControlPlan,
    image_config,
    parse_label_config,
    video_config,
)

SOURCE = "label-studio"
#: task data keys: the store video of an image task (written and read), and the older spelling (read only)
VIDEO_KEY, LEGACY_VIDEO_KEYS, FRAME_KEY = "source_video", ("video_name",), "frame_index"
AUTHOR_PREFIX = "ls-user:"
IMAGE_RE = re.compile(r"^(?P<video>.+?)[_-](?:frame[_-]?)?(?P<frame>\d+)(?:_endo)?\.\w+$")
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")  # Label Studio prefixes uploaded file names with a hash
#: CVS criterion counts as met at or above this probability (predictions) or value (human labels)
CVS_THRESHOLD = 0.5
#: polygons smaller than this fraction of the image are noise, not regions
MIN_POLYGON_AREA = 0.0005
#: polygon simplification tolerance, fraction of the contour's perimeter
POLYGON_EPSILON = 0.002


# ----------------------------------------------------------------------------------------------------------
# tasks, authors
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskTarget:
    """Where a Label Studio task's labels live in the store."""

    video: str  # store video path
    frame: int | None  # the frame an image task shows; None for a video task (labels carry ranges)
    media_key: str  # task data key of the media ("image" for value="$image")
    media: str | None  # the media URL

    @property
    def kind(self) -> str:
        return "image" if self.frame is not None else "video"


def _media_name(url: str) -> str:
    """The file name behind a task URL (``/data/local-files/?d=a/b.png`` -> ``b.png``; upload hash cut)."""
    parts = urlsplit(url)
    path = (parse_qs(parts.query).get("d") or [parts.path])[0]
    name = Path(path).name
    return _UPLOAD_PREFIX.sub("", name) if "/data/upload/" in parts.path else name


def task_target(task: dict[str, Any], plan: ConfigPlan | None = None) -> TaskTarget:
    """The store video and frame of a task (module docstring: "Which frame a task shows")."""
    data = task.get("data")
    if not isinstance(data, dict):
        raise DatasetFormatError(f"task {task.get('id')} has no 'data' object", "send Label Studio task JSON")
    kinds = {c.value_key: c.object_tag for c in plan.controls} if plan is not None else {}
    kinds.update({k: k for k in ("image", "video") if k not in kinds})
    key = next((k for k in kinds if isinstance(data.get(k), str) and data[k]), None)
    kind = kinds.get(key) if key else ("video" if data.get(FRAME_KEY) is None else "image")
    named = next((data[k] for k in (VIDEO_KEY, *LEGACY_VIDEO_KEYS) if data.get(k) not in (None, "")), None)
    url = data[key] if key else None
    if named is not None:
        frame = data.get(FRAME_KEY)
        try:
            frame = None if frame is None and kind == "video" else int(frame or 0)
        except (TypeError, ValueError):
            raise DatasetFormatError(
                f"task {task.get('id')}: {FRAME_KEY} {frame!r} is not an integer",
                "use the 0-based frame number",
            ) from None
        return TaskTarget(str(named), frame, key or kind, url)
    if url is None:
        raise DatasetFormatError(
            f"task {task.get('id')} names no image or video (data keys {sorted(data)[:10]})",
            f"give the task data the labeling config's media key, or {VIDEO_KEY} and {FRAME_KEY}",
        )
    if kind == "video":
        return TaskTarget(url, None, key, url)
    m = IMAGE_RE.match(_media_name(url))
    if m:
        return TaskTarget(m.group("video"), int(m.group("frame")), key, url)
    return TaskTarget(url, 0, key, url)


STORE_PROJECT_PREFIX = "label-studio-"


def ls_project_id(project: Any) -> int | None:
    """Label Studio's project id from what its requests carry: an int, ``"<id>.<timestamp>"`` (``/setup`` and
    ``/predict``), or a project object (webhooks); None when there is none."""
    if isinstance(project, dict):
        project = project.get("id")
    if isinstance(project, bool) or project is None:
        return None
    try:
        return int(str(project).split(".", 1)[0])
    except ValueError:
        return None


def store_project_name(project: Any, override: str | None = None) -> str | None:
    """The label-store project that holds a Label Studio project's labels, predictions, queue and models:
    ``label-studio-<id>``, so that projects never mix. ``override`` (a deployment that wants every Label
    Studio project in one store project) wins; None when the request names no project (the store default)."""
    if override:
        return override
    pid = ls_project_id(project)
    return None if pid is None else f"{STORE_PROJECT_PREFIX}{pid}"


def ls_author(annotation: dict[str, Any]) -> str | None:
    """``ls-user:<id>`` of who completed an annotation (``completed_by``: a user id, or a user object)."""
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("id")
    return None if who is None else f"{AUTHOR_PREFIX}{who}"


def ls_user_id(author: str | None) -> int | None:
    """The Label Studio user id behind an author written by :func:`ls_author` (None for other authors)."""
    if author and author.startswith(AUTHOR_PREFIX) and author[len(AUTHOR_PREFIX) :].isdigit():
        return int(author[len(AUTHOR_PREFIX) :])
    return None


#: the key our exporter writes on each annotation: what Label Studio's own fields cannot hold (a store author
#: that is no Label Studio user, the source, the model version a label started from); the importer reads it
EXPORT_KEY = "surgenet_assist"
MODEL_VERSION_CHARS = 200  # the store's column


def ls_provenance(annotation: dict[str, Any], task: dict[str, Any]) -> Provenance:
    """How a Label Studio annotation came to be, from Label Studio's own fields (label-studio.md section 8).

    ``parent_prediction`` set: it started from that prediction, whose ``model_version`` is looked up in the
    task's ``predictions`` (the API's task and ``fields=all`` pages list them; a JSON export lists only their
    ids, and then the version is unknown). "Create annotations from predictions" leaves ``lead_time`` and
    ``updated_by`` empty: nobody has looked at it, so it is unreviewed until the editor (``lead_time``) or an
    API update (``updated_by``) touches it. ``ground_truth``: the task's ground-truth star.
    """
    ground_truth = annotation.get("ground_truth") is True
    parent = annotation.get("parent_prediction")
    if parent is None or isinstance(parent, bool):
        return Provenance(ground_truth=ground_truth)
    touched = annotation.get("lead_time") is not None or annotation.get("updated_by") is not None
    version = _prediction_version(parent, task)
    return Provenance.started_from(version, reviewed=touched, ground_truth=ground_truth)


def _prediction_version(parent: Any, task: dict[str, Any]) -> str | None:
    """The model version of the prediction ``parent`` (an id, or an expanded prediction object)."""
    if isinstance(parent, dict):
        version, parent = parent.get("model_version"), parent.get("id")
    else:
        version = None
    predictions = task.get("predictions")
    if version is None and isinstance(predictions, list):  # anything else names no prediction
        for pred in predictions:
            if isinstance(pred, dict) and pred.get("id") == parent and pred.get("id") is not None:
                version = pred.get("model_version")
                break
    return version[:MODEL_VERSION_CHARS] if isinstance(version, str) and version else None


def _export_origin(annotation: dict[str, Any], where: str) -> tuple[str, str | None, Provenance] | None:
    """(source, author, provenance) our exporter wrote under :data:`EXPORT_KEY`; None without it. Anything
    malformed there is a :class:`DatasetFormatError` naming the annotation."""
    meta = annotation.get(EXPORT_KEY)
    if meta is None:
        return None
    hint = f"remove the '{EXPORT_KEY}' object of that annotation, or export again with surgenet-assist"
    if not isinstance(meta, dict):
        raise DatasetFormatError(f"{where}: '{EXPORT_KEY}' is not an object", hint)
    source, author, version = meta.get("source"), meta.get("author"), meta.get("model_version")
    flags = {k: meta.get(k, d) for k, d in (("from_prediction", False), ("reviewed", True))}
    if source not in SOURCES:
        raise DatasetFormatError(
            f"{where}: '{EXPORT_KEY}.source' {source!r} is not one of {list(SOURCES)}", hint
        )
    for name, value in (("author", author), ("model_version", version)):
        if value is not None and (not isinstance(value, str) or len(value) > MODEL_VERSION_CHARS):
            raise DatasetFormatError(
                f"{where}: '{EXPORT_KEY}.{name}' must be a string of at most {MODEL_VERSION_CHARS} "
                "characters",
                hint,
            )
    if not all(isinstance(v, bool) for v in flags.values()):
        raise DatasetFormatError(f"{where}: '{EXPORT_KEY}' flags must be true or false: {flags}", hint)
    try:
        ground_truth = annotation.get("ground_truth") is True
        prov = Provenance(flags["from_prediction"], version, flags["reviewed"], ground_truth)
    except ValueError as exc:
        raise DatasetFormatError(f"{where}: '{EXPORT_KEY}' is contradictory: {exc}", hint) from None
    return source, author, prov


def ls_integer(value: Any, what: str) -> int:
    """An id Label Studio sends (``annotation.id``, ``task.id``) as an int; anything else is refused."""
    if isinstance(value, bool):
        value = None
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise DatasetFormatError(
            f"{what} {str(value)[:40]!r} is not an integer", "send Label Studio's JSON unchanged"
        ) from None


# ----------------------------------------------------------------------------------------------------------
# Label Studio -> store
# ----------------------------------------------------------------------------------------------------------
class LabelStudioTranslator:
    """Reads annotations and writes result regions for one labeling config (``plan``) and label schema.

    Without a plan (an export read on its own) regions are classified by their type and values: brush and
    polygon labels are segmentation classes, choices are CVS criteria when all of them are, else one phase.
    """

    def __init__(self, plan: ConfigPlan | None = None, schema: LabelSchema = DEFAULT_SCHEMA) -> None:
        self.plan = plan
        self.schema = schema
        self._controls = {c.name: c for c in plan.controls} if plan is not None else {}
        self._skipped = {c["control"]: c["reason"] for c in plan.skipped_controls} if plan is not None else {}

    @classmethod
    def for_config(
        cls, label_config: str | None, schema: LabelSchema = DEFAULT_SCHEMA
    ) -> LabelStudioTranslator:
        """A translator for a labeling config's XML (None: no config, classify by type and values)."""
        return cls(parse_label_config(label_config, schema) if label_config else None, schema)

    def target(self, task: dict[str, Any]) -> TaskTarget:
        return task_target(task, self.plan)

    def read(
        self, task: dict[str, Any], annotation: dict[str, Any], *, our_export: bool = False
    ) -> tuple[list[PendingLabel], list[str]]:
        """One annotation of a task -> the labels to store, and the reasons for the regions it skipped.

        Each label carries the annotation's provenance (:func:`ls_provenance`). ``our_export``: the file is
        one :func:`export_label_studio` wrote (an import, never a webhook), so an annotation's
        :data:`EXPORT_KEY` object, when it has one, gives its source, author and provenance back exactly.

        Raises :class:`SchemaError` for a label the schema does not know and :class:`DatasetFormatError` for
        a malformed region, both naming the task and the annotation.
        """
        where = f"task {task.get('id')} annotation {annotation.get('id')}"
        target = self.target(task)
        ann_id = annotation.get("id")
        origin = _export_origin(annotation, where) if our_export else None
        source, author, provenance = origin or (
            SOURCE, ls_author(annotation), ls_provenance(annotation, task)
        )
        from_ls = source == SOURCE  # a label that came from elsewhere (napari) keeps no Label Studio ids
        common = dict(
            video=target.video,
            author=author,
            source=source,
            updated_at=to_utc(annotation.get("updated_at") or annotation.get("created_at")),
            ls_task_id=task.get("id") if from_ls else None,
            ls_annotation_id=None if ann_id is None or not from_ls else ls_integer(ann_id, "annotation id"),
            image_path=target.media if target.kind == "image" and target.media != target.video else None,
            provenance=provenance,
        )
        mask: np.ndarray | None = None
        phase: str | None = None
        segments: list[tuple[int, int, str]] = []
        cvs: list[float] | None = None
        skipped: list[str] = []
        for region in annotation.get("result") or []:
            try:
                kind, value = self._classify(region)
                if kind is None:
                    skipped.append(value)
                elif target.frame is None and kind in ("mask", "phase", "cvs", "cvs_criterion"):
                    skipped.append(
                        f"{region.get('type')} {region.get('from_name')!r} on a video task (the store keeps "
                        "frame labels and phase ranges, not whole-clip labels)"
                    )
                elif kind == "mask":
                    mask = self._paint(mask, region, value)
                elif kind == "phase":
                    phase = value
                elif kind == "cvs":
                    cvs = cvs or [0.0] * self.schema.num_cvs
                    for cid in value:
                        cvs[cid] = 1.0
                elif kind == "cvs_criterion":
                    cvs = cvs or [0.0] * self.schema.num_cvs
                    cvs[value[0]] = value[1]
                elif kind == "segments":
                    segments += value
            except SurgenetAssistError as exc:
                raise type(exc)(f"{where}: {exc.message}", exc.hint) from None
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise DatasetFormatError(
                    f"{where}: malformed {region.get('type') if isinstance(region, dict) else 'region'} "
                    f"region {region.get('id') if isinstance(region, dict) else region!r}: {exc!r}",
                    "compare the region with what Label Studio exports for this control (docs/store.md)",
                ) from None
        labels: list[PendingLabel] = []
        frame = target.frame or 0

        def add(task: str, payload: Any, start: int = frame, end: int | None = None) -> None:
            labels.append(
                PendingLabel(frame_start=start, frame_end=end, task=task, payload=payload, **common)
            )

        try:
            if mask is not None:
                add("segmentation", segmentation_payload(mask, self.schema))
            if segments:
                segments.sort()
                payload = phase_segments_payload(segments, self.schema)
                add("phase", payload, segments[0][0], max(s[1] for s in segments))
            elif phase is not None:
                add("phase", phase_payload(phase, self.schema))
            if cvs is not None:
                add("cvs", cvs_payload(cvs, None, self.schema))
        except SurgenetAssistError as exc:
            raise type(exc)(f"{where}: {exc.message}", exc.hint) from None
        return labels, skipped

    def _unknown(self, what: str, label: Any, ctrl: ControlPlan | None) -> SchemaError:
        where = f" of control {ctrl.name!r}" if ctrl is not None else ""
        known = {
            "segmentation class": self.schema.class_names,
            "phase": self.schema.phase_names,
            "CVS criterion": self.schema.cvs_keys,
        }[what]
        return SchemaError(
            f"label {label!r}{where} is not a {what} of schema {self.schema.name!r}",
            f'use one of {known}, map it with predicted_values="<schema name>" on its <Label>/<Choice> '
            "in the labeling config, or load a schema file that defines it",
        )

    def _label_id(self, ctrl: ControlPlan | None, value: str, what: str) -> int:
        if ctrl is not None:
            found = ctrl.model_id(value)
            if found is None:
                raise self._unknown(what, value, ctrl)
            return found
        has, find = {
            "segmentation class": (self.schema.has_class, self.schema.class_id),
            "phase": (self.schema.has_phase, self.schema.phase_id),
            "CVS criterion": (self.schema.has_cvs, self.schema.cvs_id),
        }[what]
        if not has(value):
            raise self._unknown(what, value, None)
        return find(value)

    def _classify(self, region: Any) -> tuple[str | None, Any]:
        """(kind, value) of one result region; kind None means skipped with ``value`` as the reason."""
        if not isinstance(region, dict):
            raise TypeError(f"a result region must be an object, got {type(region).__name__}")
        rtype = str(region.get("type", "")).lower()
        name = region.get("from_name")
        value = region.get("value") or {}
        ctrl = self._controls.get(name)
        if ctrl is None and name in self._skipped:
            return None, f"control {name!r} is not one of ours ({self._skipped[name]})"
        if rtype in ("brushlabels", "polygonlabels"):
            if ctrl is not None and ctrl.kind not in (BRUSH, POLYGON):
                return None, f"{rtype} region of control {name!r} ({ctrl.kind})"
            labels = value.get(rtype) or []
            if len(labels) != 1:
                raise ValueError(f"a {rtype} region needs exactly one label, got {labels}")
            return "mask", self._label_id(ctrl, str(labels[0]), "segmentation class")
        if rtype == "timelinelabels":
            out = []
            for label in value.get("timelinelabels") or []:
                pid = self._label_id(ctrl, str(label), "phase")
                for rng in value.get("ranges") or []:
                    out.append((int(rng["start"]) - 1, int(rng["end"]) - 1, self.schema.phase_names[pid]))
            return "segments", out
        if rtype == "choices":
            chosen = [str(c) for c in value.get("choices") or []]
            if ctrl is None:
                if chosen and all(self.schema.has_cvs(c) for c in chosen):
                    return "cvs", [self.schema.cvs_id(c) for c in chosen]
                if len(chosen) == 1 and self.schema.has_phase(chosen[0]):
                    return "phase", self.schema.phase_names[self.schema.phase_id(chosen[0])]
                raise SchemaError(
                    f"choices {chosen} of control {name!r} are neither CVS criteria nor one phase",
                    f"use {self.schema.cvs_keys} or one of {self.schema.phase_names}, or read the export "
                    "with the project's labeling config so that choices of other controls are skipped",
                )
            if ctrl.kind == PHASE_CHOICE:
                if len(chosen) != 1:
                    raise ValueError(f"a phase choice needs exactly one value, got {chosen}")
                return "phase", self.schema.phase_names[self._label_id(ctrl, chosen[0], "phase")]
            if ctrl.kind == CVS_MULTI:
                return "cvs", [self._label_id(ctrl, c, "CVS criterion") for c in chosen]
            if ctrl.kind == CVS_CRITERION and ctrl.criterion is not None and ctrl.yes_no is not None:
                if len(chosen) != 1 or chosen[0] not in ctrl.yes_no:
                    raise self._unknown("CVS criterion", chosen, ctrl)
                return "cvs_criterion", (ctrl.criterion, 1.0 if chosen[0] == ctrl.yes_no[0] else 0.0)
            return None, f"choices region of control {name!r} ({ctrl.kind})"
        return None, f"unsupported result type {rtype!r}"

    def _paint(self, mask: np.ndarray | None, region: dict[str, Any], class_id: int) -> np.ndarray:
        import cv2

        h, w = int(region["original_height"]), int(region["original_width"])
        if mask is None:
            mask = np.full((h, w), self.schema.ignore_index, dtype=np.uint8)
        elif mask.shape != (h, w):
            raise ValueError(
                f"region {region.get('id')} is {w}x{h}, the others {mask.shape[1]}x{mask.shape[0]}"
            )
        value = region["value"]
        if region["type"].lower() == "brushlabels":
            mask[brush_rle_to_mask(value["rle"], h, w) > 127] = class_id
        else:
            pts = np.array([[x / 100 * w, y / 100 * h] for x, y in value["points"]], dtype=np.float64)
            if len(pts) < 3:
                raise ValueError(f"a polygon needs at least 3 points, got {len(pts)}")
            # pixel centres inside the polygon (x, y in % of the image, 0..100 spanning the pixel edges)
            poly = np.round((pts - 0.5) * 16).astype(np.int32)
            cv2.fillPoly(mask, [poly], int(class_id), lineType=cv2.LINE_8, shift=4)
        return mask

    # --- store -> Label Studio ------------------------------------------------------------------------------
    def controls(self, kind: str, *kinds: str) -> list[ControlPlan]:
        """The config's controls on ``kind`` ("image"/"video") objects filling any of ``kinds``."""
        plan = self.plan
        if plan is None:
            return []
        found = plan.image_controls if kind == "image" else plan.video_controls
        return [c for c in found if c.kind in kinds]

    def label_regions(
        self, kind: str, task: str, payload: dict[str, Any], *, human: bool = True
    ) -> list[dict[str, Any]]:
        """A stored label of a ``kind`` ("image"/"video") task as result regions of this config.

        ``human``: an annotation's regions (unscored); a label the config cannot express raises
        :class:`SchemaError`. Otherwise a stored prediction: what the config cannot express is left out, as
        the backend does. A task without any control for the label gets no region.
        """
        strict = human
        if task == "segmentation":
            ctrls = self.controls(kind, BRUSH) or self.controls(kind, POLYGON)
            if not ctrls:
                return []
            ctrl = ctrls[0]
            mask = payload["mask"]
            if strict:
                self._check_offered(ctrl, [int(c) for c in np.unique(mask) if c != self.schema.ignore_index])
            build = brush_regions if ctrl.kind == BRUSH else polygon_regions
            return build(ctrl, mask, None)
        if task == "cvs":
            out = []
            vec = np.asarray(payload["values"], dtype=np.float64)
            for ctrl in self.controls(kind, CVS_MULTI, CVS_CRITERION):
                if strict and ctrl.kind == CVS_MULTI:
                    self._check_offered(ctrl, [int(i) for i in np.flatnonzero(vec >= CVS_THRESHOLD)], "CVS")
                out += cvs_regions(ctrl, vec, scored=not human)
            return out
        if "segments" in payload:
            ctrls = self.controls(kind, TIMELINE)
            if not ctrls:
                return []
            ctrl = ctrls[0]
            ids = [self.schema.phase_id(name) for _, _, name in payload["segments"]]
            if strict:
                self._check_offered(ctrl, ids, "phase")
            return [
                timeline_region(ctrl, k, int(s) + 1, int(e) + 1, ctrl.labels[pid], None)
                for k, ((s, e, _), pid) in enumerate(zip(payload["segments"], ids, strict=True))
                if pid in ctrl.labels
            ]
        ctrls = self.controls(kind, PHASE_CHOICE)
        if not ctrls:
            return []
        pid = self.schema.phase_id(payload["phase"])
        if strict:
            self._check_offered(ctrls[0], [pid], "phase")
        return [choice_region(ctrls[0], [ctrls[0].labels[pid]], None)] if pid in ctrls[0].labels else []

    def _check_offered(self, ctrl: ControlPlan, ids: Iterable[int], what: str = "segmentation") -> None:
        names = {
            "segmentation": self.schema.class_names,
            "phase": self.schema.phase_names,
            "CVS": self.schema.cvs_keys,
        }[what]
        missing = [names[i] for i in ids if i not in ctrl.labels]
        if missing:
            raise SchemaError(
                f"the labeling config's control {ctrl.name!r} offers no label for {what} {missing}",
                f'add <Label value="..."/> (or <Choice>) for them to {ctrl.name!r}, or export with the '
                "config `surgenet-assist ls config` generates",
            )


# ----------------------------------------------------------------------------------------------------------
# result regions (predictions and exports)
# ----------------------------------------------------------------------------------------------------------
def _r(x: float, nd: int = 4) -> float:
    return round(float(x), nd)


def _scored(region: dict[str, Any], score: float | None) -> dict[str, Any]:
    if score is not None:
        region["score"] = _r(score)
        region["readonly"] = False
    return region


def brush_region(
    from_name: str, to_name: str, binary: np.ndarray, label: str, score: float | None, region_id: str
) -> dict[str, Any]:
    """One ``brushlabels`` region: Label Studio's RLE of the 0/255 mask of ``binary`` under ``label``
    (scored when ``score`` is given: predictions and interactive answers)."""
    h, w = binary.shape
    region = {
        "id": region_id,
        "from_name": from_name,
        "to_name": to_name,
        "type": "brushlabels",
        "original_width": int(w),
        "original_height": int(h),
        "image_rotation": 0,
        "value": {
            "format": "rle",
            "rle": mask_to_brush_rle(binary.astype(np.uint8) * 255),
            "brushlabels": [label],
        },
    }
    return _scored(region, score)


def brush_regions(ctrl: ControlPlan, mask: np.ndarray, confidence: np.ndarray | None) -> list[dict[str, Any]]:
    """One RLE region per class the control offers (foreground 255).

    Scored with the mean pixel confidence when ``confidence`` is given (predictions); unscored otherwise.
    """
    out = []
    for cid in np.flatnonzero(np.bincount(mask.ravel(), minlength=256)):
        label = ctrl.labels.get(int(cid))
        if label is None:
            continue
        binary = mask == cid
        score = float(confidence[binary].astype(np.float32).mean()) if confidence is not None else None
        out.append(brush_region(ctrl.name, ctrl.to_name, binary, label, score, f"{ctrl.name}-{int(cid)}"))
    return out


def polygon_regions(
    ctrl: ControlPlan, mask: np.ndarray, confidence: np.ndarray | None
) -> list[dict[str, Any]]:
    """Outer contours of each class (OpenCV), simplified, points in percent of the image."""
    import cv2

    h, w = mask.shape
    out = []
    for cid in np.flatnonzero(np.bincount(mask.ravel(), minlength=256)):
        label = ctrl.labels.get(int(cid))
        if label is None:
            continue
        binary = (mask == cid).astype(np.uint8)
        contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        for k, contour in enumerate(contours):
            if cv2.contourArea(contour) < MIN_POLYGON_AREA * h * w:
                continue
            approx = cv2.approxPolyDP(contour, POLYGON_EPSILON * cv2.arcLength(contour, True), True)
            pts = approx.reshape(-1, 2)
            if len(pts) < 3:
                continue
            score = None
            if confidence is not None:
                region_mask = np.zeros_like(binary)
                cv2.drawContours(region_mask, [contour], -1, 1, thickness=-1)
                sel = region_mask.astype(bool) & binary.astype(bool)
                score = float(confidence[sel].astype(np.float32).mean()) if sel.any() else 1.0
            region = {
                "id": f"{ctrl.name}-{int(cid)}-{k}",
                "from_name": ctrl.name,
                "to_name": ctrl.to_name,
                "type": "polygonlabels",
                "original_width": int(w),
                "original_height": int(h),
                "image_rotation": 0,
                "value": {
                    "points": [[_r(x / w * 100, 3), _r(y / h * 100, 3)] for x, y in pts.tolist()],
                    "closed": True,
                    "polygonlabels": [label],
                },
            }
            out.append(_scored(region, score))
    return out


def choice_region(ctrl: ControlPlan, choices: list[str], score: float | None) -> dict[str, Any]:
    region = {
        "id": f"{ctrl.name}-0",
        "from_name": ctrl.name,
        "to_name": ctrl.to_name,
        "type": "choices",
        "value": {"choices": choices},
    }
    return _scored(region, score)


def cvs_regions(ctrl: ControlPlan, cvs_probs: np.ndarray, scored: bool = True) -> list[dict[str, Any]]:
    """CVS as one multiple-choice region, or a yes/no region for a per-criterion control."""
    probs = np.asarray(cvs_probs, dtype=np.float64)
    if ctrl.kind == CVS_CRITERION:
        assert ctrl.criterion is not None and ctrl.yes_no is not None
        p = float(probs[ctrl.criterion])
        met = p >= CVS_THRESHOLD
        value = ctrl.yes_no[0] if met else ctrl.yes_no[1]
        return [choice_region(ctrl, [value], (p if met else 1 - p) if scored else None)]
    chosen = [(cid, label) for cid, label in sorted(ctrl.labels.items()) if probs[cid] >= CVS_THRESHOLD]
    if not ctrl.multiple and chosen:
        cid, label = max(chosen, key=lambda item: probs[item[0]])
        chosen = [(cid, label)]
    certainty = [max(probs[c], 1 - probs[c]) for c in ctrl.labels]
    if not chosen:
        return []  # nothing met: an empty choices value is not allowed, and "none" is the absence of a region
    score = float(np.mean(certainty)) if scored else None
    return [choice_region(ctrl, [label for _, label in chosen], score)]


def phase_choice_regions(ctrl: ControlPlan, phase_probs: np.ndarray) -> list[dict[str, Any]]:
    """The most probable phase among those the config offers."""
    probs = np.asarray(phase_probs, dtype=np.float64)
    pid = max(ctrl.labels, key=lambda i: probs[i])
    return [choice_region(ctrl, [ctrl.labels[pid]], float(probs[pid]))]


def timeline_region(
    ctrl: ControlPlan, k: int, start: int, end: int, label: str, score: float | None
) -> dict[str, Any]:
    """One ``timelinelabels`` region; ``start``/``end`` are Label Studio's 1-based inclusive frames."""
    region = {
        "id": f"{ctrl.name}-{k}",
        "from_name": ctrl.name,
        "to_name": ctrl.to_name,
        "type": "timelinelabels",
        "value": {"ranges": [{"start": int(start), "end": int(end)}], "timelinelabels": [label]},
    }
    return _scored(region, score)


def timeline_regions(
    ctrl: ControlPlan,
    segments: Sequence[tuple[int, int, int]],
    video_fps: float,
    frame_count: int,
    frame_rate: float,
    phase_probs: np.ndarray | None = None,
    sample_indices: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Predicted phase segments (first/last decoded frame index, 0-based) -> ``timelinelabels`` regions.

    A segment covers the video from its first sampled frame to the frame before the next segment starts (the
    last one to the end), converted to the config's ``frameRate`` through time, 1-based and inclusive, as
    Label Studio counts frames. Phases the config does not offer are left out (a gap in the timeline).
    """
    total = max(1, int(math.floor(frame_count / video_fps * frame_rate + 1e-6)))
    out = []
    for k, (first, _last, phase) in enumerate(segments):
        label = ctrl.labels.get(int(phase))
        nxt = segments[k + 1][0] if k + 1 < len(segments) else frame_count
        start = int(math.floor(first / video_fps * frame_rate + 1e-6)) + 1
        end = int(math.floor(nxt / video_fps * frame_rate + 1e-6))
        start, end = min(start, total), min(max(end, start), total)
        if label is None:
            continue
        score = 1.0
        if phase_probs is not None and sample_indices is not None:
            sel = (sample_indices >= first) & (sample_indices < nxt)
            if sel.any():
                score = float(phase_probs[sel, int(phase)].mean())
        out.append(timeline_region(ctrl, k, start, end, label, score))
    return out


def image_regions(
    controls: Sequence[ControlPlan],
    mask: np.ndarray | None,
    confidence: np.ndarray | None,
    cvs_probs: np.ndarray | None,
    phase_probs: np.ndarray | None,
) -> list[dict[str, Any]]:
    """Predicted regions of one frame for every image control; a missing output (None) leaves its controls
    empty. Masks are scored (``confidence`` None scores 1.0)."""
    result: list[dict[str, Any]] = []
    for ctrl in controls:
        if ctrl.kind in (BRUSH, POLYGON) and mask is not None:
            conf = confidence if confidence is not None else np.ones(mask.shape, np.float32)
            result += (brush_regions if ctrl.kind == BRUSH else polygon_regions)(ctrl, mask, conf)
        elif ctrl.kind in (CVS_MULTI, CVS_CRITERION) and cvs_probs is not None:
            result += cvs_regions(ctrl, cvs_probs)
        elif ctrl.kind == PHASE_CHOICE and phase_probs is not None:
            result += phase_choice_regions(ctrl, phase_probs)
    return result


def video_regions(
    controls: Sequence[ControlPlan],
    task: dict[str, Any],
    video_fps: float,
    frame_count: int,
    segments: Sequence[tuple[int, int, int]] | None,
    phase_probs: np.ndarray | None,
    sample_indices: Sequence[int] | None,
    cvs_probs: np.ndarray | None,
) -> list[dict[str, Any]]:
    """Predicted regions of one video task: the phase timeline (at the config's or the task's ``frameRate``,
    else the video's own) and the clip-level CVS (the maximum over the sampled frames)."""
    result: list[dict[str, Any]] = []
    for ctrl in controls:
        if ctrl.kind == TIMELINE and segments is not None:
            rate = ctrl.frame_rate or _task_rate(task, ctrl) or video_fps
            indices = None if sample_indices is None else np.asarray(sample_indices)
            result += timeline_regions(ctrl, segments, video_fps, frame_count, rate, phase_probs, indices)
        elif ctrl.kind in (CVS_MULTI, CVS_CRITERION) and cvs_probs is not None:
            result += cvs_regions(ctrl, np.asarray(cvs_probs).max(axis=0))
    return result


def _task_rate(task: dict[str, Any], ctrl: ControlPlan) -> float | None:
    if not ctrl.frame_rate_key:
        return None
    try:
        rate = float((task.get("data") or {}).get(ctrl.frame_rate_key))
    except (TypeError, ValueError):
        return None
    return rate if rate > 0 else None


# ----------------------------------------------------------------------------------------------------------
# import (JSON exports)
# ----------------------------------------------------------------------------------------------------------
def _collect(
    tasks: Sequence[Any], report: ImportReport, tr: LabelStudioTranslator, progress: bool
) -> tuple[list[PendingLabel], dict[str, VideoInfo]]:
    labels: list[PendingLabel] = []
    videos: dict[str, VideoInfo] = {}
    for task in progress_iter(tasks, progress, "label-studio", len(tasks)):
        if not isinstance(task, dict):
            raise DatasetFormatError(
                "a Label Studio export must be a list of task objects",
                "export the project from Label Studio as JSON (not JSON-MIN or CSV)",
            )
        fps = (task.get("data") or {}).get("fps")
        for ann in task.get("annotations") or []:
            name = f"task {task.get('id')} annotation {ann.get('id')}"
            if ann.get("was_cancelled"):
                report.skip(name, "annotation was cancelled (skipped) in Label Studio")
                continue
            found, skipped = tr.read(task, ann, our_export=True)
            for reason in skipped:
                report.skip(name, reason)
            for lab in found:
                videos.setdefault(lab.video, VideoInfo(fps=float(fps) if fps else None))
            labels.extend(found)
        if not task.get("annotations"):
            report.skip(f"task {task.get('id')}", "no annotations")
    return labels, videos


def _read_json(path: str | Path, what: str) -> list[dict[str, Any]]:
    path = Path(path)
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetFormatError(f"cannot read {what} {path}: {exc}", "export as JSON") from None
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list):
        raise DatasetFormatError(f"{path} is not a list of tasks", "use Label Studio's JSON export")
    return tasks


def import_label_studio(
    store: LabelStore,
    path: str | Path,
    *,
    project: str | None = None,
    schema: LabelSchema = DEFAULT_SCHEMA,
    label_config: str | None = None,
    progress: bool = False,
) -> ImportReport:
    """Import a Label Studio JSON export (list of tasks with annotations) in one transaction.

    ``label_config``: the project's labeling config; with it, regions are read by their control (aliases,
    per-criterion CVS, other controls skipped), without it by their type and values.
    """
    tasks = _read_json(path, "Label Studio export")
    report = ImportReport("label-studio", str(path))
    labels, videos = _collect(tasks, report, LabelStudioTranslator.for_config(label_config, schema), progress)
    report.counts["labels read"] = len(labels)
    write_labels(store, videos, labels, report, project)
    return report


# ----------------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------------
_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
Where = tuple[str, int | None]  # (store video path, frame of an image task | None for a video task)


def _iso(ts: Any) -> str | None:
    return None if ts is None else ts.isoformat(timespec="microseconds") + "Z"


def _where(video_path: str, start: int, end: int, payload: dict[str, Any]) -> Where:
    single = start == end and "segments" not in payload
    return video_path, (start if single else None)


def _task_data(where: Where, tr: LabelStudioTranslator) -> dict[str, Any]:
    """Task data for a store frame or video (the inverse of :func:`task_target`, as far as it goes)."""
    video, frame = where
    plan = tr.plan
    ctrls = (plan.image_controls if frame is not None else plan.video_controls) if plan else []
    media_key = ctrls[0].value_key if ctrls else ("image" if frame is not None else "video")
    if frame is None or (frame == 0 and Path(urlsplit(video).path).suffix.lower() in _IMAGE_EXTS):
        return {media_key: video}
    return {VIDEO_KEY: video, FRAME_KEY: frame}


def _annotation_of(label: LabelRecord) -> tuple[Any, ...]:
    """Which exported annotation a live label belongs to: its Label Studio annotation, else one per author,
    time and provenance (a napari commit of masks, phases and CVS is one)."""
    if label.source == SOURCE and label.ls_annotation_id is not None:
        return (SOURCE, label.ls_annotation_id)
    return (label.source, label.author, label.updated_at, label.provenance)


def _exported_annotation(labels: Sequence[LabelRecord], result: list[dict[str, Any]]) -> dict[str, Any]:
    """One Label Studio annotation for the live labels of one annotation: Label Studio's own fields where
    they mean the same (``id``, ``completed_by``, ``ground_truth``), the rest under :data:`EXPORT_KEY`."""
    first = labels[0]
    prov = first.provenance
    ann: dict[str, Any] = {"result": result, "was_cancelled": False, "ground_truth": prov.ground_truth}
    if first.source == SOURCE and first.ls_annotation_id is not None:
        ann["id"] = first.ls_annotation_id
    if ls_user_id(first.author) is not None:
        ann["completed_by"] = ls_user_id(first.author)
    ann["updated_at"] = _iso(max(lab.updated_at for lab in labels))
    ann[EXPORT_KEY] = {
        "source": first.source,
        "author": first.author,
        "from_prediction": prov.from_prediction,
        "model_version": prov.model_version,
        "reviewed": prov.reviewed,
    }
    return ann


def export_label_studio(
    store: LabelStore,
    out: str | Path,
    *,
    label_config: str | None = None,
    tasks: str | Path | Sequence[dict[str, Any]] | None = None,
    schema: LabelSchema = DEFAULT_SCHEMA,
    model_version: str | None = None,
    annotations: bool = False,
    predictions: bool = True,
) -> int:
    """Write Label Studio tasks with the store's newest predictions as ``predictions`` (one per model version
    and task) and, with ``annotations``, every live human label as ``annotations``: one per Label Studio
    annotation (its ``id``), else per author and commit, each with its author (``completed_by`` for a Label
    Studio user), ``ground_truth`` and, under :data:`EXPORT_KEY`, source, author and provenance, so that
    importing the file into a store gives back the same labels; returns the number of tasks written.

    ``label_config``: the project's labeling config, whose control names the results use; by default the
    configs ``surgenet-assist ls config`` generates (image: ``mask``, ``cvs``, ``phase``; video: ``phases``).
    ``tasks``: Label Studio tasks (e.g. the project's JSON export) to attach the labels to: their ``id``
    and ``data`` are kept, so the file imports back into that project, and frames without such a task are
    left out. Without them a frame task's data is ``source_video`` + ``frame_index`` (or the image URL, when
    that is the store video), a video task's the video.

    Human labels the config cannot express raise :class:`SchemaError`; a label kind the config has no control
    for (say, phases for a masks-only project) is left out.
    """
    if label_config is not None:
        image_tr = video_tr = LabelStudioTranslator.for_config(label_config, schema)
    else:
        image_tr = LabelStudioTranslator.for_config(image_config(schema), schema)
        video_tr = LabelStudioTranslator.for_config(video_config(schema), schema)
    templates: dict[Where, dict[str, Any]] | None = None
    if tasks is not None:
        plan = image_tr.plan if label_config is not None else None
        templates = {}
        for t in _read_json(tasks, "Label Studio tasks") if isinstance(tasks, (str, Path)) else tasks:
            target = task_target(t, plan)
            templates[(target.video, target.frame)] = {"id": t.get("id"), "data": dict(t.get("data") or {})}
    videos = {v["id"]: str(v["path"]) for v in store.videos()}
    out_tasks: dict[Where, dict[str, Any]] = {}

    def task_for(where: Where) -> dict[str, Any] | None:
        if where not in out_tasks:
            if templates is not None:
                if where not in templates:
                    return None
                base = {k: v for k, v in templates[where].items() if v is not None}
            else:
                base = {"data": _task_data(where, image_tr if where[1] is not None else video_tr)}
            out_tasks[where] = {**base, "annotations": [], "predictions": []}
        return out_tasks[where]

    if annotations:
        groups: dict[Where, dict[tuple[Any, ...], list[LabelRecord]]] = {}
        for task_name in TASKS:
            for lab in store.live_labels(task_name):
                if lab.video_id in videos:
                    where = _where(videos[lab.video_id], lab.frame_start, lab.frame_end, lab.payload)
                    groups.setdefault(where, {}).setdefault(_annotation_of(lab), []).append(lab)
        for where, by_annotation in groups.items():
            kind = "image" if where[1] is not None else "video"
            tr = image_tr if kind == "image" else video_tr
            anns = []
            for labs in by_annotation.values():
                result: list[dict[str, Any]] = []
                for lab in labs:
                    try:
                        result += tr.label_regions(kind, lab.task, lab.payload)
                    except SchemaError as exc:
                        raise SchemaError(
                            f"{lab.task} label of {where[0]!r} frame {lab.frame_start}: {exc.message}",
                            exc.hint,
                        ) from None
                if result:
                    anns.append(_exported_annotation(labs, result))
            task = task_for(where) if anns else None
            if task is not None:
                task["annotations"] += sorted(anns, key=lambda a: (a["updated_at"], a.get("id") or 0))
    if predictions:
        preds: dict[tuple[Where, str | None], dict[str, Any]] = {}
        for p in store.predictions_for(model_version=model_version):
            if p.video_id not in videos:
                continue
            where = _where(videos[p.video_id], p.frame_start, p.frame_end, p.payload)
            kind = "image" if where[1] is not None else "video"
            tr = image_tr if kind == "image" else video_tr
            regions = tr.label_regions(kind, p.task, p.payload, human=False)
            task = task_for(where) if regions else None
            if task is None:
                continue
            key = (where, p.model_version)
            if key not in preds:
                preds[key] = {"model_version": p.model_version, "score": 0.0, "result": []}
                task["predictions"].append(preds[key])
            preds[key]["result"] += regions
            if p.score is not None:
                preds[key]["score"] = max(preds[key]["score"], float(p.score))
    written = [t for t in out_tasks.values() if t["annotations"] or t["predictions"]]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(written, indent=1), encoding="utf-8")
    return len(written)
