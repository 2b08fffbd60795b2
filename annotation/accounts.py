"""Accounts of the annotation store: passwords, sign-in, roles, throttling, first-run set-up.

Roles (:data:`ROLES`, lowest first; a higher role may do everything a lower one may):

* ``rater`` rates items and sends items from the Align tab to the annotation queue;
* ``examiner`` also reviews the items whose raters disagree;
* ``admin`` also exports, sees agreement and everyone's progress, and manages accounts.

:data:`OPERATOR` is the local command line: its user can open the database file anyway, so it
passes every check.

The session credential: :func:`sign_in` returns a random 256-bit token. The app keeps it in a
server-side ``gr.State`` of the browser session (the page never receives it); the database keeps
only its SHA-256. A sign-in lasts at most :data:`SIGN_IN_TTL`; changing the password, disabling
the account or signing out ends it.

Passwords are hashed with scrypt (:data:`SCRYPT_N` = 2^17, r=8, p=1: 128 MiB and about 0.3 s per
hash on one core, the OWASP 2024 minimum). Hashes made with weaker parameters are replaced at the
next successful sign-in. At most :data:`HASH_SLOTS` hashes run at once, so a burst of sign-ins
cannot take more than that many times 128 MiB.

Throttling (:mod:`annotation.throttle`, in the database, so every process on it shares it):
after :data:`FREE_FAILURES_ACCOUNT` failed sign-ins for one account name, or
:data:`FREE_FAILURES_CLIENT` from one client address, each further attempt has to wait (1 s,
doubling up to 15 min) and is refused without running scrypt; only one check per account name
runs at a time, across processes. Failed attempts are logged with the name and address,
never the password.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from sqlalchemy import select

from metaaligner_core.errors import MetaAlignerError

from .models import Annotator, SignIn, utcnow
from .throttle import (BACKOFF_FIRST_S, BACKOFF_MAX_S, FORGET_AFTER_S, FREE_FAILURES_ACCOUNT,  # noqa: F401
                       FREE_FAILURES_CLIENT, Refused, Throttle, key_of)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from .database import Database

log = logging.getLogger("annotation.accounts")

ROLES = ("rater", "examiner", "admin")
ROLE_RANK = {r: i for i, r in enumerate(ROLES)}
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024  # scrypt reads the whole password; nobody types more
MAX_NAME_LENGTH = 200
SIGN_IN_TTL = timedelta(hours=12)

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 17, 8, 1
_SCRYPT_MAXMEM = 256 * 1024 * 1024  # 128 * N * r = 128 MiB needed, plus headroom
HASH_SLOTS = 2
_hash_slots = threading.BoundedSemaphore(HASH_SLOTS)

WRONG = "wrong name or password"


class AccessDenied(MetaAlignerError, PermissionError):
    """The caller is not signed in, or not allowed to do this (e.g. a non-admin exporting)."""


class Operator:
    """The local command line: full access, since its user can open the database file anyway."""

    def __repr__(self) -> str:
        return "OPERATOR"


OPERATOR = Operator()


@dataclass(frozen=True)
class Account:
    name: str
    role: str = "rater"
    disabled: bool = False

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


# ----------------------------------------------------------------------------- passwords

def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    with _hash_slots:
        digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                                maxmem=_SCRYPT_MAXMEM, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str | None) -> bool:
    if not stored:
        return False
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt" or int(n) > 2 ** 20 or int(r) > 32 or int(p) > 16:
            return False  # a tampered row must not make the server allocate gigabytes
        expected = base64.b64decode(digest)
        with _hash_slots:
            actual = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r),
                                    p=int(p), maxmem=1024 * 1024 * 1024, dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def needs_rehash(stored: str | None) -> bool:
    """Whether a stored hash is weaker than the current parameters (re-hashed at the next sign-in)."""
    try:
        scheme, n, r, p, *_ = (stored or "").split("$")
        return scheme != "scrypt" or int(n) < SCRYPT_N or int(r) < SCRYPT_R or int(p) < SCRYPT_P
    except ValueError:
        return True


_dummy_hash: str | None = None
_dummy_lock = threading.Lock()


def _dummy() -> str:
    """Checked against for unknown names, so timing does not reveal which names exist."""
    global _dummy_hash
    with _dummy_lock:
        if _dummy_hash is None or needs_rehash(_dummy_hash):
            _dummy_hash = hash_password(secrets.token_hex(8))
        return _dummy_hash


def _sha(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def _aware(dt: datetime) -> datetime:
    # SQLite hands back naive datetimes; they were written as UTC.
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def check_password_rules(password: str | None) -> None:
    if password is None:
        return
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_LENGTH:
        raise MetaAlignerError(f"password: expected at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise MetaAlignerError(f"password: expected at most {MAX_PASSWORD_LENGTH} characters")


def check_name(name: str | None) -> str:
    name = (name or "").strip() if isinstance(name, str) or name is None else ""
    if not name or len(name) > MAX_NAME_LENGTH:
        raise MetaAlignerError(f"annotator name: expected 1-{MAX_NAME_LENGTH} characters")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise MetaAlignerError(f'role "{role}": expected one of {", ".join(ROLES)}')
    return role


# ----------------------------------------------------------------------------- throttling

THROTTLE = Throttle()  # its counts live in the database: every process on it shares them


def _keys(store: "Database", name: str, client: str | None) -> list[str]:
    keys = [key_of("account", name.casefold())]
    if client:
        keys.append(key_of("client", client))
    return keys


def _begin(store: "Database", keys: list[str]) -> None:
    try:
        THROTTLE.begin(store, keys)
    except Refused as e:
        raise AccessDenied(str(e)) from None


# ----------------------------------------------------------------------------- sign-in

def sign_in(store: "Database", name: str, password: str, client: str | None = None) -> str:
    """A session token; AccessDenied on a wrong name or password, a disabled account, or while
    the account or the client address has to wait after failed attempts."""
    name = (name or "").strip() if isinstance(name, str) else ""
    password = password if isinstance(password, str) else ""
    if not name or len(name) > MAX_NAME_LENGTH or len(password) > MAX_PASSWORD_LENGTH:
        raise AccessDenied(WRONG)
    keys = _keys(store, name, client)
    try:
        _begin(store, keys)
    except AccessDenied as e:
        log.warning("sign-in for account %r from %s refused: %s", name[:64], client or "local", e)
        raise
    ok = False
    try:
        with store._session() as s:
            row = s.execute(select(Annotator.id, Annotator.password_hash, Annotator.disabled)
                            .where(Annotator.name == name)).first()
        # scrypt runs outside the write lock: sign-ins never hold up other annotators' saves.
        if row is None or not row.password_hash:
            verify_password(password, _dummy())
            raise AccessDenied(WRONG)
        if not verify_password(password, row.password_hash):
            raise AccessDenied(WRONG)
        if row.disabled:
            raise AccessDenied("this account is disabled; ask an admin")
        new_hash = hash_password(password) if needs_rehash(row.password_hash) else None
        with store._session(write=True) as s:
            me = s.get(Annotator, row.id)
            if me is None or me.password_hash != row.password_hash or me.disabled:
                raise AccessDenied(WRONG)  # changed meanwhile
            if new_hash is not None:
                me.password_hash = new_hash
            s.execute(SignIn.__table__.delete().where(SignIn.created_at < utcnow() - SIGN_IN_TTL))
            token = secrets.token_urlsafe(32)
            s.add(SignIn(token_hash=_sha(token), annotator_id=row.id))
        if new_hash is not None:
            log.info("password hash of %r upgraded to scrypt N=%d", name[:64], SCRYPT_N)
        ok = True
        return token
    finally:
        failures = THROTTLE.end(store, keys, ok)
        if not ok:
            log.warning("failed sign-in for account %r from %s (%d recent failures)", name[:64],
                        client or "local", failures)


def sign_out(store: "Database", token: str | None) -> None:
    if isinstance(token, str) and token:
        with store._session(write=True) as s:
            s.execute(SignIn.__table__.delete().where(SignIn.token_hash == _sha(token)))


def current(s: "Session", token) -> Annotator:
    """The signed-in annotator of ``token`` inside an open session; AccessDenied otherwise."""
    if not isinstance(token, str) or not token:
        raise AccessDenied("not signed in")
    row = s.execute(select(Annotator, SignIn.created_at).join(SignIn, SignIn.annotator_id == Annotator.id)
                    .where(SignIn.token_hash == _sha(token))).first()
    if row is None or _aware(row[1]) + SIGN_IN_TTL < utcnow() or row[0].disabled:
        raise AccessDenied("not signed in (or the sign-in expired): sign in again")
    return row[0]


_ROLE_DENIED = {
    "admin": "admins only: exports, agreement, other annotators' progress and accounts need an admin account",
    "examiner": "examiners and admins only",
    "rater": "not signed in",
}


def require_role(s: "Session", actor, role: str):
    """``actor`` (a token or OPERATOR) if it has at least ``role``; AccessDenied otherwise."""
    if actor is OPERATOR:
        return OPERATOR
    me = current(s, actor)
    if ROLE_RANK.get(_role_of(me), -1) < ROLE_RANK[role]:
        raise AccessDenied(_ROLE_DENIED[role])
    return me


def _role_of(a: Annotator) -> str:
    # Rows written before the role column existed carry only is_admin.
    return "admin" if a.is_admin and a.role != "admin" else (a.role or "rater")


def whoami(store: "Database", token) -> Account:
    with store._session() as s:
        me = current(s, token)
        return Account(me.name, _role_of(me), bool(me.disabled))


def role_of_token(store: "Database", token) -> str | None:
    """The role of a signed-in token, None when not signed in (never raises AccessDenied)."""
    try:
        return whoami(store, token).role
    except AccessDenied:
        return None


# ----------------------------------------------------------------------------- accounts

def upsert_account(store: "Database", name: str, password: str | None, role: str = "rater",
                   update: bool = False) -> None:
    """Create an account (or, with ``update``, set its password and role). The CLI's path."""
    name = check_name(name)
    check_role(role)
    check_password_rules(password)
    hashed = hash_password(password) if password is not None else None
    with store._session(write=True) as s:
        row = s.scalar(select(Annotator).where(Annotator.name == name))
        if row is None:
            s.add(Annotator(name=name, password_hash=hashed, is_admin=role == "admin", role=role))
        elif not update:
            raise MetaAlignerError(f'annotator "{name}" already exists (use --update to change it)')
        else:
            if hashed is not None:
                row.password_hash = hashed
                s.execute(SignIn.__table__.delete().where(SignIn.annotator_id == row.id))
            row.role, row.is_admin = role, role == "admin"
    log.debug("annotator %s %s (%s)", name, "updated" if update else "added", role)


