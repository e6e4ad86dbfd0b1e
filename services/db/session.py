"""Engine and sessions; SQLite (embedded default) gets WAL and a busy timeout for api + worker processes.

Transient errors (a lock held past the busy timeout, a dropped connection) are told apart from the others
(``is_transient``) so that a job's writes can be retried (``retry_transient``) and the API can answer 503.
"""

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, Insert, create_engine, delete, event, false, make_url, text
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from services.config import get_settings
from services.db.models import Worker

log = logging.getLogger(__name__)

T = TypeVar("T")

# PostgreSQL SQLSTATEs that pass by themselves: connection exceptions (class 08), serialisation failure,
# deadlock, lock not available (lock_timeout), admin/crash shutdown, cannot connect now (starting up)
TRANSIENT_SQLSTATES = ("08", "40001", "40P01", "55P03", "57P01", "57P02", "57P03")
RETRY_FIRST_WAIT_S = 0.1
RETRY_MAX_WAIT_S = 5.0
WRITE_PROBE_TIMEOUT_S = 2.0  # /health's write probe waits at most this for a lock


def get_engine(url: str | None = None) -> Engine:
    """The engine of ``url``, default the settings' database (one engine per URL and SQLite busy timeout,
    so that a changed setting reaches a new database)."""
    return _engine(url or get_settings().database_url, get_settings().sqlite_busy_timeout_s)


@lru_cache(maxsize=4)
def _engine(url: str, busy_timeout_s: float) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": busy_timeout_s})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


@lru_cache(maxsize=4)
def _session_factory(url: str, busy_timeout_s: float) -> sessionmaker[Session]:
    return sessionmaker(bind=_engine(url, busy_timeout_s), expire_on_commit=False)


def conflict_insert(session: Session) -> Callable[..., Insert] | None:
    """The ``insert`` of the session's database that takes ``ON CONFLICT`` clauses (PostgreSQL, SQLite), or
    None for another database."""
    dialect = session.get_bind().dialect.name
    return {"postgresql": postgresql_insert, "sqlite": sqlite_insert}.get(dialect)


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session committed on success and rolled back on error."""
    session = _session_factory(url or get_settings().database_url, get_settings().sqlite_busy_timeout_s)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def is_transient(exc: BaseException) -> bool:
    """Whether a database error passes by itself: a lock wait that timed out (SQLite 'database is locked',
    PostgreSQL lock timeout, deadlock, serialisation failure) or a dropped, refused or restarting connection.
    A missing table, a constraint violation or a read-only database are not."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, OperationalError):
        return False
    if isinstance(exc.orig, sqlite3.OperationalError):
        message = str(exc.orig).lower()
        return "locked" in message or "busy" in message
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return sqlstate is None or sqlstate.startswith(TRANSIENT_SQLSTATES)  # None: libpq lost the server


def error_text(exc: BaseException) -> str:
    """A database error in the driver's words, first line only (no SQL statement, no parameters)."""
    reason = str(exc.orig if isinstance(exc, DBAPIError) else exc).strip()
    return reason.splitlines()[0] if reason else type(exc).__name__


def retry_transient(operation: Callable[[], T], what: str, budget_s: float | None = None) -> T:
    """``operation()`` (one whole transaction, e.g. a ``session_scope`` block), run again after a transient
    error (``is_transient``) with exponential backoff (0.1 s doubling up to 5 s) for up to ``budget_s``
    (default the ``db_retry_s`` setting); other errors, and the last transient one, are raised."""
    budget_s = get_settings().db_retry_s if budget_s is None else budget_s
    deadline = time.monotonic() + budget_s
    wait, attempt = RETRY_FIRST_WAIT_S, 1
    while True:
        try:
            return operation()
        except DBAPIError as exc:
            if not is_transient(exc) or time.monotonic() + wait > deadline:
                raise
            log.warning("%s: %s (attempt %d); retrying in %.1f s", what, error_text(exc), attempt, wait)
        time.sleep(wait)
        wait, attempt = min(wait * 2, RETRY_MAX_WAIT_S), attempt + 1


def check_writable() -> None:
    """Raise unless the database takes a write now: a write that deletes no row, in a transaction rolled
    back, waiting at most ``WRITE_PROBE_TIMEOUT_S`` for a lock. Fails on a read-only or a locked database."""
    wait_ms = int(WRITE_PROBE_TIMEOUT_S * 1000)
    with get_engine().connect() as conn:  # (its transaction begins with the first statement)
        sqlite = conn.dialect.name == "sqlite"
        try:
            if sqlite:  # a setting of the connection: put back below, before it returns to the pool
                conn.execute(text(f"PRAGMA busy_timeout={wait_ms}"))
            else:  # settings of this transaction only
                conn.execute(text(f"SET LOCAL lock_timeout = {wait_ms}"))
                conn.execute(text(f"SET LOCAL statement_timeout = {wait_ms}"))
            conn.execute(delete(Worker).where(false()))
        finally:
            conn.rollback()
            if sqlite:
                conn.execute(text(f"PRAGMA busy_timeout={int(get_settings().sqlite_busy_timeout_s * 1000)}"))
                conn.rollback()
