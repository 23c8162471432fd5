"""Engines for the label store: one URL picks SQLite (default) or PostgreSQL.

* URL order: the ``url`` argument (``--db URL``), ``$SURGENET_ASSIST_DB_URL``, else a SQLite file
  ``data_home()/surgenet-assist.db``.
* Making an engine touches nothing on disk unless ``create=True`` (what ``db upgrade`` and
  ``LabelStore(migrate=True)`` pass): then the SQLite file's folder is created; without it a missing SQLite
  file is a :class:`StoreError` that says how to create the store.
* SQLite is opened in WAL mode with foreign keys on and a busy timeout, and write transactions start with
  ``BEGIN IMMEDIATE``: a writer takes the write lock up front and waits for it, instead of failing with
  "database is locked" when a read transaction tries to upgrade. Readers never block writers (WAL).
* Transient conflicts (SQLite busy/locked, PostgreSQL serialization failures and deadlocks) are retried with
  back-off by :func:`retrying`; an unreachable server becomes a :class:`StoreError` naming the URL (password
  masked) and the fix.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError

from ..errors import StoreError
from ..paths import default_db_path

ENV_URL = "SURGENET_ASSIST_DB_URL"
T = TypeVar("T")
UPGRADE_HINT = "run `surgenet-assist db upgrade` (with --db URL for another database); it keeps every row"


def default_url() -> str:
    """The SQLite file under the data dir."""
    return f"sqlite:///{default_db_path()}"


def resolve_url(url: str | None = None) -> str:
    """The URL to use: explicit, else the environment, else the default SQLite file."""
    return url or os.environ.get(ENV_URL) or default_url()


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***``, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def is_sqlite(engine_or_url: Engine | str) -> bool:
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else make_url(engine_or_url)
    return url.get_backend_name() == "sqlite"


def create_store_engine(url: str | None = None, *, create: bool = False, echo: bool = False) -> Engine:
    """Engine for ``url`` with the store's connection settings (see module doc).

    ``create=False`` refuses a SQLite file that does not exist yet (connecting would create an empty one);
    ``create=True`` makes its folder, and the first connection makes the file.
    """
    url = resolve_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreError(
            f"not a database URL: {url!r}",
            "use sqlite:///path/to/file.db or postgresql+psycopg://user:password@host:5432/dbname",
        ) from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            path = Path(database).expanduser()
            if create:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise StoreError(
                        f"cannot create the folder of the SQLite database {mask_url(url)}: {exc.strerror}",
                        "pass a writable path with --db sqlite:///path/file.db or set SURGENET_ASSIST_DB_URL",
                    ) from None
            elif not path.exists():
                raise StoreError(f"no label store at {mask_url(url)} (the file does not exist)", UPGRADE_HINT)
        engine = sa.create_engine(parsed, echo=echo, connect_args={"timeout": 60})
        _sqlite_events(engine)
        return engine
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return sa.create_engine(parsed, echo=echo, pool_pre_ping=True, connect_args={"connect_timeout": 5})
    raise StoreError(
        f"unsupported database {backend!r} in {mask_url(url)}",
        "the label store runs on SQLite (sqlite:///file.db) or PostgreSQL (postgresql+psycopg://...)",
    )


def _sqlite_events(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # noqa: ANN001 - DBAPI types
        dbapi_conn.isolation_level = None  # let SQLAlchemy's BEGIN below control transactions
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout = 60000")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # noqa: ANN001
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def writer(engine: Engine) -> Engine:
    """The same engine, but its transactions take SQLite's write lock up front (no-op on PostgreSQL)."""
    return engine.execution_options(sqlite_immediate=True) if is_sqlite(engine) else engine


def check_reachable(engine: Engine) -> None:
    """Connect once; turn connection failures into a StoreError that names the URL and the fix."""
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    except (OperationalError, DBAPIError) as exc:
        first = str(exc.orig if getattr(exc, "orig", None) else exc).strip().splitlines()
        reason = first[0] if first else type(exc).__name__
        if is_sqlite(engine):
            hint = (
                "check that the directory exists and is writable, or pass --db / set SURGENET_ASSIST_DB_URL"
            )
        else:
            hint = (
                "start the server or fix host/port/user/password (--db or $SURGENET_ASSIST_DB_URL); "
                "nothing was written"
            )
        raise StoreError(
            f"cannot reach the label store at {mask_url(str(engine.url))}: {reason}", hint
        ) from None


_TRANSIENT_TEXT = (
    "database is locked",
    "database table is locked",
    "database is busy",
    "deadlock detected",
    "could not serialize access",
)
_TRANSIENT_SQLSTATE = {"40001", "40P01", "55P03"}


def is_transient(exc: BaseException) -> bool:
    """True for lock/serialization conflicts that succeed when retried."""
    if not isinstance(exc, DBAPIError):
        return False
    orig = getattr(exc, "orig", None)
    if getattr(orig, "sqlstate", None) in _TRANSIENT_SQLSTATE:
        return True
    text = str(orig or exc).lower()
    return any(t in text for t in _TRANSIENT_TEXT)


def retrying(
    fn: Callable[[], T],
    *,
    attempts: int = 30,
    also: Callable[[BaseException], bool] | None = None,
) -> T:
    """Run ``fn`` (one whole transaction) again after transient conflicts, with jittered back-off.

    ``also`` marks further exceptions as retryable (e.g. a unique-key race between two first inserts).
    """
    delay = 0.005
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            retry = is_transient(exc) or (also is not None and also(exc))
            if not retry or attempt == attempts - 1:
                raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)
    raise AssertionError("unreachable")  # pragma: no cover
