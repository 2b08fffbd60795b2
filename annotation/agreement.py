"""Inter-annotator agreement: Krippendorff's alpha per objective.

Pure functions over rating rows, so the numbers can be checked without a database. Alpha is
Krippendorff's alpha at the ordinal level over the protocol's value domain (0..3 for IMHI), with
responses as units and missing ratings allowed (not every annotator rates every response),
computed from the coincidence matrix; the tests check it against the ``krippendorff`` package.
"""
from __future__ import annotations

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
    follow in order of first appearance. Alpha comes from the coincidence matrix
    (:func:`ordinal_alpha`), which equals the ``krippendorff`` package's ordinal alpha (the
    tests check it) without building an annotators x units matrix.
    """
    by_obj: dict[str, dict[Hashable, dict[Hashable, int]]] = {k: {} for k in objectives}
    for objective, unit, annotator, score in rows:
        by_obj.setdefault(objective, {}).setdefault(unit, {})[annotator] = int(score)
    out: dict[str, Agreement] = {}
    for objective, units in by_obj.items():
        annotators = {a for scores in units.values() for a in scores}
        counts = unit_counts(units.values(), domain)
        alpha = ordinal_alpha(counts) if counts.shape[0] else None
        out[objective] = Agreement(alpha=alpha, units=int(counts.shape[0]), annotators=len(annotators))
    return out


def alpha_from_counts(rows: Iterable[tuple[str, Hashable, int, int]], annotators: dict[str, int],
                      objectives: Sequence[str] = (), domain: Sequence[int] = VALUE_DOMAIN) -> dict[str, Agreement]:
    """Like :func:`alpha_by_objective`, from ``(objective, unit, score, how many raters gave it)``
    rows (a database can aggregate those) and the number of raters per objective."""
    import numpy as np

    index = {v: i for i, v in enumerate(domain)}
    cells: dict[str, tuple[dict, list, list, list]] = {k: ({}, [], [], []) for k in objectives}
    for objective, unit, score, n in rows:
        units, u_idx, v_idx, ns = cells.setdefault(objective, ({}, [], [], []))
        u_idx.append(units.setdefault(unit, len(units)))
        v_idx.append(index[int(score)])
        ns.append(n)
    out: dict[str, Agreement] = {}
    for objective, (units, u_idx, v_idx, ns) in cells.items():
        counts = np.zeros((len(units), len(domain)))
        if units:
            np.add.at(counts, (np.array(u_idx), np.array(v_idx)), np.array(ns, dtype=float))
        counts = counts[counts.sum(1) >= 2]
        alpha = ordinal_alpha(counts) if counts.shape[0] else None
        out[objective] = Agreement(alpha=alpha, units=int(counts.shape[0]), annotators=annotators.get(objective, 0))
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
    unit_of, value_of = [], []
    n = 0
    for scores in units:
        vals = scores.values() if isinstance(scores, dict) else scores
        if len(vals) < 2:
            continue
        for v in vals:
            unit_of.append(n)
            value_of.append(index[int(v)])
        n += 1
    counts = np.zeros((n, len(domain)))
    if n:
        np.add.at(counts, (np.array(unit_of), np.array(value_of)), 1)
    return counts


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


def _alpha_rows(o):
    """Ordinal alpha for a batch of coincidence matrices (reps x V x V); NaN where undefined."""
    import numpy as np

    n_c = o.sum(2)
    n = n_c.sum(1)
    cum = np.cumsum(n_c, 1)
    v = o.shape[1]
    lo = np.minimum.outer(np.arange(v), np.arange(v))
    hi = np.maximum.outer(np.arange(v), np.arange(v))
    between = cum[:, hi] - cum[:, lo] + n_c[:, lo]
    delta = (between - (n_c[:, :, None] + n_c[:, None, :]) / 2) ** 2
    d_e = (n_c[:, :, None] * n_c[:, None, :] * delta).sum((1, 2))
    d_o = (o * delta).sum((1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d_e > 0, 1 - (n - 1) * d_o / d_e, np.nan)


def bootstrap_interval(counts, reps: int = 1000, seed: int = 0, level: float = 0.95) -> list[float] | None:
    """Percentile interval of alpha over ``reps`` resamples of the units (with replacement).

    Alpha depends on the units only through their count vectors, and a study has few distinct
    ones (two raters on a 0-3 scale: at most 10), so a resample of n units is a multinomial
    draw over the distinct vectors, weighted by how often each occurs: the same distribution
    as resampling units one by one, at a cost independent of n.
    """
    import numpy as np

    n = counts.shape[0]
    if n < 2 or reps <= 0:
        return None
    patterns, freq = np.unique(counts, axis=0, return_counts=True)
    v = counts.shape[1]
    m = patterns.sum(1)
    per_pattern = (patterns[:, :, None] * patterns[:, None, :] - patterns[:, :, None] * np.eye(v)[None]) \
        / (m - 1)[:, None, None]
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, freq / n, size=reps).astype(float)
    vals = _alpha_rows((weights @ per_pattern.reshape(len(patterns), v * v)).reshape(reps, v, v))
    vals = vals[~np.isnan(vals)]
    if len(vals) < reps // 2:
        return None
    lo, hi = np.quantile(vals, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]  # full precision: displays round
