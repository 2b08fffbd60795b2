"""Exports: ratings and final labels as JSONL/CSV, and preference pairs in the generic format
of build-dataset.

Pure functions over plain records (the store does the querying). Pairs follow DESIGN.md: for
every item, every pair of its responses in import order (``response_1`` is the earlier) and
every objective both responses were rated on, the examiner's final score where the item was
reviewed, else the mean submitted score, decides ``>``, ``<`` or ``=``. Every pair carries
``"objectives": {key: "Name: description"}`` (the protocol's text of each labelled objective),
so ``build-dataset`` needs no ``--objectives`` for a custom protocol.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import combinations
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from metaaligner_core.errors import MetaAlignerError
from metaaligner_core.io import csv_cell, write_csv, write_jsonl

RATING_FIELDS = ("item_id", "query", "response", "source", "annotator", "objective", "score", "note", "seconds",
                 "protocol", "protocol_version", "gold")
FINAL_FIELDS = ("item_id", "query", "response", "source", "objective", "ratings", "notes", "final_score",
                "decided_by", "reason", "protocol", "protocol_version", "gold")
def neutralise_cell(value) -> str:
    """Text for one CSV cell (see :func:`metaaligner_core.io.csv_cell`)."""
    return csv_cell(value)


def write_ratings(path: str | os.PathLike, records: Iterable[dict], fields=RATING_FIELDS,
                  what: str = "ratings") -> int:
    """Write rating records to ``.jsonl`` or ``.csv`` (by suffix), atomically and owner-only
    (mode 0600, as the database); returns the count."""
    path = Path(path)
    suffix = path.name.lower()
    if suffix.endswith(".jsonl"):
        return write_jsonl(path, records, private=True)
    if suffix.endswith(".csv"):
        return write_csv(path, fields, records, private=True)
    raise MetaAlignerError(f"{path}: {what} export must end in .jsonl or .csv")


def write_final(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Final labels (one row per item, response and objective) to ``.jsonl`` or ``.csv``."""
    return write_ratings(path, records, FINAL_FIELDS, "final labels")


@dataclass
class ScoredResponse:
    text: str
    scores: dict[str, list[int]] = field(default_factory=dict)  # objective -> submitted scores


@dataclass
class ScoredItem:
    item_id: str
    query: str
    responses: list[ScoredResponse]  # in import order


def compare_means(a: Sequence[int], b: Sequence[int]) -> str:
    """``>`` if mean(a) > mean(b), ``<`` if lower, ``=`` if equal (exact arithmetic)."""
    ma, mb = Fraction(sum(a), len(a)), Fraction(sum(b), len(b))
    return ">" if ma > mb else "<" if ma < mb else "="


def derive_pairs(items: Iterable[ScoredItem], objectives: Sequence[str] = ()) -> Iterator[dict]:
    """Generic preference records; label keys follow ``objectives`` order, then first appearance.

    A pair with no objective rated on both responses yields nothing.
    """
    order = {k: i for i, k in enumerate(objectives)}
    for item in items:
        for r1, r2 in combinations(item.responses, 2):
            common = [k for k in r1.scores if r1.scores[k] and r2.scores.get(k)]
            common.sort(key=lambda k: order.get(k, len(order)))
            if not common:
                continue
            labels = {k: compare_means(r1.scores[k], r2.scores[k]) for k in common}
            yield {"query": item.query, "response_1": r1.text, "response_2": r2.text,
                   "labels": labels, "item_id": item.item_id}


def pairs_from_scores(items, objectives: Sequence[str] = ()) -> Iterator[dict]:
    """Pairs from :class:`annotation.workflow.ItemScores`: per objective the examiner's final
    score where reviewed, else the mean submitted score; each pair carries the objectives' texts."""
    from .workflow import pair_score

    order = {k: i for i, k in enumerate(objectives)}
    for item in items:
        texts = {o.key: o.text for o in item.protocol.objectives}
        for r1, r2 in combinations(item.responses, 2):
            labels = {}
            for key in sorted(texts, key=lambda k: order.get(k, len(order))):
                a, b = pair_score(r1, key), pair_score(r2, key)
                if a is None or b is None:
                    continue
                labels[key] = ">" if a > b else "<" if a < b else "="
            if labels:
                yield {"query": item.query, "response_1": r1.text, "response_2": r2.text, "labels": labels,
                       "objectives": {k: texts[k] for k in labels}, "item_id": item.uid}


def write_pairs(path: str | os.PathLike, pairs: Iterable[dict]) -> int:
    path = Path(path)
    if not path.name.lower().endswith(".jsonl"):
        raise MetaAlignerError(f"{path}: pairs are written as JSON Lines (use a .jsonl file name)")
    return write_jsonl(path, pairs, private=True)
