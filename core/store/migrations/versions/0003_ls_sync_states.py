"""``ls_sync_states``: per Label Studio annotation, what ``ls sync`` read and the revisions it left live.

A reconciliation skips an annotation whose digest (result, author, task target, labeling config) and live
revisions are unchanged since the last sync, instead of trusting Label Studio's ``updated_at``, which some
result changes never touch. The table is a cache: an empty one (every store upgraded to this revision) only
makes the first sync read every annotation again, and that sync adds no revision for unchanged content.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ls_sync_states",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("ls_annotation_id", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("revision_ids", sa.JSON(), nullable=False),
        sa.Column("synced_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_ls_sync_states_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ls_sync_states")),
        sa.UniqueConstraint("project_id", "ls_annotation_id", name="uq_ls_sync_states_project_annotation"),
    )


def downgrade() -> None:
    op.drop_table("ls_sync_states")
