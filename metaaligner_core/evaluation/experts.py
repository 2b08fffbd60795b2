"""Judge–expert agreement: join the judge's verdicts with expert 0–3 ratings of the same responses.

The ratings are records in the store's ratings export format (``{"query", "response",
"annotator", "objective", "score"}``); ``metaaligner evaluate --ratings-db`` reads them from an
annotation database (:meth:`annotation.store.Store.rating_records`) or from such an export file
(:func:`metaaligner_core.commands.evaluate.rating_records`). A rated response matches a judged one when its query and its text are equal after
whitespace normalisation and the rating's objective is the judged objective's key.

Per judge and objective the report gives Spearman's rank correlation between the judge's value
and the mean expert score of the response: the judge's 0–10 score in score mode, and in
pairwise mode the response's result against the golden answer as an ordinal (loss 0 < tie 1 <
win 2). The two scales differ (0–10 or 3 levels against 0–3), which is why a rank correlation
is used rather than an agreement coefficient that assumes one shared scale.
"""
from __future__ import annotations

import logging
import statistics
from typing import Iterable

from ..errors import MetaAlignerError
from ..objectives import normalize_key
from . import stats
from .metrics import normalise_whitespace

log = logging.getLogger(__name__)


def expert_scores(records: Iterable[dict], source: str) -> dict[tuple[str, str, str], list[int]]:
    """``{(query, response, objective key): [scores]}`` from rating records; ``source`` (the
    database or file they came from) names them in errors."""
    scores: dict[tuple[str, str, str], list[int]] = {}
    for rec in records:
        try:
            key = (normalise_whitespace(str(rec["query"])), normalise_whitespace(str(rec["response"])),
                   normalize_key(str(rec["objective"])))
            score = rec["score"]
        except KeyError as e:
            raise MetaAlignerError(f"--ratings-db {source}: a rating record lacks {e}") from None
        if score is None:
            continue
        scores.setdefault(key, []).append(int(score))
    return scores


def expert_agreement(experts, rows, objectives, correctors, per_judge: dict, mode: str, source: str) -> dict:
    """Spearman's rho between each judge and the mean expert score, per objective."""
    judged_value = "the judge's 0-10 score" if mode == "score" else \
        "the response's result against the golden answer (loss 0 < tie 1 < win 2)"
    result = {"source": source if "://" not in source else source.split("://", 1)[0] + "://…",
              "measure": f"Spearman's rho between {judged_value} and the mean expert score",
              "ratings": sum(len(v) for v in experts.values()), "judges": {}}
    sides = ["original", *[c.name for c in correctors]]
    for name, summary in per_judge.items():
        per_obj = {}
        for obj in objectives:
            xs, ys, seen = [], [], set()
            for side in sides:
                values = summary["outcomes"].get((obj.key, side), [])
                for i, (_, row) in enumerate(rows):
                    text = row["draft"] if side == "original" else row["responses"][side]
                    key = (normalise_whitespace(row["query"]), normalise_whitespace(text), obj.key)
                    if (i, key) in seen:  # a correction that copies the draft is one rated response
                        continue
                    seen.add((i, key))
                    if key in experts and i < len(values) and values[i] is not None:
                        xs.append(values[i])
                        ys.append(statistics.fmean(experts[key]))
            rho = stats.spearman(xs, ys) if xs else None
            per_obj[obj.key] = {"n": len(xs), "spearman": rho}
        result["judges"][name] = per_obj
    if not any(v["n"] for per in result["judges"].values() for v in per.values()):
        log.warning("--ratings-db: no rated response matches a judged one (same query, same text, same "
                    "objective key)")
    return result
