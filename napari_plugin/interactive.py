"""Click-to-mask in napari: clicks (and a box) on one frame, a live preview of one object, accept, propagate.

The clinician adds points to the ``click prompts`` layer (positive = green, negative = red; **T** switches
which kind the next point is) and may draw a rectangle in ``box prompt``. Every change re-runs the click
engine (:class:`surgenet_assist.core.interactive.ClickSegmenter`) on a worker thread and shows the object's
mask in the ``current object`` layer. **C** writes it into the clip's segmentation layer under the selected
class as a normal napari edit (so Ctrl+Z and Commit work as for a brush stroke); the accepted object can then
be propagated through the clip, changing only the pixels the propagated object covers.

Two parts, so the rules are testable without a display:

- :class:`ClickState` (no Qt, no napari): the current object's prompt, which preview is current, one
  engine call in flight at a time with the newest prompt queued behind it (a result for an older prompt is
  dropped), and the accept rule;
- :class:`ClickTool`: the napari side: the three layers, their events, and the worker that calls the engine.
  Actions the user cannot take raise :class:`.edits.ReviewError`; the dock widget shows them.

``surgenet_assist.core.interactive`` (torch, timm) is imported inside the functions that need it: this module
is imported with the dock widget, after napari has created its OpenGL context, and torch must come in only
after :mod:`.session` has kept triton out (see ``session._keep_triton_out_after_gl``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from surgenet_assist.core.errors import SurgenetAssistError
from surgenet_assist.core.schema import DEFAULT_SCHEMA, LabelSchema

from .edits import ClipEdits, ReviewError

if TYPE_CHECKING:
    from surgenet_assist.core.interactive import Box, Click, MaskResult, Prompt

    from .session import Clip, ModelChoice, ReviewSession

POINTS_LAYER = "click prompts"
BOX_LAYER = "box prompt"
PREVIEW_LAYER = "current object"
LABELS = ("positive", "negative")
#: border colours of positive / negative clicks (micro-sam's convention)
LABEL_COLORS = ("#00FF00", "#FF0000")
PREVIEW_COLOR = (0.0, 0.9, 1.0, 1.0)  # cyan: no class of the schema and no tissue has this colour


@dataclass(frozen=True)
class PreviewRequest:
    """One engine call: the prompt of ``frame`` as it was at ``generation``."""

    generation: int
    frame: int
    prompt: Prompt


@dataclass(frozen=True)
class AcceptedObject:
    """The last object accepted into the labels: what *Propagate object* carries through the clip."""

    frame: int
    mask: np.ndarray  # (H, W) bool
    class_id: int
    model_version: str


def merge_object(target: np.ndarray, obj: np.ndarray, class_id: int) -> np.ndarray:
    """``target`` (class ids) with the object's pixels set to ``class_id``; every other pixel unchanged.

    The one rule for accept (on the clicked frame) and for propagating the object (on the other frames), so a
    propagated object never wipes the rest of a frame's pre-annotation the way a whole-frame propagation does.
    """
    out = np.array(target, dtype=np.uint8, copy=True)
    out[np.asarray(obj, dtype=bool)] = int(class_id)
    return out


class ClickHost(Protocol):
    """What :class:`ClickTool` needs of the dock widget (``_widget.SurgeNetAssistWidget``)."""

    viewer: Any
    schema: LabelSchema
    session: ReviewSession
    clip: Clip | None
    image_layer: Any
    labels_layer: Any

    @property
    def model_choice(self) -> ModelChoice: ...

    @property
    def frame(self) -> int: ...

    def _require_clip(self) -> ClipEdits: ...

    def _report(self, exc: SurgenetAssistError, failed: str | None = None) -> None: ...

    def _say(self, text: str) -> None: ...

    def _bind_keys(self, target: Any) -> None: ...


def _new_prompt(*args: Any) -> Prompt:
    from surgenet_assist.core.interactive import Prompt

    return Prompt(*args)


class ClickState:
    """The object being clicked, without Qt: prompt, freshness of the preview, the accept rule.

    ``generation`` counts prompt changes; a preview is current only when it was computed for the current
    generation. At most one request is in flight: a prompt that changes meanwhile is remembered and
    :meth:`finished` hands it out next, so quick clicking costs one engine call per pause, never a queue."""

    def __init__(self, height: int, width: int, schema: LabelSchema = DEFAULT_SCHEMA) -> None:
        self.height, self.width = int(height), int(width)
        self.schema = schema
        self.frame: int | None = None
        self.prompt = _new_prompt()
        self.generation = 0
        self.preview: MaskResult | None = None
        self.positive = True  # the kind of the next click (T toggles)
        self.accepted: AcceptedObject | None = None
        self.in_flight = False
        self._pending = False
        self._runnable = False

    # --- prompt ---------------------------------------------------------------------------------------
    @property
    def waiting(self) -> bool:
        """A preview for the current prompt is being (or about to be) computed."""
        return self._runnable and self.preview is None

    def toggle(self) -> bool:
        """Switch the kind of the next click; returns True when it is positive now."""
        self.positive = not self.positive
        return self.positive

    def set_prompt(
        self, frame: int, clicks: Sequence[Click], box: Box | None = None
    ) -> PreviewRequest | None:
        """The prompt layers changed: the request to run now, or ``None`` (nothing to segment, unchanged,
        or one in flight: :meth:`finished` returns it later). Raises :class:`PromptError` for a prompt the
        engine cannot use (a click outside the frame, only negative clicks)."""
        clicks = tuple(clicks)
        if frame == self.frame and clicks == self.prompt.clicks and box == self.prompt.box:
            return None
        # iterative refinement: a prompt that only adds to the previous one starts from its mask
        extends = (
            frame == self.frame
            and self.preview is not None
            and clicks[: len(self.prompt.clicks)] == self.prompt.clicks
            and box == self.prompt.box
        )
        previous = self.preview.mask if extends and self.preview is not None else None
        self.generation += 1
        self.frame, self.prompt, self.preview = int(frame), _new_prompt(clicks, box, previous), None
        self._runnable = False
        if not clicks and box is None:
            return None
        self.prompt.validate(self.height, self.width)
        self._runnable = True
        return self._next()

    def clear(self) -> None:
        """Forget the current object (its clicks, box and preview); the accepted object stays."""
        self.generation += 1
        self.frame, self.prompt, self.preview, self._runnable = None, _new_prompt(), None, False

    def _next(self) -> PreviewRequest | None:
        if self.in_flight:
            self._pending = True
            return None
        assert self.frame is not None
        self.in_flight, self._pending = True, False
        return PreviewRequest(self.generation, self.frame, self.prompt)

    # --- results --------------------------------------------------------------------------------------
    def deliver(self, request: PreviewRequest, result: MaskResult) -> bool:
        """Keep ``result`` if it answers the current prompt; False (dropped) when the prompt has moved on."""
        if request.generation != self.generation:
            return False
        if result.mask.shape != (self.height, self.width):
            size = f"{self.height}x{self.width}"
            raise ValueError(f"engine returned a {result.mask.shape} mask for a {size} frame")
        self.preview = result
        return True

    def finished(self) -> PreviewRequest | None:
        """The request in flight ended (answered, dropped or failed): the newest prompt's request, if any."""
        self.in_flight = False
        if self._pending and self._runnable and self.preview is None:
            return self._next()
        self._pending = False
        return None

    # --- accept ---------------------------------------------------------------------------------------
    def accept(self, class_id: int) -> AcceptedObject:
        """The current preview as the object of class ``class_id``; raises :class:`ReviewError` when there
        is nothing (current) to accept or the class is not one of the schema's object classes."""
        cid = int(class_id)
        if self.preview is None or self.frame is None:
            if self.waiting:
                raise ReviewError(
                    "The preview of your last click is still being computed.",
                    hint="wait until the 'current object' layer updates, then accept",
                )
            raise ReviewError(
                "No object to accept yet.",
                hint=f"add a point in the '{POINTS_LAYER}' layer on the object (positive), then accept",
            )
        if not 1 <= cid < self.schema.num_classes:
            raise ReviewError(
                f"label {cid} is not an object class (classes 1–{self.schema.num_classes - 1})",
                hint="set the class in the label box of the segmentation layer's controls",
            )
        if not self.preview.mask.any():
            raise ReviewError("The preview is empty.", hint="add a positive click inside the object")
        self.accepted = AcceptedObject(self.frame, self.preview.mask.copy(), cid, self.preview.model_version)
        return self.accepted

    def object_to_propagate(self, labels: np.ndarray) -> AcceptedObject:
        """The accepted object, checked against the clip's labels (``labels`` = its frame's class ids): it
        must still be there, so an accept the clinician undid is not carried through the clip."""
        obj = self.accepted
        if obj is None:
            raise ReviewError(
                "No accepted object to propagate.",
                hint="click an object, accept it (C), then press Propagate object",
            )
        if float((labels[obj.mask] == obj.class_id).mean()) < 0.5:
            raise ReviewError(
                f"The accepted object is no longer in frame {obj.frame}'s labels (undone or painted over).",
                hint="accept the object again, then propagate",
            )
        return obj