def add_account(store: "Database", actor, name: str, password: str, role: str = "rater") -> None:
    """An admin creates an account."""
    name = check_name(name)
    check_role(role)
    check_password_rules(password)
    with store._session() as s:
        require_role(s, actor, "admin")
    hashed = hash_password(password)
    with store._session(write=True) as s:
        admin = require_role(s, actor, "admin")
        if s.scalar(select(Annotator.id).where(Annotator.name == name)) is not None:
            raise MetaAlignerError(f'annotator "{name}" already exists')
        s.add(Annotator(name=name, password_hash=hashed, is_admin=role == "admin", role=role))
    log.info("account %r (%s) added by %s", name[:64], role, _who(admin))


def reset_password(store: "Database", actor, name: str, password: str) -> None:
    """An admin sets a new password (also for imported annotators who had none); ends its sign-ins."""
    check_password_rules(password)
    if password is None:
        raise MetaAlignerError("password: missing")
    with store._session() as s:
        require_role(s, actor, "admin")
    hashed = hash_password(password)
    with store._session(write=True) as s:
        admin = require_role(s, actor, "admin")
        row = _account_row(s, name)
        row.password_hash = hashed
        s.execute(SignIn.__table__.delete().where(SignIn.annotator_id == row.id))
    log.info("password of %r reset by %s", name[:64], _who(admin))


