"""Query building blocks shared by the store's readers and its writer: which label revision is current."""

from __future__ import annotations

import sqlalchemy as sa

from .models import Annotation, AnnotationRevision


def current_revisions(task: str | None) -> sa.Subquery:
    """Newest revision per annotation (by updated_at, then id), tombstones included.

    Columns: ``rid`` (revision id), ``aid`` (annotation id), ``deleted``, ``updated_at``, ``rn`` (1 = newest).
    """
    R, A = AnnotationRevision, Annotation
    rn = sa.func.row_number().over(partition_by=R.annotation_id, order_by=(R.updated_at.desc(), R.id.desc()))
    q = sa.select(R.id.label("rid"), R.annotation_id.label("aid"), R.deleted, R.updated_at, rn.label("rn"))
    q = q.join(A, A.id == R.annotation_id)
    if task is not None:
        q = q.where(A.task == task)
    return q.subquery()


def live_annotation_ids(task: str | None) -> sa.Subquery:
    """Ids (``aid``) of annotations whose newest revision is not a tombstone."""
    cur = current_revisions(task)
    return sa.select(cur.c.aid).where(cur.c.rn == 1, cur.c.deleted.is_(False)).subquery()
