"""The rating store: the service functions of the annotation tool.

This is the only module that opens database sessions. Every other layer (the CLI, the Gradio
tabs, tests) calls these functions.

Who may do what:

* An annotator signs in with name and password and gets a random token; every rating function
  takes that token and acts only on that annotator's own ratings. No function takes an
  annotator id from the caller, so one annotator can neither read nor change another's ratings.
* The review of disagreements (final scores) needs an examiner or admin token; exports, the
  dashboard, agreement, the audit trail and progress of all annotators need an admin token, or
  :data:`OPERATOR`: the local command line, whose user can open the database file anyway.

How a study runs (k raters per item, gold items, review, final labels, audit) is in
:mod:`annotation.workflow`; the dashboard figures in :mod:`annotation.dashboard`.

SQLite (the default, ``sqlite:///data/annotations.db``) runs in WAL mode with foreign keys on;
write transactions start with ``BEGIN IMMEDIATE`` so concurrent writers queue on the busy
timeout instead of failing on a lock upgrade. PostgreSQL (``postgresql+psycopg://...``) runs the
same code; the test suite runs on both.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from sqlalchemy import case, create_engine, distinct, event, func, or_, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from metaaligner_core.errors import InputError, MetaAlignerError
from metaaligner_core.io import iter_records
from metaaligner_core.objectives import normalize_key

from . import agreement as agreement_mod
from . import workflow
from . import migrate
from . import export as export_mod
from .models import (DRAFT, SUBMITTED, Annotator, Assignment, Base, Item, ProtocolObjective, ProtocolRow, Rating,
                     RatingEvent, Response, Review, SignIn, utcnow)
from . import DEFAULT_DB_URL, DEFAULT_TARGET_ANNOTATORS  # noqa: F401  (re-exported)
from .protocols import SCORES, Protocol, load_protocol
from . import accounts
# Accounts, passwords, sign-in and roles live in .accounts; these names stay importable from here.
from .accounts import (MIN_PASSWORD_LENGTH, OPERATOR, SCRYPT_N, SCRYPT_P, SCRYPT_R, SIGN_IN_TTL,  # noqa: F401
                       Account, AccessDenied, Operator, hash_password, verify_password)
from .safety import database_error, prepare_sqlite_file

log = logging.getLogger(__name__)

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


# ----------------------------------------------------------------------------- views

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
    overwritten: int = 0  # submitted scores replaced (import-ratings --overwrite)


# ----------------------------------------------------------------------------- the store

class Store:
    """Service functions over one database. Cheap to construct: engines are shared per URL."""

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

    # --------------------------------------------------------------- accounts (see .accounts)

    def add_annotator(self, name: str, password: str | None, admin: bool = False, update: bool = False,
                      role: str | None = None) -> None:
        """Create an account (or, with ``update``, set its password and role); the operator's path.
        ``role`` (rater, examiner, admin) wins over ``admin``."""
        accounts.upsert_account(self, name, password, role or ("admin" if admin else "rater"), update=update)

    def sign_in(self, name: str, password: str, client: str | None = None) -> str:
        """A session token; AccessDenied on a wrong name or password, a disabled account, or
        while failed attempts from this account or client address are being throttled."""
        return accounts.sign_in(self, name, password, client)

    def sign_out(self, token: str | None) -> None:
        accounts.sign_out(self, token)

    def whoami(self, token: str | None) -> Account:
        return accounts.whoami(self, token)

    def _annotator(self, s: Session, token) -> Annotator:
        return accounts.current(s, token)

    def _require_role(self, s: Session, actor, role: str):
        """``actor`` (token or OPERATOR) with at least ``role`` (rater < examiner < admin)."""
        return accounts.require_role(s, actor, role)

    def _require_admin(self, s: Session, actor) -> None:
        accounts.require_role(s, actor, "admin")

    # --------------------------------------------------------------- protocols

    def _protocol_row(self, s: Session, protocol: Protocol) -> ProtocolRow:
        """The stored protocol of this name; a new ``version`` replaces the stored definition
        (ratings keep the version they were made under), a changed definition under the same
        version is refused."""
        row = s.scalar(select(ProtocolRow).where(ProtocolRow.name == protocol.name))
        spec = _jsonable(protocol.to_dict())
        if row is None:
            row = ProtocolRow(name=protocol.name, title=protocol.title, guidelines=protocol.guidelines, spec=spec,
                              version=protocol.version)
            row.objectives = [ProtocolObjective(key=o.key, name=o.name, description=o.description, position=i,
                                                levels=[_jsonable(lv.__dict__) for lv in o.levels])
                              for i, o in enumerate(protocol.objectives)]
            s.add(row)
            s.flush()
        elif row.spec != spec:
            if (row.version or "") == protocol.version:
                raise MetaAlignerError(f'protocol "{protocol.name}" version {protocol.version} is already in the '
                                       f'database with a different definition; give the changed protocol a new '
                                       f'"version:" (or a new name)')
            log.info("protocol %s: version %s replaces %s", protocol.name, protocol.version, row.version or "unversioned")
            row.spec, row.version, row.title, row.guidelines = spec, protocol.version, protocol.title, protocol.guidelines
            existing = {o.key: o for o in row.objectives}
            for i, o in enumerate(protocol.objectives):
                levels = [_jsonable(lv.__dict__) for lv in o.levels]
                if o.key in existing:
                    po = existing.pop(o.key)
                    po.name, po.description, po.position, po.levels = o.name, o.description, i, levels
                else:
                    row.objectives.append(ProtocolObjective(key=o.key, name=o.name, description=o.description,
                                                            position=i, levels=levels))
            for po in existing.values():
                row.objectives.remove(po)
            s.flush()
        return row

    # --------------------------------------------------------------- items

    def import_items(self, path: str | os.PathLike, protocol: str | Protocol = "imhi",
                     raters: int | None = None) -> ImportResult:
        """Items from JSONL (``{"query","responses":[{"text","source"?,"gold"?}],"item_id"?}``) or CSV
        (``query,response,source``; rows with the same query form one item). Idempotent: items
        and responses already stored are kept, new responses are appended. ``raters`` (k) sets
        how many raters each item of this import wants (default: the protocol's, else 2); a
        response's ``gold`` (``{objective: score}``) makes its item a gold item."""
        proto = protocol if isinstance(protocol, Protocol) else load_protocol(protocol)
        _check_raters(raters)
        items = _read_items(path, proto)
        with self._session(write=True) as s:
            return self._add_items(s, proto, items, path, raters)

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
            self._add_items(s, proto, [_ItemIn(0, item_id, query, [(t, src, None) for t, src in resp])], "<enqueue>")
            return _item_uid(proto, item_id, query)

    def _add_items(self, s: Session, proto: Protocol, items: list["_ItemIn"], path,
                   raters: int | None = None) -> ImportResult:
        prow = self._protocol_row(s, proto)
        added = existing = r_added = 0
        for it in _progress_bar(items, "items"):
            item, new = self._get_or_create_item(s, prow, proto, it.item_id, it.query, path, it.line, raters)
            added += new
            existing += not new
            for text, source, gold in it.responses:
                resp, created = self._get_or_create_response(s, item, text, source)
                r_added += created
                if gold is not None:
                    resp.gold, item.is_gold = gold, True
        log.debug("items: %d added, %d already present, %d new responses", added, existing, r_added)
        return ImportResult(items_added=added, items_existing=existing, responses_added=r_added)

    def _get_or_create_item(self, s: Session, prow: ProtocolRow, proto: Protocol, item_id, query, path, line,
                            raters: int | None = None):
        uid = _item_uid(proto, item_id, query)
        item = s.scalar(select(Item).where(Item.uid == uid))
        if item is not None:
            if item.query_hash != _sha(query):
                raise InputError(path, line, "item_id", f'item "{uid}" is already stored with a different query')
            if item.protocol_id != prow.id:
                raise InputError(path, line, "item_id", f'item "{uid}" is already stored under another protocol')
            if raters is not None:
                item.target_raters = raters
            return item, False
        item = Item(uid=uid, protocol_id=prow.id, query=query, query_hash=_sha(query),
                    target_raters=raters or proto.raters, is_gold=False)
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

    def import_ratings(self, path: str | os.PathLike, protocol: str | Protocol = "imhi", *,
                       overwrite: bool = False, mapping: dict | None = None, raters: int | None = None,
                       actor=None) -> ImportResult:
        """Submitted ratings made elsewhere. Every row is checked before anything is stored; one
        bad row rejects the whole file. Unknown annotators are created without a password (they
        cannot sign in until an admin gives them one).

        Shapes (see :mod:`annotation.rating_files`): one rating per row (``query, response,
        annotator, objective, score``, optional ``item_id, source, note``), or, with ``mapping``,
        a column per aspect holding every rater's scores as a list, or a column per rater.

        A rating that is already submitted with a different score is refused, naming the line,
        unless ``overwrite``; every change is recorded in the audit trail.
        """
        from .rating_files import read_rating_file

        proto = protocol if isinstance(protocol, Protocol) else load_protocol(protocol)
        _check_raters(raters)
        rows = read_rating_file(path, proto, mapping)
        who = workflow.actor_name(actor)
        via = "import-ratings --overwrite" if overwrite else "import-ratings"
        with self._session(write=True) as s:
            prow = self._protocol_row(s, proto)
            people: dict[str, Annotator] = {}
            new_people: list[str] = []
            items: dict[tuple, Item] = {}
            added = existing = r_added = changed = 0
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
                        item, new = self._get_or_create_item(s, prow, proto, r.item_id, r.query, path, r.line, raters)
                        added += new
                        existing += not new
                    items[key] = item
                item = items[key]
                resp, created = self._get_or_create_response(s, item, r.response, r.source)
                r_added += created
                row = s.scalar(select(Rating).where(Rating.response_id == resp.id,
                                                    Rating.annotator_id == people[r.annotator].id,
                                                    Rating.objective == r.objective))
                if row is not None and row.status == SUBMITTED and row.score != r.score and not overwrite:
                    raise InputError(path, r.line, "score",
                                     f"{r.annotator} already submitted {row.score} for this response on "
                                     f"{r.objective}; this file says {r.score} (pass --overwrite to replace "
                                     "submitted scores; replacements are logged)")
                changed += row is not None and row.status == SUBMITTED and row.score != r.score
                self._upsert(s, resp.id, people[r.annotator].id, r.objective, r.score, r.note, None, SUBMITTED,
                             row=row, version=proto.version, audit=(who, via, item.uid, r.annotator))
                workflow.assign(s, item.id, people[r.annotator].id, submitted=True)
        if changed:
            log.warning("import-ratings: %d submitted scores replaced (--overwrite); see the audit trail", changed)
        log.debug("ratings: %d stored (%d new items, %d new responses, %d new annotators)",
                  len(rows), added, r_added, len(new_people))
        return ImportResult(items_added=added, items_existing=existing, responses_added=r_added,
                            ratings=len(rows), annotators_added=tuple(new_people), overwritten=changed)

    @staticmethod
    def _upsert(s: Session, response_id: int, annotator_id: int, objective: str, score: int,
                note: str | None, seconds: float | None, status: str, row: Rating | None | bool = True,
                version: str | None = None, audit: tuple[str, str, str, str] | None = None) -> None:
        """Insert or update one rating; ``row`` is the existing rating (or None) when the caller
        already loaded it, True to look it up. ``audit`` = (actor, path, item uid, rater name):
        a change of score or status is recorded."""
        now = utcnow()
        if row is True:
            row = s.scalar(select(Rating).where(Rating.response_id == response_id, Rating.annotator_id == annotator_id,
                                                Rating.objective == objective))
        old_score, old_status = (None, None) if row is None else (row.score, row.status)
        if row is None:
            s.add(Rating(response_id=response_id, annotator_id=annotator_id, objective=objective, score=score,
                         note=note or None, seconds=seconds, status=status, created_at=now, updated_at=now,
                         submitted_at=now if status == SUBMITTED else None, protocol_version=version))
        else:
            row.score = score
            row.note = note if note is not None else row.note
            if seconds is not None:
                row.seconds = (row.seconds or 0.0) + seconds
            if status == SUBMITTED:
                row.status, row.submitted_at = SUBMITTED, now
            row.updated_at = now
            row.protocol_version = version or row.protocol_version
        if audit is not None:
            actor, path, uid, rater = audit
            workflow.record(s, actor=actor, path=path, kind="rating", item_uid=uid, response_id=response_id,
                            objective=objective, rater=rater, old_score=old_score, new_score=score,
                            old_status=old_status, new_status=SUBMITTED if status == SUBMITTED else
                            (old_status if old_status == SUBMITTED else status))

    # --------------------------------------------------------------- annotating

    def next_item(self, token: str, target: int | None = None, exclude: Iterable[str] = ()) -> ItemView | None:
        """The next item for this rater: their open items (drafts) first, a gold item every
        few items, then items still short of their k raters, least-assigned first (``target``
        overrides every item's k). The item is assigned to the rater, so concurrent raters
        spread over items. The view carries only this rater's own scores."""
        exclude = list(exclude)
        with self._session() as s:
            me = self._annotator(s, token)
            item_id, new = workflow.pick_next(s, me.id, target, exclude)
            if item_id is None:
                return None
            if not new:
                return self._view(s, me, s.get(Item, item_id))
        with self._session(write=True) as s:
            me = self._annotator(s, token)
            workflow.assign(s, item_id, me.id)
            return self._view(s, me, s.get(Item, item_id))

    def item_view(self, token: str, uid: str) -> ItemView:
        with self._session() as s:
            me = self._annotator(s, token)
            item = s.scalar(select(Item).where(Item.uid == uid))
            if item is None:
                raise MetaAlignerError(f'no item "{uid}"')
            return self._view(s, me, item)

    def _view(self, s: Session, me: Annotator, item: Item) -> ItemView:
        proto = _stored_protocol(item.protocol)
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
             notes: dict[int, str] | None = None, submit: bool = False, seconds: float | None = None,
             path: str = "app") -> ItemView:
        """Store this rater's scores for one item: a draft, or (``submit``) final ratings.

        ``scores`` maps (response id, objective key) to a score of the protocol's scale; None
        entries are ignored. A submission must cover every response on every objective
        (together with ratings already stored). A draft cannot overwrite submitted ratings:
        submit again to change them. ``seconds`` (time spent since the last save) is spread over
        the ratings saved. Every rating carries the protocol's version; changes are audited.
        """
        for attempt in (1, 2):
            try:
                return self._save(token, uid, scores, notes or {}, submit, seconds, path)
            except IntegrityError:
                # Another session inserted the same rating first (possible on servers without
                # SQLite's up-front write lock): the second attempt updates it instead.
                if attempt == 2:
                    raise

    def _save(self, token, uid, scores, notes, submit, seconds, path="app") -> ItemView:
        with self._session(write=True) as s:
            me = self._annotator(s, token)
            item = s.scalar(select(Item).where(Item.uid == uid))
            if item is None:
                raise MetaAlignerError(f'no item "{uid}"')
            proto = _stored_protocol(item.protocol)
            response_ids = {r.id: r.position for r in item.responses}
            clean: dict[tuple[int, str], int] = {}
            for (rid, objective), score in scores.items():
                if score is None or score == "":
                    continue
                if rid not in response_ids:
                    raise MetaAlignerError(f"response {rid} does not belong to item {uid}")
                obj = proto.objective(objective)
                clean[(rid, obj.key)] = _check_score(score, obj.scores)
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
            audit = (me.name, path, item.uid, me.name)
            for (rid, key), score in clean.items():
                self._upsert(s, rid, me.id, key, score, notes.get(rid), per, status, row=own.get((rid, key)),
                             version=proto.version, audit=audit)
            if submit:  # ratings stored earlier as drafts and not resent become final too
                for k, r in own.items():
                    if k not in clean and r.status != SUBMITTED:
                        workflow.record(s, actor=me.name, path=path, kind="rating", item_uid=item.uid,
                                        response_id=k[0], objective=k[1], rater=me.name, old_score=r.score,
                                        new_score=r.score, old_status=r.status, new_status=SUBMITTED)
                        r.status, r.submitted_at, r.updated_at = SUBMITTED, utcnow(), utcnow()
                        r.protocol_version = r.protocol_version or proto.version
            for rid, note in notes.items():  # a note on a response with no new score
                for k, r in own.items():
                    if k[0] == rid and k not in clean:
                        r.note = note or None
            workflow.assign(s, item.id, me.id, submitted=submit)
            s.flush()
            return self._view(s, me, item)

    def progress(self, token: str, target: int | None = None) -> Progress:
        with self._session() as s:
            me = self._annotator(s, token)
            return self._progress(s, me.id, target)

    def _progress(self, s: Session, annotator_id: int | None, target: int | None) -> Progress:
        """Items complete: at least ``target`` (None: each item's own k) raters submitted."""
        total = s.scalar(select(func.count(Item.id)))
        per_item = (select(Assignment.item_id, func.count().label("n")).where(Assignment.status == SUBMITTED)
                    .group_by(Assignment.item_id).subquery())
        k = func.coalesce(Item.target_raters, DEFAULT_TARGET_ANNOTATORS) if target is None else target
        complete = s.scalar(select(func.count()).select_from(per_item).join(Item, Item.id == per_item.c.item_id)
                            .where(per_item.c.n >= k))
        mine = 0
        if annotator_id is not None:
            mine = s.scalar(select(func.count()).select_from(Assignment)
                            .where(Assignment.annotator_id == annotator_id, Assignment.status == SUBMITTED))
        return Progress(mine=mine, total=total, complete=complete, target=target)

    # --------------------------------------------------------------- admin

    def progress_by_annotator(self, actor, target: int | None = None) -> tuple[Progress, list[dict]]:
        """Overall progress and, per annotator, items submitted, ratings submitted and drafts."""
        with self._session() as s:
            self._require_admin(s, actor)
            overall = self._progress(s, None, target)
            rows = s.execute(
                select(Annotator.name, Annotator.is_admin,
                       func.count(distinct(case((Rating.status == SUBMITTED, Response.item_id)))),
                       func.count(case((Rating.status == SUBMITTED, Rating.id))),
                       func.count(case((Rating.status == DRAFT, Rating.id))),
                       func.sum(Rating.seconds))
                .outerjoin(Rating, Rating.annotator_id == Annotator.id)
                .outerjoin(Response, Rating.response_id == Response.id)
                .group_by(Annotator.id).order_by(Annotator.name)).all()
            return overall, [{"annotator": name, "admin": bool(adm), "items": items, "ratings": n, "drafts": d,
                              "seconds_per_item": round(secs / items, 1) if secs and items else None}
                             for name, adm, items, n, d, secs in rows]

    def _check_protocol(self, s: Session, protocol: str | None) -> None:
        if protocol and s.scalar(select(ProtocolRow.id).where(ProtocolRow.name == protocol)) is None:
            stored = ", ".join(s.scalars(select(ProtocolRow.name).order_by(ProtocolRow.id))) or "none"
            raise MetaAlignerError(f'--protocol "{protocol}": not in the database (stored: {stored})')

    def _submitted(self, s: Session, protocol: str | None):
        self._check_protocol(s, protocol)
        q = (select(Item.uid, Item.query, Response.id, Response.text, Response.source, Response.position,
                    Annotator.name, Rating.objective, Rating.score, Rating.note, Rating.seconds, ProtocolRow.name,
                    Rating.protocol_version, Item.is_gold, Rating.submitted_at)
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

    def _max_score(self, s: Session, protocol: str | None) -> int:
        q = select(ProtocolRow.spec)
        if protocol:
            q = q.where(ProtocolRow.name == protocol)
        specs = list(s.scalars(q))
        return max((Protocol.from_dict(sp).max_score for sp in specs), default=max(SCORES))

    def agreement(self, actor, protocol: str | None = None) -> dict[str, agreement_mod.Agreement]:
        """Krippendorff's alpha per objective over submitted ratings (units: responses; gold
        items left out)."""
        with self._session() as s:
            self._require_admin(s, actor)
            self._check_protocol(s, protocol)
            # the database counts raters per (objective, response, score): alpha needs no more
            base = (select(Rating.objective, Rating.response_id, Rating.score, Rating.annotator_id)
                    .join(Response, Response.id == Rating.response_id).join(Item, Item.id == Response.item_id)
                    .where(Rating.status == SUBMITTED, or_(Item.is_gold.is_(None), Item.is_gold.is_(False))))
            if protocol:
                base = base.join(ProtocolRow, ProtocolRow.id == Item.protocol_id).where(ProtocolRow.name == protocol)
            sub = base.subquery()
            conn = s.connection()
            rows = conn.execute(select(sub.c.objective, sub.c.response_id, sub.c.score, func.count())
                                .group_by(sub.c.objective, sub.c.response_id, sub.c.score)).all()
            raters = dict(conn.execute(select(sub.c.objective, func.count(distinct(sub.c.annotator_id)))
                                       .group_by(sub.c.objective)).all())
            return agreement_mod.alpha_from_counts(rows, raters, self._objective_order(s, protocol),
                                                   domain=range(self._max_score(s, protocol) + 1))

    def dashboard(self, actor, protocol: str | None = None, bootstrap: int = 1000, seed: int = 0,
                  batch_size: int = 20) -> dict:
        """Every figure of the admins' dashboard (and ``annotate agreement --json``); ``batch_size``:
        items per batch of ``alpha_by_batch``."""
        from . import ab as ab_mod
        from . import dashboard as dashboard_mod

        with self._session() as s:
            self._require_admin(s, actor)
            self._check_protocol(s, protocol)
            items = workflow.load_scores(s, protocol, texts=False)
            order = self._objective_order(s, protocol)
            max_score = self._max_score(s, protocol)
            seconds = s.execute(
                select(Response.item_id, Annotator.name, func.sum(Rating.seconds))
                .join(Response, Response.id == Rating.response_id).join(Annotator, Annotator.id == Rating.annotator_id)
                .join(Item, Item.id == Response.item_id).join(ProtocolRow, ProtocolRow.id == Item.protocol_id)
                .where(Rating.status == SUBMITTED, Rating.seconds.is_not(None),
                       *([ProtocolRow.name == protocol] if protocol else []))
                .group_by(Response.item_id, Annotator.name)).all()
            ab_figures = ab_mod.figures_in_session(s, protocol, bootstrap=bootstrap, seed=seed)
            completed_at = {iid: _aware(at) for iid, at in s.execute(
                select(Assignment.item_id, func.max(Assignment.submitted_at))
                .where(Assignment.status == SUBMITTED, Assignment.submitted_at.is_not(None))
                .group_by(Assignment.item_id))}
        out = dashboard_mod.figures(items, order, max_score, seconds, bootstrap=bootstrap, seed=seed,
                                    completed_at=completed_at, batch_size=batch_size)
        out["ab"] = ab_figures
        return out

    def rating_records(self, actor, protocol: str | None = None) -> list[dict]:
        """Submitted ratings in the ratings format (plus note, seconds, protocol, its version, gold)."""
        with self._session() as s:
            self._require_admin(s, actor)
            return [{"item_id": uid, "query": q, "response": text, "source": src, "annotator": who,
                     "objective": obj, "score": score, "note": note,
                     "seconds": None if secs is None else round(secs, 1), "protocol": pname,
                     "protocol_version": pver, "gold": bool(gold)}
                    for uid, q, _rid, text, src, _pos, who, obj, score, note, secs, pname, pver, gold, _at
                    in self._submitted(s, protocol)]

    def final_records(self, actor, protocol: str | None = None) -> list[dict]:
        """Final labels, one row per (item, response, objective) with submitted ratings: every
        rater's score, the final score and who decided (an examiner's name, ``agreement``,
        ``mean`` or ``pending review``), with the examiner's reason."""
        with self._session() as s:
            self._require_admin(s, actor)
            self._check_protocol(s, protocol)
            items = workflow.load_scores(s, protocol)
        out = []
        for it in items:
            for r in it.responses:
                for o in it.protocol.objectives:
                    raters = r.raters.get(o.key)
                    if not raters and o.key not in r.reviews:
                        continue
                    final, decided, reason = workflow.final_label(r, o.key, it.protocol.review)
                    out.append({"item_id": it.uid, "query": it.query, "response": r.text, "source": r.source,
                                "objective": o.key, "ratings": dict(sorted((raters or {}).items())),
                                "notes": dict(sorted(r.notes.items())), "final_score": final,
                                "decided_by": decided, "reason": reason, "protocol": it.protocol_name,
                                "protocol_version": it.protocol.version, "gold": it.is_gold})
        return out

    def pair_records(self, actor, protocol: str | None = None) -> list[dict]:
        """Preference pairs (generic format): per objective, the examiner's final score where the
        item was reviewed, else the mean submitted score. Each pair carries
        ``"objectives": {key: "Name: description"}`` from the protocol. Gold items are left out."""
        with self._session() as s:
            self._require_admin(s, actor)
            self._check_protocol(s, protocol)
            items = workflow.load_scores(s, protocol)
            order = self._objective_order(s, protocol)
        return list(export_mod.pairs_from_scores([it for it in items if not it.is_gold], order))

    # --------------------------------------------------------------- review (examiners)

    def review_queue(self, actor, protocol: str | None = None, include_reviewed: bool = False) -> list[dict]:
        """Items whose raters disagree under their protocol's review rule, complete (k raters
        submitted) and not yet reviewed: ``{"item_id", "query", "flagged", "raters", "reviewed"}``."""
        with self._session() as s:
            self._require_role(s, actor, "examiner")
            items = workflow.load_scores(s, protocol)
        return [{"item_id": it.uid, "query": it.query, "flagged": len(it.flagged()),
                 "raters": sorted(it.submitted_by), "reviewed": it.reviewed}
                for it in items if it.needs_review and (include_reviewed or not it.reviewed)]

    def review_view(self, actor, uid: str) -> "workflow.ItemScores":
        """One item with every rater's scores and notes (examiners only)."""
        with self._session() as s:
            self._require_role(s, actor, "examiner")
            found = workflow.load_scores(s, uids=[uid])
        if not found:
            raise MetaAlignerError(f'no item "{uid}"')
        return found[0]

    def finalize(self, actor, uid: str, scores: dict[tuple[int, str], int], reason: str) -> "workflow.ItemScores":
        """The examiner's final scores for one item, with the reason (required). Every flagged
        (response, objective) needs a score; others may be set too. Changes are audited."""
        reason = (reason or "").strip()
        if not reason:
            raise MetaAlignerError("reason: say why these are the final scores")
        with self._session(write=True) as s:
            me = self._require_role(s, actor, "examiner")
            found = workflow.load_scores(s, uids=[uid])
            if not found:
                raise MetaAlignerError(f'no item "{uid}"')
            it = found[0]
            by_id = {r.response_id: r for r in it.responses}
            clean = {}
            for (rid, objective), score in scores.items():
                if score is None or score == "":
                    continue
                if rid not in by_id:
                    raise MetaAlignerError(f"response {rid} does not belong to item {uid}")
                obj = it.protocol.objective(objective)
                clean[(rid, obj.key)] = _check_score(score, obj.scores)
            missing = [(rid, k) for rid, k in it.flagged() if (rid, k) not in clean and k not in by_id[rid].reviews]
            if missing:
                names = [f"response {by_id[rid].position + 1} / {it.protocol.objective(k).name}" for rid, k in missing]
                raise MetaAlignerError(f"set a final score for every disagreement (missing: {', '.join(names[:6])})")
            who = workflow.actor_name(me)
            examiner_id = me.id if me is not OPERATOR else self._operator_account(s)
            for (rid, key), score in clean.items():
                row = s.scalar(select(Review).where(Review.response_id == rid, Review.objective == key))
                old = None if row is None else row.score
                if row is None:
                    s.add(Review(item_id=it.item_id, response_id=rid, objective=key, score=score, reason=reason,
                                 examiner_id=examiner_id, protocol_version=it.protocol.version))
                else:
                    row.score, row.reason, row.examiner_id, row.updated_at = score, reason, examiner_id, utcnow()
                workflow.record(s, actor=who, path="review", kind="review", item_uid=uid, response_id=rid,
                                objective=key, rater=None, old_score=old, new_score=score, note=reason)
            s.flush()
            return workflow.load_scores(s, uids=[uid])[0]

    @staticmethod
    def _operator_account(s: Session) -> int:
        """Reviews made from the command line are signed by an account named "operator"."""
        row = s.scalar(select(Annotator).where(Annotator.name == "operator"))
        if row is None:
            row = Annotator(name="operator", password_hash=None, is_admin=False)
            s.add(row)
            s.flush()
        return row.id

    def stored_protocols(self, actor) -> list[dict]:
        """The protocols in the database: name, version, objective keys, item count."""
        with self._session() as s:
            self._require_admin(s, actor)
            counts = dict(s.execute(select(Item.protocol_id, func.count()).group_by(Item.protocol_id)).all())
            return [{"name": p.name, "version": p.version or "unversioned", "objectives": [o.key for o in p.objectives],
                     "items": counts.get(p.id, 0)}
                    for p in s.scalars(select(ProtocolRow).order_by(ProtocolRow.id))]

    def audit_events(self, actor, item_uid: str | None = None, limit: int | None = None) -> list[dict]:
        """The audit trail, oldest first (admins only)."""
        with self._session() as s:
            self._require_admin(s, actor)
            q = select(RatingEvent).order_by(RatingEvent.id)
            if item_uid:
                q = q.where(RatingEvent.item_uid == item_uid)
            if limit:
                q = q.limit(limit)
            return [{"at": _aware(e.at).isoformat(), "actor": e.actor, "path": e.path, "kind": e.kind,
                     "item_id": e.item_uid, "response_id": e.response_id, "rater": e.rater,
                     "objective": e.objective, "old_score": e.old_score, "new_score": e.new_score,
                     "old_status": e.old_status, "new_status": e.new_status, "reason": e.note}
                    for e in s.scalars(q)]

    def export(self, actor, fmt: str, out: str | os.PathLike, protocol: str | None = None,
               push_to_hub: str | None = None) -> int:
        """Write ``ratings`` (.jsonl/.csv), ``final`` labels (.jsonl/.csv), ``pairs`` (.jsonl), or
        ``hf`` (a Hugging Face ``datasets`` folder with ratings, final labels and pairs, and a
        dataset card); returns the row count (for hf: the ratings)."""
        if fmt == "ratings":
            return export_mod.write_ratings(out, self.rating_records(actor, protocol))
        if fmt == "final":
            return export_mod.write_final(out, self.final_records(actor, protocol))
        if fmt == "pairs":
            return export_mod.write_pairs(out, self.pair_records(actor, protocol))
        if fmt == "hf":
            from . import hf_export

            return hf_export.export_hf(self, actor, out, protocol, push_to_hub)
        raise MetaAlignerError(f'--format "{fmt}": expected ratings, final, pairs or hf')


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
    responses: list[tuple[str, str | None, dict | None]]  # (text, source, gold scores)


def _check_raters(raters) -> None:
    if raters is not None and (isinstance(raters, bool) or not isinstance(raters, int) or not 1 <= raters <= 50):
        raise MetaAlignerError(f"--raters {raters!r}: expected an integer 1-50 (raters per item)")


def _progress_bar(seq, what: str):
    """A progress bar on a terminal for long imports; silent elsewhere (tests, logs)."""
    if len(seq) < 500:
        return seq
    from tqdm import tqdm

    return tqdm(seq, desc=f"storing {what}", unit=what[:-1], disable=None, leave=False)


_PROTOCOL_CACHE: dict[str, Protocol] = {}


def _stored_protocol(row: ProtocolRow) -> Protocol:
    """The protocol of a stored row, parsed once per distinct definition (keyed by its JSON, as
    several databases may hold different protocols of one name)."""
    import json

    key = json.dumps(row.spec, sort_keys=True)
    proto = _PROTOCOL_CACHE.get(key)
    if proto is None:
        if len(_PROTOCOL_CACHE) > 256:
            _PROTOCOL_CACHE.clear()
        proto = _PROTOCOL_CACHE[key] = Protocol.from_dict(row.spec, source=f"database protocol {row.name}")
    return proto


def _item_uid(proto: Protocol, item_id: str | None, query: str) -> str:
    return item_id if item_id else "q-" + _sha(f"{proto.name}\n{query}")[:16]


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _parse_score(value, scores=SCORES) -> int | None:
    """A score of ``scores`` from an int, an integral float or a digit string (CSV); None for
    anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and value in scores else None


def _check_score(value, scores=SCORES) -> int:
    score = _parse_score(value, scores)
    if score is None:
        raise MetaAlignerError(f"score {value!r}: expected an integer {min(scores)}-{max(scores)}")
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


def _read_items(path, proto: Protocol | None = None) -> list[_ItemIn]:
    items: dict[tuple, _ItemIn] = {}
    is_csv = str(path).lower().endswith((".csv", ".csv.gz"))
    for line, rec in iter_records(path):
        query = _text_field(rec, "query", path, line)
        item_id = _text_field(rec, "item_id", path, line, required=False)
        if is_csv:
            text = _text_field(rec, "response", path, line)
            resp = [(text, _text_field(rec, "source", path, line, required=False), None)]
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
                resp.append((text, None if source in (None, "") else str(source),
                             _gold(r.get("gold"), proto, path, line, f"responses[{i}].gold")))
        key = (item_id, query) if is_csv else (item_id, query, line)
        if key in items:
            items[key].responses.extend(resp)
        else:
            items[key] = _ItemIn(line, item_id, query, resp)
    if not items:
        raise MetaAlignerError(f"{path}: no items")
    return list(items.values())


def _gold(raw, proto: Protocol | None, path, line, fld: str) -> dict | None:
    """A gold response's known scores ``{objective: score}``, checked against the protocol."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw:
        raise InputError(path, line, fld, "expected {objective: score}")
    out = {}
    for key, value in raw.items():
        if proto is not None and not proto.has(str(key)):
            raise InputError(path, line, f"{fld}.{key}", f'not an objective of protocol "{proto.name}" '
                             f'(valid: {", ".join(proto.keys)})')
        obj = proto.objective(str(key)) if proto is not None else None
        score = _parse_score(value, obj.scores if obj else SCORES)
        if score is None:
            raise InputError(path, line, f"{fld}.{key}", f"expected a score of the protocol's scale, got {value!r}")
        out[obj.key if obj else normalize_key(str(key))] = score
    return out
