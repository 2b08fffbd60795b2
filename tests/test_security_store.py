"""Accounts and database safety of the annotation store (issue 10): password hashing and re-hash,
throttled sign-in, roles, disabled accounts, the first-run admin token, owner-only files, and
database faults (full disk on a real tmpfs, locked, read-only, corrupt) as one-line errors in the
store and the CLI, with nothing half-written."""
from __future__ import annotations

import logging
import os
import sqlite3
import stat
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select

from annotation import accounts
from annotation.accounts import OPERATOR, AccessDenied, FirstRun
from annotation.models import Annotator
from annotation.store import Store, dispose_engine
from conftest import run_cli, write_jsonl
from metaaligner_core.errors import MetaAlignerError

PASSWORD = "correct horse battery"


@pytest.fixture
def fast_scrypt(monkeypatch):
    """2^14 keeps these tests quick; the parameter itself is checked in its own test."""
    monkeypatch.setattr(accounts, "SCRYPT_N", 2 ** 14)


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(accounts.THROTTLE, "clock", lambda: now[0])
    return now


@pytest.fixture
def store(tmp_path):
    url = f"sqlite:///{tmp_path / 'db' / 'a.db'}"
    yield Store(url)
    dispose_engine(url)


def _items(path: Path, n: int = 2) -> Path:
    return write_jsonl(path, [{"query": f"Question {i}?", "responses": [{"text": f"Answer {i}."}]} for i in range(n)])


# ----------------------------------------------------------------------------- passwords

def test_scrypt_is_n_2_17_and_old_hashes_are_upgraded_at_sign_in(store, monkeypatch):
    assert accounts.SCRYPT_N == 2 ** 17
    monkeypatch.setattr(accounts, "SCRYPT_N", 2 ** 14)
    store.add_annotator("ann", PASSWORD)
    with store._session() as s:
        old = s.execute(select(Annotator.password_hash)).scalar_one()
    assert old.startswith("scrypt$16384$")
    monkeypatch.setattr(accounts, "SCRYPT_N", 2 ** 17)
    assert accounts.needs_rehash(old)
    store.whoami(store.sign_in("ann", PASSWORD))
    with store._session() as s:
        new = s.execute(select(Annotator.password_hash)).scalar_one()
    assert new.startswith("scrypt$131072$8$1$") and new != old and not accounts.needs_rehash(new)
    assert store.whoami(store.sign_in("ann", PASSWORD)).name == "ann"  # the new hash verifies
    # A tampered row cannot make the server allocate gigabytes.
    assert not accounts.verify_password(PASSWORD, "scrypt$1073741824$8$1$AAAA$AAAA")


# ----------------------------------------------------------------------------- throttling

def test_sign_in_backs_off_per_account_and_logs_without_the_password(store, clock, fast_scrypt, caplog):
    store.add_annotator("ann", PASSWORD)
    caplog.set_level(logging.WARNING, logger="annotation.accounts")
    for i in range(accounts.FREE_FAILURES_ACCOUNT):
        with pytest.raises(AccessDenied, match="wrong name or password"):
            store.sign_in("ann", f"guess-{i}-xyz", client="10.0.0.1")
    # Now even the right password waits: 1 s, then 2 s after the next failure, ...
    with pytest.raises(AccessDenied, match="too many failed sign-ins; try again in 1 s"):
        store.sign_in("ann", PASSWORD, client="10.0.0.2")
    clock[0] += 1.1
    with pytest.raises(AccessDenied, match="wrong name or password"):
        store.sign_in("ann", "guess-again-xyz", client="10.0.0.1")
    with pytest.raises(AccessDenied, match="try again in 2 s"):
        store.sign_in("ann", PASSWORD)
    clock[0] += 2.1
    token = store.sign_in("ann", PASSWORD)  # success clears the account's count
    assert store.whoami(token).name == "ann"
    with pytest.raises(AccessDenied, match="wrong name or password"):
        store.sign_in("ann", "one-more-xyz")
    assert "failed sign-in for account 'ann' from 10.0.0.1" in caplog.text
    assert "refused: too many failed sign-ins" in caplog.text
    assert "guess-" not in caplog.text and PASSWORD not in caplog.text


def test_sign_in_backs_off_per_client_address(store, clock, fast_scrypt):
    store.add_annotator("ann", PASSWORD)
    for i in range(accounts.FREE_FAILURES_CLIENT):  # a different name each time: only the address repeats
        with pytest.raises(AccessDenied, match="wrong name or password"):
            store.sign_in(f"user{i}", "guess-xyz", client="10.9.9.9")
    with pytest.raises(AccessDenied, match="too many failed sign-ins"):
        store.sign_in("ann", PASSWORD, client="10.9.9.9")
    assert store.whoami(store.sign_in("ann", PASSWORD, client="10.1.1.1")).name == "ann"


