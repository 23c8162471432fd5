"""Value objects of the label store: what callers pass in and what they get back.

Plain frozen dataclasses (no database session attached), the identity rule of a human label
(:func:`annotation_key`), timestamp normalisation (:func:`to_utc`) and the status names the store's rows use.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..errors import StoreError
from . import payloads as pl

#: where a human label came from
SOURCES = ("label-studio", "napari", "import")
DEFAULT_PROJECT = "default"

# model_versions.status
CANDIDATE = "candidate"
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous-champion"
ARCHIVED = "archived"
REJECTED = "rejected"  # a candidate that failed the promotion gate
INSTANT = "instant"  # a head fitted in seconds on today's labels (training_loop/instant.py)

# model_versions.task of a learned click head (core/interactive/click_head.py): it has its own champion and
# never serves as the whole-frame model (``LabelStore.serving_champion`` skips it)
INTERACTIVE_TASK = "interactive"

# training_runs.status; a queued run is claimed (queued -> running) by exactly one trainer
RUN_QUEUED = "queued"
RUN_RUNNING = "running"
RUN_FINISHED = "finished"
RUN_FAILED = "failed"
RUN_INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class RecordResult:
    """Outcome of recording a human label: which revision holds it and whether this call added it."""

    annotation_id: int
    revision_id: int
    revision: int
    created: bool
    current: bool


@dataclass(frozen=True)
class Provenance:
    """How a human label came to be, stored with every revision (migration 0004).

    ``from_prediction``: a person started from a model's pre-annotation (Label Studio's ``parent_prediction``,
    napari's pre-annotated or propagated frame) instead of an empty canvas; ``model_version`` names that
    prediction's model when it is known. ``reviewed``: a person edited or looked at the label after it was
    pre-filled; only a label created from a prediction and never touched since (Label Studio's "create
    annotations from predictions") is unreviewed, and the training set leaves it out by default.
    ``ground_truth``: Label Studio's ground-truth star, which the training set prefers over newer labels.
    """

    from_prediction: bool = False
    model_version: str | None = None
    reviewed: bool = True
    ground_truth: bool = False

    def __post_init__(self) -> None:
        if self.model_version is not None and not self.from_prediction:
            raise ValueError("a model version names the prediction a label started from: from_prediction")
        if not self.reviewed and not self.from_prediction:
            raise ValueError("only a label pre-filled from a prediction can be unreviewed")

    @classmethod
    def started_from(cls, model_version: str | None, **kw: bool) -> Provenance:
        """A label that started from a prediction of ``model_version`` (None: of an unknown model)."""
        return cls(True, model_version or None, **kw)

    def is_plain(self) -> bool:
        """Drawn by a person from scratch, not ground truth: what every label was before provenance."""
        return self == PLAIN

    def digest(self, payload_digest: str) -> str:
        """The revision digest: the payload's own for a plain label (so labels stored before provenance
        still match a redelivery), else the payload's with the provenance folded in (a label that gains the
        ground-truth star or a review is a new revision, even at the same ``updated_at``)."""
        if self.is_plain():
            return payload_digest
        text = f"{payload_digest}|{int(self.from_prediction)}|{self.model_version or ''}|"
        return hashlib.sha256(f"{text}{int(self.reviewed)}|{int(self.ground_truth)}".encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "from_prediction": self.from_prediction,
            "model_version": self.model_version,
            "reviewed": self.reviewed,
            "ground_truth": self.ground_truth,
        }


PLAIN = Provenance()


def revision_digest(payload: pl.Payload | None, provenance: Provenance = PLAIN) -> str:
    """The digest a revision is stored with (what makes a redelivery land on it): ``tombstone`` for a delete
    (``payload`` None), else the payload's digest, provenance folded in (:meth:`Provenance.digest`)."""
    return "tombstone" if payload is None else provenance.digest(payload.digest())


@dataclass(frozen=True)
class AnnotationInput:
    """One human label to record (see :meth:`LabelStore.record_annotation` for the fields)."""

    video_id: int
    frame_start: int
    task: str
    payload: pl.Payload | None
    source: str
    author: str | None = None
    frame_end: int | None = None
    ls_task_id: int | None = None
    ls_annotation_id: int | None = None
    updated_at: datetime | None = None
    key: str | None = None
    deleted: bool = False
    provenance: Provenance = PLAIN

    @property
    def end(self) -> int:
        return self.frame_start if self.frame_end is None else self.frame_end

    def revision_digest(self) -> str:
        return revision_digest(None if self.deleted else self.payload, self.provenance)

    def identity(self) -> str:
        return self.key or annotation_key(
            self.source,
            self.video_id,
            self.frame_start,
            self.end,
            self.task,
            self.ls_annotation_id,
            self.author,
        )


@dataclass(frozen=True)
class LabelRecord:
    """A human label revision as read back (``payload`` has ``mask`` decoded for segmentation)."""

    annotation_id: int
    revision_id: int
    revision: int
    video_id: int
    video_path: str
    frame_start: int
    frame_end: int
    task: str
    source: str
    author: str | None
    updated_at: datetime
    deleted: bool
    payload: dict[str, Any] = field(repr=False)
    origin: str = "human"
    provenance: Provenance = PLAIN
    ls_task_id: int | None = None
    ls_annotation_id: int | None = None


@dataclass(frozen=True)
class PredictionRecord:
    id: int
    video_id: int
    frame_start: int
    frame_end: int
    task: str
    model_version: str | None
    probabilities: Any
    uncertainty: float | None
    score: float | None
    created_at: datetime
    payload: dict[str, Any] = field(repr=False)
    origin: str = "model"


@dataclass(frozen=True)
class AcquisitionItem:
    video_id: int
    frame_index: int
    task: str
    method: str
    score: float
    model_version: str


def annotation_key(
    source: str,
    video_id: int,
    frame_start: int,
    frame_end: int,
    task: str,
    ls_annotation_id: int | None = None,
    author: str | None = None,
) -> str:
    """Identity of a label: a Label Studio annotation id, else source + author + frame(s) + task."""
    if ls_annotation_id is not None:
        return f"ls:{ls_annotation_id}:{video_id}:{frame_start}-{frame_end}:{task}"
    return f"{source}:{author or ''}:{video_id}:{frame_start}-{frame_end}:{task}"


def to_utc(ts: datetime | str | float | None) -> datetime | None:
    """Naive UTC from a datetime (aware, or naive meaning UTC), an ISO string (``Z`` ok) or epoch seconds."""
    if ts is None:
        return None
    if isinstance(ts, (int, float)):
        return datetime.fromtimestamp(float(ts), UTC).replace(tzinfo=None)
    if isinstance(ts, str):
        try:
            ts = datetime.fromisoformat(ts.strip().replace("Z", "+00:00"))
        except ValueError:
            raise StoreError(f"not an ISO timestamp: {ts!r}", "use e.g. 2024-05-01T12:00:00Z") from None
    if ts.tzinfo is not None:
        ts = ts.astimezone(UTC).replace(tzinfo=None)
    return ts
