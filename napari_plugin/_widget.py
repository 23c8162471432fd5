"""The "SurgeNet Assist" dock widget: review and correct masks, phases and CVS, commit to the label store.

Thin on purpose: model, cache and store logic live in :mod:`.session` (Qt-free); this module wires them to
napari layers, a phase timeline, keyboard shortcuts and a background worker. Layers are only touched on the
main thread (``yielded``/``returned`` signals); the worker only runs the model and writes prediction rows.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from surgenet_assist.core.schema import DEFAULT_SCHEMA

from ._reader import SOURCE_KEY
from ._timeline import PhaseTimeline
from .session import CachedPrediction, Clip, ModelChoice, ReviewSession, plugin_settings

if TYPE_CHECKING:
    import napari

#: documented in docs/napari.md; bound on the viewer AND on this plugin's layers (layer keymaps win)
SHORTCUTS = {
    "commit": "Shift-C",
    "next": "N",
    "previous": "Shift-N",
    **{f"phase{i}": f"Alt-{i + 1}" for i in range(len(DEFAULT_SCHEMA.phases))},
}
SCOPES = ("current frame", "frame range", "whole clip")


def class_colormap(schema=DEFAULT_SCHEMA) -> Any:
    """DirectLabelColormap with the schema's class colours; id 0 (background) is transparent."""
    from napari.utils.colormaps import DirectLabelColormap

    colors: dict[Any, Any] = {c.id: np.array([*c.color, 255]) / 255.0 for c in schema.classes}
    colors[0] = np.zeros(4)
    colors[schema.ignore_index] = np.array([1.0, 1.0, 1.0, 0.6])
    colors[None] = np.array([1.0, 0.0, 1.0, 1.0])
    return DirectLabelColormap(color_dict=colors)


