"""Per-clip edit state and the merge/commit rules of the review panel, without Qt or napari.

The dock widget (:mod:`._widget`) shows this state in napari layers and controls and forwards every user
action here; the rules live in one place that plain pytest drives directly:

- **Human labels win.** A prediction or a propagated mask never replaces a mask the clinician painted (dirty)
  or one already committed (human); a predicted CVS value never replaces one the clinician set; a predicted
  phase only fills frames without a phase.
- **Commit — current frame** stores the frame's mask whether painted or accepted as predicted (committing is
  how a correct pre-annotation is confirmed), its phase and its CVS values. **Commit — frame range** stores
  the range's phases as one range label plus the masks and CVS values edited inside the range.
- After a commit the committed frames are clean and their masks count as human labels.

The mask array (``masks``, ``(T, H, W)`` uint8) is the one the widget's Labels layer paints into, so a stroke
in napari and a prediction written here are the same memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from surgenet_assist.core.errors import SurgenetAssistError
from surgenet_assist.core.schema import DEFAULT_SCHEMA, LabelSchema

if TYPE_CHECKING:
    from .session import CachedPrediction, Clip, CommitResult, ReviewSession

#: what Pre-annotate runs on (the *Scope* box)
SCOPES = ("current frame", "frame range", "whole clip")
#: what Commit stores (the box next to the Commit button)
COMMIT_SCOPES = ("current frame", "frame range")
#: where Propagate carries the current frame's mask
DIRECTIONS = ("next", "previous", "both")

OPEN_A_CLIP = "Open a video first (File › Open, or File › Open Sample › SurgeNet Assist)."


class ReviewError(SurgenetAssistError):
    """A review action that cannot run as asked (no clip open, a job already running, an empty range, ...).

    The panel shows ``message`` in its status line and as a napari notification, with ``hint``."""


def _check(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise ReviewError(f"unknown {what} {value!r}", hint=f"use one of: {', '.join(allowed)}")
    return value


@dataclass(frozen=True)
class CommitPlan:
    """What one commit will store: the frame span, and masks/phases/CVS as :meth:`ReviewSession.commit`
    takes them (``phases`` is the clip's whole per-frame array, or ``None`` for no phase label)."""

    frames: tuple[int, int]
    masks: dict[int, np.ndarray] = field(default_factory=dict)
    phases: np.ndarray | None = None
    cvs: dict[int, list[float]] = field(default_factory=dict)


class ClipEdits:
    """The clinician's working copy of one clip's labels, and what is not committed yet.

    ``phases`` holds one phase id per frame (-1 = none); ``cvs`` the CVS values per frame (model defaults
    included); ``cvs_probs`` the model's CVS probabilities per predicted frame. ``predicted`` are frames with
    a pre-annotation or propagated mask, ``human_masks`` frames whose mask is a committed human label,
    ``dirty_*`` frames changed since the last commit, ``reviewed`` the frames left with *Next to review*
    (what *Previous* walks back).
    """

    def __init__(
        self,
        clip: Clip,
        *,
        schema: LabelSchema = DEFAULT_SCHEMA,
        phases: np.ndarray | Sequence[int] | None = None,
        cvs: dict[int, Sequence[float]] | None = None,
        masks: dict[int, np.ndarray] | None = None,
    ) -> None:
        n = clip.frame_count
        self.clip = clip
        self.schema = schema
        self.masks = np.zeros((n, clip.height, clip.width), dtype=np.uint8)  # pages allocated on write
        for f, m in (masks or {}).items():
            self.masks[f] = m
        self.phases = (
            np.full(n, -1, dtype=np.int64) if phases is None else np.array(phases, dtype=np.int64, copy=True)
        )
        if self.phases.shape != (n,):
            raise ReviewError(
                f"{len(self.phases)} phase values for a clip of {n} frames",
                hint="pass one phase id (or -1) per frame",
            )
        self.cvs: dict[int, list[float]] = {int(f): [float(x) for x in v] for f, v in (cvs or {}).items()}
        self.cvs_probs: dict[int, np.ndarray] = {}
        self.predicted: set[int] = set()
        self.human_masks: set[int] = {int(f) for f in (masks or {})}
        self.dirty_masks: set[int] = set()
        self.dirty_phase: set[int] = set()
        self.dirty_cvs: set[int] = set()
        self.reviewed: list[int] = []
        self.shown_model: str | None = None
        # task -> frame -> the model version whose pre-annotation (or propagation) filled that frame's value:
        # what the label the clinician commits there started from (the store's provenance); never cleared
        # by a correction, since a corrected pre-annotation still started from it
        self.started_from: dict[str, dict[int, str]] = {"segmentation": {}, "phase": {}, "cvs": {}}

    @classmethod
    def load(cls, session: ReviewSession, clip: Clip) -> ClipEdits:
        """Start from the clip's current human labels in the store."""
        human = session.human_labels(clip)
        return cls(
            clip, schema=session.schema, phases=human["phases"], cvs=human["cvs"], masks=human["masks"]
        )

    @property
    def frame_count(self) -> int:
        return self.clip.frame_count

    def _frame(self, frame: int) -> int:
        f = int(frame)
        if not 0 <= f < self.frame_count:
            raise ReviewError(
                f"frame {f} is outside the clip (frames 0–{self.frame_count - 1})",
                hint="pick a frame on the timeline or with the Frames boxes",
            )
        return f

    def _span(self, frames: tuple[int, int]) -> tuple[int, int]:
        a, b = sorted((self._frame(frames[0]), self._frame(frames[1])))
        return a, b

    # --- what the panel shows ---------------------------------------------------------------------------
    def phase_at(self, frame: int) -> int:
        """Phase id of ``frame``, -1 when it has none."""
        f = int(frame)
        return int(self.phases[f]) if 0 <= f < len(self.phases) else -1

    def cvs_at(self, frame: int) -> list[float] | None:
        return self.cvs.get(int(frame))

    def has_uncommitted(self) -> bool:
        return bool(self.dirty_masks or self.dirty_phase or self.dirty_cvs)

    def uncommitted_count(self) -> int:
        """Frame labels changed since the last commit (a frame counts once per task)."""
        return len(self.dirty_masks) + len(self.dirty_phase) + len(self.dirty_cvs)

    # --- edits ------------------------------------------------------------------------------------------
    def mark_painted(self, frame: int) -> None:
        """The clinician painted on ``frame`` (the mask array already holds the stroke)."""
        self.dirty_masks.add(self._frame(frame))

    def set_phase(self, phase: int, frames: tuple[int, int]) -> tuple[int, int]:
        """Set ``phase`` for ``frames`` (inclusive, either order); returns the span as ``(start, end)``."""
        a, b = self._span(frames)
        if not 0 <= int(phase) < len(self.schema.phases):
            raise ReviewError(
                f"phase id {phase} is not a phase of the schema (0–{len(self.schema.phases) - 1})",
                hint="choose a phase in the Phase box or press Alt+1 … Alt+7",
            )
        self.phases[a : b + 1] = int(phase)
        self.dirty_phase.update(range(a, b + 1))
        return a, b

    def set_cvs(self, frame: int, values: Sequence[float | bool]) -> None:
        """The clinician's CVS values (C1, C2, C3) for ``frame``."""
        f = self._frame(frame)
        if len(values) != self.schema.num_cvs:
            raise ReviewError(
                f"{len(values)} CVS values for {self.schema.num_cvs} criteria",
                hint=f"give one value per criterion ({', '.join(self.schema.cvs_keys)})",
            )
        self.cvs[f] = [1.0 if float(v) >= 0.5 else 0.0 for v in values]
        self.dirty_cvs.add(f)

    # --- model output -----------------------------------------------------------------------------------
    def apply_prediction(self, frame: int, pred: CachedPrediction) -> bool:
        """Merge one frame's pre-annotation; True when its mask was written (human and edited masks win)."""
        f = self._frame(frame)
        self.shown_model = version = pred.model_version
        wrote = f not in self.dirty_masks and f not in self.human_masks
        if wrote:
            self.masks[f] = pred.mask
            self.started_from["segmentation"][f] = version
        self.predicted.add(f)
        self.cvs_probs[f] = np.asarray(pred.cvs_probs)
        if f not in self.dirty_cvs and f not in self.cvs:
            self.cvs[f] = [float(p >= 0.5) for p in pred.cvs_probs]
            self.started_from["cvs"][f] = version
        if self.phases[f] < 0:
            self.phases[f] = int(np.argmax(pred.phase_probs))
            self.started_from["phase"][f] = version
        return wrote

    def apply_propagated(self, frame: int, mask: np.ndarray, version: str | None = None) -> bool:
        """Merge one propagated mask (``version``: what the propagation is stored as, e.g.
        ``propagation-from-12``); True when written (never over a human or edited mask)."""
        f = self._frame(frame)
        if f in self.dirty_masks or f in self.human_masks:
            return False
        self.masks[f] = mask
        self.predicted.add(f)
        if version is not None:
            self.started_from["segmentation"][f] = version
        return True

    def scope_frames(self, scope: str, current: int, frames: tuple[int, int]) -> list[int]:
        """The frames Pre-annotate runs on for a *Scope* choice."""
        _check(scope, SCOPES, "scope")
        if scope == "current frame":
            return [self._frame(current)]
        if scope == "frame range":
            a, b = self._span(frames)
            return list(range(a, b + 1))
        return list(range(self.frame_count))

    def propagation_targets(self, keyframe: int, direction: str, n: int) -> list[int]:
        """Frames Propagate fills from ``keyframe``: up to ``n`` after, before, or both."""
        _check(direction, DIRECTIONS, "direction")
        f, last, n = self._frame(keyframe), self.frame_count - 1, int(n)
        if n < 1:
            raise ReviewError(f"cannot propagate to {n} frames", hint="choose 1 frame or more")
        targets: list[int] = []
        if direction in ("next", "both"):
            targets += list(range(f + 1, min(last, f + n) + 1))
        if direction in ("previous", "both"):
            targets += list(range(max(0, f - n), f))
        if not targets:
            side = {"next": "after", "previous": "before", "both": "around"}[direction]
            raise ReviewError(
                f"No frames in that direction: frame {f} has no frames {side} it.",
                hint="propagate the other way, or from another frame",
            )
        return targets

    # --- commit -----------------------------------------------------------------------------------------
    def commit_plan(self, scope: str, current: int, frames: tuple[int, int]) -> CommitPlan:
        """What a commit of ``scope`` stores (see the module docstring for the rules)."""
        _check(scope, COMMIT_SCOPES, "commit scope")
        if scope == "current frame":
            a = b = self._frame(current)
            mask_frames = {a} & (self.predicted | self.dirty_masks | self.human_masks)
            cvs_frames = {a} & set(self.cvs)
            phases = self.phases if self.phases[a] >= 0 else None
        else:
            a, b = self._span(frames)
            span = set(range(a, b + 1))
            mask_frames = span & self.dirty_masks
            cvs_frames = span & self.dirty_cvs
            phases = self.phases
        return CommitPlan(
            (a, b),
            masks={f: self.masks[f].copy() for f in sorted(mask_frames)},
            phases=None if phases is None else phases.copy(),
            cvs={f: list(self.cvs[f]) for f in sorted(cvs_frames)},
        )

    def mark_committed(self, plan: CommitPlan) -> None:
        """The plan is in the store: its frames are clean and its masks are human labels now."""
        a, b = plan.frames
        self.dirty_masks -= set(plan.masks)
        self.human_masks |= set(plan.masks)
        self.dirty_cvs -= set(plan.cvs)
        if plan.phases is not None:
            self.dirty_phase -= set(range(a, b + 1))

    def commit(
        self, session: ReviewSession, scope: str, current: int, frames: tuple[int, int]
    ) -> CommitResult:
        """Store the plan for ``scope`` through ``session`` (one transaction per label), then mark it
        clean; when the store refuses, nothing is marked and the edits stay uncommitted."""
        plan = self.commit_plan(scope, current, frames)
        result = session.commit(
            self.clip, plan.frames, masks=plan.masks, phases=plan.phases, cvs=plan.cvs,
            shown_model=self.shown_model, started_from=self.started_from,
        )
        self.mark_committed(plan)
        return result

    # --- review order -----------------------------------------------------------------------------------
    def next_to_review(self, session: ReviewSession, current: int) -> int | None:
        """The next frame worth a look (the session's queue order), remembering ``current`` for *Previous*;
        ``None`` when nothing is left."""
        f = session.next_to_review(self.clip, int(current), skip=set(self.reviewed) | {int(current)})
        if f is None:
            return None
        self.reviewed.append(int(current))
        return int(f)

    def previous(self, current: int) -> int | None:
        """Where *Previous* goes: back along the reviewed frames, else one frame back (None at frame 0)."""
        if self.reviewed:
            return self.reviewed.pop()
        return int(current) - 1 if current > 0 else None


__all__ = [
    "COMMIT_SCOPES",
    "DIRECTIONS",
    "SCOPES",
    "ClipEdits",
    "CommitPlan",
    "ReviewError",
]

