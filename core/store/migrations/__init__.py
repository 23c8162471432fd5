"""Alembic migrations of the label store, run from code (no alembic.ini needed).

:func:`upgrade` is the only path that creates or changes the schema, in production and in tests.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from ..db import check_reachable, create_store_engine, writer

HERE = Path(__file__).resolve().parent


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(url: str | Engine | None = None, revision: str = "head") -> str | None:
    """Bring the database at ``url`` to ``revision`` (default: latest); returns the revision reached.

    Creates the schema (and a SQLite file's folder) when there is none: this is what ``db upgrade`` runs.
    """
    engine = url if isinstance(url, Engine) else create_store_engine(url, create=True)
    try:
        check_reachable(engine)
        cfg = alembic_config()
        with writer(engine).begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
        return current_revision(engine)
    finally:
        if not isinstance(url, Engine):
            engine.dispose()
