"""Adding items and ratings: the operator's imports of item and rating files (read and checked
by :mod:`annotation.readers`), the Align tab's "Send to annotation", and the stored protocols
they are rated under.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from metaaligner_core.errors import InputError, MetaAlignerError

from . import workflow
from .database import Database
from .models import SUBMITTED, Annotator, Item, ProtocolObjective, ProtocolRow, Rating, Response
from .protocols import Protocol, load_protocol
from .readers import ItemIn, read_item_file, read_rating_file
from .rater_service import upsert_rating

log = logging.getLogger("annotation.store")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()



@dataclass(frozen=True)
class ImportResult:
    items_added: int = 0
    items_existing: int = 0
    responses_added: int = 0
    ratings: int = 0
    annotators_added: tuple[str, ...] = ()
    overwritten: int = 0  # submitted scores replaced (import-ratings --overwrite)



class ItemService(Database):
    """Items and ratings coming in (see :class:`annotation.store.Store`)."""

    def audience(self, uid: str, target: int | None = None) -> workflow.Audience:
        """How many raters an item still waits for and how many accounts can rate it (counts
        only: what the app tells whoever queued the item)."""
        with self._session() as s:
            item_id = s.scalar(select(Item.id).where(Item.uid == uid))
            if item_id is None:
                raise MetaAlignerError(f'no item "{uid}"')
            return workflow.audience(s, item_id, target)

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
        items = read_item_file(path, proto)
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
            self._add_items(s, proto, [ItemIn(0, item_id, query, [(t, src, None) for t, src in resp])], "<enqueue>")
            return _item_uid(proto, item_id, query)

    def _add_items(self, s: Session, proto: Protocol, items: list[ItemIn], path,
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

        Shapes (see :mod:`annotation.readers`): one rating per row (``query, response,
        annotator, objective, score``, optional ``item_id, source, note``), or, with ``mapping``,
        a column per aspect holding every rater's scores as a list, or a column per rater.

        A rating that is already submitted with a different score is refused, naming the line,
        unless ``overwrite``; every change is recorded in the audit trail.
        """
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
                upsert_rating(s, resp.id, people[r.annotator].id, r.objective, r.score, r.note, None, SUBMITTED,
                               row=row, version=proto.version, audit=(who, via, item.uid, r.annotator))
                workflow.assign(s, item.id, people[r.annotator].id, submitted=True)
        if changed:
            log.warning("import-ratings: %d submitted scores replaced (--overwrite); see the audit trail", changed)
        log.debug("ratings: %d stored (%d new items, %d new responses, %d new annotators)",
                  len(rows), added, r_added, len(new_people))
        return ImportResult(items_added=added, items_existing=existing, responses_added=r_added,
                            ratings=len(rows), annotators_added=tuple(new_people), overwritten=changed)


def _check_raters(raters) -> None:
    if raters is not None and (isinstance(raters, bool) or not isinstance(raters, int) or not 1 <= raters <= 50):
        raise MetaAlignerError(f"--raters {raters!r}: expected an integer 1-50 (raters per item)")


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

