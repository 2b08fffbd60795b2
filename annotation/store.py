"""The rating store: the service functions of the annotation tool.

This is the only module that opens database sessions. Every other layer (the CLI, the Gradio
tabs, tests) calls these functions.

Who may do what:

* An annotator signs in with name and password and gets a random token; every rating function
  takes that token and acts only on that annotator's own ratings. No function takes an
  annotator id from the caller, so one annotator can neither read nor change another's ratings.
* Exports, agreement and progress of all annotators need an admin token, or :data:`OPERATOR`:
  the local command line, whose user can open the database file anyway.

SQLite (the default, ``sqlite:///data/annotations.db``) runs in WAL mode with foreign keys on;
write transactions start with ``BEGIN IMMEDIATE`` so concurrent writers queue on the busy
timeout instead of failing on a lock upgrade. Any other SQLAlchemy URL works too.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from sqlalchemy import case, create_engine, distinct, event, func, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from metaaligner_core.errors import InputError, MetaAlignerError
from metaaligner_core.io import iter_records
from metaaligner_core.objectives import normalize_key

from . import agreement as agreement_mod
from . import migrate
from . import export as export_mod
from .models import (DRAFT, SUBMITTED, Annotator, Base, Item, ProtocolObjective, ProtocolRow, Rating,
                     Response, SignIn, utcnow)
from . import DEFAULT_DB_URL, DEFAULT_TARGET_ANNOTATORS  # noqa: F401  (re-exported)
from .protocols import SCORES, Protocol, load_protocol

log = logging.getLogger(__name__)

MIN_PASSWORD_LENGTH = 8
SIGN_IN_TTL = timedelta(hours=12)
# scrypt cost: 16 MiB and ~50 ms per hash on one core; the salt is per password.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1


class AccessDenied(MetaAlignerError, PermissionError):
    """The caller is not signed in, or not allowed to do this (e.g. a non-admin exporting)."""


class Operator:
    """The local command line: full access, since its user can open the database file anyway."""

    def __repr__(self) -> str:
        return "OPERATOR"


OPERATOR = Operator()


# ----------------------------------------------------------------------------- passwords

def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            maxmem=64 * 1024 * 1024, dklen=32)
    b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt)}${b64(digest)}"


def verify_password(password: str, stored: str | None) -> bool:
    if not stored:
        return False
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r),
                                p=int(p), maxmem=64 * 1024 * 1024, dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


_DUMMY_HASH = None  # compared against for unknown names, so timing does not reveal which names exist


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _aware(dt: datetime) -> datetime:
    # SQLite hands back naive datetimes; they were written as UTC.
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


# ----------------------------------------------------------------------------- engine

def normalize_db_url(url: str | os.PathLike | None) -> str:
    """A SQLAlchemy URL; a bare file path means a SQLite file."""
    if url is None or str(url).strip() == "":
        return DEFAULT_DB_URL
    url = str(url).strip()
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser()}"
    return url


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
                Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 60, "check_same_thread": False}
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
        except OperationalError as e:
            raise MetaAlignerError(f'--db "{url}": cannot open the database ({e.orig})') from None
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
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # A write transaction takes the write lock up front: a deferred one that read first
        # cannot wait for the lock later (SQLITE_BUSY_SNAPSHOT) and would fail instead.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("ma_write") else "BEGIN")


# ----------------------------------------------------------------------------- views

@dataclass(frozen=True)
class Account:
    name: str
    is_admin: bool


@dataclass(frozen=True)
class ResponseView:
    id: int
    position: int
    text: str


@dataclass
class ItemView:
    """What an annotator sees of one item: no model names, only their own ratings."""

    uid: str
    query: str
    protocol: Protocol
    responses: list[ResponseView]
    mine: dict[tuple[int, str], int] = field(default_factory=dict)  # (response id, objective) -> score
    notes: dict[int, str] = field(default_factory=dict)  # response id -> note
    status: str = "new"  # new | draft | submitted


@dataclass(frozen=True)
class Progress:
    mine: int  # items this annotator submitted
    total: int  # items in the store
    complete: int  # items with at least `target` annotators who submitted
    target: int | None


@dataclass(frozen=True)
class ImportResult:
    items_added: int = 0
    items_existing: int = 0
    responses_added: int = 0
    ratings: int = 0
    annotators_added: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- the store

class Store:
    """Service functions over one database. Cheap to construct: engines are shared per URL."""

    def __init__(self, url: str | None = None):
        self.url = normalize_db_url(url)
        self.engine = engine_for(self.url)
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        self._writer = sessionmaker(self.engine.execution_options(ma_write=True), expire_on_commit=False)
        self._write_lock = _WRITE_LOCKS.get(self.url)

    @contextmanager
    def _session(self, write: bool = False) -> Iterator[Session]:
        lock = self._write_lock if write else None
        try:
            if lock is not None:
                lock.acquire()
            with (self._writer if write else self._reader)() as session, session.begin():
                yield session
        except OperationalError as e:
            if "locked" in str(e.orig).lower() or "busy" in str(e.orig).lower():
                raise MetaAlignerError(f"{self.url}: the database stayed locked by another writer; try again") from None
            raise
        finally:
            if lock is not None:
                lock.release()

    # --------------------------------------------------------------- accounts

    def add_annotator(self, name: str, password: str | None, admin: bool = False, update: bool = False) -> None:
        """Create an account (or, with ``update``, set its password and admin flag)."""
        name = (name or "").strip()
        if not name or len(name) > 200:
            raise MetaAlignerError("annotator name: expected 1-200 characters")
        if password is not None and len(password) < MIN_PASSWORD_LENGTH:
            raise MetaAlignerError(f"password: expected at least {MIN_PASSWORD_LENGTH} characters")
        hashed = hash_password(password) if password is not None else None
        with self._session(write=True) as s:
            row = s.scalar(select(Annotator).where(Annotator.name == name))
            if row is None:
                s.add(Annotator(name=name, password_hash=hashed, is_admin=admin))
            elif not update:
                raise MetaAlignerError(f'annotator "{name}" already exists (use --update to change it)')
            else:
                if hashed is not None:
                    row.password_hash = hashed
                    s.execute(SignIn.__table__.delete().where(SignIn.annotator_id == row.id))
                row.is_admin = admin
        log.debug("annotator %s %s%s", name, "updated" if update else "added", " (admin)" if admin else "")

    def sign_in(self, name: str, password: str) -> str:
        """A session token for the annotator; raises AccessDenied on a wrong name or password."""
        global _DUMMY_HASH
        with self._session() as s:
            row = s.execute(select(Annotator.id, Annotator.password_hash)
                            .where(Annotator.name == (name or "").strip())).first()
        # The password check (scrypt, ~50 ms) runs outside the write lock: sign-in attempts,
        # wrong ones included, never hold up other annotators' saves.
        if row is None or not row.password_hash:
            _DUMMY_HASH = _DUMMY_HASH or hash_password(secrets.token_hex(8))
            verify_password(password or "", _DUMMY_HASH)
            raise AccessDenied("wrong name or password")
        if not verify_password(password or "", row.password_hash):
            raise AccessDenied("wrong name or password")
        with self._session(write=True) as s:
            if s.scalar(select(Annotator.password_hash).where(Annotator.id == row.id)) != row.password_hash:
                raise AccessDenied("wrong name or password")  # the password changed meanwhile
            s.execute(SignIn.__table__.delete().where(SignIn.created_at < utcnow() - SIGN_IN_TTL))
            token = secrets.token_urlsafe(32)
            s.add(SignIn(token_hash=_sha(token), annotator_id=row.id))
            return token

    def sign_out(self, token: str | None) -> None:
        if token:
            with self._session(write=True) as s:
                s.execute(SignIn.__table__.delete().where(SignIn.token_hash == _sha(token)))

    def whoami(self, token: str | None) -> Account:
        with self._session() as s:
            me = self._annotator(s, token)
            return Account(me.name, me.is_admin)

    def _annotator(self, s: Session, token) -> Annotator:
        if not isinstance(token, str) or not token:
            raise AccessDenied("not signed in")
        row = s.execute(select(Annotator, SignIn.created_at).join(SignIn, SignIn.annotator_id == Annotator.id)
                        .where(SignIn.token_hash == _sha(token))).first()
        if row is None or _aware(row[1]) + SIGN_IN_TTL < utcnow():
            raise AccessDenied("not signed in (or the sign-in expired): sign in again")
        return row[0]

    def _require_admin(self, s: Session, actor) -> None:
        if actor is OPERATOR:
            return
        if not self._annotator(s, actor).is_admin:
            raise AccessDenied("admins only: exports, agreement and other annotators' progress need an admin account")

    # --------------------------------------------------------------- protocols

    def _protocol_row(self, s: Session, protocol: Protocol) -> ProtocolRow:
        row = s.scalar(select(ProtocolRow).where(ProtocolRow.name == protocol.name))
        spec = _jsonable(protocol.to_dict())
        if row is None:
            row = ProtocolRow(name=protocol.name, title=protocol.title, guidelines=protocol.guidelines, spec=spec)
            row.objectives = [ProtocolObjective(key=o.key, name=o.name, description=o.description, position=i,
                                                levels=[_jsonable(lv.__dict__) for lv in o.levels])
                              for i, o in enumerate(protocol.objectives)]
            s.add(row)
            s.flush()
        elif row.spec != spec:
            raise MetaAlignerError(f'protocol "{protocol.name}" is already in the database with a different '
                                   f'definition; give the changed protocol a new name')
        return row

    # --------------------------------------------------------------- items

    def import_items(self, path: str | os.PathLike, protocol: str | Protocol = "imhi") -> ImportResult:
        """Items from JSONL (``{"query","responses":[{"text","source"?}],"item_id"?}``) or CSV
        (``query,response,source``; rows with the same query form one item). Idempotent: items
        and responses already stored are kept, new responses are appended."""
        proto = protocol if isinstance(protocol, Protocol) else load_protocol(protocol)
        items = _read_items(path)
        with self._session(write=True) as s:
            return self._add_items(s, proto, items, path)

    def enqueue_item(self, query: str, responses: Sequence[tuple[str, str | None]],
                     protocol: str | Protocol = "imhi", item_id: str | None = None) -> str:
        """Add one item (e.g. a draft and its correction from the Align tab); returns its id."""
        proto = protocol if isinstance(protocol, Protocol) else load_protocol(protocol)
        if not isinstance(query, str) or not query.strip():
            raise MetaAlignerError("query: missing or empty")
        resp = [(t, src) for t, src in responses if isinstance(t, str) and t.strip()]
        if not resp:
            raise MetaAlignerError("responses: at least one non-empty response is needed")
        with self._session(write=True) as s:
            self._add_items(s, proto, [_ItemIn(0, item_id, query, resp)], "<enqueue>")
            return _item_uid(proto, item_id, query)

    def _add_items(self, s: Session, proto: Protocol, items: list["_ItemIn"], path) -> ImportResult:
        prow = self._protocol_row(s, proto)
        added = existing = r_added = 0
        for it in _progress_bar(items, "items"):
            item, new = self._get_or_create_item(s, prow, proto, it.item_id, it.query, path, it.line)
            added += new
            existing += not new
            for text, source in it.responses:
                _, created = self._get_or_create_response(s, item, text, source)
                r_added += created
        log.debug("items: %d added, %d already present, %d new responses", added, existing, r_added)
        return ImportResult(items_added=added, items_existing=existing, responses_added=r_added)

    def _get_or_create_item(self, s: Session, prow: ProtocolRow, proto: Protocol, item_id, query, path, line):
        uid = _item_uid(proto, item_id, query)
        item = s.scalar(select(Item).where(Item.uid == uid))
        if item is not None:
            if item.query_hash != _sha(query):
                raise InputError(path, line, "item_id", f'item "{uid}" is already stored with a different query')
            if item.protocol_id != prow.id:
                raise InputError(path, line, "item_id", f'item "{uid}" is already stored under another protocol')
            return item, False
        item = Item(uid=uid, protocol_id=prow.id, query=query, query_hash=_sha(query))
        s.add(item)
        s.flush()
        return item, True

    def _get_or_create_response(self, s: Session, item: Item, text: str, source: str | None):
        h = _sha(text)
        resp = s.scalar(select(Response).where(Response.item_id == item.id, Response.text_hash == h))
        if resp is not None:
            if source and not resp.source:
                resp.source = source
            return resp, False
        pos = s.scalar(select(func.coalesce(func.max(Response.position), -1)).where(Response.item_id == item.id)) + 1
        resp = Response(item_id=item.id, text=text, text_hash=h, source=source or None, position=pos)
        s.add(resp)
        s.flush()
        return resp, True

    # --------------------------------------------------------------- ratings import

    def import_ratings(self, path: str | os.PathLike, protocol: str | Protocol = "imhi") -> ImportResult:
        """One submitted rating per row (``query, response, annotator, objective, score``,
        optional ``item_id, source, note``). Every row is checked before anything is stored;
        one bad row rejects the whole file. Unknown annotators are created without a password
        (they cannot sign in until ``add-annotator --update`` gives them one)."""
        proto = protocol if isinstance(protocol, Protocol) else load_protocol(protocol)
        rows = _read_ratings(path, proto)
        with self._session(write=True) as s:
            prow = self._protocol_row(s, proto)
            people: dict[str, Annotator] = {}
            new_people: list[str] = []
            items: dict[tuple, Item] = {}
            added = existing = r_added = 0
            for r in _progress_bar(rows, "ratings"):
                if r.annotator not in people:
                    a = s.scalar(select(Annotator).where(Annotator.name == r.annotator))
                    if a is None:
                        a = Annotator(name=r.annotator, password_hash=None, is_admin=False)
                        s.add(a)
                        s.flush()
                        new_people.append(r.annotator)
                    people[r.annotator] = a
                key = (r.item_id, r.query)
                if key not in items:
                    item = None
                    if r.item_id is None:
                        found = list(s.scalars(select(Item).where(Item.protocol_id == prow.id,
                                                                  Item.query_hash == _sha(r.query))))
                        if len(found) > 1:
                            raise InputError(path, r.line, "item_id", "several stored items have this query; "
                                             "give item_id to say which one")
                        item = found[0] if found else None
                        if item is not None:
                            existing += 1
                    if item is None:
                        item, new = self._get_or_create_item(s, prow, proto, r.item_id, r.query, path, r.line)
                        added += new
                        existing += not new
                    items[key] = item
                resp, created = self._get_or_create_response(s, items[key], r.response, r.source)
                r_added += created
                self._upsert(s, resp.id, people[r.annotator].id, r.objective, r.score, r.note, None, SUBMITTED)
        log.debug("ratings: %d stored (%d new items, %d new responses, %d new annotators)",
                 len(rows), added, r_added, len(new_people))
        return ImportResult(items_added=added, items_existing=existing, responses_added=r_added,
                            ratings=len(rows), annotators_added=tuple(new_people))

    @staticmethod
    def _upsert(s: Session, response_id: int, annotator_id: int, objective: str, score: int,
                note: str | None, seconds: float | None, status: str, row: Rating | None | bool = True) -> None:
        """Insert or update one rating; ``row`` is the existing rating (or None) when the caller
        already loaded it, True to look it up."""
        now = utcnow()
        if row is True:
            row = s.scalar(select(Rating).where(Rating.response_id == response_id, Rating.annotator_id == annotator_id,
                                                Rating.objective == objective))
        if row is None:
            s.add(Rating(response_id=response_id, annotator_id=annotator_id, objective=objective, score=score,
                         note=note or None, seconds=seconds, status=status, created_at=now, updated_at=now,
                         submitted_at=now if status == SUBMITTED else None))
        else:
            row.score = score
            row.note = note if note is not None else row.note
            if seconds is not None:
                row.seconds = (row.seconds or 0.0) + seconds
            if status == SUBMITTED:
                row.status, row.submitted_at = SUBMITTED, now
            row.updated_at = now

    # --------------------------------------------------------------- annotating

    def next_item(self, token: str, target: int | None = DEFAULT_TARGET_ANNOTATORS,
                  exclude: Iterable[str] = ()) -> ItemView | None:
        """The next item for this annotator: one they have drafts on first, then items they have
        not submitted, fewest annotators who submitted first, skipping items that already
        have ``target`` annotators (None: no limit) and the uids in ``exclude``."""
        exclude = list(exclude)
        with self._session() as s:
            me = self._annotator(s, token)
            mine_submitted = (select(Response.item_id).join(Rating, Rating.response_id == Response.id)
                              .where(Rating.annotator_id == me.id, Rating.status == SUBMITTED))
            mine_draft = (select(Response.item_id).join(Rating, Rating.response_id == Response.id)
                          .where(Rating.annotator_id == me.id, Rating.status == DRAFT))
            done = (select(Response.item_id.label("item_id"), func.count(distinct(Rating.annotator_id)).label("n"))
                    .join(Rating, Rating.response_id == Response.id).where(Rating.status == SUBMITTED)
                    .group_by(Response.item_id).subquery())
            n = func.coalesce(done.c.n, 0)
            has_draft = Item.id.in_(mine_draft)
            q = (select(Item.id).outerjoin(done, done.c.item_id == Item.id)
                 .where(Item.id.not_in(mine_submitted)))
            if exclude:
                q = q.where(Item.uid.not_in(exclude))
            if target is not None:
                q = q.where((n < target) | has_draft)
            q = q.order_by(case((has_draft, 0), else_=1), n, Item.id).limit(1)
            item_id = s.scalar(q)
            return None if item_id is None else self._view(s, me, s.get(Item, item_id))

    def item_view(self, token: str, uid: str) -> ItemView:
        with self._session() as s:
            me = self._annotator(s, token)
            item = s.scalar(select(Item).where(Item.uid == uid))
            if item is None:
                raise MetaAlignerError(f'no item "{uid}"')
            return self._view(s, me, item)

    def _view(self, s: Session, me: Annotator, item: Item) -> ItemView:
        proto = Protocol.from_dict(item.protocol.spec, source=f"database protocol {item.protocol.name}")
        responses = [ResponseView(r.id, r.position, r.text) for r in item.responses]
        rows = s.scalars(select(Rating).join(Response, Rating.response_id == Response.id)
                         .where(Response.item_id == item.id, Rating.annotator_id == me.id))
        view = ItemView(uid=item.uid, query=item.query, protocol=proto, responses=responses)
        statuses = set()
        for r in rows:
            view.mine[(r.response_id, r.objective)] = r.score
            if r.note:
                view.notes[r.response_id] = r.note
            statuses.add(r.status)
        view.status = SUBMITTED if SUBMITTED in statuses else DRAFT if statuses else "new"
        return view

    def save(self, token: str, uid: str, scores: dict[tuple[int, str], int | None],
             notes: dict[int, str] | None = None, submit: bool = False, seconds: float | None = None) -> ItemView:
        """Store this annotator's scores for one item: a draft, or (``submit``) final ratings.

        ``scores`` maps (response id, objective key) to 0–3; None entries are ignored. A
        submission must cover every response on every objective (together with ratings
        already stored). A draft cannot overwrite submitted ratings: submit again to change them.
        ``seconds`` (time spent since the last save) is spread over the ratings saved.
        """
        for attempt in (1, 2):
            try:
                return self._save(token, uid, scores, notes or {}, submit, seconds)
            except IntegrityError:
                # Another session inserted the same rating first (possible on servers without
                # SQLite's up-front write lock): the second attempt updates it instead.
                if attempt == 2:
                    raise

    def _save(self, token, uid, scores, notes, submit, seconds) -> ItemView:
        with self._session(write=True) as s:
            me = self._annotator(s, token)
            item = s.scalar(select(Item).where(Item.uid == uid))
            if item is None:
                raise MetaAlignerError(f'no item "{uid}"')
            proto = Protocol.from_dict(item.protocol.spec, source=f"database protocol {item.protocol.name}")
            response_ids = {r.id: r.position for r in item.responses}
            clean: dict[tuple[int, str], int] = {}
            for (rid, objective), score in scores.items():
                if score is None or score == "":
                    continue
                if rid not in response_ids:
                    raise MetaAlignerError(f"response {rid} does not belong to item {uid}")
                key = proto.objective(objective).key
                clean[(rid, key)] = _check_score(score)
            for rid in notes:
                if rid not in response_ids:
                    raise MetaAlignerError(f"response {rid} does not belong to item {uid}")
            own = {(r.response_id, r.objective): r for r in s.scalars(
                select(Rating).where(Rating.annotator_id == me.id, Rating.response_id.in_(list(response_ids))))}
            if submit:
                missing = [f"response {response_ids[rid] + 1} / {o.name}" for rid in response_ids
                           for o in proto.objectives if (rid, o.key) not in clean and (rid, o.key) not in own]
                if missing:
                    raise MetaAlignerError("rate every response on every objective before submitting "
                                           f"(missing: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''})")
            elif any(own.get(k) is not None and own[k].status == SUBMITTED for k in clean):
                raise MetaAlignerError("these ratings are already submitted: submit again to change them")
            status = SUBMITTED if submit else DRAFT
            per = (seconds / len(clean)) if seconds and clean else None
            for (rid, key), score in clean.items():
                self._upsert(s, rid, me.id, key, score, notes.get(rid), per, status, row=own.get((rid, key)))
            if submit:  # ratings stored earlier as drafts and not resent become final too
                for k, r in own.items():
                    if k not in clean and r.status != SUBMITTED:
                        r.status, r.submitted_at, r.updated_at = SUBMITTED, utcnow(), utcnow()
            for rid, note in notes.items():  # a note on a response with no new score
                for k, r in own.items():
                    if k[0] == rid and k not in clean:
                        r.note = note or None
            s.flush()
            return self._view(s, me, item)

    def progress(self, token: str, target: int | None = DEFAULT_TARGET_ANNOTATORS) -> Progress:
        with self._session() as s:
            me = self._annotator(s, token)
            return self._progress(s, me.id, target)

    def _progress(self, s: Session, annotator_id: int | None, target: int | None) -> Progress:
        total = s.scalar(select(func.count(Item.id)))
        per_item = (select(Response.item_id, func.count(distinct(Rating.annotator_id)).label("n"))
                    .join(Rating, Rating.response_id == Response.id).where(Rating.status == SUBMITTED)
                    .group_by(Response.item_id).subquery())
        complete = s.scalar(select(func.count()).select_from(per_item).where(per_item.c.n >= (target or 1)))
        mine = 0
        if annotator_id is not None:
            mine = s.scalar(select(func.count(distinct(Response.item_id))).join(Rating, Rating.response_id == Response.id)
                            .where(Rating.annotator_id == annotator_id, Rating.status == SUBMITTED))
        return Progress(mine=mine, total=total, complete=complete, target=target)

    # --------------------------------------------------------------- admin

    def progress_by_annotator(self, actor, target: int | None = DEFAULT_TARGET_ANNOTATORS) -> tuple[Progress, list[dict]]:
        """Overall progress and, per annotator, items submitted, ratings submitted and drafts."""
        with self._session() as s:
            self._require_admin(s, actor)
            overall = self._progress(s, None, target)
            rows = s.execute(
                select(Annotator.name, Annotator.is_admin,
                       func.count(distinct(case((Rating.status == SUBMITTED, Response.item_id)))),
                       func.count(case((Rating.status == SUBMITTED, Rating.id))),
                       func.count(case((Rating.status == DRAFT, Rating.id))))
                .outerjoin(Rating, Rating.annotator_id == Annotator.id)
                .outerjoin(Response, Rating.response_id == Response.id)
                .group_by(Annotator.id).order_by(Annotator.name)).all()
            return overall, [{"annotator": name, "admin": bool(adm), "items": items, "ratings": n, "drafts": d}
                             for name, adm, items, n, d in rows]

    def _submitted(self, s: Session, protocol: str | None):
        if protocol and s.scalar(select(ProtocolRow.id).where(ProtocolRow.name == protocol)) is None:
            stored = ", ".join(s.scalars(select(ProtocolRow.name).order_by(ProtocolRow.id))) or "none"
            raise MetaAlignerError(f'--protocol "{protocol}": not in the database (stored: {stored})')
        q = (select(Item.uid, Item.query, Response.id, Response.text, Response.source, Response.position,
                    Annotator.name, Rating.objective, Rating.score, Rating.note, Rating.seconds, ProtocolRow.name)
             .join(Response, Response.item_id == Item.id).join(Rating, Rating.response_id == Response.id)
             .join(Annotator, Annotator.id == Rating.annotator_id).join(ProtocolRow, ProtocolRow.id == Item.protocol_id)
             .where(Rating.status == SUBMITTED)
             .order_by(Item.id, Response.position, Annotator.name, Rating.objective))
        if protocol:
            q = q.where(ProtocolRow.name == protocol)
        return s.execute(q).all()

    def _objective_order(self, s: Session, protocol: str | None) -> list[str]:
        q = select(ProtocolObjective.key).join(ProtocolRow).order_by(ProtocolRow.id, ProtocolObjective.position)
        if protocol:
            q = q.where(ProtocolRow.name == protocol)
        return list(dict.fromkeys(s.scalars(q)))

    def agreement(self, actor, protocol: str | None = None) -> dict[str, agreement_mod.Agreement]:
        """Krippendorff's alpha per objective over submitted ratings (units: responses)."""
        with self._session() as s:
            self._require_admin(s, actor)
            rows = [(r[7], r[2], r[6], r[8]) for r in self._submitted(s, protocol)]
            return agreement_mod.alpha_by_objective(rows, self._objective_order(s, protocol))

    def rating_records(self, actor, protocol: str | None = None) -> list[dict]:
        """Submitted ratings in the ratings format (plus ``note`` and ``seconds``)."""
        with self._session() as s:
            self._require_admin(s, actor)
            return [{"item_id": uid, "query": q, "response": text, "source": src, "annotator": who,
                     "objective": obj, "score": score, "note": note,
                     "seconds": None if secs is None else round(secs, 1)}
                    for uid, q, _rid, text, src, _pos, who, obj, score, note, secs, _p in self._submitted(s, protocol)]

    def pair_records(self, actor, protocol: str | None = None) -> list[dict]:
        """Preference pairs (generic format) from the mean submitted score per objective."""
        with self._session() as s:
            self._require_admin(s, actor)
            items: dict[str, export_mod.ScoredItem] = {}
            responses: dict[int, export_mod.ScoredResponse] = {}
            for uid, q, rid, text, _src, _pos, _who, obj, score, *_ in self._submitted(s, protocol):
                item = items.setdefault(uid, export_mod.ScoredItem(uid, q, []))
                if rid not in responses:
                    responses[rid] = export_mod.ScoredResponse(text)
                    item.responses.append(responses[rid])
                responses[rid].scores.setdefault(obj, []).append(score)
            return list(export_mod.derive_pairs(items.values(), self._objective_order(s, protocol)))

    def export(self, actor, fmt: str, out: str | os.PathLike, protocol: str | None = None) -> int:
        """Write ``ratings`` (.jsonl/.csv) or ``pairs`` (.jsonl) to ``out``; returns the row count."""
        if fmt == "ratings":
            return export_mod.write_ratings(out, self.rating_records(actor, protocol))
        if fmt == "pairs":
            return export_mod.write_pairs(out, self.pair_records(actor, protocol))
        raise MetaAlignerError(f'--format "{fmt}": expected ratings or pairs')


