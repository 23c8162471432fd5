"""The "SurgeNet Assist" dock widget: review and correct masks, phases and CVS, commit to the label store.

Thin on purpose. The panel is a magicgui :class:`~magicgui.widgets.Container` of magicgui value widgets; it
only wires them, the napari layers and the keyboard shortcuts to two Qt-free objects:

- :class:`.session.ReviewSession` — model, prediction cache, label store, review order;
- :class:`.edits.ClipEdits` — the clip's working labels, what is uncommitted, the merge and commit rules.

Background jobs (pre-annotate, propagate) go through one helper, :meth:`SurgeNetAssistWidget._start_job`, a
napari ``create_worker`` with a progress bar in the activity panel. Click-to-mask (:mod:`.interactive`) keeps
its own layers and runs its engine calls on workers of their own, outside that one job slot, so a click
preview never waits for a pre-annotation. Layers are only touched on the main thread
(``yielded``/``returned`` signals); the worker only runs the model and writes prediction rows. The phase
timeline under the canvas is the one custom Qt widget (:mod:`._timeline`): magicgui has no timeline. Qt is
touched directly in two more places where magicgui has no option: word wrap on long labels, and the yes/no
question before discarding uncommitted corrections.

Actions the user cannot take right now (no clip open, a job already running, nothing in that direction) raise
:class:`.edits.ReviewError`; the buttons and shortcuts show it in the status line and as a napari
notification with its hint.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    Label,
    PushButton,
    SpinBox,
    Widget,
    show_file_dialog,
)
from psygnal import Signal

from surgenet_assist.core.errors import SurgenetAssistError
from surgenet_assist.core.schema import DEFAULT_SCHEMA
from surgenet_assist.core.store import CHAMPION

from ._reader import SOURCE_KEY
from ._timeline import PhaseTimeline
from .edits import COMMIT_SCOPES, DIRECTIONS, OPEN_A_CLIP, SCOPES, ClipEdits, ReviewError
from .interactive import POINTS_LAYER, PREVIEW_LAYER, ClickTool, merge_object
from .session import EXPORT_FORMATS, CachedPrediction, Clip, ModelChoice, ReviewSession, plugin_settings

if TYPE_CHECKING:
    import napari

#: documented in docs/napari.md; bound on the viewer AND on this plugin's layers (layer keymaps win)
SHORTCUTS = {
    "commit": "Shift-C",
    "next": "N",
    "previous": "Shift-N",
    # click-to-mask (micro-sam's keys, except clear: Shift+C is Commit here)
    "click_toggle": "T",
    "click_accept": "C",
    "click_undo": "U",
    "click_clear": "Shift-X",
    **{f"phase{i}": f"Alt-{i + 1}" for i in range(len(DEFAULT_SCHEMA.phases))},
}

F = TypeVar("F", bound=Callable[..., Any])


def class_colormap(schema=DEFAULT_SCHEMA) -> Any:
    """DirectLabelColormap with the schema's class colours; id 0 (background) is transparent."""
    from napari.utils.colormaps import DirectLabelColormap

    colors: dict[Any, Any] = {c.id: np.array([*c.color, 255]) / 255.0 for c in schema.classes}
    colors[0] = np.zeros(4)
    colors[schema.ignore_index] = np.array([1.0, 1.0, 1.0, 0.6])
    colors[None] = np.array([1.0, 0.0, 1.0, 1.0])
    return DirectLabelColormap(color_dict=colors)


# --- layout helpers (magicgui) ----------------------------------------------------------------------------
def _wrapping_label(value: str = "") -> Label:
    """A Label that wraps long text: magicgui's Label has no word-wrap option, the QLabel behind it has."""
    from qtpy.QtWidgets import QSizePolicy

    label = Label(value=value)
    label.native.setWordWrap(True)
    label.native.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Preferred)
    return label


def _box(*widgets: Widget, label: str = "", layout: str = "horizontal", labels: bool = False) -> Container:
    """A borderless row (or column) of widgets, optionally labelled inside a form."""
    box = Container(widgets=widgets, layout=layout, labels=labels, label=label)
    box.margins = (0, 0, 0, 0)
    return box


def _section(title: str, *parts: Widget) -> Container:
    """One titled group of the panel (what a group box was), laid out top to bottom."""
    section = Container(widgets=[Label(value=f"<b>{title}</b>"), *parts], labels=False)
    section.margins = (4, 8, 4, 2)
    return section


