"""Label provenance on every human revision, and a split for every video.

``annotation_revisions`` gains ``from_prediction``, ``started_from_model``, ``reviewed`` and ``ground_truth``
(``core.store.records.Provenance``). Revisions stored before it were counted as labels a person drew: they
keep that meaning (not from a prediction, reviewed, not ground truth).

Videos stored without a split get the split the store now gives a video when it enters
(``core.store.splits.split_for_video``, frozen here as a migration must be), so no video is left without one;
a split already stored is kept.

Revision ID: 0004
Revises: 0003 (ls_sync_states; written against 0002, chained after 0003 when main gained it)
Create Date: 2026-12-10 09:00:00.000000
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# core.store.splits at the time of this migration
SPLITS = ("train", "val", "test", "final")
FRACTIONS = (0.6, 0.15, 0.15, 0.1)


def _split_for_video(path: str) -> str:
    position = int.from_bytes(hashlib.sha256(str(path).encode()).digest()[:8], "big") / 2**64
    upper = 0.0
    for name, share in zip(SPLITS, FRACTIONS, strict=True):
        upper += share
        if position < upper:
            return name
    return SPLITS[-1]


def upgrade() -> None:
    with op.batch_alter_table("annotation_revisions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("from_prediction", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("started_from_model", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("reviewed", sa.Boolean(), nullable=False, server_default=sa.true()))
        batch_op.add_column(
            sa.Column("ground_truth", sa.Boolean(), nullable=False, server_default=sa.false())
        )

    conn = op.get_bind()
    videos = sa.table("videos", sa.column("id", sa.Integer), sa.column("path"), sa.column("split"))
    rows = conn.execute(sa.select(videos.c.id, videos.c.path).where(videos.c.split.is_(None))).all()
    for vid, path in rows:
        conn.execute(sa.update(videos).where(videos.c.id == vid).values(split=_split_for_video(path)))


def downgrade() -> None:
    # the splits given to videos stay: a split, once given, is never taken back
    with op.batch_alter_table("annotation_revisions", schema=None) as batch_op:
        for column in ("ground_truth", "reviewed", "started_from_model", "from_prediction"):
            batch_op.drop_column(column)
