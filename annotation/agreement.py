"""Inter-annotator agreement: Krippendorff's alpha per objective.

Pure functions over rating rows, so the numbers can be checked without a database. Alpha is
computed by the ``krippendorff`` package at the ordinal level over the value domain 0..3, with
responses as units and missing ratings allowed (not every annotator rates every response).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Hashable, Iterable, Sequence

VALUE_DOMAIN = (0, 1, 2, 3)


@dataclass(frozen=True)
class Agreement:
    """``alpha`` is None where it is undefined: no response has two ratings, or every rating
    has the same value (no expected disagreement to compare with)."""

    alpha: float | None
    units: int  # responses with at least two ratings on this objective
    annotators: int  # annotators with at least one rating on this objective

    def to_dict(self) -> dict:
        return asdict(self)


def alpha_by_objective(rows: Iterable[tuple[str, Hashable, Hashable, int]],
                       objectives: Sequence[str] = ()) -> dict[str, Agreement]:
    """``rows`` are ``(objective, unit, annotator, score)``; one result per objective.

    Objectives listed in ``objectives`` come first (and appear even with no ratings); others
    follow in order of first appearance.
    """
    import numpy as np
    import krippendorff

    by_obj: dict[str, dict[Hashable, dict[Hashable, int]]] = {k: {} for k in objectives}
    for objective, unit, annotator, score in rows:
        by_obj.setdefault(objective, {}).setdefault(unit, {})[annotator] = int(score)
    out: dict[str, Agreement] = {}
    for objective, units in by_obj.items():
        annotators = sorted({a for scores in units.values() for a in scores}, key=str)
        pairable = [scores for scores in units.values() if len(scores) >= 2]
        alpha = None
        if pairable:
            index = {a: i for i, a in enumerate(annotators)}
            data = np.full((len(annotators), len(pairable)), np.nan)
            for j, scores in enumerate(pairable):
                for a, s in scores.items():
                    data[index[a], j] = s
            if len({s for scores in pairable for s in scores.values()}) > 1:
                value = krippendorff.alpha(reliability_data=data, level_of_measurement="ordinal",
                                           value_domain=list(VALUE_DOMAIN))
                alpha = None if math.isnan(value) else float(value)
        out[objective] = Agreement(alpha=alpha, units=len(pairable), annotators=len(annotators))
    return out


def agreement_table(results: dict[str, Agreement]) -> list[list]:
    """Rows ``[objective, alpha (3 decimals or "n/a"), units, annotators]`` for printing."""
    return [[k, "n/a" if a.alpha is None else f"{a.alpha:.3f}", a.units, a.annotators]
            for k, a in results.items()]
