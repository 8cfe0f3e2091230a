"""Engines for the results store, the Alembic upgrade that creates its tables, and the two
helpers every store module reads with (:func:`read`, :func:`chunks`)."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from ml_framework.errors import StoreUnavailableError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
READ_ONLY = "mlf_read_only"
"""Execution option: on SQLite, begin a deferred (read) transaction instead of IMMEDIATE."""

SQLITE_BUSY_TIMEOUT_MS = 30_000
PG_MIGRATION_LOCK_ID = 72_616_001  # arbitrary constant key for pg_advisory_xact_lock
CONNECTION_ERRORS: tuple[type[Exception], ...] = (OperationalError, InterfaceError, DisconnectionError,
                                                 PoolTimeoutError)
"""SQLAlchemy errors that mean the database cannot be reached or cannot serve now (refused
or dropped connections, a database that admits no connection, an exhausted pool), as
opposed to a statement it refused: the callers' "retry later"."""
IN_CHUNK = 500
"""Ids per ``IN (...)`` list: well under SQLite's 32,766 bound parameters."""


def read(engine: Engine) -> Connection:
    """A connection for reading only (on SQLite a deferred transaction, see
    :data:`READ_ONLY`); use it as a context manager."""
    return engine.connect().execution_options(**{READ_ONLY: True})


def unavailable(exc: BaseException, what: str = "results store") -> StoreUnavailableError | None:
    """``exc`` as a :class:`~ml_framework.errors.StoreUnavailableError` (its cause) when it is
    one of :data:`CONNECTION_ERRORS`, else ``None``. The message names ``what`` and the
    driver's error, not the database URL (callers log it; answers use a fixed text)."""
    if not isinstance(exc, CONNECTION_ERRORS):
        return None
    error = StoreUnavailableError(f"{what} unreachable: {type(exc).__name__}")
    error.__cause__ = exc
    return error


def chunks(items: list) -> Iterator[list]:
    """``items`` in slices of :data:`IN_CHUNK`, one ``IN (...)`` list each."""
    for lo in range(0, len(items), IN_CHUNK):
        yield items[lo:lo + IN_CHUNK]


def make_engine(url: str) -> Engine:
    """Create an engine for ``url``.

    SQLite gets incremental auto-vacuum (new files), WAL journaling, a 30 s busy timeout and ``BEGIN IMMEDIATE`` write
    transactions: in WAL mode a deferred transaction that reads and then writes fails at
    once with SQLITE_BUSY when another process wrote in between, whatever the timeout.
    Connections marked with the :data:`READ_ONLY` execution option begin deferred.

    Args:
        url: SQLAlchemy URL, e.g. ``sqlite:////abs/path.sqlite`` or
            ``postgresql+psycopg://user@host:5432/db``.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=4)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        # Takes effect only in a file without tables yet (a new store): pages freed by
        # deleting jobs can then be handed back to the file system by
        # ``PRAGMA incremental_vacuum`` (see ml_framework.store.lifecycle). An older file
        # keeps reusing its freed pages; ``mlf prune --vacuum`` converts it once.
        cur.execute("PRAGMA auto_vacuum=INCREMENTAL")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def _current_revision(engine: Engine) -> str | None:
    with engine.connect().execution_options(**{READ_ONLY: True}) as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest migration; safe to call from many processes at once.

    Concurrent callers serialise on a lock (a file lock beside a SQLite database, a
    transaction-scoped advisory lock on PostgreSQL); the losers find the schema current.
    """
    cfg = _alembic_config()
    head = ScriptDirectory.from_config(cfg).get_current_head()
    if _current_revision(engine) == head:
        return
    backend = engine.url.get_backend_name()
    lock_file = None
    if backend == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        lock_file = open(f"{engine.url.database}.migrate.lock", "w")  # noqa: SIM115
        fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
        with engine.begin() as conn:
            if backend == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_MIGRATION_LOCK_ID})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    finally:
        if lock_file is not None:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
            lock_file.close()
