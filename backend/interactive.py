"""Label Studio's interactive mode: an annotator's clicks and boxes in, the clicked object's brush mask out.

With the ML backend connected as interactive ("Use for interactive preannotations") and Auto-Annotation on,
every region drawn with a smart ``KeyPointLabels`` or ``RectangleLabels`` makes the editor post to Label
Studio's ``/api/ml/{id}/interactive-annotating``, which calls our ``/predict`` with one task and
``params.context = {"result": [region, ...]}`` (shape captured from LS 1.23.2: keypoints carry
``is_positive`` beside ``value``, Alt+click gives ``false``; all coordinates are percent of the image).
This module turns that context into a core :class:`~surgenet_assist.core.interactive.Prompt`, runs the
click-to-mask engine and answers with one ``brushlabels`` region under the label the annotator chose, in
the ``BrushLabels`` paired with the prompt tool (the config's :class:`InteractivePlan`).

What counts: any object ``params.context`` makes the request interactive (batch pre-annotation sends
``"context": null``). An empty one (``{"result": []}``, what the editor sends when the last smart region is
deleted, or ``{}``) is answered with one empty result per task: never the whole-frame prediction, which the
editor would apply over the annotator's choices. Otherwise the label of the newest prompt region is the object
being segmented; every keypoint of that label is a click (so with auto-accept off, the keypoints Label Studio
re-sends accumulate into one prompt) and the newest rectangle of that label is the box. Keypoints of other
labels belong to other objects and are ignored. A context we cannot use is a :class:`InteractiveError` (the
app answers 400 with ``detail`` and ``hint``) rather than an empty mask, which the annotator could not tell
from "nothing found".

What a caller can make it do is bounded before any engine is built or image fetched: at most
``max_regions`` regions (``SURGENET_ASSIST_MAX_PROMPT_REGIONS``), one task per request with regions (Label
Studio sends one), every coordinate a finite number in 0..100 (a huge integer, NaN, a string or a bool is a
400). The engine then bounds the work per click (``core.interactive.engine``).

Which engine answers a project is decided in one place, :meth:`ClickSegmenters.for_project`.
"""

from __future__ import annotations

import logging
import math
import reprlib
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from surgenet_assist.core.errors import SurgenetAssistError
from surgenet_assist.core.formats.label_studio import brush_region

from .config import ConfigPlan, RegionControl
from .media import load_image
from .predictions import _task_value
from .settings import DEFAULT_MAX_PROMPT_REGIONS

log = logging.getLogger("surgenet_assist.backend")

KEYPOINT, RECTANGLE = "keypointlabels", "rectanglelabels"
CONFIG_HINT = (
    "pair smart prompt tools with a BrushLabels of the same labels on the same Image, e.g. the config "
    "`surgenet-assist ls config --kind image --interactive` prints"
)
_EPS = 1e-3  # percent: Label Studio's float rounding at the image border
MAX_TASKS = 1  # tasks of an interactive request with regions (Label Studio sends the one being annotated)
_REPR = reprlib.Repr()  # a caller's values echoed in an error, cut short (a 20 MB id is not a message)
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxdict = 4
_REPR.maxlevel = 2
_short = _REPR.repr


class InteractiveError(SurgenetAssistError):
    """The interactive context cannot be used (the client gets a 400 with ``detail`` and ``hint``)."""


class InteractiveUnavailable(SurgenetAssistError):
    """No click-to-mask engine can run in this backend (the client gets a 503 saying why)."""