def test_parallel_guesses_run_one_check_per_account_at_a_time(store, fast_scrypt):
    """A burst of guesses for one account: at most one scrypt check at a time and the back-off
    after five failures, so 60 guesses cost a handful of hashes, not 60."""
    import threading

    store.add_annotator("ann", PASSWORD)
    calls = []
    real = accounts.verify_password

    def counting(password, stored):
        calls.append(1)
        return real(password, stored)

    outcomes = []
    accounts.verify_password, saved = counting, accounts.verify_password
    try:
        def guess(i):
            try:
                store.sign_in("ann", f"guess-{i}-xyz", client=f"10.0.{i}.1")
            except AccessDenied as e:
                outcomes.append(str(e))

        threads = [threading.Thread(target=guess, args=(i,)) for i in range(60)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        accounts.verify_password = saved
    assert len(outcomes) == 60
    assert len(calls) <= accounts.FREE_FAILURES_ACCOUNT + 2, len(calls)
    assert sum("wrong name or password" in o for o in outcomes) == len(calls)


# ----------------------------------------------------------------------------- roles and accounts

def test_roles_disable_reset_and_the_last_admin(store, clock, fast_scrypt):
    store.add_annotator("boss", PASSWORD, role="admin")
    admin = store.sign_in("boss", PASSWORD)
    accounts.add_account(store, admin, "rita", PASSWORD, "rater")
    accounts.add_account(store, admin, "eve", PASSWORD, "examiner")
    rita, eve = store.sign_in("rita", PASSWORD), store.sign_in("eve", PASSWORD)
    assert store.whoami(eve).role == "examiner" and not store.whoami(eve).is_admin
    with store._session() as s:
        accounts.require_role(s, eve, "examiner")
        with pytest.raises(AccessDenied, match="examiners and admins only"):
            accounts.require_role(s, rita, "examiner")
        accounts.require_role(s, OPERATOR, "admin")
    for action in (lambda t: accounts.add_account(store, t, "mallory", PASSWORD),
                   lambda t: accounts.list_accounts(store, t),
                   lambda t: accounts.set_disabled(store, t, "boss"),
                   lambda t: accounts.reset_password(store, t, "boss", "hijacked-password")):
        for tok in (rita, eve, None, "forged"):
            with pytest.raises(AccessDenied):
                action(tok)
    names = {a["name"]: a for a in accounts.list_accounts(store, admin)}
    assert set(names) == {"boss", "rita", "eve"} and names["eve"]["role"] == "examiner"
    accounts.set_disabled(store, admin, "rita")  # ends her sign-in, and she cannot sign in again
    with pytest.raises(AccessDenied, match="not signed in"):
        store.whoami(rita)
    with pytest.raises(AccessDenied, match="disabled"):
        store.sign_in("rita", PASSWORD)
    accounts.set_disabled(store, admin, "rita", False)
    accounts.reset_password(store, admin, "rita", "a brand new password")
    with pytest.raises(AccessDenied, match="wrong name or password"):
        store.sign_in("rita", PASSWORD)
    assert store.whoami(store.sign_in("rita", "a brand new password")).role == "rater"
    with pytest.raises(MetaAlignerError, match="last admin"):
        accounts.set_disabled(store, admin, "boss")
    with pytest.raises(MetaAlignerError, match="last admin"):
        accounts.set_role(store, admin, "boss", "rater")


def test_sign_ins_expire(store, fast_scrypt):
    from datetime import timedelta

    from annotation.models import SignIn

    store.add_annotator("ann", PASSWORD)
    token = store.sign_in("ann", PASSWORD)
    with store._session(write=True) as s:
        s.execute(SignIn.__table__.update().values(
            created_at=accounts.utcnow() - accounts.SIGN_IN_TTL - timedelta(seconds=1)))
    with pytest.raises(AccessDenied, match="expired"):
        store.whoami(token)


def test_first_admin_with_the_one_time_token(store, clock, fast_scrypt):
    first = FirstRun()
    store.add_annotator("imported", None)  # an annotator from import-ratings: no password, no admin
    assert accounts.needs_first_admin(store)
    with pytest.raises(AccessDenied, match="set-up token"):
        accounts.create_first_admin(store, first, "wrong-token", "boss", PASSWORD)
    with pytest.raises(AccessDenied, match="set-up token"):
        accounts.create_first_admin(store, first, None, "boss", PASSWORD)
    token = accounts.create_first_admin(store, first, first.token, "boss", PASSWORD)
    assert store.whoami(token).role == "admin" and not accounts.needs_first_admin(store)
    with pytest.raises(AccessDenied, match="set-up token"):  # once only
        accounts.create_first_admin(store, first, first.token, "boss2", PASSWORD)
    again = FirstRun()  # a restart while an admin exists: no way in either
    with pytest.raises(AccessDenied, match="already exists"):
        accounts.create_first_admin(store, again, again.token, "boss3", PASSWORD)


# ----------------------------------------------------------------------------- files

def test_database_file_and_new_folders_are_owner_only(tmp_path, fast_scrypt):
    old = os.umask(0)  # even a permissive umask
    try:
        db = tmp_path / "new" / "sub" / "a.db"
        store = Store(f"sqlite:///{db}")
        store.add_annotator("ann", PASSWORD)
    finally:
        os.umask(old)
    for d in (tmp_path / "new", tmp_path / "new" / "sub"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    for f in (db, db.with_name("a.db-wal"), db.with_name("a.db-shm")):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    dispose_engine(f"sqlite:///{db}")


def test_a_rejected_import_leaves_no_database_file(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query": "Q?", "responses": []}])
    db = tmp_path / "fresh" / "a.db"
    r = run_cli("annotate", "import", "--db", f"sqlite:///{db}", "--input", bad, timeout=300)
    assert r.returncode != 0 and "responses" in r.stderr
    assert not db.exists() and not db.parent.exists()


# ----------------------------------------------------------------------------- database faults

def _one_line_cli_error(r: subprocess.CompletedProcess, text: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert any(text in ln for ln in lines), r.stderr[-2000:]


def test_corrupt_database_is_a_one_line_error(tmp_path):
    db = tmp_path / "a.db"
    db.write_bytes(b"this is not a SQLite database, just text\n" * 200)
    with pytest.raises(MetaAlignerError, match="not a valid SQLite database") as e:
        Store(f"sqlite:///{db}").progress_by_annotator(OPERATOR)
    assert "\n" not in str(e.value)
    r = run_cli("annotate", "progress", "--db", f"sqlite:///{db}", timeout=300)
    _one_line_cli_error(r, "not a valid SQLite database")
    assert db.read_bytes().startswith(b"this is not a SQLite")  # untouched


def test_locked_database_is_a_one_line_error_and_nothing_is_written(tmp_path, monkeypatch, fast_scrypt):
    import annotation.database as database

    monkeypatch.setattr(database, "SQLITE_BUSY_TIMEOUT_S", 0.5)
    db = tmp_path / "a.db"
    url = f"sqlite:///{db}"
    store = Store(url)
    store.import_items(_items(tmp_path / "i.jsonl", 1))
    other = sqlite3.connect(db, timeout=0)
    other.execute("BEGIN IMMEDIATE")  # another process's writer holds the lock
    try:
        with pytest.raises(MetaAlignerError, match="locked by another writer") as e:
            store.import_items(_items(tmp_path / "j.jsonl", 3))
        assert "\n" not in str(e.value)
    finally:
        other.rollback()
        other.close()
    with store._session() as s:
        from annotation.models import Item

        assert s.query(Item).count() == 1
    dispose_engine(url)


@pytest.fixture
def tmpfs(tmp_path):
    """A real 512 KiB tmpfs (root on Linux); skipped, saying so, where it cannot be mounted."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not root'}): disk-full and read-only "
                    "tests need one")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_is_a_one_line_error_and_nothing_is_half_written(tmpfs, tmp_path):
    db = tmpfs / "a.db"
    url = f"sqlite:///{db}"
    r = run_cli("annotate", "import", "--db", url, "--input", _items(tmp_path / "i.jsonl", 2), timeout=300)
    assert r.returncode == 0, r.stderr
    filler = tmpfs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)  # fill the disk to the last byte
    try:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    big = write_jsonl(tmp_path / "big.jsonl", [{"query": f"Long question {i}? " + "x" * 2000,
                                                "responses": [{"text": "y" * 2000}]} for i in range(200)])
    r = run_cli("annotate", "import", "--db", url, "--input", big, timeout=300)
    _one_line_cli_error(r, "the disk is full; nothing was saved")
    filler.unlink()
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 2
    finally:
        con.close()


def test_read_only_database_is_a_one_line_error(tmpfs, tmp_path):
    db = tmpfs / "a.db"
    url = f"sqlite:///{db}"
    assert run_cli("annotate", "import", "--db", url, "--input", _items(tmp_path / "i.jsonl", 2),
                   timeout=300).returncode == 0
    r = subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot remount the tmpfs read-only: {r.stderr.strip()}")
    try:
        r = run_cli("annotate", "import", "--db", url, "--input", _items(tmp_path / "j.jsonl", 4), timeout=300)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert "read-only" in r.stderr or "cannot open the database file" in r.stderr, r.stderr[-1000:]
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], capture_output=True)
    con = sqlite3.connect(db)
    try:
        assert con.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 2
    finally:
        con.close()


def test_database_errors_name_the_url_without_its_password():
    from annotation.safety import database_error

    class Orig(Exception):
        pass

    class Wrapped(Exception):
        orig = Orig("database or disk is full")

    msg = str(database_error("postgresql://ann:s3cret-pw@db.example/annot", Wrapped()))
    assert "s3cret-pw" not in msg and "***" in msg and "disk is full" in msg
