"""ORM tables of the label store (SQLAlchemy 2 declarative).

The schema itself is created by the Alembic migrations in ``migrations/`` (``tests/test_store.py`` checks that
the migrations and these classes agree), never by ``create_all`` in production.

Human labels are append-only: an :class:`Annotation` is the identity of one label (e.g. one Label Studio
annotation for one task of one frame), each change is a new :class:`AnnotationRevision`, and a delete is a
revision with ``deleted=True`` (a tombstone). Nothing is updated in place, so no label is ever lost.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Naive UTC: SQLite has no time zones, so every timestamp in the store is naive UTC."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Video(Base):
    __tablename__ = "videos"
    __table_args__ = (UniqueConstraint("project_id", "path", name="uq_videos_project_path"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(String(1000))
    fps: Mapped[float | None] = mapped_column(Float)
    frame_count: Mapped[int | None] = mapped_column(Integer)
    content_hash: Mapped[str | None] = mapped_column(String(128))
    split: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Frame(Base):
    __tablename__ = "frames"
    __table_args__ = (UniqueConstraint("video_id", "index", name="uq_frames_video_index"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    video_id: Mapped[int] = mapped_column(ForeignKey("videos.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    timestamp: Mapped[float | None] = mapped_column(Float)
    split: Mapped[str | None] = mapped_column(String(32))
    image_path: Mapped[str | None] = mapped_column(String(1000))


class ModelVersion(Base):
    """Registry row of a trained model bundle of one project; ``status`` e.g. candidate / champion /
    archived / rejected."""

    __tablename__ = "model_versions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # the project whose registry holds it (one champion per project); ``version`` is unique across projects
    project_id: Mapped[int | None] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    version: Mapped[str] = mapped_column(String(200), unique=True)
    task: Mapped[str | None] = mapped_column(String(32))
    bundle_path: Mapped[str | None] = mapped_column(String(1000))
    bundle_hash: Mapped[str | None] = mapped_column(String(128))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(32), default="candidate")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Prediction(Base):
    """A model output for one frame (``frame_start == frame_end``) or a frame range (video phases)."""

    __tablename__ = "predictions"
    __table_args__ = (Index("ix_predictions_video_task_frame", "video_id", "task", "frame_start"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    video_id: Mapped[int] = mapped_column(ForeignKey("videos.id", ondelete="CASCADE"))
    frame_start: Mapped[int] = mapped_column(Integer)
    frame_end: Mapped[int] = mapped_column(Integer)
    task: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    mask: Mapped[bytes | None] = mapped_column(LargeBinary)
    probabilities: Mapped[Any | None] = mapped_column(JSON)
    uncertainty: Mapped[float | None] = mapped_column(Float)
    score: Mapped[float | None] = mapped_column(Float)
    model_version: Mapped[str | None] = mapped_column(String(200), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Annotation(Base):
    """Identity of one human label; ``key`` makes redelivery of the same label land on the same row."""

    __tablename__ = "annotations"
    __table_args__ = (
        UniqueConstraint("project_id", "key", name="uq_annotations_project_key"),
        Index("ix_annotations_task_video_frame", "task", "video_id", "frame_start"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(500))
    video_id: Mapped[int] = mapped_column(ForeignKey("videos.id", ondelete="CASCADE"))
    frame_start: Mapped[int] = mapped_column(Integer)
    frame_end: Mapped[int] = mapped_column(Integer)
    task: Mapped[str] = mapped_column(String(32))
    source: Mapped[str] = mapped_column(String(32))
    ls_task_id: Mapped[int | None] = mapped_column(Integer, index=True)
    ls_annotation_id: Mapped[int | None] = mapped_column(Integer, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class AnnotationRevision(Base):
    """One version of a human label; append-only. ``deleted`` marks a tombstone."""

    __tablename__ = "annotation_revisions"
    __table_args__ = (
        UniqueConstraint("annotation_id", "revision", name="uq_revisions_annotation_revision"),
        UniqueConstraint("annotation_id", "digest", "updated_at", "deleted", name="uq_revisions_content"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    annotation_id: Mapped[int] = mapped_column(ForeignKey("annotations.id", ondelete="CASCADE"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    mask: Mapped[bytes | None] = mapped_column(LargeBinary)
    digest: Mapped[str] = mapped_column(String(64))
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    author: Mapped[str | None] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(32))
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    recorded_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class LabelStudioSyncState(Base):
    """What the last ``ls sync`` read of one Label Studio annotation, so the next one can skip it.

    ``digest`` hashes what decides the annotation's labels (its result, author, cancelled flag, its task's
    store target and the labeling config); ``revision_ids`` are the current revisions of the labels that sync
    left live. Label Studio's ``updated_at`` alone is no such key: ``/api/labels/bulk``, renaming a label, a
    task-data or a config change alter what the labels are without touching it. A sync skips an annotation
    only when both match, so a label that a webhook (or anything else) changed since is read again.
    """

    __tablename__ = "ls_sync_states"
    __table_args__ = (
        UniqueConstraint("project_id", "ls_annotation_id", name="uq_ls_sync_states_project_annotation"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    ls_annotation_id: Mapped[int] = mapped_column(Integer)
    digest: Mapped[str] = mapped_column(String(64))
    revision_ids: Mapped[list[int]] = mapped_column(JSON)
    synced_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class TrainingRun(Base):
    __tablename__ = "training_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # the project trained (its queue, its labels); every run written since migration 0002 has one
    project_id: Mapped[int | None] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    model_version: Mapped[str | None] = mapped_column(String(200), index=True)
    task: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(32), default="finished")
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    num_labels: Mapped[int | None] = mapped_column(Integer)
    max_revision_id: Mapped[int | None] = mapped_column(Integer)


class AcquisitionScore(Base):
    """Active-learning score of a frame for a task (higher = ask a human sooner)."""

    __tablename__ = "acquisition_scores"
    __table_args__ = (
        UniqueConstraint("video_id", "frame_index", "task", "method", "model_version", name="uq_acq_key"),
        Index("ix_acq_task_method_score", "task", "method", "score"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    video_id: Mapped[int] = mapped_column(ForeignKey("videos.id", ondelete="CASCADE"))
    frame_index: Mapped[int] = mapped_column(Integer)
    task: Mapped[str] = mapped_column(String(32))
    method: Mapped[str] = mapped_column(String(64))
    score: Mapped[float] = mapped_column(Float)
    model_version: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
