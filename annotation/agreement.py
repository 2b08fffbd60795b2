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
                       objectives: Sequence[str] = (), domain: Sequence[int] = VALUE_DOMAIN) -> dict[str, Agreement]:
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
                                           value_domain=list(domain))
                alpha = None if math.isnan(value) else float(value)
        out[objective] = Agreement(alpha=alpha, units=len(pairable), annotators=len(annotators))
    return out


def agreement_table(results: dict[str, Agreement]) -> list[list]:
    """Rows ``[objective, alpha (3 decimals or "n/a"), units, annotators]`` for printing."""
    return [[k, "n/a" if a.alpha is None else f"{a.alpha:.3f}", a.units, a.annotators]
            for k, a in results.items()]


# ----------------------------------------------------------------------------- fast alpha + bootstrap
# The dashboard needs a confidence interval: alpha recomputed on many resamples of the units.
# Alpha depends on the data only through the coincidence matrix, a sum over units, so each
# unit's contribution is computed once and a resample is a weighted sum (no re-tabulation).

def unit_counts(units: Iterable[dict], domain: Sequence[int] = VALUE_DOMAIN):
    """Units with at least two ratings as a (units x values) count matrix."""
    import numpy as np

    index = {v: i for i, v in enumerate(domain)}
    rows = []
    for scores in units:
        vals = list(scores.values()) if isinstance(scores, dict) else list(scores)
        if len(vals) < 2:
            continue
        row = [0] * len(domain)
        for v in vals:
            row[index[int(v)]] += 1
        rows.append(row)
    return np.array(rows, dtype=float).reshape(-1, len(domain))


def ordinal_alpha(counts, weights=None) -> float | None:
    """Krippendorff's ordinal alpha from a unit count matrix (optionally weighting units)."""
    import numpy as np

    if counts.shape[0] == 0:
        return None
    m = counts.sum(1)
    w = np.ones(len(m)) if weights is None else weights
    scaled = counts * (w / (m - 1))[:, None]
    o = scaled.T @ counts - np.diag(scaled.sum(0))
    n_c = o.sum(1)
    n = n_c.sum()
    if n <= 1:
        return None
    cum = np.cumsum(n_c)
    lo = np.minimum.outer(np.arange(len(n_c)), np.arange(len(n_c)))
    hi = np.maximum.outer(np.arange(len(n_c)), np.arange(len(n_c)))
    between = cum[hi] - cum[lo] + n_c[lo]
    delta = (between - (n_c[:, None] + n_c[None, :]) / 2) ** 2
    d_e = (np.outer(n_c, n_c) * delta).sum()
    if d_e <= 0:
        return None
    return float(1 - (n - 1) * (o * delta).sum() / d_e)


def bootstrap_interval(counts, reps: int = 1000, seed: int = 0, level: float = 0.95) -> list[float] | None:
    """Percentile interval of alpha over ``reps`` resamples of the units (with replacement)."""
    import numpy as np

    n = counts.shape[0]
    if n < 2 or reps <= 0:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(reps):
        a = ordinal_alpha(counts, np.bincount(rng.integers(0, n, n), minlength=n).astype(float))
        if a is not None:
            values.append(a)
    if len(values) < reps // 2:
        return None
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [round(float(lo), 4), round(float(hi), 4)]