def prompt_from_layers(
    points: np.ndarray, labels: Sequence[str], boxes: Sequence[np.ndarray], frame: int
) -> tuple[list[Click], Box | None]:
    """Clicks and box of ``frame`` from napari layer data: points ``(N, 3)`` (frame, row, col) with their
    ``label`` feature, and shape vertices ``(V, 3)``; the newest shape on the frame is the box."""
    from surgenet_assist.core.interactive import Box, Click

    clicks = [
        Click(float(p[1]), float(p[2]), str(lab) == LABELS[0])
        for p, lab in zip(points, labels, strict=True)
        if int(round(float(p[0]))) == frame
    ]
    box = None
    for verts in boxes:
        v = np.asarray(verts, dtype=float)
        if len(v) and int(round(float(v[0, 0]))) == frame:
            box = Box(float(v[:, 1].min()), float(v[:, 2].min()), float(v[:, 1].max()), float(v[:, 2].max()))
    return clicks, box


class ClickTool:
    """The napari side of click-to-mask for the widget's current clip: layers, events, background engine.

    Engine calls run on napari worker threads (``create_worker``) outside the widget's job slot: a click
    preview never waits for a running pre-annotation or propagation, and never blocks the GUI. ``on_preview``
    is called on the main thread after a preview is shown or an engine call failed (tests wait on it)."""

    def __init__(self, widget: ClickHost, on_preview: Callable[[], None] | None = None) -> None:
        self.widget = widget
        self.viewer = widget.viewer
        self.on_preview = on_preview or (lambda: None)
        self.state: ClickState | None = None
        self.points_layer: Any = None
        self.box_layer: Any = None
        self.preview_layer: Any = None
        self._shown_frame: int | None = None
        self._syncing = False

    # --- layers ---------------------------------------------------------------------------------------
    def attach(self, height: int, width: int, frames: int) -> None:
        """Fresh prompt layers and state for a newly opened clip (the old clip's layers are replaced)."""
        self.detach()
        self.state = ClickState(height, width, self.widget.schema)
        self._frames, self._size = int(frames), (int(height), int(width))
        self._ensure_layers()

    def detach(self) -> None:
        """Remove this tool's layers (clip closed or replaced)."""
        for ly in (self.points_layer, self.box_layer, self.preview_layer):
            if ly is not None and ly in self.viewer.layers:
                self.viewer.layers.remove(ly)
        self.points_layer = self.box_layer = self.preview_layer = None
        self.state, self._shown_frame = None, None

    def _require(self) -> ClickState:
        if self.state is None:
            self.widget._require_clip()  # raises "No clip is open"
            raise ReviewError("Click-to-mask is not ready.", hint="reopen the clip")
        self._ensure_layers()
        return self.state

    def _ensure_layers(self) -> None:
        """Create the three layers, again if the user deleted one (micro-sam does the same)."""
        from napari.utils.colormaps import DirectLabelColormap

        active = self.viewer.layers.selection.active
        if self.preview_layer is None or self.preview_layer not in self.viewer.layers:
            data = np.zeros((self._frames, *self._size), dtype=np.uint8)  # pages allocated on write
            self.preview_layer = self.viewer.add_labels(
                data, name=PREVIEW_LAYER, opacity=0.5, axis_labels=("frame", "y", "x"),
                colormap=DirectLabelColormap(color_dict={0: np.zeros(4), 1: np.array(PREVIEW_COLOR),
                                                         None: np.array([1.0, 0.0, 1.0, 1.0])}),
            )
            self._shown_frame = None
            self.widget._bind_keys(self.preview_layer)
        if self.box_layer is None or self.box_layer not in self.viewer.layers:
            self.box_layer = self.viewer.add_shapes(
                ndim=3, name=BOX_LAYER, face_color="transparent", edge_color=LABEL_COLORS[0], edge_width=2,
                axis_labels=("frame", "y", "x"),
            )
            self.box_layer.events.data.connect(self._on_prompt_changed)
            self.widget._bind_keys(self.box_layer)
        if self.points_layer is None or self.points_layer not in self.viewer.layers:
            positive = self.state is None or self.state.positive
            self.points_layer = self.viewer.add_points(
                np.empty((0, 3)), ndim=3, name=POINTS_LAYER, axis_labels=("frame", "y", "x"),
                features={"label": np.array([], dtype=str)},
                feature_defaults={"label": LABELS[0] if positive else LABELS[1]},
                property_choices={"label": list(LABELS)},
                border_color="label", border_color_cycle=list(LABEL_COLORS), face_color="transparent",
                border_width=0.3, size=max(6, round(min(self._size) / 20)),
            )
            self.points_layer.events.data.connect(self._on_prompt_changed)
            self.widget._bind_keys(self.points_layer)
        if active is not None and active in self.viewer.layers:
            self.viewer.layers.selection.active = active

    def activate(self) -> None:
        """Select the click layer in add mode: the next mouse click on the frame is a prompt."""
        self._require()
        self.viewer.layers.selection.active = self.points_layer
        self.points_layer.mode = "add"

    # --- prompt changes -------------------------------------------------------------------------------
    def _on_prompt_changed(self, event: Any = None) -> None:
        action = str(getattr(event, "action", "") or "")
        if self._syncing or action.endswith("ing"):  # napari's "adding"/"removing": the change follows
            return
        try:
            self.sync(event.source if event is not None else None)
        except SurgenetAssistError as exc:
            self.widget._report(exc)

    def sync(self, source: Any = None) -> PreviewRequest | None:
        """Read the prompt from the layers and start a preview if it changed.

        The object lives on one frame: the frame of the newest point (or box) of the layer that changed.
        Prompts left on other frames are removed (clicking on another frame starts a new object), and so
        are clicks outside the frame, after the engine's own check has said so."""
        from surgenet_assist.core.interactive import PromptError

        state = self._require()
        pts, shapes = self.points_layer, self.box_layer
        newest = source if source is not None and len(source.data) else (pts if len(pts.data) else shapes)
        if len(newest.data):
            last = newest.data[-1]
            frame = int(round(float(np.asarray(last).reshape(-1, 3)[0, 0])))
        else:
            frame = state.frame if state.frame is not None else self.widget.frame
        self._drop_other_frames(frame)
        clicks, box = prompt_from_layers(pts.data, pts.features["label"], shapes.data, frame)
        try:
            request = state.set_prompt(frame, clicks, box)
        except PromptError as exc:
            self._show(None)
            h, w = self._size
            outside = [i for i, p in enumerate(pts.data) if not (0 <= p[1] < h and 0 <= p[2] < w)]
            if not outside:
                raise
            # a click beside the frame is dropped (it could never be used); the others keep working
            self._remove_points(outside)
            try:
                retry = state.set_prompt(frame, *prompt_from_layers(pts.data, pts.features["label"],
                                                                    shapes.data, frame))
            except PromptError:
                retry = None
            if retry is not None:
                self._run(retry)
            raise exc
        if request is None and not state.waiting:
            self._show(state.preview)
        if request is not None:
            self._run(request)
        return request

    def _drop_other_frames(self, frame: int) -> None:
        pts = self.points_layer
        others = [i for i, p in enumerate(pts.data) if int(round(float(p[0]))) != frame]
        self._remove_points(others)
        shapes = [
            i for i, v in enumerate(self.box_layer.data) if int(round(float(np.asarray(v)[0, 0]))) != frame
        ]
        if shapes:
            with self._quiet():
                self.box_layer.selected_data = set(shapes)
                self.box_layer.remove_selected()

    def _remove_points(self, indices: Sequence[int]) -> None:
        if not len(indices):
            return
        with self._quiet():
            self.points_layer.selected_data = set(int(i) for i in indices)
            self.points_layer.remove_selected()

    @contextmanager
    def _quiet(self) -> Iterator[None]:
        """Edit the prompt layers without re-entering :meth:`sync` for each step."""
        self._syncing = True
        try:
            yield
        finally:
            self._syncing = False

    # --- the engine, in the background -----------------------------------------------------------------
    def _run(self, request: PreviewRequest) -> None:
        from napari.qt.threading import create_worker

        widget = self.widget
        session, choice, image, clip = widget.session, widget.model_choice, widget.image_layer, widget.clip
        assert clip is not None and image is not None
        state = self.state

        def job() -> tuple[PreviewRequest, MaskResult]:
            segmenter = session.click_segmenter(choice)
            rgb = np.asarray(image.data[request.frame])
            if rgb.ndim == 2:
                rgb = np.repeat(rgb[..., None], 3, axis=2)
            rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
            key = (clip.content_hash, request.frame)
            return request, segmenter.segment(rgb, request.prompt, key=key)

        worker = create_worker(job, _start_thread=False)
        worker.returned.connect(lambda out: self._on_result(state, *out))
        worker.errored.connect(lambda exc: self._on_error(state, exc))
        worker.finished.connect(lambda: self._on_finished(state))
        worker.start()

    def _on_result(self, state: ClickState | None, request: PreviewRequest, result: MaskResult) -> None:
        if state is not self.state or state is None:
            return  # the clip changed while the engine ran
        if state.deliver(request, result):
            self._show(result)
            self.widget._say(
                f"Object on frame {request.frame}: {int(result.mask.sum())} px ({result.level}, "
                f"{result.seconds * 1000:.0f} ms). C accepts it, T switches positive/negative."
            )
            self.on_preview()

    def _on_error(self, state: ClickState | None, exc: BaseException) -> None:
        if state is not self.state:
            return
        if isinstance(exc, SurgenetAssistError):
            self.widget._report(exc, failed="Click preview failed")
            self.on_preview()
            return
        self.widget._say(f"Click preview failed: {exc}")
        self.on_preview()
        raise exc  # napari's error notification, with the traceback

    def _on_finished(self, state: ClickState | None) -> None:
        if state is not self.state or state is None:
            return
        request = state.finished()
        if request is not None:
            self._run(request)

    def _show(self, result: MaskResult | None) -> None:
        """Draw ``result`` (or nothing) in the preview layer, on the state's frame only."""
        layer, state = self.preview_layer, self.state
        if layer is None or state is None or layer not in self.viewer.layers:
            return
        if self._shown_frame is not None:
            layer.data[self._shown_frame] = 0
        self._shown_frame = None
        if result is not None and state.frame is not None:
            layer.data[state.frame] = result.mask.astype(np.uint8)
            self._shown_frame = state.frame
        layer.refresh()

    # --- actions (bound to keys and buttons by the widget) ---------------------------------------------
    def toggle(self) -> str:
        """Switch the kind of the next click (positive/negative); returns it."""
        state = self._require()
        kind = LABELS[0] if state.toggle() else LABELS[1]
        self.points_layer.feature_defaults["label"] = kind
        return kind

    def undo_click(self) -> None:
        """Remove the newest click of the current object (its preview follows)."""
        self._require()
        n = len(self.points_layer.data)
        if not n:
            raise ReviewError("No click to undo.", hint=f"add points in the '{POINTS_LAYER}' layer")
        self._remove_points([n - 1])
        self.sync(self.points_layer)

    def clear(self) -> None:
        """Drop the current object's clicks, box and preview."""
        state = self._require()
        self._remove_points(list(range(len(self.points_layer.data))))
        if len(self.box_layer.data):
            with self._quiet():
                self.box_layer.selected_data = set(range(len(self.box_layer.data)))
                self.box_layer.remove_selected()
        state.clear()
        self._show(None)

    def accept(self, class_id: int) -> AcceptedObject:
        """Write the preview into the segmentation layer as class ``class_id`` — one napari edit, so Ctrl+Z
        (or *Undo accept*) reverts it and Commit stores it — then start a fresh object."""
        state = self._require()
        obj = state.accept(class_id)
        edits = self.widget._require_clip()
        layer = self.widget.labels_layer
        rows, cols = np.nonzero(obj.mask)
        layer.data_setitem((np.full(rows.shape, obj.frame), rows, cols), obj.class_id)
        edits.mark_painted(obj.frame)  # the paint event marks the viewer's frame; this one is certain
        self.clear()  # a fresh object next; the accepted one is kept for Propagate object
        return obj

    def accepted_object(self) -> AcceptedObject:
        """The accepted object, still present in the clip's labels (else :class:`ReviewError`)."""
        state = self._require()
        edits = self.widget._require_clip()
        obj = state.accepted
        labels = np.asarray(edits.masks[obj.frame]) if obj is not None else np.zeros((0, 0), np.uint8)
        return state.object_to_propagate(labels)


__all__ = [
    "BOX_LAYER",
    "POINTS_LAYER",
    "PREVIEW_LAYER",
    "AcceptedObject",
    "ClickState",
    "ClickTool",
    "PreviewRequest",
    "merge_object",
    "prompt_from_layers",
]
