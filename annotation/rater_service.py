"""The raters' service functions: the next item to rate, an item as its rater sees it, saving
drafts and submissions, and the rater's own progress. Every function takes the rater's sign-in
token and touches only that rater's ratings.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from metaaligner_core.errors import MetaAlignerError

from . import DEFAULT_TARGET_ANNOTATORS
from . import accounts, workflow
from .database import Database
from .models import DRAFT, SUBMITTED, Annotator, Assignment, Item, ProtocolRow, Rating, Response, utcnow
from .protocols import Protocol
from .readers import check_score


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


class RaterService(Database):
    """What a signed-in rater does (see :class:`annotation.store.Store`)."""

    def next_item(self, token: str, target: int | None = None, exclude: Iterable[str] = ()) -> ItemView | None:
        """The next item for this rater: their open items (drafts) first, a gold item every
        few items, then items still short of their k raters, least-assigned first (``target``
        overrides every item's k). The item is assigned to the rater, so concurrent raters
        spread over items. The view carries only this rater's own scores."""
        exclude = list(exclude)
        with self._session() as s:
            me = accounts.current(s, token)
            item_id, new = workflow.pick_next(s, me.id, target, exclude)
            if item_id is None:
                return None
            if not new:
                return self._view(s, me, s.get(Item, item_id))
        with self._session(write=True) as s:
            me = accounts.current(s, token)
            workflow.assign(s, item_id, me.id)
            return self._view(s, me, s.get(Item, item_id))

    def release(self, token: str, uid: str) -> bool:
        """End this rater's hold on item ``uid`` now (a skip): the item stops counting toward its k
        for them, as if :data:`~annotation.workflow.ASSIGNMENT_TTL` had passed, so another rater
        can take it; it stays theirs, and comes back to them when their other items are done.
        Submitted items and other raters' holds are untouched. True when a hold ended."""
        with self._session(write=True) as s:
            me = accounts.current(s, token)
            item_id = s.scalar(select(Item.id).where(Item.uid == uid))
            return item_id is not None and workflow.release(s, item_id, me.id)

    def item_view(self, token: str, uid: str) -> ItemView:
        with self._session() as s:
            me = accounts.current(s, token)
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
            me = accounts.current(s, token)
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
                clean[(rid, obj.key)] = check_score(score, obj.scores)
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
                upsert_rating(s, rid, me.id, key, score, notes.get(rid), per, status, row=own.get((rid, key)),
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

    def queue_version(self, token: str) -> tuple[int, int, int]:
        """The study's change marker (:func:`annotation.workflow.study_version`) for a signed-in
        rater: what the Annotate tab asks every few seconds while it has nothing to show, before
        it runs the full next-item query."""
        with self._session() as s:
            accounts.current(s, token)
            return workflow.study_version(s)

    def progress(self, token: str, target: int | None = None, max_age: float = 0.0) -> Progress:
        """This rater's progress bar. The study-wide counts come from a cache shared by every
        session of this process, keyed by the study's change marker (and at most
        SHARED_COUNTS_MAX_AGE_S old); ``max_age``: counts up to that many seconds old will do even
        after a change (what an idle tab's timer asks for, so that twenty idle tabs do not each
        count the whole study again after every submission). The rater's own count is exact."""
        with self._session() as s:
            me = accounts.current(s, token)
            key = (self.url, id(self.engine), target)
            version = workflow.study_version(s)
            hit = _SHARED_COUNTS.get(key)
            age = None if hit is None else time.monotonic() - hit[1]
            if hit is not None and (hit[0] == version or age < max_age) and age < SHARED_COUNTS_MAX_AGE_S:
                return Progress(mine=_submitted_by(s, me.id), total=hit[2], complete=hit[3], target=target)
            progress = count_progress(s, me.id, target)
            _SHARED_COUNTS[key] = (version, time.monotonic(), progress.total, progress.complete)
            return progress


# Study-wide progress counts per (database, engine, k): (change marker, when, items, complete).
_SHARED_COUNTS: dict[tuple, tuple[tuple, float, int, int]] = {}
SHARED_COUNTS_MAX_AGE_S = 60.0


def count_progress(s: Session, annotator_id: int | None, target: int | None) -> Progress:
    """Items complete: at least ``target`` (None: each item's own k) raters submitted."""
    total = s.scalar(select(func.count(Item.id)))
    per_item = (select(Assignment.item_id, func.count().label("n")).where(Assignment.status == SUBMITTED)
                .group_by(Assignment.item_id).subquery())
    k = func.coalesce(Item.target_raters, DEFAULT_TARGET_ANNOTATORS) if target is None else target
    complete = s.scalar(select(func.count()).select_from(per_item).join(Item, Item.id == per_item.c.item_id)
                        .where(per_item.c.n >= k))
    mine = _submitted_by(s, annotator_id) if annotator_id is not None else 0
    return Progress(mine=mine, total=total, complete=complete, target=target)


def _submitted_by(s: Session, annotator_id: int) -> int:
    return s.scalar(select(func.count()).select_from(Assignment)
                    .where(Assignment.annotator_id == annotator_id, Assignment.status == SUBMITTED))


def upsert_rating(s: Session, response_id: int, annotator_id: int, objective: str, score: int,
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