# ---------------------------------------------------------------------------------------------------------
# params.context -> prompt
# ---------------------------------------------------------------------------------------------------------
def context_regions(
    params: Any, max_regions: int = DEFAULT_MAX_PROMPT_REGIONS
) -> list[dict[str, Any]] | None:
    """The regions of ``params.context``: None when there is no context (an ordinary ``/predict``: batch
    pre-annotation sends ``"context": null``), ``[]`` for an empty one (the editor's "last smart region
    deleted": ``{"result": []}``; also ``{}``), else the list of region objects, at most ``max_regions``
    (counted before any region is read)."""
    if not isinstance(params, dict):
        return None
    context = params.get("context")
    if context is None:
        return None
    if not isinstance(context, dict):
        raise InteractiveError(
            f"params.context must be an object, got {type(context).__name__}",
            'send {"context": {"result": [<keypoint or rectangle region>, ...]}} as Label Studio does',
        )
    result = context.get("result")
    if result is None:
        return []
    if not isinstance(result, list):
        raise InteractiveError(
            f"params.context.result must be a list of region objects, got {type(result).__name__}",
            "send the regions the annotator drew with the smart tools, as Label Studio does",
        )
    if len(result) > max_regions:
        raise InteractiveError(
            f"params.context.result has {len(result)} regions; an interactive request takes at most "
            f"{max_regions} (SURGENET_ASSIST_MAX_PROMPT_REGIONS)",
            "send the prompt regions of the object being segmented (an annotator needs a few clicks, not "
            "hundreds); accept the mask and start a new object",
        )
    if not all(isinstance(r, dict) for r in result):
        raise InteractiveError(
            "params.context.result must be a list of region objects",
            "send the regions the annotator drew with the smart tools, as Label Studio does",
        )
    return result


@dataclass(frozen=True)
class ContextPrompt:
    """A parsed context, still in percent of the image (the image is fetched only once it is known usable).

    ``clicks``: ``(x %, y %, positive)``; ``box``: ``(x %, y %, width %, height %)``, x/y the top-left."""

    label: str
    brush: RegionControl  # the BrushLabels that answers (from_name of the result)
    clicks: tuple[tuple[float, float, bool], ...]
    box: tuple[float, float, float, float] | None

    @property
    def to_name(self) -> str:
        return self.brush.to_name

    def prompt(self, height: int, width: int) -> Any:
        """The core :class:`Prompt` in pixels of an image of this size (row = y, col = x)."""
        from surgenet_assist.core.interactive import Box, Click, Prompt

        def px(percent: float, size: int) -> float:
            # a point on the far border (100 %) is the centre of the last pixel, not one past it
            return min(max(percent / 100.0 * size, 0.0), size - 0.5)

        clicks = tuple(Click(row=px(y, height), col=px(x, width), positive=pos) for x, y, pos in self.clicks)
        box = None
        if self.box is not None:
            x, y, w, h = self.box
            box = Box(
                top=max(y, 0.0) / 100.0 * height,
                left=max(x, 0.0) / 100.0 * width,
                bottom=min(y + h, 100.0) / 100.0 * height,
                right=min(x + w, 100.0) / 100.0 * width,
            )
        return Prompt(clicks=clicks, box=box)


def read_context(regions: list[dict[str, Any]], plan: ConfigPlan) -> ContextPrompt:
    """Check the context's regions against the labeling config and keep those of the chosen label.

    Raises :class:`InteractiveError` naming the region and what is wrong: no smart prompt tool in the
    config, no BrushLabels to answer with, no keypoint or rectangle, a label the BrushLabels lacks,
    coordinates outside 0..100 %, a rotated image or box."""
    interactive = plan.interactive
    if interactive is None:
        raise InteractiveError(
            "the labeling config has no smart KeyPointLabels or RectangleLabels, so it cannot take clicks",
            CONFIG_HINT,
        )
    prompts = [r for r in regions if str(r.get("type", "")).lower() in (KEYPOINT, RECTANGLE)]
    if not prompts:
        kinds = sorted({_short(r.get("type")) for r in regions})
        raise InteractiveError(
            f"the interactive context has no keypoint and no rectangle (region types: {_short(kinds)})",
            "click on the object with the smart KeyPointLabels tool or draw a box with the smart "
            "RectangleLabels tool, with Auto-Annotation on",
        )
    for region in prompts:
        _check_region(region, interactive)
    newest = prompts[-1]
    label = _label(newest)
    to_name = _to_name(newest, interactive)
    brush = interactive.brush_for(to_name, label)
    if brush is None:
        offered = [b for b in interactive.brushes if b.to_name == to_name]
        if not offered:
            raise InteractiveError(
                f"the labeling config has no BrushLabels on image {to_name!r} to answer the "
                f"{newest.get('from_name')!r} prompt with",
                CONFIG_HINT,
            )
        labels = sorted({label for b in offered for label in b.labels})
        raise InteractiveError(
            f"label {label!r} is not offered by the BrushLabels on image {to_name!r} "
            f"({', '.join(b.name for b in offered)}: {labels[:12]})",
            f'add <Label value="{label}"/> to the BrushLabels, or give the prompt tools the same labels '
            "as the BrushLabels",
        )
    mine = [r for r in prompts if _label(r) == label and _to_name(r, interactive) == to_name]
    clicks = tuple(
        (float(r["value"]["x"]), float(r["value"]["y"]), _positive(r))
        for r in mine
        if str(r["type"]).lower() == KEYPOINT
    )
    boxes = [r["value"] for r in mine if str(r["type"]).lower() == RECTANGLE]
    box = None
    if boxes:
        v = boxes[-1]
        box = (float(v["x"]), float(v["y"]), float(v["width"]), float(v["height"]))
    return ContextPrompt(label=label, brush=brush, clicks=clicks, box=box)


