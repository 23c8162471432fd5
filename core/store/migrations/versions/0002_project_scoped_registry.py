"""Registry and training runs per project: ``model_versions.project_id``, ``training_runs.project_id``.

Existing rows are assigned to the ``default`` project (created if the database has none), so a store that was
upgraded keeps its champion, its history and its queue, now as the default project's. Model version names
stay unique across projects (they name bundle directories); the champion is per project from now on.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 09:00:00.000000
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

DEFAULT_PROJECT = "default"  # core.store.records.DEFAULT_PROJECT, frozen here as a migration must be
TABLES = ("model_versions", "training_runs")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("project_id", sa.Integer(), nullable=True))
            batch_op.create_index(batch_op.f(f"ix_{table}_project_id"), ["project_id"], unique=False)
            batch_op.create_foreign_key(
                batch_op.f(f"fk_{table}_project_id_projects"),
                "projects",
                ["project_id"],
                ["id"],
                ondelete="CASCADE",
            )

    # every stored row becomes the default project's (nothing is dropped)
    conn = op.get_bind()
    projects = sa.table(
        "projects", sa.column("id", sa.Integer), sa.column("name", sa.String), sa.column("created_at")
    )
    orphans = sum(
        int(conn.scalar(sa.text(f"SELECT count(*) FROM {table} WHERE project_id IS NULL")) or 0)
        for table in TABLES
    )
    if not orphans:
        return
    pid = conn.scalar(sa.select(projects.c.id).where(projects.c.name == DEFAULT_PROJECT))
    if pid is None:
        now = datetime.now(UTC).replace(tzinfo=None)
        conn.execute(sa.insert(projects).values(name=DEFAULT_PROJECT, created_at=now))
        pid = conn.scalar(sa.select(projects.c.id).where(projects.c.name == DEFAULT_PROJECT))
    for table in TABLES:
        conn.execute(sa.text(f"UPDATE {table} SET project_id = :pid WHERE project_id IS NULL"), {"pid": pid})


def downgrade() -> None:
    for table in reversed(TABLES):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_constraint(batch_op.f(f"fk_{table}_project_id_projects"), type_="foreignkey")
            batch_op.drop_index(batch_op.f(f"ix_{table}_project_id"))
            batch_op.drop_column("project_id")
