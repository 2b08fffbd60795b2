"""Database faults as one-line errors, and database files readable by their owner only.

:func:`database_error` turns a driver error (disk full, locked past the timeout, read-only,
corrupt file, unreachable server) into a :class:`MetaAlignerError` naming the database, with the
password stripped from the URL. The store raises it from its sessions: the transaction was rolled
back, so nothing was half-written.

:func:`prepare_sqlite_file` creates the folders a SQLite database needs with mode 0700 and the
file itself with mode 0600 before SQLite opens it (SQLite gives its ``-wal`` and ``-shm`` files the
database file's mode), so password hashes and notes are not readable by other local users.
"""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from metaaligner_core.errors import MetaAlignerError

log = logging.getLogger("annotation.safety")


def display_url(url: str) -> str:
    """The URL with any password replaced by ***."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<database URL>"


def database_error(url: str, exc: BaseException) -> MetaAlignerError:
    """One line for a failed database operation."""
    orig = getattr(exc, "orig", None) or exc
    first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    msg = first.lower()
    where = display_url(url)
    if "disk is full" in msg or "no space left" in msg or "disk full" in msg or (
            "i/o error" in msg and _disk_full(url)):  # a failed WAL write on a full disk reads as I/O error
        why = "the disk is full; nothing was saved: free some space and try again"
    elif "locked" in msg or "busy" in msg:
        why = "the database stayed locked by another writer past the timeout; nothing was saved: try again"
    elif "readonly" in msg or "read-only" in msg or "read only" in msg:
        why = ("the database is read-only (check the permissions of the file and its folder); "
               "nothing was saved")
    elif "not a database" in msg or "malformed" in msg or "corrupt" in msg:
        why = "the file is not a valid SQLite database (corrupt, or another kind of file); restore it from a backup"
    elif "i/o error" in msg:
        why = "disk I/O error (a failing or full disk?); nothing was saved"
    elif "unable to open" in msg:
        why = "cannot open the database file (missing folder or no permission)"
    else:
        why = f"database error: {first[:300]}"
    return MetaAlignerError(f"{where}: {why}")


def _disk_full(url: str) -> bool:
    """Whether the file system of a SQLite database has no space left."""
    try:
        from sqlalchemy.engine import make_url

        db = make_url(url).database
        if not db or db == ":memory:":
            return False
        st = os.statvfs(Path(db).expanduser().parent)
        return st.f_bavail * st.f_frsize < 64 * 1024
    except Exception:
        return False


def prepare_sqlite_file(path: str | os.PathLike) -> None:
    """Create missing parent folders (0700) and the database file (0600) before SQLite does."""
    p = Path(path).expanduser()
    missing = []
    parent = p.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            pass
    if not p.exists():
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        except FileExistsError:
            pass
        except OSError:
            return  # SQLite reports the problem itself (read-only folder, ...)
    else:
        mode = p.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("%s is readable by other users (mode %o); chmod 600 it: it holds password hashes "
                        "and notes", p, stat.S_IMODE(mode))


def remove_later(path: str | os.PathLike, seconds: float = 60.0) -> None:
    """Delete a temporary folder shortly after a handler returned it: Gradio copies files it
    serves into its own cache (which ``delete_cache`` ages out) right after the handler returns,
    so the handler's own copy can go."""
    import shutil
    import threading

    timer = threading.Timer(seconds, shutil.rmtree, args=(str(path), True))
    timer.daemon = True
    timer.start()