def _where(region: dict[str, Any]) -> str:
    kind = region.get("type")
    kind = kind if isinstance(kind, str) and len(kind) <= 40 else _short(kind)
    return f"{kind} region {_short(region.get('id'))} of {_short(region.get('from_name'))}"


def _check_region(region: dict[str, Any], interactive: Any) -> None:
    where = _where(region)
    name = region.get("from_name")
    if interactive.prompt(name) is None:
        known = [p.name for p in interactive.prompts]
        raise InteractiveError(
            f"{where}: {_short(name)} is not a KeyPointLabels or RectangleLabels on an Image of this "
            f"labeling config (prompt tools: {known})",
            "send the project's current label_config with the context",
        )
    rotation = region.get("image_rotation") or 0
    if not _number(rotation) or abs(float(rotation)) > 1e-6:
        raise InteractiveError(
            f"{where}: the image is rotated by {_short(rotation)} degrees in the editor",
            "rotate the image back to 0 degrees before clicking (masks are drawn on the unrotated image)",
        )
    value = region.get("value")
    if not isinstance(value, dict):
        raise InteractiveError(f"{where} has no 'value' object", "send the region as Label Studio does")
    _label(region)  # a region without a label is refused here, before the image is fetched
    rtype = str(region.get("type")).lower()
    keys = ("x", "y") if rtype == KEYPOINT else ("x", "y", "width", "height")
    for key in keys:
        v = value.get(key)
        if not _number(v) or not (-_EPS <= float(v) <= 100.0 + _EPS):
            raise InteractiveError(
                f"{where}: value.{key} = {_short(v)} is not a percentage of the image (0..100)",
                "coordinates are percent of the original image; click inside the image",
            )
    if rtype == RECTANGLE:
        x, y, w, h = (float(value[k]) for k in keys)
        if w <= 0 or h <= 0:
            raise InteractiveError(f"{where}: the box is empty ({w} x {h} %)", "draw the box over the object")
        if x + w > 100.0 + _EPS or y + h > 100.0 + _EPS:
            raise InteractiveError(
                f"{where}: the box reaches past the image (x+width = {x + w:g} %, y+height = {y + h:g} %)",
                "draw the box inside the image",
            )
        rot = value.get("rotation") or 0
        if not _number(rot) or abs(float(rot)) > 1e-6:
            raise InteractiveError(
                f"{where}: the box is rotated by {_short(rot)} degrees",
                "draw an unrotated box around the object",
            )
    if "is_positive" in region and not isinstance(region["is_positive"], bool):
        raise InteractiveError(
            f"{where}: is_positive = {_short(region['is_positive'])} is not true/false",
            "send is_positive as Label Studio does (false for an Alt+click)",
        )


