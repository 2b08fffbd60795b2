"""The admins' service functions: progress of every rater, agreement, the dashboard, the
exports (ratings, final labels, preference pairs, a Hugging Face dataset), the stored protocols
and the audit trail. They need an admin token or :data:`~annotation.accounts.OPERATOR`.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone

from sqlalchemy import case, distinct, func, or_, select
from sqlalchemy.orm import Session

from metaaligner_core.errors import MetaAlignerError

from . import accounts, workflow
from . import agreement as agreement_mod
from . import export as export_mod
from .database import Database
from .models import (DRAFT, SUBMITTED, Annotator, Assignment, Item, ProtocolObjective, ProtocolRow, Rating, RatingEvent,
                     Response)
from .protocols import SCORES, Protocol
from .rater_service import Progress, count_progress


def _aware(dt: datetime) -> datetime:
    # SQLite hands back naive datetimes; they were written as UTC.
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


class AdminService(Database):
    """What an admin (or the operator) does (see :class:`annotation.store.Store`)."""

    def progress_by_annotator(self, actor, target: int | None = None) -> tuple[Progress, list[dict]]:
        """Overall progress and, per annotator, items submitted, ratings submitted and drafts."""
        with self._session() as s:
            accounts.require_role(s, actor, "admin")
            overall = count_progress(s, None, target)
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
                              "seconds_per_item": secs / items if secs and items else None}
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
            accounts.require_role(s, actor, "admin")
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
            accounts.require_role(s, actor, "admin")
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
            accounts.require_role(s, actor, "admin")
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
            accounts.require_role(s, actor, "admin")
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
            accounts.require_role(s, actor, "admin")
            self._check_protocol(s, protocol)
            items = workflow.load_scores(s, protocol)
            order = self._objective_order(s, protocol)
        return list(export_mod.pairs_from_scores([it for it in items if not it.is_gold], order))
    def stored_protocols(self, actor) -> list[dict]:
        """The protocols in the database: name, version, objective keys, item count."""
        with self._session() as s:
            accounts.require_role(s, actor, "admin")
            counts = dict(s.execute(select(Item.protocol_id, func.count()).group_by(Item.protocol_id)).all())
            return [{"name": p.name, "version": p.version or "unversioned", "objectives": [o.key for o in p.objectives],
                     "items": counts.get(p.id, 0)}
                    for p in s.scalars(select(ProtocolRow).order_by(ProtocolRow.id))]

    def audit_events(self, actor, item_uid: str | None = None, limit: int | None = None) -> list[dict]:
        """The audit trail, oldest first (admins only)."""
        with self._session() as s:
            accounts.require_role(s, actor, "admin")
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
