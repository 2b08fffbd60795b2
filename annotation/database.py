"""The annotation database: one SQLAlchemy engine per URL per process, the per-dialect set-up
(SQLite: owner-only file, WAL, foreign keys, ``BEGIN IMMEDIATE`` for writers, an in-process
write lock; PostgreSQL: plain pooled connections), the schema created and upgraded on first use,
and :class:`Database`, whose ``_session`` is how the store's service functions open sessions.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from metaaligner_core.errors import MetaAlignerError

from . import DEFAULT_DB_URL
from . import migrate
from .models import Base
from .safety import database_error, prepare_sqlite_file


def normalize_db_url(url: str | os.PathLike | None) -> str:
    """A SQLAlchemy URL; a bare file path means a SQLite file."""
    if url is None or str(url).strip() == "":
        return DEFAULT_DB_URL
    url = str(url).strip()
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser()}"
    return url


def _check_url(url: str) -> None:
    """A bad URL or a missing driver fails at once, before any file is made."""
    try:
        make_url(url).get_dialect()
    except Exception as e:
        raise MetaAlignerError(f'--db "{url}": not a usable SQLAlchemy database URL ({e}); '
                               f'e.g. {DEFAULT_DB_URL} or postgresql://user@host/db') from None


# How long a SQLite writer waits for another process's lock before the one-line "locked" error.
SQLITE_BUSY_TIMEOUT_S = 60.0
_ENGINES: dict[str, Engine] = {}
_ENGINES_LOCK = threading.Lock()
# SQLite has one writer at a time. Threads of this process queue on a lock (woken at once)
# rather than on SQLite's busy handler, which polls with sleeps of up to 100 ms.
_WRITE_LOCKS: dict[str, threading.Lock | None] = {}


def engine_for(url: str) -> Engine:
    """One engine per URL per process (pooled), with the schema created on first use."""
    url = normalize_db_url(url)
    with _ENGINES_LOCK:
        if url in _ENGINES:
            return _ENGINES[url]
        try:
            parsed = make_url(url)
        except Exception:
            raise MetaAlignerError(f'--db "{url}": not a SQLAlchemy database URL '
                                   f'(e.g. {DEFAULT_DB_URL} or postgresql://user@host/db)') from None
        sqlite = parsed.get_backend_name() == "sqlite"
        kwargs = {}
        if sqlite:
            db = parsed.database or ""
            if db and db != ":memory:" and not db.startswith("file:"):
                prepare_sqlite_file(db)  # owner-only file and folders, before SQLite creates them
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
            if db in ("", ":memory:"):  # one connection, or every thread would see its own empty database
                from sqlalchemy.pool import StaticPool

                kwargs["poolclass"] = StaticPool
        try:
            engine = create_engine(url, **kwargs)
        except Exception as e:  # unknown dialect, missing driver
            raise MetaAlignerError(f'--db "{url}": {e}') from None
        if sqlite:
            _configure_sqlite(engine)
        try:
            Base.metadata.create_all(engine)
            migrate.upgrade(engine)  # columns added since a database was created
        except DBAPIError as e:  # locked, corrupt, read-only, disk full, server down
            engine.dispose()
            raise database_error(url, e) from None
        _ENGINES[url] = engine
        _WRITE_LOCKS[url] = threading.Lock() if sqlite else None
        return engine


def dispose_engine(url: str) -> None:
    """Close and forget this process's engine for ``url`` (e.g. before dropping the database)."""
    url = normalize_db_url(url)
    with _ENGINES_LOCK:
        engine = _ENGINES.pop(url, None)
        _WRITE_LOCKS.pop(url, None)
    if engine is not None:
        engine.dispose()


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Let SQLAlchemy's "begin" hook below emit BEGIN, not the sqlite3 module.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # A write transaction takes the write lock up front: a deferred one that read first
        # cannot wait for the lock later (SQLITE_BUSY_SNAPSHOT) and would fail instead.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("ma_write") else "BEGIN")



class Database:
    """One database by URL. Cheap to construct: engines are shared per URL."""

    def __init__(self, url: str | None = None):
        self.url = normalize_db_url(url)
        _check_url(self.url)
        # The engine (and a SQLite file) is made on first use, so a command that fails on its
        # input before touching the database leaves no empty database file behind.
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            engine = engine_for(self.url)
            self._reader = sessionmaker(engine, expire_on_commit=False)
            self._writer = sessionmaker(engine.execution_options(ma_write=True), expire_on_commit=False)
            self._write_lock = _WRITE_LOCKS.get(self.url)
            self._engine = engine
        return self._engine

    @contextmanager
    def _session(self, write: bool = False) -> Iterator[Session]:
        self.engine  # noqa: B018 (creates the engine and session factories on first use)
        lock = self._write_lock if write else None
        try:
            if lock is not None:
                lock.acquire()
            with (self._writer if write else self._reader)() as session, session.begin():
                yield session
        except DBAPIError as e:  # disk full, locked past the timeout, read-only, corrupt: one line
            if isinstance(e, IntegrityError):
                raise  # a constraint race the caller retries
            raise database_error(self.url, e) from None
        finally:
            if lock is not None:
                lock.release()