def _number(v: Any) -> bool:
    """A finite JSON number: not a bool, a string, NaN or infinity (``1e400`` parses as infinity), nor an
    integer too large for a float (``10**400``: ``math.isfinite`` would raise OverflowError on it)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _label(region: dict[str, Any]) -> str:
    rtype = str(region.get("type", "")).lower()
    labels = (region.get("value") or {}).get(rtype)
    if not isinstance(labels, list) or not labels or not isinstance(labels[0], str):
        raise InteractiveError(
            f"{_where(region)} has no label (value.{_short(rtype)} = {_short(labels)})",
            "pick a label in the toolbar before clicking, so the mask knows which object it is",
        )
    return labels[0]


def _to_name(region: dict[str, Any], interactive: Any) -> str:
    to_name = region.get("to_name")
    if isinstance(to_name, str) and to_name:
        return to_name
    return interactive.prompt(region.get("from_name")).to_name


def _positive(region: dict[str, Any]) -> bool:
    # Label Studio sends is_positive beside value; a keypoint without it is an ordinary (positive) click
    return bool(region.get("is_positive", True))


# ---------------------------------------------------------------------------------------------------------
# mask -> brush region
# ---------------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------------
# which engine answers a project
# ---------------------------------------------------------------------------------------------------------
class ClickSegmenters:
    """The click-to-mask engine of each Label Studio project: ``segmenter`` (injected) or the one
    ``factory(backbone)`` builds on the backbone the project's served model runs on (the CLI's factory; the
    cached SurgeNetXL weights only when no model serves: ``backend/backbones.py``), rebuilt when that backbone
    changes, so one backbone per process serves predictions, clicks and day-one features.

    :meth:`for_project` is the one place that decides. A project whose registry holds a learned click head
    (the nightly cycle's interactive champion, trained on this backbone: ``core.interactive.serving``) gets
    its own engine serving that head, sharing the backbone; every other project gets the day-one engine.
    The registry is read at most every ``poll_s`` seconds per project, and a head is loaded only when its
    version changes, so a click costs no database round trip in between."""

    def __init__(
        self,
        segmenter: Any = None,
        factory: Callable[[Any], Any] | None = None,
        store: Any = None,
        poll_s: float = 5.0,
    ) -> None:
        self._base = segmenter
        self._factory = factory
        self.store = store
        self.poll_s = poll_s
        self.problem: str | None = None
        self._lock = threading.Lock()
        # project -> (its engine with a learned head, or None for day one; when the registry was read)
        self._learned: dict[str | None, tuple[Any, float]] = {}

    def for_project(self, store_project: str | None, backbone: Callable[[], Any] | None = None) -> Any:
        """The engine that answers clicks in ``store_project`` (the label-store project of the Label Studio
        project), on the backbone ``backbone()`` returns; raises :class:`InteractiveUnavailable` when none can
        be built."""
        base = self._default(backbone)
        if self.store is None or getattr(base, "backbone", None) is None:
            return base
        return self._learned_engine(base, store_project) or base

    def _learned_engine(self, base: Any, project: str | None) -> Any:
        """The project's engine with its learned click head, or None (day one)."""
        now = time.monotonic()
        with self._lock:
            engine, polled = self._learned.get(project, (None, -math.inf))
        if now - polled < self.poll_s:
            return engine
        try:
            from surgenet_assist.core.interactive.serving import click_champion_row, serving_click_head

            row = click_champion_row(self.store, project)
            if row is None:
                engine = None
            elif engine is None or engine.head_version != str(row["version"]):
                found = serving_click_head(
                    self.store, project, backbone_sha256=getattr(base.backbone, "weights_sha256", None)
                )
                if found is None:
                    engine = None
                else:
                    if engine is None:  # same backbone and feature cache: one memory budget per process
                        engine = base.with_head(*found)
                    else:
                        engine.use_head(*found)
                    log.info("project %s: clicks answered by learned head %s", project, found[1])
        except Exception as exc:  # noqa: BLE001 - a registry hiccup: keep answering clicks
            log.warning("project %s: click head not readable, day one: %s", project, exc)
        with self._lock:
            self._learned[project] = (engine, now)
        return engine

    def _default(self, backbone: Callable[[], Any] | None) -> Any:
        if self._factory is None:
            if self._base is not None:
                return self._base  # injected
            raise InteractiveUnavailable(
                "interactive mode is not enabled in this backend",
                "start the backend with `surgenet-assist serve` (it builds the click-to-mask engine), or "
                "pass click_segmenter to create_app",
            )
        try:
            current = backbone() if backbone is not None else None
        except SurgenetAssistError as exc:  # no served model and no cached weights
            what = f"interactive mode is unavailable: {exc.message}"
            raise InteractiveUnavailable(what, exc.hint) from None
        with self._lock:
            stale = self._base is not None and getattr(self._base, "backbone", None) is not current
            if self._base is None or (stale and current is not None):
                try:
                    self._base = self._factory(current)
                    self._learned.clear()  # heads were checked against the previous backbone
                    self.problem = None
                except Exception as exc:  # noqa: BLE001 - no weights, no memory: say so on every click
                    self.problem = str(getattr(exc, "message", exc))
                    log.warning("interactive mode off: %s", self.problem)
            if self._base is not None:
                return self._base
        raise InteractiveUnavailable(
            f"interactive mode is unavailable: {self.problem or 'the click engine could not be built'}",
            "cache the SurgeNetXL weights on the backend (`surgenet-assist weights download surgenetxl`, "
            "or --from-file) and restart it, or serve a model (--model BUNDLE / --registry)",
        )


# ---------------------------------------------------------------------------------------------------------
# the interactive /predict
# ---------------------------------------------------------------------------------------------------------
Fetch = Callable[[str, Any], Path]


def interactive_predictions(
    tasks: list[dict[str, Any]],
    plan: ConfigPlan,
    regions: list[dict[str, Any]],
    engine: Callable[[], Any],
    fetch: Fetch,
    project: str | None,
    compute: AbstractContextManager[Any] | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """One prediction per task holding the clicked object's brush region (``"result": []`` for an empty
    context), and the engine's model version. The context is read and checked first, then ``engine()`` gives
    the click-to-mask engine, then the image is fetched. Raises :class:`InteractiveError` for a context that
    cannot be used, :class:`InteractiveUnavailable` (from ``engine``) when no engine can run, ``MediaError``
    when the image cannot be fetched, ``PromptError`` (a ``SurgenetAssistError``) when the prompt does not
    fit the image."""
    parsed = read_context(regions, plan) if regions else None
    if parsed is not None and len(tasks) > MAX_TASKS:
        raise InteractiveError(
            f"an interactive request with prompt regions names {len(tasks)} tasks; it takes {MAX_TASKS}",
            "send the task being annotated, as Label Studio does; pre-annotate batches without a context",
        )
    segmenter = engine()
    version = str(segmenter.model_version)
    if parsed is None:  # the annotator deleted the last prompt: nothing to suggest
        return [{"model_version": version, "score": 0.0, "result": []} for _ in tasks], version
    out = []
    for task in tasks:
        image = _task_image(task, parsed.brush, fetch)
        height, width = image.shape[:2]
        prompt = parsed.prompt(height, width)
        prompt.validate(height, width)
        t0 = time.perf_counter()
        key = ("ls", project, task.get("id"), _image_url(task, parsed.brush))
        with compute or nullcontext():  # the image is here: only now take a compute slot
            result = segmenter.segment(image, prompt, key=key)  # the engine is thread-safe
        version = str(result.model_version)
        mask = np.asarray(result.mask, dtype=bool)
        inside = np.asarray(result.probability)[mask]
        score = float(inside.mean()) if inside.size else 0.0
        log.info(
            "task %s: interactive %r, %d clicks%s -> %d px in %.0f ms (%s)",
            task.get("id"),
            parsed.label,
            len(prompt.clicks),
            " + box" if prompt.box is not None else "",
            int(mask.sum()),
            1000 * (time.perf_counter() - t0),
            result.level,
        )
        # each accepted object is its own region in the editor: a fresh id per answer
        region_id = uuid.uuid4().hex[:10]
        brush = parsed.brush
        result_regions = []
        if mask.any():
            result_regions = [brush_region(brush.name, brush.to_name, mask, parsed.label, score, region_id)]
        out.append({"model_version": version, "score": round(score, 4), "result": result_regions})
    return out, version


def _image_url(task: dict[str, Any], brush: RegionControl) -> Any:
    data = task.get("data")
    return data.get(brush.value_key) if isinstance(data, dict) else None


def _task_image(task: dict[str, Any], brush: RegionControl, fetch: Fetch) -> np.ndarray:
    url = _task_value(task, brush.value_key, "image")
    return load_image(fetch(url, task.get("id")), url)