def set_role(store: "Database", actor, name: str, role: str) -> None:
    check_role(role)
    with store._session(write=True) as s:
        admin = require_role(s, actor, "admin")
        row = _account_row(s, name)
        if role != "admin" and _role_of(row) == "admin":
            _keep_one_admin(s, row)
        row.role, row.is_admin = role, role == "admin"
    log.info("role of %r set to %s by %s", name[:64], role, _who(admin))


def set_disabled(store: "Database", actor, name: str, disabled: bool = True) -> None:
    """An admin disables (or re-enables) an account; disabling ends its sign-ins."""
    with store._session(write=True) as s:
        admin = require_role(s, actor, "admin")
        row = _account_row(s, name)
        if disabled and _role_of(row) == "admin":
            _keep_one_admin(s, row)
        row.disabled = bool(disabled)
        if disabled:
            s.execute(SignIn.__table__.delete().where(SignIn.annotator_id == row.id))
    log.info("account %r %s by %s", name[:64], "disabled" if disabled else "enabled", _who(admin))


def list_accounts(store: "Database", actor) -> list[dict]:
    with store._session() as s:
        require_role(s, actor, "admin")
        return [{"name": a.name, "role": _role_of(a), "disabled": bool(a.disabled),
                 "has_password": bool(a.password_hash)}
                for a in s.scalars(select(Annotator).order_by(Annotator.name))]


