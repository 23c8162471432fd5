"""Label store: human labels with provenance and revisions, predictions, model registry, AL scores.

SQLite by default (a file under the data dir), PostgreSQL with the same URL scheme SQLAlchemy uses. See
``docs/store.md`` for the entities and guarantees.
"""

from .db import create_store_engine, mask_url, resolve_url
from .label_store import (
    AcquisitionItem,
    AnnotationInput,
    LabelRecord,
    LabelStore,
    PredictionRecord,
    RecordResult,
    Writer,
    annotation_key,
    to_utc,
)
from .migrations import upgrade
from .payloads import (
    TASKS,
    Payload,
    build_payload,
    cvs_payload,
    mask_to_png,
    phase_payload,
    phase_segments_payload,
    png_to_mask,
    segmentation_payload,
)

__all__ = [
    "TASKS",
    "AcquisitionItem",
    "AnnotationInput",
    "LabelRecord",
    "LabelStore",
    "Payload",
    "PredictionRecord",
    "RecordResult",
    "Writer",
    "annotation_key",
    "build_payload",
    "create_store_engine",
    "cvs_payload",
    "mask_to_png",
    "mask_url",
    "phase_payload",
    "phase_segments_payload",
    "png_to_mask",
    "resolve_url",
    "segmentation_payload",
    "to_utc",
    "upgrade",
]
