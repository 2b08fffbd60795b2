"""How a study runs: k raters per item, gold items, the examiner's review, final labels, audit.

Functions here work inside a session the :class:`annotation.store.Store` opened; the store
checks who the caller is first.

* **Assignment.** Every item wants ``k`` raters (``Item.target_raters``: set per import, else
  the protocol's ``raters``, else :data:`annotation.DEFAULT_TARGET_ANNOTATORS`). When a rater
  asks for work, an *assignment* row is written; an item counts the raters who submitted it plus
  those who opened it within :data:`ASSIGNMENT_TTL`, so concurrent raters spread over items
  instead of all taking the same one. The least-assigned item comes first.
* **Gold items** (items whose responses carry known scores) go to every rater, one every
  :data:`GOLD_EVERY` items, looking like any other item; each rater's accuracy on them is
  reported. They stay out of agreement and pairs.
* **Review.** Once an item has its k submissions, the protocol's ``review`` rule decides whether
  it goes to an examiner, who sees every rater's scores and notes side by side and sets final
  scores with a reason.
* **Final labels** per response and objective: the examiner's score where reviewed, else the
  raters' common score when they agree, else (a rule that let a difference pass) their mean.
* **Audit.** Every change of a rating or a final score adds a :class:`RatingEvent`.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from fractions import Fraction

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import DEFAULT_TARGET_ANNOTATORS
from .models import (SUBMITTED, Annotator, Assignment, Item, ProtocolRow, Rating, RatingEvent, Response, Review,
                     utcnow)
from .protocols import Protocol, review_needed

ASSIGNMENT_TTL = timedelta(hours=2)
GOLD_EVERY = 5  # one gold item among every GOLD_EVERY items a rater gets (when gold items exist)
OPEN = "open"


# ----------------------------------------------------------------------------- audit

def record(s: Session, *, actor: str, path: str, kind: str, item_uid: str, response_id: int, objective: str,
           rater: str | None, old_score, new_score, old_status=None, new_status=None, note=None) -> None:
    """One audit row; a call that changes nothing records nothing."""
    if old_score == new_score and old_status == new_status and kind == "rating":
        return
    s.add(RatingEvent(at=utcnow(), actor=actor, path=path, kind=kind, item_uid=item_uid, response_id=response_id,
                      rater=rater, objective=objective, old_score=old_score, new_score=new_score,
                      old_status=old_status, new_status=new_status, note=note))


def actor_name(actor) -> str:
    name = getattr(actor, "name", None)
    return name if isinstance(name, str) else "operator"


# ----------------------------------------------------------------------------- assignment

def target_of(item_target: int | None) -> int:
    return item_target or DEFAULT_TARGET_ANNOTATORS


def assign(s: Session, item_id: int, annotator_id: int, submitted: bool = False) -> None:
    """Record that the rater has (or submitted) the item; idempotent."""
    row = s.scalar(select(Assignment).where(Assignment.item_id == item_id, Assignment.annotator_id == annotator_id))
    now = utcnow()
    if row is None:
        try:
            with s.begin_nested():
                s.add(Assignment(item_id=item_id, annotator_id=annotator_id, status=SUBMITTED if submitted else OPEN,
                                 created_at=now, submitted_at=now if submitted else None))
        except IntegrityError:  # another session of this rater assigned it first
            row = s.scalar(select(Assignment).where(Assignment.item_id == item_id,
                                                    Assignment.annotator_id == annotator_id))
        else:
            if submitted:
                _count_submission(s, item_id)
            return
    if submitted and row.status != SUBMITTED:
        # conditional, so two sessions of one rater submitting at once count the item once
        done = s.execute(update(Assignment).where(Assignment.id == row.id, Assignment.status != SUBMITTED)
                         .values(status=SUBMITTED, submitted_at=now).execution_options(synchronize_session=False))
        if done.rowcount == 1:
            _count_submission(s, item_id)
        s.expire(row)
    elif not submitted and row.status == OPEN:
        row.created_at = now  # reopened: the hold starts again


def _count_submission(s: Session, item_id: int) -> None:
    # an SQL increment, so concurrent submissions on a server database do not lose one
    s.execute(update(Item).where(Item.id == item_id)
              .values(submitted_count=func.coalesce(Item.submitted_count, 0) + 1))


def _hold_cutoff():
    """Open assignments created before this time no longer hold their item."""
    return utcnow() - ASSIGNMENT_TTL


def release(s: Session, item_id: int, annotator_id: int) -> bool:
    """End the rater's hold on the item now (a skip), as if :data:`ASSIGNMENT_TTL` had passed;
    the assignment stays theirs and open. True when a hold ended."""
    done = s.execute(update(Assignment)
                     .where(Assignment.item_id == item_id, Assignment.annotator_id == annotator_id,
                            Assignment.status == OPEN, Assignment.created_at >= _hold_cutoff())
                     .values(created_at=_hold_cutoff() - timedelta(seconds=1))
                     .execution_options(synchronize_session=False))
    return done.rowcount == 1


def _active_counts(candidates):
    """Per candidate item: raters who submitted it or hold a fresh assignment."""
    fresh = _hold_cutoff()
    return (select(Assignment.item_id.label("item_id"), func.count().label("n"))
            .where(Assignment.item_id.in_(candidates), or_(Assignment.status == SUBMITTED, Assignment.created_at >= fresh))
            .group_by(Assignment.item_id).subquery())


def _naive(t):
    """A UTC time without its zone (SQLite returns naive datetimes, PostgreSQL aware ones)."""
    return t.replace(tzinfo=None) if t is not None and t.tzinfo is not None else t


def pick_next(s: Session, me_id: int, target: int | None, exclude: list[str]) -> tuple[int | None, bool]:
    """The item id to serve next, and whether :func:`assign` must run: a new assignment row, or
    the rater's own open item whose hold ran out or was ended by a skip (it starts again).

    Order: the rater's own open assignments (drafts first), then, every GOLD_EVERY-th item, a
    gold item; then regular items below their k, least-assigned first; gold items last.
    """
    mine = select(Assignment.item_id).where(Assignment.annotator_id == me_id)
    q_open = (select(Assignment.item_id, Assignment.created_at).join(Item, Item.id == Assignment.item_id)
              .where(Assignment.annotator_id == me_id, Assignment.status == OPEN)
              .order_by(Assignment.created_at, Assignment.item_id).limit(1))
    if exclude:
        q_open = q_open.where(Item.uid.not_in(exclude))
    row = s.execute(q_open).first()
    if row is not None:  # a hold that ran out (or was ended by a skip) starts again: assign() renews it
        return row.item_id, _naive(row.created_at) < _naive(_hold_cutoff())

    def gold_item():
        q = select(Item.id).where(Item.is_gold.is_(True), Item.id.not_in(mine)).order_by(Item.id).limit(1)
        if exclude:
            q = q.where(Item.uid.not_in(exclude))
        return s.scalar(q)

    done = s.scalar(select(func.count()).select_from(Assignment)
                    .where(Assignment.annotator_id == me_id, Assignment.status == SUBMITTED)) or 0
    if (done + 1) % GOLD_EVERY == 0:
        g = gold_item()
        if g is not None:
            return g, True
    k = func.coalesce(Item.target_raters, DEFAULT_TARGET_ANNOTATORS) if target is None else target
    found = _most_disagreeing(s, k, mine, exclude)
    if found is not None:
        return found, True
    # only items with fewer than k submissions can be short of raters: count assignments for those
    short = (select(Item.id).where(func.coalesce(Item.submitted_count, 0) < k,
                                   or_(Item.is_gold.is_(None), Item.is_gold.is_(False))))
    counts = _active_counts(short)
    n = func.coalesce(counts.c.n, 0)
    q = (select(Item.id).outerjoin(counts, counts.c.item_id == Item.id)
         .where(Item.id.in_(short), Item.id.not_in(mine), n < k)
         .order_by(n, Item.id).limit(1))
    if exclude:
        q = q.where(Item.uid.not_in(exclude))
    found = s.scalar(q)
    if found is not None:
        return found, True
    g = gold_item()
    return (g, True) if g is not None else (None, False)


def disagreement(scores_by_unit) -> float:
    """Mean, over units (response, objective) with two or more scores, of highest minus lowest."""
    spreads = [max(v) - min(v) for v in scores_by_unit if len(v) >= 2]
    return sum(spreads) / len(spreads) if spreads else 0.0


def _most_disagreeing(s: Session, k, mine, exclude: list[str]) -> int | None:
    """Under a protocol with ``order: disagreement``: the item still short of raters whose
    submitted scores disagree most (ties: fewer raters, then import order); None when no such
    item disagrees yet (the caller then serves the least-rated item)."""
    protocols = [pid for pid, spec in s.execute(select(ProtocolRow.id, ProtocolRow.spec))
                 if (spec or {}).get("order") == "disagreement"]
    if not protocols:
        return None
    short = (select(Item.id).where(Item.protocol_id.in_(protocols), func.coalesce(Item.submitted_count, 0) >= 2,
                                   func.coalesce(Item.submitted_count, 0) < k,
                                   or_(Item.is_gold.is_(None), Item.is_gold.is_(False))))
    counts = _active_counts(short)
    n = func.coalesce(counts.c.n, 0)
    q = (select(Item.id, n).outerjoin(counts, counts.c.item_id == Item.id)
         .where(Item.id.in_(short), Item.id.not_in(mine), n < k))
    if exclude:
        q = q.where(Item.uid.not_in(exclude))
    candidates = dict(s.execute(q).all())
    if not candidates:
        return None
    units: dict[int, dict[tuple[int, str], list[int]]] = defaultdict(lambda: defaultdict(list))
    ids = list(candidates)
    for start in range(0, len(ids), 5000):
        for iid, rid, obj, score in s.execute(
                select(Response.item_id, Rating.response_id, Rating.objective, Rating.score)
                .join(Response, Response.id == Rating.response_id)
                .where(Response.item_id.in_(ids[start:start + 5000]), Rating.status == SUBMITTED)):
            units[iid][(rid, obj)].append(score)
    best = max(ids, key=lambda i: (disagreement(units[i].values()), -candidates[i], -i))
    return best if disagreement(units[best].values()) > 0 else None


def study_version(s: Session) -> tuple[int, int, int]:
    """A marker that changes when a rater's queue or the progress figures may have changed:
    ``(newest item, assignment, audit-trail row)``, i.e. new items, raters taking items, ratings
    saved or submitted. One query over three primary keys, so an idle rater's page can ask it
    every few seconds. Only a new item can give an idle rater work (others taking or rating items
    leaves less); what the marker cannot see (a hold running out after :data:`ASSIGNMENT_TTL`, a
    re-import changing an item's k) the caller catches with a full check now and then."""
    newest = [select(func.coalesce(func.max(col), 0)).scalar_subquery()
              for col in (Item.id, Assignment.id, RatingEvent.id)]
    return tuple(s.execute(select(*newest)).one())


@dataclass(frozen=True)
class Audience:
    """Who an item goes to: ``wanted`` raters (its k), ``submitted`` so far, and ``able``: the
    other accounts that can take it (enabled, with a password, not yet submitted)."""

    wanted: int
    submitted: int
    able: int

    @property
    def waiting_for(self) -> int:
        return max(0, self.wanted - self.submitted)

    def describe(self) -> str:
        """One phrase for the sender, e.g. "queued for 2 raters"."""
        if self.waiting_for == 0:
            return f"already rated by its {self.wanted} rater{'s' if self.wanted != 1 else ''}"
        text = f"queued for {self.waiting_for} rater{'s' if self.waiting_for != 1 else ''}"
        if self.able < self.waiting_for:
            have = "no account" if self.able == 0 else f"only {self.able} account{'s' if self.able != 1 else ''}"
            text += f"; {have} can rate it yet: add raters on the Accounts tab"
        return text


def audience(s: Session, item_id: int, target: int | None = None) -> Audience:
    item = s.get(Item, item_id)
    done = select(Assignment.annotator_id).where(Assignment.item_id == item_id, Assignment.status == SUBMITTED)
    able = s.scalar(select(func.count(Annotator.id)).where(
        Annotator.password_hash.is_not(None), or_(Annotator.disabled.is_(None), Annotator.disabled.is_(False)),
        Annotator.id.not_in(done)))
    submitted = s.scalar(select(func.count()).select_from(done.subquery()))
    return Audience(wanted=target or target_of(item.target_raters), submitted=submitted, able=able)


# ----------------------------------------------------------------------------- review and final labels

@dataclass
class ResponseScores:
    response_id: int
    position: int
    text: str
    source: str | None
    gold: dict | None
    raters: dict[str, dict[str, int]] = field(default_factory=dict)  # objective -> rater -> score
    notes: dict[str, str] = field(default_factory=dict)  # rater -> note
    reviews: dict[str, tuple[int, str, str]] = field(default_factory=dict)  # objective -> (score, reason, examiner)


@dataclass
class ItemScores:
    item_id: int
    uid: str
    query: str
    protocol: Protocol
    protocol_name: str
    is_gold: bool
    target: int
    responses: list[ResponseScores]
    submitted_by: set[str] = field(default_factory=set)

    def flagged(self) -> list[tuple[int, str]]:
        """(response id, objective) pairs the protocol's review rule sends to the examiner."""
        return [(r.response_id, o.key) for r in self.responses for o in self.protocol.objectives
                if review_needed(self.protocol.review, list(r.raters.get(o.key, {}).values()))]

    @property
    def complete(self) -> bool:
        return len(self.submitted_by) >= self.target

    @property
    def reviewed(self) -> bool:
        return any(r.reviews for r in self.responses)

    @property
    def needs_review(self) -> bool:
        return not self.is_gold and self.complete and bool(self.flagged())


def load_scores(s: Session, protocol: str | None = None, uids: list[str] | None = None,
                item_ids: list[int] | None = None, texts: bool = True) -> list[ItemScores]:
    """Every item (of ``protocol``) with its submitted ratings, notes and reviews, in item order
    (``texts=False``: queries and responses left empty, for figures that need only scores)."""
    query_col = Item.query if texts else Item.uid
    text_col = Response.text if texts else Response.source
    q = (select(Item.id, Item.uid, query_col, Item.is_gold, Item.target_raters, ProtocolRow.name, ProtocolRow.spec)
         .join(ProtocolRow, ProtocolRow.id == Item.protocol_id).order_by(Item.id))
    if protocol:
        q = q.where(ProtocolRow.name == protocol)
    if uids is not None:
        q = q.where(Item.uid.in_(uids))
    if item_ids is not None:
        q = q.where(Item.id.in_(item_ids))
    protos: dict[str, Protocol] = {}
    items: dict[int, ItemScores] = {}
    for iid, uid, query, gold, target, pname, spec in s.execute(q):
        if pname not in protos:
            protos[pname] = Protocol.from_dict(spec, source=f"database protocol {pname}")
        items[iid] = ItemScores(iid, uid, query if texts else "", protos[pname], pname, bool(gold), target_of(target), [])
    if not items:
        return []
    ids = list(items)
    responses: dict[int, ResponseScores] = {}
    for start in range(0, len(ids), 5000):
        chunk = ids[start:start + 5000]
        for rid, iid, pos, text, src, gold in s.execute(
                select(Response.id, Response.item_id, Response.position, text_col, Response.source, Response.gold)
                .where(Response.item_id.in_(chunk)).order_by(Response.item_id, Response.position)):
            responses[rid] = ResponseScores(rid, pos, text if texts else "", src, gold)
            items[iid].responses.append(responses[rid])
        for rid, iid, who, obj, score, note in s.execute(
                select(Rating.response_id, Response.item_id, Annotator.name, Rating.objective, Rating.score, Rating.note)
                .join(Response, Response.id == Rating.response_id).join(Annotator, Annotator.id == Rating.annotator_id)
                .where(Response.item_id.in_(chunk), Rating.status == SUBMITTED)):
            resp = responses[rid]
            resp.raters.setdefault(obj, {})[who] = score
            if note:
                resp.notes[who] = note
            items[iid].submitted_by.add(who)
        for rid, obj, score, reason, who in s.execute(
                select(Review.response_id, Review.objective, Review.score, Review.reason, Annotator.name)
                .join(Annotator, Annotator.id == Review.examiner_id).where(Review.item_id.in_(chunk))):
            responses[rid].reviews[obj] = (score, reason, who)
    return list(items.values())


def final_label(resp: ResponseScores, objective: str, rule: str) -> tuple[float | int | None, str, str | None]:
    """(final score, decided by, reason) of one response on one objective.

    decided by: the examiner's name, ``agreement`` (all raters gave the same score), ``mean``
    (raters differ but the rule did not send it to review; the score is their mean), or
    ``pending review`` / ``unrated`` (no final score yet).
    """
    if objective in resp.reviews:
        score, reason, who = resp.reviews[objective]
        return score, who, reason
    scores = list(resp.raters.get(objective, {}).values())
    if not scores:
        return None, "unrated", None
    if len(set(scores)) == 1:
        return scores[0], "agreement", None
    if review_needed(rule, scores):
        return None, "pending review", None
    mean = Fraction(sum(scores), len(scores))
    return (int(mean) if mean.denominator == 1 else float(mean)), "mean", None


def pair_score(resp: ResponseScores, objective: str) -> Fraction | None:
    """What a pair compares (DESIGN.md): the examiner's score where reviewed, else the mean."""
    if objective in resp.reviews:
        return Fraction(resp.reviews[objective][0])
    scores = list(resp.raters.get(objective, {}).values())
    return Fraction(sum(scores), len(scores)) if scores else None


# ----------------------------------------------------------------------------- figures per rater

def gold_accuracy(items: list[ItemScores]) -> dict[str, dict]:
    """Per rater, on gold items: ratings checked, exact matches, and mean absolute error."""
    out: dict[str, dict] = defaultdict(lambda: {"ratings": 0, "exact": 0, "abs_error": 0})
    for it in items:
        if not it.is_gold:
            continue
        for r in it.responses:
            for obj, expected in (r.gold or {}).items():
                for who, score in r.raters.get(obj, {}).items():
                    d = out[who]
                    d["ratings"] += 1
                    d["exact"] += int(score == expected)
                    d["abs_error"] += abs(score - expected)
    return {who: {"ratings": d["ratings"], "accuracy": d["exact"] / d["ratings"],
                  "mean_abs_error": d["abs_error"] / d["ratings"]}
            for who, d in sorted(out.items()) if d["ratings"]}


__all__ = ["ASSIGNMENT_TTL", "Audience", "GOLD_EVERY", "ItemScores", "ResponseScores", "assign", "audience",
           "disagreement", "final_label", "gold_accuracy", "load_scores", "pair_score", "pick_next", "record", "release",
           "actor_name", "study_version", "target_of"]
