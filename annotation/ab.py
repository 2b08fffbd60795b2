"""Blind A/B studies of two aligners, rated by the study's own raters (``annotate ab``, the Train tab).

1. :func:`pick_queries`: N queries of the study held out from the candidate's training — the
   items an ``annotate train`` run recorded as held out first, then items it did not train on
   (for a candidate from elsewhere, any item of the study; the record says so).
2. The caller corrects each query's draft (the item's first response) with both aligners.
3. :func:`enqueue`: one new item per query under the study's protocol, holding the two
   corrections in a random (seeded) order. Which aligner wrote which response is kept in
   :class:`~annotation.models.ABResponse` for admins; a rater's item view has no sources.
   Two identical corrections are one response (it counts as a tie).
4. :func:`compare` (pure) and :func:`figures`: per objective, the candidate's mean score minus
   the baseline's over the items where both were rated — a response's score is the
   examiner's final score where reviewed, else the mean submitted score — with a paired
   bootstrap interval (items resampled) and the per-item wins, ties and losses.

A/B items stay out of ``annotate train``'s pairs.
"""
from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Sequence

from sqlalchemy import func, select

from metaaligner_core.errors import MetaAlignerError

from . import accounts, workflow
from .models import ABResponse, ABStudy, Item, ProtocolRow, Response
from .protocols import Protocol
from .training_run import ab_item_ids, pick_protocol

ARMS = ("baseline", "candidate")


@dataclass(frozen=True)
class Query:
    item_id: str  # uid of the study item it comes from
    query: str
    draft: str


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- choosing and enqueuing

def pick_queries(store, actor, protocol: str | None, n: int, record: dict | None = None,
                 seed: int = 0) -> tuple[Protocol, list[Query], str]:
    """(the study's protocol, N queries, how they were held out). ``record``: the candidate's ``study.json``."""
    if n < 1:
        raise MetaAlignerError(f"--queries {n}: expected 1 or more")
    if record is not None and protocol and record.get("protocol") != protocol:
        raise MetaAlignerError(f'--protocol "{protocol}": the candidate was trained on study "{record.get("protocol")}"')
    name = pick_protocol(store, protocol or (record or {}).get("protocol"))
    with store._session() as s:
        accounts.require_role(s, actor, "admin")
        skip = ab_item_ids(s)
        items = [it for it in workflow.load_scores(s, name) if not it.is_gold and it.item_id not in skip
                 and it.responses]
        proto = Protocol.from_dict(s.scalar(select(ProtocolRow.spec).where(ProtocolRow.name == name)))
    by_uid = {it.uid: it for it in items}
    rng = random.Random(seed)
    if record is None:
        pool, how = sorted(by_uid), "any item of the study (the candidate's training items are unknown)"
        chosen = rng.sample(pool, min(n, len(pool)))
    else:
        held = [u for u in record.get("held_out_items", []) if u in by_uid]
        trained = set(record.get("trained_items", []))
        rest = sorted(u for u in by_uid if u not in trained and u not in held)
        chosen = rng.sample(held, min(n, len(held)))
        chosen += rng.sample(rest, min(n - len(chosen), len(rest)))
        how = (f"held out by the candidate's training run ({len(held)} items) and items it did not train on "
               f"({len(rest)})")
        pool = held + rest
    if len(chosen) < n:
        raise MetaAlignerError(f"--queries {n}: the study has only {len(pool)} queries held out from the candidate's "
                               f"training ({how}); ask for fewer, import more items, or train with --holdout")
    out = [Query(u, by_uid[u].query, by_uid[u].responses[0].text) for u in chosen]
    return proto, out, how


def enqueue(store, actor, *, protocol: str, baseline: str, candidate: str, template: str,
            rows: Sequence[tuple[Query, str, str]], seed: int = 0, name: str | None = None) -> dict:
    """Store the study and its items: ``rows`` = (query, baseline's correction, candidate's)."""
    if not rows:
        raise MetaAlignerError("no queries to enqueue")
    rng = random.Random(seed)
    with store._session(write=True) as s:
        me = accounts.require_role(s, actor, "admin")
        prow = s.scalar(select(ProtocolRow).where(ProtocolRow.name == protocol))
        if prow is None:
            raise MetaAlignerError(f'protocol "{protocol}" is not in the database')
        if name is None:
            n = (s.scalar(select(func.count()).select_from(ABStudy)) or 0) + 1
            name = f"ab{n}-{datetime.now(timezone.utc):%Y%m%d%H%M%S}"
        if s.scalar(select(ABStudy.id).where(ABStudy.name == name)) is not None:
            raise MetaAlignerError(f'--name "{name}": an A/B study of that name exists')
        study = ABStudy(name=name, protocol_id=prow.id, baseline=baseline, candidate=candidate, template=template,
                        seed=seed, queries=[q.item_id for q, _, _ in rows], created_by=workflow.actor_name(me))
        s.add(study)
        s.flush()
        raters = (prow.spec or {}).get("raters")
        for i, (q, base_text, cand_text) in enumerate(rows):
            item = Item(uid=f"{name}-{i + 1:04d}", protocol_id=prow.id, query=q.query, query_hash=_sha(q.query),
                        target_raters=raters, is_gold=False, added_by=f"ab:{name}")
            s.add(item)
            s.flush()
            arms = [("baseline", base_text.strip()), ("candidate", cand_text.strip())]
            rng.shuffle(arms)  # the order raters see
            made: dict[str, Response] = {}
            for arm, text in arms:
                if not text:
                    raise MetaAlignerError(f"the {arm} aligner returned an empty correction for item {q.item_id}")
                resp = made.get(text)
                if resp is None:
                    resp = made[text] = Response(item_id=item.id, text=text, text_hash=_sha(text),
                                                 source=baseline if arm == "baseline" else candidate,
                                                 position=len(made))
                    s.add(resp)
                    s.flush()
                s.add(ABResponse(response_id=resp.id, study_id=study.id, item_id=item.id, arm=arm,
                                 source_item=q.item_id))
        return {"name": name, "items": len(rows), "protocol": protocol}