def enqueue_item(db_url: str | None, query: str, responses: Sequence[tuple[str, str | None]],
                 protocol: str = "imhi") -> str:
    """Queue one query and its responses for rating (the app's "Send to annotation")."""
    return Store(db_url).enqueue_item(query, responses, protocol)


# ----------------------------------------------------------------------------- input parsing

@dataclass
class _ItemIn:
    line: int
    item_id: str | None
    query: str
    responses: list[tuple[str, str | None]]


@dataclass
class _RatingIn:
    line: int
    item_id: str | None
    query: str
    response: str
    source: str | None
    annotator: str
    objective: str
    score: int
    note: str | None


def _progress_bar(seq, what: str):
    """A progress bar on a terminal for long imports; silent elsewhere (tests, logs)."""
    if len(seq) < 500:
        return seq
    from tqdm import tqdm

    return tqdm(seq, desc=f"storing {what}", unit=what[:-1], disable=None, leave=False)


def _item_uid(proto: Protocol, item_id: str | None, query: str) -> str:
    return item_id if item_id else "q-" + _sha(f"{proto.name}\n{query}")[:16]


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _parse_score(value) -> int | None:
    """0..3 from an int, an integral float or a digit string (CSV); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and value in SCORES else None


def _check_score(value) -> int:
    score = _parse_score(value)
    if score is None:
        raise MetaAlignerError(f"score {value!r}: expected an integer 0-3")
    return score


def _text_field(rec: dict, fld: str, path, line, required: bool = True) -> str | None:
    value = rec.get(fld)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise InputError(path, line, fld, "missing or empty")
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and fld in ("item_id", "source"):
        value = str(value)
    if not isinstance(value, str):
        raise InputError(path, line, fld, f"expected text, got {type(value).__name__}")
    return value


def _read_items(path) -> list[_ItemIn]:
    items: dict[tuple, _ItemIn] = {}
    is_csv = str(path).lower().endswith((".csv", ".csv.gz"))
    for line, rec in iter_records(path):
        query = _text_field(rec, "query", path, line)
        item_id = _text_field(rec, "item_id", path, line, required=False)
        if is_csv:
            text = _text_field(rec, "response", path, line)
            resp = [(text, _text_field(rec, "source", path, line, required=False))]
        else:
            raw = rec.get("responses")
            if not isinstance(raw, list) or not raw:
                raise InputError(path, line, "responses", 'expected a non-empty list of {"text", "source"?}')
            resp = []
            for i, r in enumerate(raw):
                if isinstance(r, str):
                    r = {"text": r}
                if not isinstance(r, dict):
                    raise InputError(path, line, f"responses[{i}]", 'expected {"text", "source"?}')
                text = r.get("text")
                if not isinstance(text, str) or not text.strip():
                    raise InputError(path, line, f"responses[{i}].text", "missing or empty")
                source = r.get("source")
                resp.append((text, None if source in (None, "") else str(source)))
        key = (item_id, query) if is_csv else (item_id, query, line)
        if key in items:
            items[key].responses.extend(resp)
        else:
            items[key] = _ItemIn(line, item_id, query, resp)
    if not items:
        raise MetaAlignerError(f"{path}: no items")
    return list(items.values())


def _read_ratings(path, proto: Protocol) -> list[_RatingIn]:
    rows: list[_RatingIn] = []
    seen: dict[tuple, int] = {}
    for line, rec in iter_records(path):
        item_id = _text_field(rec, "item_id", path, line, required=False)
        query = _text_field(rec, "query", path, line)
        response = _text_field(rec, "response", path, line)
        annotator = _text_field(rec, "annotator", path, line).strip()
        objective = _text_field(rec, "objective", path, line)
        if not proto.has(objective):
            raise InputError(path, line, "objective", f'"{objective}" is not in protocol "{proto.name}" '
                             f'(valid: {", ".join(proto.keys)})')
        if rec.get("score") is None or rec.get("score") == "":
            raise InputError(path, line, "score", "missing")
        score = _parse_score(rec["score"])
        if score is None:
            raise InputError(path, line, "score", f"expected an integer 0-3, got {rec['score']!r}")
        note = rec.get("note")
        key = (item_id, query, response, annotator, normalize_key(objective))
        if key in seen:
            raise InputError(path, line, "objective", f"a second rating of this response by {annotator} "
                             f"on this objective (first at line {seen[key]})")
        seen[key] = line
        rows.append(_RatingIn(line, item_id, query, response, _text_field(rec, "source", path, line, required=False),
                              annotator, normalize_key(objective), score, note if isinstance(note, str) else None))
    if not rows:
        raise MetaAlignerError(f"{path}: no ratings")
    return rows
