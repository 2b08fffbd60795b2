"""The examiners' service functions: the queue of items whose raters disagree, one item with
every rater's scores, and the examiner's final scores with a reason (audited). They need an
examiner or admin token, or :data:`~annotation.accounts.OPERATOR` (the command line).
"""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from metaaligner_core.errors import MetaAlignerError

from . import accounts, workflow
from .accounts import OPERATOR
from .database import Database
from .models import Annotator, Review, utcnow
from .readers import check_score


class ReviewService(Database):
    """What an examiner does (see :class:`annotation.store.Store`)."""

    def review_queue(self, actor, protocol: str | None = None, include_reviewed: bool = False) -> list[dict]:
        """Items whose raters disagree under their protocol's review rule, complete (k raters
        submitted) and not yet reviewed: ``{"item_id", "query", "flagged", "raters", "reviewed"}``."""
        with self._session() as s:
            accounts.require_role(s, actor, "examiner")
            items = workflow.load_scores(s, protocol)
        return [{"item_id": it.uid, "query": it.query, "flagged": len(it.flagged()),
                 "raters": sorted(it.submitted_by), "reviewed": it.reviewed}
                for it in items if it.needs_review and (include_reviewed or not it.reviewed)]

    def review_view(self, actor, uid: str) -> "workflow.ItemScores":
        """One item with every rater's scores and notes (examiners only)."""
        with self._session() as s:
            accounts.require_role(s, actor, "examiner")
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
            me = accounts.require_role(s, actor, "examiner")
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
                clean[(rid, obj.key)] = check_score(score, obj.scores)
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
