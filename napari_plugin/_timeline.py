"""Phase timeline strip: one colour per phase, a cursor on the current frame, click to jump, drag to select.

Neither napari nor magicgui has a timeline widget, so this strip is the panel's one custom Qt widget; a
QPainter strip is cheap at any video length (it draws runs, not frames).
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QRect, Qt, Signal
from qtpy.QtGui import QColor, QMouseEvent, QPainter, QPaintEvent
from qtpy.QtWidgets import QSizePolicy, QWidget

from surgenet_assist.core.schema import LabelSchema
from surgenet_assist.core.timeline import runs

UNSET_COLOR = QColor(70, 70, 70)


class PhaseTimeline(QWidget):
    """Per-frame phases as coloured runs; emits ``frame_clicked(i)`` and ``range_selected(start, end)``."""

    frame_clicked = Signal(int)
    range_selected = Signal(int, int)

    def __init__(self, schema: LabelSchema, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.schema = schema
        self.phases = np.full(1, -1, dtype=np.int64)
        self.current = 0
        self.selection: tuple[int, int] | None = None
        self._press: int | None = None
        self.setMinimumHeight(28)
        self.setMaximumHeight(40)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip("Phase timeline: click to jump to a frame, drag to select a range")
        self._colors = [QColor(*p.color) for p in schema.phases]

    def set_phases(self, phases: np.ndarray) -> None:
        self.phases = np.asarray(phases, dtype=np.int64)
        self.update()

    def set_current(self, frame: int) -> None:
        self.current = int(frame)
        self.update()

    def set_selection(self, selection: tuple[int, int] | None) -> None:
        self.selection = selection
        self.update()

    # --- geometry ------------------------------------------------------------------------------------
    def frame_at(self, x: float) -> int:
        n = max(1, len(self.phases))
        return int(np.clip(x / max(1, self.width()) * n, 0, n - 1))

    def _x(self, frame: float) -> int:
        return int(round(frame / max(1, len(self.phases)) * self.width()))

    # --- painting -------------------------------------------------------------------------------------
    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802 - Qt override
        p = QPainter(self)
        h = self.height()
        for start, end, phase in runs(self.phases):
            color = self._colors[phase] if 0 <= phase < len(self._colors) else UNSET_COLOR
            p.fillRect(QRect(self._x(start), 0, max(1, self._x(end) - self._x(start)), h), color)
        if self.selection is not None:
            a, b = self.selection
            sel = QRect(self._x(a), 0, max(2, self._x(b + 1) - self._x(a)), h - 1)
            p.fillRect(sel, QColor(255, 255, 255, 70))
            p.setPen(QColor(255, 255, 255))
            p.drawRect(sel)
        p.setPen(QColor(255, 255, 0))
        x = self._x(self.current + 0.5)
        p.drawLine(x, 0, x, h)
        p.end()

    # --- mouse ----------------------------------------------------------------------------------------
    def mousePressEvent(self, event: QMouseEvent) -> None:  # noqa: N802 - Qt override
        if event.button() == Qt.MouseButton.LeftButton:
            self._press = self.frame_at(event.position().x())

    def mouseMoveEvent(self, event: QMouseEvent) -> None:  # noqa: N802 - Qt override
        if self._press is not None:
            f = self.frame_at(event.position().x())
            self.set_selection((min(self._press, f), max(self._press, f)))

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:  # noqa: N802 - Qt override
        if self._press is None:
            return
        f = self.frame_at(event.position().x())
        a, b = min(self._press, f), max(self._press, f)
        self._press = None
        if a == b:
            self.set_selection(None)
            self.frame_clicked.emit(a)
        else:
            self.set_selection((a, b))
            self.range_selected.emit(a, b)
