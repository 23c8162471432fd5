"""Label store: human labels with provenance and revisions, predictions, model registry, AL scores.

SQLite by default (a file under the data dir), PostgreSQL with the same URL scheme SQLAlchemy uses. See
``docs/store.md`` for the entities and guarantees. Importing it (or opening a store) does not import torch.
"""

from ..schema import TASKS
from .acquisition import DEFAULT_QUEUE_METHOD
from .db import create_store_engine, mask_url, resolve_url
from .label_store import LabelStore
from .migrations import upgrade
from .payloads import (
    Payload,
    build_payload,
    cvs_payload,
    mask_to_png,
    phase_payload,
    phase_segments_payload,
    png_to_mask,
    segmentation_payload,
)
from .records import (
    ARCHIVED,
    CANDIDATE,
    CHAMPION,
    DEFAULT_PROJECT,
    INSTANT,
    INTERACTIVE_TASK,
    PREVIOUS_CHAMPION,
    REJECTED,
    RUN_FAILED,
    RUN_FINISHED,
    RUN_INTERRUPTED,
    RUN_QUEUED,
    RUN_RUNNING,
    AcquisitionItem,
    AnnotationInput,
    LabelRecord,
    PredictionRecord,
    Provenance,
    RecordResult,
    annotation_key,
    revision_digest,
    to_utc,
)
from .registry import is_frame_model
from .splits import DEFAULT_SPLIT_FRACTIONS, HELD_OUT_SPLITS, SPLITS, split_for_video
from .writer import Writer

__all__ = [
    "ARCHIVED",
    "CANDIDATE",
    "CHAMPION",
    "DEFAULT_PROJECT",
    "INSTANT",
    "INTERACTIVE_TASK",
    "PREVIOUS_CHAMPION",
    "REJECTED",
    "RUN_FAILED",
    "RUN_FINISHED",
    "RUN_INTERRUPTED",
    "RUN_QUEUED",
    "RUN_RUNNING",
    "TASKS",
    "AcquisitionItem",
    "AnnotationInput",
    "DEFAULT_QUEUE_METHOD",
    "DEFAULT_SPLIT_FRACTIONS",
    "HELD_OUT_SPLITS",
    "LabelRecord",
    "LabelStore",
    "Payload",
    "PredictionRecord",
    "Provenance",
    "RecordResult",
    "SPLITS",
    "Writer",
    "annotation_key",
    "build_payload",
    "create_store_engine",
    "cvs_payload",
    "is_frame_model",
    "mask_to_png",
    "mask_url",
    "phase_payload",
    "phase_segments_payload",
    "png_to_mask",
    "resolve_url",
    "revision_digest",
    "segmentation_payload",
    "split_for_video",
    "to_utc",
    "upgrade",
]