# ----------------------------------------------------------------------------- figures

def compare(scores: dict[str, list[tuple[float, float]]], bootstrap: int = 1000, seed: int = 0) -> dict:
    """Per objective, from (baseline score, candidate score) per item: the means, the
    difference (candidate − baseline) with a paired percentile bootstrap interval over items,
    and the items the candidate won, tied and lost."""
    from metaaligner_core.evaluation.stats import bootstrap_means, percentile_interval

    out = {}
    for key, pairs in scores.items():
        b = [p[0] for p in pairs]
        c = [p[1] for p in pairs]
        n = len(pairs)
        entry = {"n": n, "baseline_mean": None, "candidate_mean": None, "difference": None, "ci95": None,
                 "wins": sum(y > x for x, y in pairs), "ties": sum(y == x for x, y in pairs),
                 "losses": sum(y < x for x, y in pairs)}
        if n:
            entry["baseline_mean"], entry["candidate_mean"] = sum(b) / n, sum(c) / n
            entry["difference"] = entry["candidate_mean"] - entry["baseline_mean"]
            if bootstrap > 0:
                means = bootstrap_means([b, c], bootstrap, seed)
                entry["ci95"] = percentile_interval(means[:, 1] - means[:, 0])
        out[key] = entry
    return out


def figures_in_session(s, protocol: str | None = None, bootstrap: int = 1000, seed: int = 0) -> dict:
    """Every A/B study (of ``protocol``): its aligners and :func:`compare` per objective."""
    q = select(ABStudy, ProtocolRow.name).join(ProtocolRow, ProtocolRow.id == ABStudy.protocol_id).order_by(ABStudy.id)
    if protocol:
        q = q.where(ProtocolRow.name == protocol)
    out = {}
    for study, pname in s.execute(q).all():
        arms: dict[int, dict[str, int]] = defaultdict(dict)  # item id -> arm -> response id
        for item_id, arm, rid in s.execute(select(ABResponse.item_id, ABResponse.arm, ABResponse.response_id)
                                           .where(ABResponse.study_id == study.id)):
            arms[item_id][arm] = rid
        items = workflow.load_scores(s, item_ids=list(arms), texts=False)
        scores: dict[str, list[tuple[float, float]]] = {}
        for it in items:
            by_id = {r.response_id: r for r in it.responses}
            for o in it.protocol.objectives:
                scores.setdefault(o.key, [])
                got = [workflow.pair_score(by_id[arms[it.item_id][a]], o.key) for a in ARMS]
                if None not in got:
                    scores[o.key].append((float(got[0]), float(got[1])))
        out[study.name] = {"protocol": pname, "baseline": study.baseline, "candidate": study.candidate,
                           "template": study.template, "items": len(arms), "created_by": study.created_by,
                           "created_at": workflow.utcnow().isoformat() if study.created_at is None
                           else study.created_at.isoformat(),
                           "objectives": compare(scores, bootstrap, seed)}
    return out


def figures(store, actor, protocol: str | None = None, bootstrap: int = 1000, seed: int = 0) -> dict:
    with store._session() as s:
        accounts.require_role(s, actor, "admin")
        return figures_in_session(s, protocol, bootstrap, seed)


def arms_of(store, actor, item_uid: str) -> dict[int, list[str]]:
    """Which aligner wrote each response of an A/B item: {response id: [arms]} (admins only)."""
    with store._session() as s:
        accounts.require_role(s, actor, "admin")
        out: dict[int, list[str]] = defaultdict(list)
        for rid, arm in s.execute(select(ABResponse.response_id, ABResponse.arm).join(Item, Item.id == ABResponse.item_id)
                                  .where(Item.uid == item_uid).order_by(ABResponse.arm)):
            out[rid].append(arm)
        return dict(out)
