"""Alembic environment of the label store; run programmatically by :func:`..migrations.upgrade`."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from surgenet_assist.core.store.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:  # pragma: no cover - the package always passes a connection
        raise RuntimeError("run migrations through surgenet_assist.core.store.migrations.upgrade(url)")
    is_sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=is_sqlite,
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Two processes upgrading at once: the second waits here, then finds the schema at head.
            connection.execute(text("SELECT pg_advisory_xact_lock(72347101)"))
        context.run_migrations()


run_migrations_online()