def _user_action(failed: str | None = None) -> Callable[[F], F]:
    """Run a panel action; a problem the user can fix is shown (status line + notification), not raised.

    The action returns ``None`` when refused. ``failed`` prefixes the status line for errors other than a
    refused action (e.g. "Commit failed: <store error>")."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(self: SurgeNetAssistWidget, *args: Any, **kwargs: Any) -> Any:
            try:
                return func(self, *args, **kwargs)
            except SurgenetAssistError as exc:
                self._report(exc, None if isinstance(exc, ReviewError) else failed)
                return None

        return wrapper  # type: ignore[return-value]

    return decorate


class SurgeNetAssistWidget(Container):
    """Dock widget; one per viewer. ``preannotation_finished`` fires on the main thread when a job ends,
    ``click_preview`` when a click's preview is shown (or its engine call failed)."""

    preannotation_finished = Signal(object)
    click_preview = Signal(object)

    def __init__(self, napari_viewer: napari.viewer.Viewer, session: ReviewSession | None = None) -> None:
        super().__init__(labels=False)
        self.viewer = napari_viewer
        self.schema = DEFAULT_SCHEMA
        cfg = plugin_settings()
        self.session = session or ReviewSession(
            cfg["database_url"] or None, project=cfg["project"], author=cfg["author"] or None,
            short_side=cfg["short_side"], batch_size=cfg["batch_size"], device=cfg["device"] or None,
        )
        # the clip under review: its layers, and its edit state (None until a video is open)
        self.clip: Clip | None = None
        self.edits: ClipEdits | None = None
        self.image_layer: Any = None
        self.labels_layer: Any = None
        self.uncertainty_layer: Any = None
        self.worker: Any = None
        self._job = ""
        self._choices: list[ModelChoice] = []
        self._stop = threading.Event()
        self._updating = False
        self.clicks = ClickTool(self, on_preview=lambda: self.click_preview.emit(self))
        self._build_ui()
        self._bind_keys(self.viewer)
        self.viewer.dims.events.current_step.connect(self._on_step)
        self.viewer.layers.events.inserted.connect(self._refresh_clips)
        self.viewer.layers.events.removed.connect(self._refresh_clips)
        self._refresh_models()
        self._refresh_clips()

    # ------------------------------------------------------------------------------------------------
    # UI
    # ------------------------------------------------------------------------------------------------
    def _build_ui(self) -> None:
        # model
        self.served_label = _wrapping_label()
        self.model_combo = ComboBox(choices=self._model_items)
        self.model_combo.changed.connect(self._on_model_changed)
        self.bundle_btn = PushButton(
            text="Bundle…", tooltip="Use a model bundle directory that is not in the registry"
        )
        self.bundle_btn.clicked.connect(self._choose_bundle)
        self.store_label = _wrapping_label(f"Store: {self.session.display_url}")
        model = _section(
            "Model", self.served_label,
            _box(_box(self.model_combo, self.bundle_btn, label="Version"), layout="vertical", labels=True),
            self.store_label,
        )
        # clip + pre-annotation
        # choices are callables: napari re-reads them (reset_choices) whenever layers change or are renamed
        self.clip_combo = ComboBox(choices=self._clip_items, label="Clip")
        self.clip_combo.changed.connect(self._on_clip_combo)
        self.scope_combo = ComboBox(choices=SCOPES, value=SCOPES[0], label="Scope")
        self.start_spin, self.end_spin = SpinBox(min=0, max=0), SpinBox(min=0, max=0)
        for s in (self.start_spin, self.end_spin):
            s.changed.connect(self._on_range_spin)
        self.run_btn = PushButton(text="Pre-annotate")
        self.run_btn.clicked.connect(lambda *_: self.preannotate())
        self.cancel_btn = PushButton(text="Cancel", enabled=False)
        self.cancel_btn.clicked.connect(lambda *_: self.cancel())
        # propagation: carry the current frame's mask to neighbouring frames (no trained head needed)
        self.propagate_btn = PushButton(text="Propagate",
                                        tooltip="Carry this frame's mask to the next/previous N frames")
        self.propagate_btn.clicked.connect(lambda *_: self.propagate())
        self.propagate_dir = ComboBox(choices=DIRECTIONS, value=DIRECTIONS[0])
        self.propagate_n = SpinBox(min=1, max=500, value=10)
        self.uncertainty_check = CheckBox(text="Show uncertainty heatmap")
        self.uncertainty_check.changed.connect(self._on_uncertainty_toggled)
        clip = _section(
            "Clip and pre-annotation",
            _box(
                self.clip_combo, self.scope_combo,
                _box(self.start_spin, Label(value="to"), self.end_spin, label="Frames"),
                _box(self.run_btn, self.cancel_btn),
                _box(self.propagate_btn, self.propagate_dir, self.propagate_n, label="Propagate"),
                layout="vertical", labels=True,
            ),
            self.uncertainty_check,
        )
        # click-to-mask: one object at a time, previewed live, accepted under the selected class
        self.click_btn = PushButton(text="Click on objects",
                                    tooltip=f"Select the '{POINTS_LAYER}' layer in add mode")
        self.click_btn.clicked.connect(lambda *_: self.start_clicking())
        self.click_kind_btn = PushButton(text=f"Next click: positive [{SHORTCUTS['click_toggle']}]")
        self.click_kind_btn.clicked.connect(lambda *_: self.toggle_click())
        self.accept_btn = PushButton(text=f"Accept [{SHORTCUTS['click_accept']}]",
                                     tooltip="Write the object into the segmentation as the selected label")
        self.accept_btn.clicked.connect(lambda *_: self.accept_object())
        self.undo_click_btn = PushButton(text=f"Undo click [{SHORTCUTS['click_undo']}]")
        self.undo_click_btn.clicked.connect(lambda *_: self.undo_click())
        self.clear_btn = PushButton(text=f"Clear [{SHORTCUTS['click_clear']}]")
        self.clear_btn.clicked.connect(lambda *_: self.clear_clicks())
        self.undo_edit_btn = PushButton(text="Undo edit", tooltip="Undo the segmentation layer's last edit "
                                        "(an accepted object or a brush stroke), like Ctrl+Z")
        self.undo_edit_btn.clicked.connect(lambda *_: self.undo_edit())
        self.propagate_object_btn = PushButton(
            text="Propagate object",
            tooltip="Carry the accepted object to the next/previous N frames (the Propagate row's choices)",
        )
        self.propagate_object_btn.clicked.connect(lambda *_: self.propagate_object())
        clicks = _section(
            "Click to segment",
            _box(self.click_btn, self.click_kind_btn),
            _box(self.accept_btn, self.undo_click_btn, self.clear_btn),
            _box(self.undo_edit_btn, self.propagate_object_btn),
        )
        # legend
        cells = [
            f"<td><span style='background-color: rgb{c.color}'>&nbsp;&nbsp;&nbsp;</span> {c.id} {c.name}"
            + (" (clear)" if c.id == 0 else "") + "</td>"
            for c in self.schema.classes
        ]
        half = (len(cells) + 1) // 2
        rows = [cells[i] + (cells[i + half] if i + half < len(cells) else "") for i in range(half)]
        self.legend = Label(value="<table>" + "".join(f"<tr>{r}</tr>" for r in rows) + "</table>")
        legend = _section("Classes (Labels layer ids)", self.legend)
        # phase
        self.phase_label = Label(value="–", label="This frame")
        self.phase_combo = ComboBox(
            choices=[(f"{p.name}  [{SHORTCUTS[f'phase{p.id}']}]", p.id) for p in self.schema.phases]
        )
        self.set_phase_btn = PushButton(
            text="Set phase for frames",
            tooltip="Applies to the selected frame range (timeline drag or the spin boxes)",
        )
        self.set_phase_btn.clicked.connect(lambda *_: self.set_phase(self.phase_combo.value))
        phase = _section(
            "Phase",
            _box(self.phase_label, layout="vertical", labels=True),
            _box(self.phase_combo, self.set_phase_btn),
        )
        # CVS
        self.cvs_boxes: list[CheckBox] = []
        for c in self.schema.cvs:
            cb = CheckBox(text=f"{c.key} {c.name}")
            cb.changed.connect(self._on_cvs_toggled)
            self.cvs_boxes.append(cb)
        cvs = _section("Critical View of Safety (this frame)", *self.cvs_boxes)
        # commit / review
        self.commit_scope = ComboBox(choices=COMMIT_SCOPES, value=COMMIT_SCOPES[0])
        self.commit_btn = PushButton(text=f"Commit [{SHORTCUTS['commit']}]")
        self.commit_btn.clicked.connect(lambda *_: self.commit())
        self.prev_btn = PushButton(text=f"Previous [{SHORTCUTS['previous']}]")
        self.prev_btn.clicked.connect(lambda *_: self.previous())
        self.next_btn = PushButton(text=f"Next to review [{SHORTCUTS['next']}]")
        self.next_btn.clicked.connect(lambda *_: self.next_to_review())
        self.export_combo = ComboBox(choices=EXPORT_FORMATS, value=EXPORT_FORMATS[0])
        self.export_btn = PushButton(text="Export store…")
        self.export_btn.clicked.connect(self._export_dialog)
        self.status = _wrapping_label()
        review = _section(
            "Review",
            _box(self.commit_scope, self.commit_btn),
            _box(self.prev_btn, self.next_btn),
            _box(self.export_combo, self.export_btn),
            self.status,
        )
        self.extend([model, clip, clicks, legend, phase, cvs, review])
        # timeline docked under the canvas: the one custom Qt widget (magicgui has no timeline)
        self.timeline = PhaseTimeline(self.schema)
        self.timeline.frame_clicked.connect(self.goto)
        self.timeline.range_selected.connect(self.select_range)
        self.timeline_dock = self.viewer.window.add_dock_widget(
            self.timeline, name="SurgeNet phase timeline", area="bottom"
        )

    def _say(self, text: str) -> None:
        self.status.value = text

    def _report(self, exc: SurgenetAssistError, failed: str | None = None) -> None:
        """Show a problem the user can fix: the message in the status line, message and hint as a napari
        notification (a warning for a refused action, an error for a failed one)."""
        from napari.utils.notifications import show_error, show_warning

        self._say(exc.message if failed is None else f"{failed}: {exc.message}")
        (show_warning if isinstance(exc, ReviewError) else show_error)(str(exc))

    # ------------------------------------------------------------------------------------------------
    # model selection
    # ------------------------------------------------------------------------------------------------
    def _model_items(self, *_: Any) -> list[tuple[str, ModelChoice]]:
        return [(c.label, c) for c in self._choices]

    def _refresh_models(self, select: ModelChoice | None = None) -> None:
        self._choices = self.session.model_choices()
        with self.model_combo.changed.blocked():
            self.model_combo.reset_choices()
            if select in self._choices:
                self.model_combo.value = select
        self._on_model_changed()

    @property
    def model_choice(self) -> ModelChoice:
        return self.model_combo.value or self._choices[0]

    def _on_model_changed(self, *_: Any) -> None:
        c = self.model_choice
        champion = next((x for x in self._choices if x.status == CHAMPION), None)
        if not c.trained:
            self.served_label.value = (
                "<b style='color:#ff6060'>No trained model: untrained (random-init).</b> Pre-annotations are "
                "noise; label by hand or choose a bundle."
                + ("" if champion is None else f" The registry serves {champion.version}.")
            )
        else:
            served = (
                f"Registry serves <b>{champion.version}</b>." if champion else "No champion in the registry."
            )
            self.served_label.value = f"{served} Using <b>{c.version}</b> ({c.status})."

    def _choose_bundle(self, *_: Any) -> None:
        path = show_file_dialog(
            mode="d", caption="Model bundle directory (with bundle.json)", parent=self.native
        )
        if path:
            self.use_bundle(path)

    @_user_action("Bundle not usable")
    def use_bundle(self, path: str) -> ModelChoice:
        """Add a bundle picked by hand to the selector and select it."""
        choice = self.session.add_bundle(path)
        self._refresh_models(select=choice)
        return choice

    # ------------------------------------------------------------------------------------------------
    # clips
    # ------------------------------------------------------------------------------------------------
    def _clip_layers(self) -> list[Any]:
        return [ly for ly in self.viewer.layers if SOURCE_KEY in getattr(ly, "metadata", {})]

    def _clip_items(self, *_: Any) -> list[tuple[str, Any]]:
        return [(ly.name, ly) for ly in self._clip_layers()]

    def _refresh_clips(self, *_: Any) -> None:
        layers = self._clip_layers()
        with self.clip_combo.changed.blocked():
            self.clip_combo.reset_choices()
            if self.image_layer in layers:
                self.clip_combo.value = self.image_layer
        if self.image_layer is not None and self.image_layer not in layers:
            self._clear_clip()
        if self.image_layer is None and layers:
            self.set_clip(layers[-1])

    def _on_clip_combo(self, layer: Any) -> None:
        if layer is None or layer is self.image_layer:
            return
        if not self.set_clip(layer):
            with self.clip_combo.changed.blocked():
                self.clip_combo.value = self.image_layer

    def has_uncommitted(self) -> bool:
        return self.edits is not None and self.edits.has_uncommitted()

    def confirm_discard(self) -> bool:
        """Asked before switching clip with uncommitted edits (tests replace it).

        A yes/no question is the one dialog magicgui lacks (its Dialog has OK/Cancel), so this stays Qt."""
        from qtpy.QtWidgets import QMessageBox

        assert self.edits is not None
        answer = QMessageBox.question(
            self.native, "Uncommitted corrections",
            f"{self.edits.uncommitted_count()} corrected frame label(s) of {self.image_layer.name} are not "
            "committed. Discard them?",
        )
        return answer == QMessageBox.StandardButton.Yes

    def _clear_clip(self) -> None:
        self.clip = self.edits = self.image_layer = self.labels_layer = self.uncertainty_layer = None
        self.clicks.state = None  # its layers stay until the next clip replaces them (inside a layer event)

    def set_clip(self, layer: Any) -> bool:
        """Make ``layer`` (a video opened by the reader) the clip under review; False if the user kept the
        current clip because of uncommitted edits."""
        if self.clip is not None and self.has_uncommitted() and not self.confirm_discard():
            self._say("Kept the current clip: commit or discard its corrections first.")
            return False
        self.cancel()
        clip = self.session.open_clip(layer.metadata[SOURCE_KEY])
        edits = ClipEdits.load(self.session, clip)
        self.clip, self.edits, self.image_layer = clip, edits, layer
        n = clip.frame_count
        name = f"{layer.name} segmentation"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        # the layer paints straight into the edit state's mask array
        self.labels_layer = self.viewer.add_labels(
            edits.masks, name=name, colormap=class_colormap(self.schema), axis_labels=("frame", "y", "x"),
            opacity=0.55, metadata={"surgenet_clip": clip.path},
        )
        self.labels_layer.events.paint.connect(self._on_paint)
        self.uncertainty_layer = None
        for ly in (self.image_layer, self.labels_layer):
            self._bind_keys(ly)
        self.clicks.attach(clip.height, clip.width, n)
        for s, value in ((self.start_spin, 0), (self.end_spin, n - 1)):
            with s.changed.blocked():
                s.max = n - 1
                s.value = value
        self.timeline.set_phases(edits.phases)
        self.timeline.set_selection(None)
        self._refresh_clips()
        self.viewer.layers.selection.active = self.labels_layer
        self._on_step()
        self._say(f"{layer.name}: {n} frames, video id {clip.video_id} in the store.")
        return True

    def _require_clip(self) -> ClipEdits:
        if self.clip is None or self.edits is None or self.labels_layer is None:
            raise ReviewError("No clip is open.", hint=OPEN_A_CLIP)
        return self.edits

    # ------------------------------------------------------------------------------------------------
    # navigation
    # ------------------------------------------------------------------------------------------------
    @property
    def frame(self) -> int:
        return int(self.viewer.dims.current_step[0])

    def goto(self, frame: int) -> None:
        self.viewer.dims.set_current_step(0, int(frame))

    def select_range(self, start: int, end: int) -> None:
        for s, value in ((self.start_spin, start), (self.end_spin, end)):
            with s.changed.blocked():
                s.value = int(value)
        self.timeline.set_selection((int(start), int(end)))

    @property
    def frame_range(self) -> tuple[int, int]:
        a, b = self.start_spin.value, self.end_spin.value
        return (min(a, b), max(a, b))

    def _on_range_spin(self, *_: Any) -> None:
        self.timeline.set_selection(self.frame_range)

    def _on_step(self, *_: Any) -> None:
        if self.edits is None:
            return
        f = self.frame
        self.timeline.set_current(f)
        ph = self.edits.phase_at(f)
        name = self.schema.phase_names[ph] if ph >= 0 else "no phase"
        self.phase_label.value = name
        if ph >= 0:
            self.phase_combo.value = ph
        text = self.viewer.canvas.overlays.text
        text.visible = True
        text.position = "top_left"
        text.font_size = 11
        text.color = "white"
        text.text = f"frame {f}: {name}"
        self._show_cvs(f)

    def _show_cvs(self, f: int) -> None:
        assert self.edits is not None
        self._updating = True
        probs = self.edits.cvs_probs.get(f)
        values = self.edits.cvs_at(f)
        for k, cb in enumerate(self.cvs_boxes):
            c = self.schema.cvs[k]
            p = "" if probs is None else f"  (model p={float(probs[k]):.2f})"
            cb.text = f"{c.key} {c.name}{p}"
            cb.value = bool(values is not None and values[k] >= 0.5)
        self._updating = False

    @_user_action()
    def next_to_review(self) -> int | None:
        """Jump to the next frame worth a look (active-learning queue, else the next unlabelled frame)."""
        edits = self._require_clip()
        f = edits.next_to_review(self.session, self.frame)
        if f is None:
            self._say("Nothing left to review in this clip.")
            return None
        self.goto(f)
        return f

    @_user_action()
    def previous(self) -> None:
        """Go back along the frames reviewed with *Next to review* (else one frame back)."""
        f = self._require_clip().previous(self.frame)
        if f is not None:
            self.goto(f)

    # ------------------------------------------------------------------------------------------------
    # edits
    # ------------------------------------------------------------------------------------------------
    def _on_paint(self, *_: Any) -> None:
        if self.edits is not None:
            self.edits.mark_painted(self.frame)

    @_user_action()
    def set_phase(self, phase: int, frames: tuple[int, int] | None = None) -> None:
        """Set a phase for the selected range (timeline / spin boxes) — or ``frames``; without a selection,
        for the current frame. Uncommitted until Commit."""
        edits = self._require_clip()
        if frames is None:
            frames = self.frame_range if self.timeline.selection is not None else (self.frame, self.frame)
        a, b = edits.set_phase(int(phase), frames)
        self.timeline.set_phases(edits.phases)
        self._on_step()
        self._say(f"Phase {self.schema.phase_names[phase]} set for frames {a}–{b} (not committed).")

    @_user_action()
    def _on_cvs_toggled(self, *_: Any) -> None:
        if self._updating or self.edits is None:
            return
        self.edits.set_cvs(self.frame, [cb.value for cb in self.cvs_boxes])

    # ------------------------------------------------------------------------------------------------
    # background jobs (one worker helper for pre-annotation and propagation)
    # ------------------------------------------------------------------------------------------------
    def _start_job(
        self,
        what: str,
        job: Callable[[threading.Event], Iterator[Any]],
        *,
        total: int,
        desc: str,
        on_item: Callable[..., None],
        on_done: Callable[[Any], None],
    ) -> Any:
        """Run ``job(stop_event)`` — a generator — in a napari worker with a progress bar of ``total`` steps.

        ``on_item(*yielded)`` and ``on_done(returned)`` run on the main thread; Cancel sets the stop event and
        quits the worker after the item in flight. Errors the user can fix are shown with their hint; others
        reach napari's error notification with the traceback."""
        from napari.qt.threading import create_worker

        if self.worker is not None:
            raise ReviewError(
                f"A {self._job.lower()} is already running.", hint="wait for it to finish, or press Cancel"
            )
        self._stop = stop = threading.Event()
        worker = create_worker(job, stop, _progress={"total": total, "desc": desc}, _start_thread=False,
                               _connect={"errored": lambda exc: self._on_job_error(what, exc)})
        worker.yielded.connect(lambda item: on_item(*item))
        worker.returned.connect(on_done)
        worker.finished.connect(self._on_worker_finished)
        self.worker, self._job = worker, what
        self.run_btn.enabled = False
        self.propagate_btn.enabled = self.propagate_object_btn.enabled = False
        self.cancel_btn.enabled = True
        worker.start()
        return worker

    def _on_job_error(self, what: str, exc: BaseException) -> None:
        if isinstance(exc, SurgenetAssistError):
            self._report(exc, failed=f"{what} failed")
            return
        self._say(f"{what} failed: {exc}")
        raise exc  # napari's error notification, with the traceback

    def _on_worker_finished(self) -> None:
        self.worker = None
        self.run_btn.enabled = True
        self.propagate_btn.enabled = self.propagate_object_btn.enabled = True
        self.cancel_btn.enabled = False
        if self.labels_layer is not None:
            self.labels_layer.refresh()
        if self.edits is not None:
            self.timeline.set_phases(self.edits.phases)
            self._on_step()
            if self._stop.is_set():
                self._say(f"{self._job} cancelled; {len(self.edits.predicted)} frame(s) have predictions.")
        self.preannotation_finished.emit(self)

    def cancel(self) -> None:
        """Stop the running job after its current batch (frames done so far are kept)."""
        if self.worker is not None:
            self._stop.set()
            self.worker.quit()

    @_user_action("Pre-annotation failed")
    def preannotate(self, scope: str | None = None) -> Any:
        """Start a background pre-annotation of the current frame, the range or the whole clip."""
        edits = self._require_clip()
        indices = edits.scope_frames(scope or self.scope_combo.value, self.frame, self.frame_range)
        session, clip, choice = self.session, edits.clip, self.model_choice

        def job(stop: threading.Event) -> Iterator[tuple[int, CachedPrediction]]:
            predictor = session.predictor(choice)
            yield from session.predict_frames(clip, predictor, indices, should_stop=stop.is_set)
            return predictor.model_version

        worker = self._start_job(
            "Pre-annotation", job, total=len(indices), desc=f"Pre-annotating {len(indices)} frame(s)",
            on_item=lambda frame, pred: self._apply_prediction(edits, frame, pred),
            on_done=lambda version: self._say(
                f"Pre-annotated with {version}. Correct the masks, phases and CVS, then commit."
            ),
        )
        self._say(f"Pre-annotating {len(indices)} frame(s) with {choice.version}…")
        return worker

    @_user_action("Propagation failed")
    def propagate(self, direction: str | None = None, n: int | None = None) -> Any:
        """Propagate the current frame's mask to the next/previous ``n`` frames in a background worker;
        results show as predictions (never over human or edited masks) for review and commit."""
        edits = self._require_clip()
        f = self.frame
        direction = direction or self.propagate_dir.value
        targets = edits.propagation_targets(f, direction, int(n or self.propagate_n.value))
        mask = edits.masks[f].copy()
        session, clip, choice = self.session, edits.clip, self.model_choice

        version = f"propagation-from-{f}"  # what session.propagate_frames stores the results as

        def job(stop: threading.Event) -> Iterator[tuple[int, np.ndarray]]:
            predictor = session.predictor(choice)
            yield from session.propagate_frames(clip, predictor, f, mask, targets, should_stop=stop.is_set)
            return version

        worker = self._start_job(
            "Propagation", job, total=len(targets), desc=f"Propagating to {len(targets)} frame(s)",
            on_item=lambda frame, m: self._apply_propagated(edits, frame, m, version),
            on_done=lambda v: self._say(f"Propagated ({v}). Review, correct, then commit."),
        )
        self._say(f"Propagating frame {f}'s mask to {len(targets)} frame(s)…")
        return worker

    @_user_action("Propagation failed")
    def propagate_object(self, direction: str | None = None, n: int | None = None) -> Any:
        """Carry the last accepted click object to the next/previous ``n`` frames (background worker).

        Only the pixels the propagated object covers take its class; the rest of each frame keeps its labels,
        and frames the clinician edited or committed are left alone. The results are reviewed like any
        propagation and stored as ``propagation-from-<frame>-class-<id>`` predictions."""
        edits = self._require_clip()
        obj = self.clicks.accepted_object()
        direction = direction or self.propagate_dir.value
        targets = edits.propagation_targets(obj.frame, direction, int(n or self.propagate_n.value))
        keymask = obj.mask.astype(np.uint8) * np.uint8(obj.class_id)
        base = {t: edits.masks[t].copy() for t in targets}  # what the stored predictions are merged into
        session, clip, choice = self.session, edits.clip, self.model_choice
        version = f"propagation-from-{obj.frame}-class-{obj.class_id}"

        def job(stop: threading.Event) -> Iterator[tuple[int, np.ndarray]]:
            predictor = session.predictor(choice)
            yield from session.propagate_frames(
                clip, predictor, obj.frame, keymask, targets, should_stop=stop.is_set, version=version,
                finish=lambda f, m: merge_object(base[f], m == obj.class_id, obj.class_id),
            )
            return version

        worker = self._start_job(
            "Propagation", job, total=len(targets), desc=f"Propagating the object to {len(targets)} frame(s)",
            on_item=lambda frame, m: self._apply_propagated(edits, frame, m, version),
            on_done=lambda v: self._say(f"Propagated the object ({v}). Review, correct, then commit."),
        )
        name = self.schema.classes[obj.class_id].name
        self._say(f"Propagating the {name} object of frame {obj.frame} to {len(targets)} frame(s)…")
        return worker

    # --- click-to-mask (napari side: .interactive.ClickTool) -----------------------------------------
    @_user_action()
    def start_clicking(self) -> None:
        """Select the click layer in add mode."""
        self.clicks.activate()
        self._say("Click on an object (positive); T switches to negative clicks; C accepts the object.")

    @_user_action()
    def toggle_click(self) -> str:
        """Switch whether the next click is positive or negative."""
        kind = self.clicks.toggle()
        self.click_kind_btn.text = f"Next click: {kind} [{SHORTCUTS['click_toggle']}]"
        self._say(f"Next click: {kind}.")
        return kind

    @_user_action()
    def accept_object(self) -> Any:
        """Write the previewed object into the segmentation under the selected label (one undoable edit)."""
        self._require_clip()
        obj = self.clicks.accept(int(self.labels_layer.selected_label))
        self.labels_layer.refresh()
        name = self.schema.classes[obj.class_id].name
        self._say(
            f"Accepted {int(obj.mask.sum())} px as {obj.class_id} {name} on frame {obj.frame} "
            "(not committed). Undo edit reverts it; Propagate object carries it through the clip."
        )
        return obj

    @_user_action()
    def undo_click(self) -> None:
        """Remove the newest click of the current object."""
        self.clicks.undo_click()

    @_user_action()
    def clear_clicks(self) -> None:
        """Drop the current object's clicks, box and preview."""
        self.clicks.clear()
        self._say(f"Cleared the clicks and the '{PREVIEW_LAYER}' preview.")

    @_user_action()
    def undo_edit(self) -> None:
        """Undo the segmentation layer's last edit (an accepted object, a brush stroke), as Ctrl+Z does."""
        self._require_clip()
        self.labels_layer.undo()

    def _apply_prediction(self, edits: ClipEdits, frame: int, pred: CachedPrediction) -> None:
        if edits is not self.edits or self.labels_layer is None:
            return  # the clip changed while the job ran
        edits.apply_prediction(frame, pred)
        if self.uncertainty_layer is not None:
            self.uncertainty_layer.data[frame] = pred.uncertainty_map
        if frame == self.frame:
            self.labels_layer.refresh()
            if self.uncertainty_layer is not None:
                self.uncertainty_layer.refresh()
            self._on_step()

    def _apply_propagated(self, edits: ClipEdits, frame: int, mask: np.ndarray, version: str) -> None:
        if edits is not self.edits or self.labels_layer is None:
            return
        edits.apply_propagated(frame, mask, version)
        if frame == self.frame:
            self.labels_layer.refresh()

    def _on_uncertainty_toggled(self, on: bool) -> None:
        if self.clip is None:
            return
        if on and self.uncertainty_layer is None:
            shape = (self.clip.frame_count, self.clip.height, self.clip.width)
            data = np.zeros(shape, dtype=np.float32)
            for f, item in self.session.cached(self.clip, self.session.predictor(self.model_choice)).items():
                data[f] = item.uncertainty_map
            self.uncertainty_layer = self.viewer.add_image(
                data, name=f"{self.image_layer.name} uncertainty", colormap="inferno", opacity=0.5,
                contrast_limits=(0.0, 1.0), blending="additive", axis_labels=("frame", "y", "x"),
            )
            self._bind_keys(self.uncertainty_layer)
            self.viewer.layers.selection.active = self.labels_layer
        elif self.uncertainty_layer is not None:
            self.uncertainty_layer.visible = on

    # ------------------------------------------------------------------------------------------------
    # commit / export
    # ------------------------------------------------------------------------------------------------
    @_user_action("Commit failed")
    def commit(self, scope: str | None = None) -> Any:
        """Save the clinician's labels of the current frame (or the range) to the store with provenance
        (the rules: :class:`.edits.ClipEdits`). Predictions in the store are never touched."""
        edits = self._require_clip()
        result = edits.commit(self.session, scope or self.commit_scope.value, self.frame, self.frame_range)
        a, b = result.frames
        self._say(f"Committed {result.count} label(s) for frames {a}–{b} as {self.session.author}.")
        return result

    def _export_dialog(self, *_: Any) -> None:
        fmt = self.export_combo.value
        if fmt == "coco":
            path = show_file_dialog(mode="w", caption="COCO JSON", start_path="labels.json",
                                    filter="JSON (*.json)", parent=self.native)
        else:
            path = show_file_dialog(mode="d", caption=f"Folder for the {fmt} export", parent=self.native)
        if path:
            self.export(fmt, str(path))

    @_user_action("Export failed")
    def export(self, fmt: str, out: str) -> Any:
        """Export the store's human labels (uncommitted corrections are not in the store yet)."""
        if self.has_uncommitted():
            self._say("Note: uncommitted corrections are not exported — commit them first.")
        result = self.session.export(fmt, out)
        self._say(f"Exported {fmt} to {out}: {result}")
        return result

    # ------------------------------------------------------------------------------------------------
    # keyboard shortcuts
    # ------------------------------------------------------------------------------------------------
    def _bind_keys(self, target: Any) -> None:
        """Bind the shortcuts on the viewer and on each of our layers (layer keymaps shadow the viewer's)."""
        actions = {
            "commit": lambda *_: self.commit(),
            "next": lambda *_: self.next_to_review(),
            "previous": lambda *_: self.previous(),
            "click_toggle": lambda *_: self.toggle_click(),
            "click_accept": lambda *_: self.accept_object(),
            "click_undo": lambda *_: self.undo_click(),
            "click_clear": lambda *_: self.clear_clicks(),
            **{f"phase{i}": (lambda *_, i=i: self.set_phase(i)) for i in range(len(self.schema.phases))},
        }
        for name, func in actions.items():
            target.bind_key(SHORTCUTS[name], func, overwrite=True)
