"""Opening a label store, its transactions, and the query every reader of human labels starts from.

:class:`StoreBase` is what :class:`~surgenet_assist.core.store.LabelStore` and its parts (registry,
acquisition) share: the engine, one-transaction-per-call writes through a
:class:`~surgenet_assist.core.store.writer.Writer`, and read sessions.

Opening has no side effects unless asked: ``StoreBase(url)`` connects and checks that the schema is at the
latest revision, and refuses (``StoreError`` with the ``db upgrade`` hint) when it is not, or when a SQLite
file does not exist. ``migrate=True`` (services and writing commands pass it) creates the SQLite folder and
runs the Alembic migrations first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Self, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ..errors import StoreError
from ..schema import DEFAULT_SCHEMA, LabelSchema
from . import migrations
from .db import UPGRADE_HINT, check_reachable, create_store_engine, mask_url, resolve_url, retrying, writer
from .records import DEFAULT_PROJECT
from .writer import Writer, is_unique_race

T = TypeVar("T")


class StoreBase:
    """The open database: engine, write transactions, read sessions (see module doc for opening)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        migrate: bool = False,
        project: str = DEFAULT_PROJECT,
        schema: LabelSchema = DEFAULT_SCHEMA,
    ) -> None:
        self.url = resolve_url(url)
        self.project = project
        self.schema = schema
        self.engine: Engine = create_store_engine(self.url, create=migrate)
        try:
            check_reachable(self.engine)
            current, head = migrations.current_revision(self.engine), migrations.head_revision()
            if current != head:
                if not migrate:
                    at = f"schema revision {current}" if current else "no label-store schema"
                    raise StoreError(
                        f"the label store at {mask_url(self.url)} has {at}, not revision {head}", UPGRADE_HINT
                    )
                migrations.upgrade(self.engine)
        except BaseException:
            self.engine.dispose()
            raise
        self._sessions = sessionmaker(bind=writer(self.engine), expire_on_commit=False)
        self._reads = sessionmaker(bind=self.engine, expire_on_commit=False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({mask_url(self.url)!r})"

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transactions ----------------------------------------------------------------------------------
    def transaction(self, fn: Callable[[Writer], T]) -> T:
        """Run ``fn(writer)`` as ONE transaction; rerun as a whole after lock/serialization conflicts.

        Any exception inside ``fn`` rolls everything back; a database error that is not retried comes out
        as a ``StoreError`` (nothing of the call was written). ``fn`` must not have side effects outside the
        database, since it may run more than once.
        """

        def attempt() -> T:
            with self._sessions.begin() as session:
                return fn(Writer(session, self.schema, self.project))

        try:
            return retrying(attempt, also=is_unique_race)
        except SQLAlchemyError as exc:  # a refusal of the database itself: a StoreError like every other
            lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            raise StoreError(
                f"the label store at {mask_url(self.url)} refused the write: "
                f"{lines[0] if lines else type(exc).__name__}",
                "nothing of this call was written; check the database (disk, permissions, schema) and retry",
            ) from exc

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._reads() as session:
            yield session

    def refresh_statistics(self) -> None:
        """Let the database planner see the tables as they are after a bulk write (PostgreSQL plans the
        current-revision queries as nested loops over a window until its statistics catch up: seconds
        instead of milliseconds for a few thousand labels, measured in bench/sync.py)."""
        if self.engine.dialect.name == "postgresql":
            with self.engine.begin() as conn:
                conn.execute(sa.text("ANALYZE annotations, annotation_revisions, videos, frames"))
        else:
            with self.engine.begin() as conn:
                conn.execute(sa.text("ANALYZE"))

    @contextmanager
    def exclusive_lock(self, name: str) -> Iterator[bool]:
        """Try to hold the database-wide lock ``name`` for the block; yields whether it was taken.

        On PostgreSQL a session advisory lock, so processes on several hosts sharing the database exclude
        each other, and a killed holder's lock is released with its connection. On SQLite (one host) it
        yields ``True``: callers serialise with a lock file there.
        """
        if self.engine.dialect.name != "postgresql":
            yield True
            return
        key = int(hashlib.sha256(f"surgenet-assist-{name}".encode()).hexdigest()[:15], 16)
        with self.engine.connect() as conn:  # closing the connection releases the lock
            yield bool(conn.execute(sa.text("select pg_try_advisory_lock(:k)"), {"k": key}).scalar())