def _account_row(s: "Session", name: str) -> Annotator:
    row = s.scalar(select(Annotator).where(Annotator.name == (name or "").strip()))
    if row is None:
        raise MetaAlignerError(f'no account "{name}"')
    return row


def _keep_one_admin(s: "Session", row: Annotator) -> None:
    others = s.scalar(select(Annotator.id).where(Annotator.id != row.id, Annotator.disabled.is_(False),
                                                 Annotator.password_hash.is_not(None),
                                                 (Annotator.role == "admin") | Annotator.is_admin.is_(True)).limit(1))
    if others is None:
        raise MetaAlignerError("the last admin who can sign in cannot be disabled or demoted")


def _who(actor) -> str:
    return "the operator" if actor is OPERATOR else repr(actor.name[:64])


# ----------------------------------------------------------------------------- first run

def needs_first_admin(store: "Database") -> bool:
    """True while no enabled admin account with a password exists."""
    with store._session() as s:
        return s.scalar(select(Annotator.id).where(
            Annotator.disabled.is_(False), Annotator.password_hash.is_not(None),
            (Annotator.role == "admin") | Annotator.is_admin.is_(True)).limit(1)) is None


class FirstRun:
    """The one-time set-up token the app prints in its log when the database has no admin.

    Whoever can read the server log (the operator) can create the first admin in the browser;
    the token works once and only while no admin exists.
    """

    def __init__(self, token: str | None = None):
        self.token = token or secrets.token_urlsafe(18)
        self.used = False
        self._lock = threading.Lock()

    def matches(self, token) -> bool:
        return (isinstance(token, str) and not self.used
                and hmac.compare_digest(token.strip().encode("utf-8"), self.token.encode("utf-8")))


def create_first_admin(store: "Database", first_run: FirstRun, token: str, name: str, password: str,
                       client: str | None = None) -> str:
    """Create the first admin with the set-up token; returns that admin's session token."""
    name = check_name(name)
    check_password_rules(password)
    if password is None:
        raise MetaAlignerError("password: missing")
    keys = [key_of("client", f"setup:{client or 'local'}")]
    _begin(store, keys)
    ok = False
    try:
        with first_run._lock:
            if not first_run.matches(token):
                raise AccessDenied("wrong or used set-up token (the server log shows it at start-up)")
            if not needs_first_admin(store):
                first_run.used = True
                raise AccessDenied("an admin account already exists; sign in instead")
            hashed = hash_password(password)
            with store._session(write=True) as s:
                row = s.scalar(select(Annotator).where(Annotator.name == name))
                if row is None:
                    s.add(Annotator(name=name, password_hash=hashed, is_admin=True, role="admin"))
                else:  # e.g. an annotator imported with ratings but no password
                    row.password_hash, row.role, row.is_admin, row.disabled = hashed, "admin", True, False
            first_run.used = True
        ok = True
        log.info("first admin %r created in the browser from %s", name[:64], client or "local")
    finally:
        THROTTLE.end(store, keys, ok)
        if not ok:
            log.warning("failed first-run set-up from %s", client or "local")
    return sign_in(store, name, password, client)


def client_of(request) -> str | None:
    """The client address of a ``gr.Request`` (or None), for per-address throttling: the TCP
    peer's, or X-Forwarded-For's from a proxy listed with ``--forwarded-allow-ips``."""
    client = getattr(request, "client", None)
    return getattr(client, "host", None) or None