class SurgeNetAssistWidget(QWidget):
    """Dock widget; one per viewer. ``preannotation_finished`` fires on the main thread when a run ends."""

    preannotation_finished = Signal(object)

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None,
                 session: ReviewSession | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.schema = DEFAULT_SCHEMA
        cfg = plugin_settings()
        self.session = session or ReviewSession(
            cfg["database_url"] or None, project=cfg["project"], author=cfg["author"] or None,
            short_side=cfg["short_side"], batch_size=cfg["batch_size"], device=cfg["device"] or None,
        )
        # per-clip state
        self.clip: Clip | None = None
        self.image_layer: Any = None
        self.labels_layer: Any = None
        self.uncertainty_layer: Any = None
        self.phases = np.zeros(0, dtype=np.int64)
        self.cvs: dict[int, list[float]] = {}
        self.cvs_probs: dict[int, np.ndarray] = {}
        self.predicted: set[int] = set()
        self.human_masks: set[int] = set()
        self.dirty_masks: set[int] = set()
        self.dirty_phase: set[int] = set()
        self.dirty_cvs: set[int] = set()
        self.reviewed: list[int] = []
        self.shown_model: str | None = None
        self.worker: Any = None
        self._stop = threading.Event()
        self._updating = False
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
        root = QVBoxLayout(self)
        # model
        box = QGroupBox("Model")
        form = QFormLayout(box)
        self.served_label = QLabel()
        self.served_label.setWordWrap(True)
        self.model_combo = QComboBox()
        self.model_combo.currentIndexChanged.connect(self._on_model_changed)
        self.bundle_btn = QPushButton("Bundle…")
        self.bundle_btn.setToolTip("Use a model bundle directory that is not in the registry")
        self.bundle_btn.clicked.connect(self._choose_bundle)
        row = QHBoxLayout()
        row.addWidget(self.model_combo, 1)
        row.addWidget(self.bundle_btn)
        form.addRow(self.served_label)
        form.addRow("Version", row)
        self.store_label = QLabel(f"Store: {self.session.display_url}")
        self.store_label.setWordWrap(True)
        form.addRow(self.store_label)
        root.addWidget(box)
        # clip + pre-annotation
        box = QGroupBox("Clip and pre-annotation")
        form = QFormLayout(box)
        self.clip_combo = QComboBox()
        self.clip_combo.currentIndexChanged.connect(self._on_clip_combo)
        form.addRow("Clip", self.clip_combo)
        self.scope_combo = QComboBox()
        self.scope_combo.addItems(SCOPES)
        form.addRow("Scope", self.scope_combo)
        self.start_spin, self.end_spin = QSpinBox(), QSpinBox()
        for s in (self.start_spin, self.end_spin):
            s.setRange(0, 0)
            s.valueChanged.connect(self._on_range_spin)
        row = QHBoxLayout()
        row.addWidget(self.start_spin)
        row.addWidget(QLabel("to"))
        row.addWidget(self.end_spin)
        form.addRow("Frames", row)
        self.run_btn = QPushButton("Pre-annotate")
        self.run_btn.clicked.connect(self.preannotate)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel)
        row = QHBoxLayout()
        row.addWidget(self.run_btn)
        row.addWidget(self.cancel_btn)
        form.addRow(row)
        # propagation: carry the current frame's mask to neighbouring frames (no trained head needed)
        self.propagate_n = QSpinBox()
        self.propagate_n.setRange(1, 500)
        self.propagate_n.setValue(10)
        self.propagate_dir = QComboBox()
        self.propagate_dir.addItems(["next", "previous", "both"])
        self.propagate_btn = QPushButton("Propagate")
        self.propagate_btn.setToolTip("Carry this frame's mask to the next/previous N frames")
        self.propagate_btn.clicked.connect(lambda *_: self.propagate())
        row = QHBoxLayout()
        row.addWidget(self.propagate_btn)
        row.addWidget(self.propagate_dir)
        row.addWidget(self.propagate_n)
        form.addRow("Propagate", row)
        self.uncertainty_check = QCheckBox("Show uncertainty heatmap")
        self.uncertainty_check.toggled.connect(self._on_uncertainty_toggled)
        form.addRow(self.uncertainty_check)
        root.addWidget(box)
        # legend
        box = QGroupBox("Classes (Labels layer ids)")
        lay = QVBoxLayout(box)
        cells = [
            f"<td><span style='background-color: rgb{c.color}'>&nbsp;&nbsp;&nbsp;</span> {c.id} {c.name}"
            + (" (clear)" if c.id == 0 else "") + "</td>"
            for c in self.schema.classes
        ]
        half = (len(cells) + 1) // 2
        rows = [cells[i] + (cells[i + half] if i + half < len(cells) else "") for i in range(half)]
        self.legend = QLabel("<table>" + "".join(f"<tr>{r}</tr>" for r in rows) + "</table>")
        lay.addWidget(self.legend)
        root.addWidget(box)
        # phase
        box = QGroupBox("Phase")
        form = QFormLayout(box)
        self.phase_label = QLabel("–")
        form.addRow("This frame", self.phase_label)
        self.phase_combo = QComboBox()
        self.phase_combo.addItems(
            [f"{p.name}  [{SHORTCUTS[f'phase{p.id}']}]" for p in self.schema.phases]
        )
        self.set_phase_btn = QPushButton("Set phase for frames")
        self.set_phase_btn.setToolTip("Applies to the selected frame range (timeline drag or the spin boxes)")
        self.set_phase_btn.clicked.connect(lambda: self.set_phase(self.phase_combo.currentIndex()))
        form.addRow(self.phase_combo, self.set_phase_btn)
        root.addWidget(box)
        # CVS
        box = QGroupBox("Critical View of Safety (this frame)")
        lay = QVBoxLayout(box)
        self.cvs_boxes: list[QCheckBox] = []
        for c in self.schema.cvs:
            cb = QCheckBox(f"{c.key} {c.name}")
            cb.toggled.connect(self._on_cvs_toggled)
            lay.addWidget(cb)
            self.cvs_boxes.append(cb)
        root.addWidget(box)
        # commit / review
        box = QGroupBox("Review")
        form = QFormLayout(box)
        self.commit_scope = QComboBox()
        self.commit_scope.addItems(["current frame", "frame range"])
        self.commit_btn = QPushButton(f"Commit [{SHORTCUTS['commit']}]")
        self.commit_btn.clicked.connect(self.commit)
        form.addRow(self.commit_scope, self.commit_btn)
        self.prev_btn = QPushButton(f"Previous [{SHORTCUTS['previous']}]")
        self.prev_btn.clicked.connect(self.previous)
        self.next_btn = QPushButton(f"Next to review [{SHORTCUTS['next']}]")
        self.next_btn.clicked.connect(self.next_to_review)
        form.addRow(self.prev_btn, self.next_btn)
        self.export_combo = QComboBox()
        from .session import EXPORT_FORMATS

        self.export_combo.addItems(EXPORT_FORMATS)
        self.export_btn = QPushButton("Export store…")
        self.export_btn.clicked.connect(self._export_dialog)
        form.addRow(self.export_combo, self.export_btn)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        form.addRow(self.status)
        root.addWidget(box)
        root.addStretch(1)
        # timeline docked under the canvas
        self.timeline = PhaseTimeline(self.schema)
        self.timeline.frame_clicked.connect(self.goto)
        self.timeline.range_selected.connect(self.select_range)
        self.timeline_dock = self.viewer.window.add_dock_widget(
            self.timeline, name="SurgeNet phase timeline", area="bottom"
        )

    def _say(self, text: str) -> None:
        self.status.setText(text)

    # ------------------------------------------------------------------------------------------------
    # model selection
    # ------------------------------------------------------------------------------------------------
    def _refresh_models(self, select: ModelChoice | None = None) -> None:
        self._choices = self.session.model_choices()
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        self.model_combo.addItems([c.label for c in self._choices])
        if select is not None and select in self._choices:
            self.model_combo.setCurrentIndex(self._choices.index(select))
        self.model_combo.blockSignals(False)
        self._on_model_changed()

    @property
    def model_choice(self) -> ModelChoice:
        return self._choices[max(0, self.model_combo.currentIndex())]

    def _on_model_changed(self, *_: Any) -> None:
        c = self.model_choice
        champion = next((x for x in self._choices if x.status == "champion"), None)
        if not c.trained:
            self.served_label.setText(
                "<b style='color:#ff6060'>No trained model: untrained (random-init).</b> Pre-annotations are "
                "noise; label by hand or choose a bundle."
                + ("" if champion is None else f" The registry serves {champion.version}.")
            )
        else:
            served = (
                f"Registry serves <b>{champion.version}</b>." if champion else "No champion in the registry."
            )
            self.served_label.setText(f"{served} Using <b>{c.version}</b> ({c.status}).")

    def _choose_bundle(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Model bundle directory (with bundle.json)")
        if path:
            self.use_bundle(path)

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

    def _refresh_clips(self, *_: Any) -> None:
        layers = self._clip_layers()
        names = [ly.name for ly in layers]
        current = self.image_layer.name if self.image_layer is not None else None
        self.clip_combo.blockSignals(True)
        self.clip_combo.clear()
        self.clip_combo.addItems(names)
        if current in names:
            self.clip_combo.setCurrentIndex(names.index(current))
        self.clip_combo.blockSignals(False)
        if self.image_layer is not None and self.image_layer not in layers:
            self._clear_clip()
        if self.image_layer is None and layers:
            self.set_clip(layers[-1])

    def _on_clip_combo(self, index: int) -> None:
        layers = self._clip_layers()
        if not 0 <= index < len(layers) or layers[index] is self.image_layer:
            return
        if not self.set_clip(layers[index]):
            self.clip_combo.blockSignals(True)
            self.clip_combo.setCurrentIndex(layers.index(self.image_layer))
            self.clip_combo.blockSignals(False)

    def has_uncommitted(self) -> bool:
        return bool(self.dirty_masks or self.dirty_phase or self.dirty_cvs)

    def confirm_discard(self) -> bool:
        """Asked before switching clip with uncommitted edits (tests replace it)."""
        n = len(self.dirty_masks) + len(self.dirty_phase) + len(self.dirty_cvs)
        answer = QMessageBox.question(
            self, "Uncommitted corrections",
            f"{n} corrected frame label(s) of {self.image_layer.name} are not committed. Discard them?",
        )
        return answer == QMessageBox.StandardButton.Yes

    def _clear_clip(self) -> None:
        self.clip = self.image_layer = self.labels_layer = self.uncertainty_layer = None

    def set_clip(self, layer: Any) -> bool:
        """Make ``layer`` (a video opened by the reader) the clip under review; False if the user kept the
        current clip because of uncommitted edits."""
        if self.clip is not None and self.has_uncommitted() and not self.confirm_discard():
            self._say("Kept the current clip: commit or discard its corrections first.")
            return False
        self.cancel()
        self.clip = self.session.open_clip(layer.metadata[SOURCE_KEY])
        self.image_layer = layer
        n = self.clip.frame_count
        human = self.session.human_labels(self.clip)
        self.phases = np.asarray(human["phases"], dtype=np.int64)
        self.cvs = {f: list(v) for f, v in human["cvs"].items()}
        self.cvs_probs, self.predicted, self.reviewed = {}, set(), []
        self.dirty_masks, self.dirty_phase, self.dirty_cvs = set(), set(), set()
        self.human_masks = set(human["masks"])
        name = f"{layer.name} segmentation"
        masks = np.zeros((n, self.clip.height, self.clip.width), dtype=np.uint8)  # pages allocated on write
        for f, m in human["masks"].items():
            masks[f] = m
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        self.labels_layer = self.viewer.add_labels(
            masks, name=name, colormap=class_colormap(self.schema), axis_labels=("frame", "y", "x"),
            opacity=0.55, metadata={"surgenet_clip": self.clip.path},
        )
        self.labels_layer.events.paint.connect(self._on_paint)
        self.uncertainty_layer = None
        for ly in (self.image_layer, self.labels_layer):
            self._bind_keys(ly)
        for s in (self.start_spin, self.end_spin):
            s.blockSignals(True)
            s.setRange(0, n - 1)
            s.blockSignals(False)
        self.start_spin.setValue(0)
        self.end_spin.setValue(n - 1)
        self.timeline.set_phases(self.phases)
        self.timeline.set_selection(None)
        self._refresh_clips()
        self.viewer.layers.selection.active = self.labels_layer
        self._on_step()
        self._say(f"{layer.name}: {n} frames, video id {self.clip.video_id} in the store.")
        return True

    # ------------------------------------------------------------------------------------------------
    # navigation
    # ------------------------------------------------------------------------------------------------
    @property
    def frame(self) -> int:
        return int(self.viewer.dims.current_step[0])

    def goto(self, frame: int) -> None:
        self.viewer.dims.set_current_step(0, int(frame))

    def select_range(self, start: int, end: int) -> None:
        self.start_spin.setValue(int(start))
        self.end_spin.setValue(int(end))
        self.timeline.set_selection((int(start), int(end)))

    @property
    def frame_range(self) -> tuple[int, int]:
        a, b = self.start_spin.value(), self.end_spin.value()
        return (min(a, b), max(a, b))

    def _on_range_spin(self, *_: Any) -> None:
        self.timeline.set_selection(self.frame_range)

    def _on_step(self, *_: Any) -> None:
        if self.clip is None:
            return
        f = self.frame
        self.timeline.set_current(f)
        ph = int(self.phases[f]) if f < len(self.phases) else -1
        name = self.schema.phase_names[ph] if ph >= 0 else "no phase"
        self.phase_label.setText(name)
        if ph >= 0:
            self.phase_combo.setCurrentIndex(ph)
        text = self.viewer.canvas.overlays.text
        text.visible = True
        text.position = "top_left"
        text.font_size = 11
        text.color = "white"
        text.text = f"frame {f}: {name}"
        self._show_cvs(f)

    def _show_cvs(self, f: int) -> None:
        self._updating = True
        probs = self.cvs_probs.get(f)
        values = self.cvs.get(f)
        for k, cb in enumerate(self.cvs_boxes):
            c = self.schema.cvs[k]
            p = "" if probs is None else f"  (model p={float(probs[k]):.2f})"
            cb.setText(f"{c.key} {c.name}{p}")
            cb.setChecked(bool(values is not None and values[k] >= 0.5))
        self._updating = False

    def next_to_review(self) -> int | None:
        if self.clip is None:
            return None
        f = self.session.next_to_review(self.clip, self.frame, skip=set(self.reviewed) | {self.frame})
        if f is None:
            self._say("Nothing left to review in this clip.")
            return None
        self.reviewed.append(self.frame)
        self.goto(f)
        return f

    def previous(self) -> None:
        if self.reviewed:
            self.goto(self.reviewed.pop())
        elif self.frame > 0:
            self.goto(self.frame - 1)

    # ------------------------------------------------------------------------------------------------
    # edits
    # ------------------------------------------------------------------------------------------------
    def _on_paint(self, *_: Any) -> None:
        self.dirty_masks.add(self.frame)

    def set_phase(self, phase: int, frames: tuple[int, int] | None = None) -> None:
        """Set a phase for the selected range (timeline / spin boxes) — or ``frames`` — and mark it dirty."""
        if self.clip is None:
            return
        if frames is None:
            frames = self.frame_range if self.timeline.selection is not None else (self.frame, self.frame)
        a, b = frames
        self.phases[a : b + 1] = int(phase)
        self.dirty_phase.update(range(a, b + 1))
        self.timeline.set_phases(self.phases)
        self._on_step()
        self._say(f"Phase {self.schema.phase_names[phase]} set for frames {a}–{b} (not committed).")

    def _on_cvs_toggled(self, *_: Any) -> None:
        if self._updating or self.clip is None:
            return
        self.cvs[self.frame] = [1.0 if cb.isChecked() else 0.0 for cb in self.cvs_boxes]
        self.dirty_cvs.add(self.frame)

    # ------------------------------------------------------------------------------------------------
    # pre-annotation (worker thread)
    # ------------------------------------------------------------------------------------------------
    def _indices(self, scope: str) -> list[int]:
        assert self.clip is not None
        if scope == "current frame":
            return [self.frame]
        if scope == "frame range":
            a, b = self.frame_range
            return list(range(a, b + 1))
        return list(range(self.clip.frame_count))

    def preannotate(self, scope: str | None = None) -> Any:
        """Start a background pre-annotation of the current frame, the range or the whole clip."""
        from napari.qt.threading import create_worker

        if self.clip is None:
            self._say("Open a video first (File › Open, or File › Open Sample › SurgeNet Assist).")
            return None
        if self.worker is not None:
            self._say("A pre-annotation is already running.")
            return None
        indices = self._indices(scope or self.scope_combo.currentText())
        session, clip, choice = self.session, self.clip, self.model_choice
        self._stop = stop = threading.Event()

        def job():
            predictor = session.predictor(choice)
            yield from session.predict_frames(clip, predictor, indices, should_stop=stop.is_set)
            return predictor.model_version

        progress = {"total": len(indices), "desc": f"Pre-annotating {len(indices)} frame(s)"}
        worker = create_worker(job, _progress=progress)
        worker.yielded.connect(lambda item, c=clip: self._apply_prediction(c, *item))
        worker.returned.connect(self._on_worker_returned)
        worker.errored.connect(lambda exc: self._say(f"Pre-annotation failed: {exc}"))
        worker.finished.connect(self._on_worker_finished)
        self.worker = worker
        self.run_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self._say(f"Pre-annotating {len(indices)} frame(s) with {choice.version}…")
        worker.start()
        return worker

    def propagate(self, direction: str | None = None, n: int | None = None) -> Any:
        """Propagate the current frame's mask to the next/previous ``n`` frames in a background worker;
        results show as predictions (never over human or edited masks) for review and commit."""
        from napari.qt.threading import create_worker

        if self.clip is None or self.labels_layer is None:
            self._say("Open a video first (File › Open, or File › Open Sample › SurgeNet Assist).")
            return None
        if self.worker is not None:
            self._say("A pre-annotation or propagation is already running.")
            return None
        direction = direction or self.propagate_dir.currentText()
        n = int(n or self.propagate_n.value())
        f, last = self.frame, self.clip.frame_count - 1
        targets: list[int] = []
        if direction in ("next", "both"):
            targets += list(range(f + 1, min(last, f + n) + 1))
        if direction in ("previous", "both"):
            targets += list(range(max(0, f - n), f))
        if not targets:
            self._say("No frames in that direction.")
            return None
        mask = np.asarray(self.labels_layer.data[f]).copy()
        session, clip, choice = self.session, self.clip, self.model_choice
        self._stop = stop = threading.Event()

        def job():
            predictor = session.predictor(choice)
            yield from session.propagate_frames(clip, predictor, f, mask, targets, should_stop=stop.is_set)
            return f"propagation-from-{f}"

        progress = {"total": len(targets), "desc": f"Propagating to {len(targets)} frame(s)"}
        worker = create_worker(job, _progress=progress)
        worker.yielded.connect(lambda item, c=clip: self._apply_propagated(c, *item))
        worker.returned.connect(lambda v: self._say(f"Propagated ({v}). Review, correct, then commit."))
        worker.errored.connect(lambda exc: self._say(f"Propagation failed: {exc}"))
        worker.finished.connect(self._on_worker_finished)
        self.worker = worker
        self.run_btn.setEnabled(False)
        self.propagate_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self._say(f"Propagating frame {f}'s mask to {len(targets)} frame(s)…")
        worker.start()
        return worker

    def _apply_propagated(self, clip: Clip, frame: int, mask: np.ndarray) -> None:
        if clip is not self.clip or self.labels_layer is None:
            return
        if frame not in self.dirty_masks and frame not in self.human_masks:
            self.labels_layer.data[frame] = mask
            self.predicted.add(frame)
        if frame == self.frame:
            self.labels_layer.refresh()

    def cancel(self) -> None:
        """Stop the running pre-annotation after its current batch (frames done so far are kept)."""
        if self.worker is not None:
            self._stop.set()
            self.worker.quit()

    def _apply_prediction(self, clip: Clip, frame: int, pred: CachedPrediction) -> None:
        if clip is not self.clip or self.labels_layer is None:
            return
        self.shown_model = pred.model_version
        if frame not in self.dirty_masks and frame not in self.human_masks:
            self.labels_layer.data[frame] = pred.mask
        self.predicted.add(frame)
        self.cvs_probs[frame] = pred.cvs_probs
        if frame not in self.dirty_cvs and frame not in self.cvs:
            self.cvs[frame] = [float(p >= 0.5) for p in pred.cvs_probs]
        if self.phases[frame] < 0:
            self.phases[frame] = int(np.argmax(pred.phase_probs))
        if self.uncertainty_layer is not None:
            self.uncertainty_layer.data[frame] = pred.uncertainty_map
        if frame == self.frame:
            self.labels_layer.refresh()
            if self.uncertainty_layer is not None:
                self.uncertainty_layer.refresh()
            self._on_step()

    def _on_worker_returned(self, version: str) -> None:
        self._say(f"Pre-annotated with {version}. Correct the masks, phases and CVS, then commit.")

    def _on_worker_finished(self) -> None:
        self.worker = None
        self.run_btn.setEnabled(True)
        self.propagate_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)
        if self.labels_layer is not None:
            self.labels_layer.refresh()
        self.timeline.set_phases(self.phases)
        self._on_step()
        if self._stop.is_set():
            self._say(f"Pre-annotation cancelled; {len(self.predicted)} frame(s) have predictions.")
        self.preannotation_finished.emit(self)

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
    def commit(self, scope: str | None = None) -> Any:
        """Save the clinician's labels of the current frame (or the range) to the store with provenance.

        Current frame: its mask (predicted or painted), phase and CVS — committing is also how a clinician
        confirms a correct pre-annotation. Range: the phase run(s) of the range as one range label, plus the
        masks and CVS edited inside it. Predictions in the store are never touched.
        """
        if self.clip is None or self.labels_layer is None:
            self._say("Nothing to commit: open a clip first.")
            return None
        scope = scope or self.commit_scope.currentText()
        if scope == "current frame":
            a = b = self.frame
            mask_frames = {a} & (self.predicted | self.dirty_masks | self.human_masks)
            cvs_frames = {a} & set(self.cvs)
            phases = self.phases if self.phases[a] >= 0 else None
        else:
            a, b = self.frame_range
            span = set(range(a, b + 1))
            mask_frames = span & self.dirty_masks
            cvs_frames = span & self.dirty_cvs
            phases = self.phases
        masks = {f: np.asarray(self.labels_layer.data[f]).copy() for f in sorted(mask_frames)}
        cvs = {f: self.cvs[f] for f in sorted(cvs_frames)}
        try:
            result = self.session.commit(
                self.clip, (a, b), masks=masks, phases=phases, cvs=cvs, shown_model=self.shown_model
            )
        except Exception as exc:  # noqa: BLE001 - shown to the user, nothing was written (one transaction each)
            self._say(f"Commit failed: {exc}")
            raise
        self.dirty_masks -= set(masks)
        self.human_masks |= set(masks)
        self.dirty_cvs -= set(cvs)
        if phases is not None:
            self.dirty_phase -= set(range(a, b + 1))
        self._say(f"Committed {result.count} label(s) for frames {a}–{b} as {self.session.author}.")
        return result

    def _export_dialog(self) -> None:
        fmt = self.export_combo.currentText()
        if fmt == "coco":
            path, _ = QFileDialog.getSaveFileName(self, "COCO JSON", "labels.json", "JSON (*.json)")
        else:
            path = QFileDialog.getExistingDirectory(self, f"Folder for the {fmt} export")
        if path:
            self.export(fmt, path)

    def export(self, fmt: str, out: str) -> Any:
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
            **{f"phase{i}": (lambda *_, i=i: self.set_phase(i)) for i in range(len(self.schema.phases))},
        }
        for name, func in actions.items():
            target.bind_key(SHORTCUTS[name], func, overwrite=True)
