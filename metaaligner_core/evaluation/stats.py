"""Statistics of an evaluation as pure numpy functions: bootstrap intervals, length-controlled
win rates, rank correlation, agreement. No I/O, no model, no network.

Bootstrap (:func:`bootstrap_means`). Paired over queries: one resample draws n rows with
replacement and keeps every column of a drawn row together, so the draft's and the correction's
outcomes on the same query move as a pair and the interval of their difference (the advantage)
accounts for their correlation. Percentile intervals; seeded (``numpy.random.default_rng``).
:func:`bootstrap_means_loop` is the same computation as a plain Python loop over resamples (same
random draws, same result); the benchmark ``bench/bench_bootstrap.py`` compares the two.

Length control (:func:`length_controlled_win_rates`), in the manner of AlpacaEval 2's
length-controlled win rate (Dubois et al. 2024, arXiv 2404.04475): a logistic regression of
"the response beat the golden answer" on the length difference, then the win rate predicted
with the length term set to zero. What is fitted here, per judge and objective::

    logit P(win_{i,s}) = alpha_s + beta * tanh((len_{i,s} - len_golden_i) / sd)

over the rows i judged validly for each response side s (the draft and every corrector), with
lengths in words (whitespace split) and ``sd`` the standard deviation of all the length
differences in the fit. The length-controlled win rate of side s is ``sigmoid(alpha_s)``: the
predicted win rate of that side for a response as long as the golden answer. Differences from
AlpacaEval 2, on purpose: its length coefficient is per model against one baseline and it adds
an instruction-difficulty term estimated from many models; here the sides are responses to
the same queries judged by the same judge, so one length coefficient (the judge's length
preference) is shared by all sides — which keeps it identifiable when every correction is
longer than the golden answer — and there is no difficulty term. An L2 penalty on beta
(``l2``, default 1, negligible with hundreds of judgments) keeps the fit finite when a judge
separates wins and losses perfectly by length. Ties count as non-wins, as in the raw win rate.
"""
from __future__ import annotations

import math

import numpy as np

DEFAULT_RESAMPLES = 1000


def bootstrap_means(columns, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                    chunk: int = 256) -> np.ndarray:
    """Means of each column over ``n_resamples`` paired resamples of the rows: shape (B, k).

    ``columns`` is an (n, k) array (or a list of k equal-length sequences given as columns):
    row i is one query, column j one quantity (e.g. the draft's and the correction's win
    indicators). The index matrix is drawn ``chunk`` resamples at a time to bound memory.
    """
    x = _as_matrix(columns)
    n, k = x.shape
    if n == 0:
        return np.full((n_resamples, k), np.nan)
    rng = np.random.default_rng(seed)
    out = np.empty((n_resamples, k))
    chunk = max(1, min(chunk, 4_000_000 // n))  # at most ~32 MB of indices at a time, however many rows
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        idx = rng.integers(0, n, size=(b, n))
        for j in range(k):  # one gather per column keeps the intermediate (b, n), not (b, n, k)
            out[start:start + b, j] = x[idx, j].mean(axis=1)
    return out


def bootstrap_means_loop(columns, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> list[list[float]]:
    """:func:`bootstrap_means` as a plain Python loop (same draws, same numbers): the reference."""
    x = _as_matrix(columns).tolist()
    n = len(x)
    k = len(x[0]) if n else 0
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_resamples):
        idx = rng.integers(0, n, size=n).tolist()
        sums = [0.0] * k
        for i in idx:
            row = x[i]
            for j in range(k):
                sums[j] += row[j]
        out.append([s / n for s in sums])
    return out


def _as_matrix(columns) -> np.ndarray:
    if isinstance(columns, np.ndarray):
        x = columns.astype(float)
        return x.reshape(-1, 1) if x.ndim == 1 else x
    cols = [np.asarray(c, dtype=float) for c in columns]
    if not cols:
        return np.zeros((0, 0))
    return np.stack(cols, axis=1)


def percentile_interval(samples, level: float = 0.95) -> list[float] | None:
    """``[lo, hi]`` percentile interval of bootstrap samples (None when there are none)."""
    s = np.asarray(samples, dtype=float)
    s = s[~np.isnan(s)]
    if s.size == 0:
        return None
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(s, [tail, 100 - tail])
    return [float(lo), float(hi)]


def paired_intervals(original, aligned, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                     level: float = 0.95) -> dict:
    """95 % intervals of the two win rates and their difference over paired rows.

    ``original`` and ``aligned`` are per-row win indicators (1 win, 0 tie or loss) over the
    same rows. Returns ``{"win_rate_original": [lo, hi], "win_rate_aligned": [lo, hi],
    "advantage": [lo, hi]}`` (values None when there are no rows).
    """
    if len(original) != len(aligned):
        raise ValueError("original and aligned must cover the same rows")
    if not len(original):
        return {"win_rate_original": None, "win_rate_aligned": None, "advantage": None}
    means = bootstrap_means([original, aligned], n_resamples, seed)
    return {"win_rate_original": percentile_interval(means[:, 0], level),
            "win_rate_aligned": percentile_interval(means[:, 1], level),
            "advantage": percentile_interval(means[:, 1] - means[:, 0], level)}


def mean_interval(values, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap interval of one mean (None without values)."""
    if not len(values):
        return None
    return percentile_interval(bootstrap_means([values], n_resamples, seed)[:, 0], level)


# --------------------------------------------------------------------------- length control

def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def length_controlled_win_rates(data: dict[str, tuple], l2: float = 1.0, max_iter: int = 100) -> dict:
    """Fit the shared-length-coefficient logistic model (module docstring) and return
    ``{"win_rates": {side: rate or None}, "beta": float or None, "sd": float or None, "n": int}``.

    ``data[side] = (wins, length_differences)``: per valid row, 1 for a win (0 for a tie or a
    loss) and the response's length minus the golden answer's. A side without rows gets None.
    """
    sides = [s for s, (w, _) in data.items() if len(w)]
    out = {"win_rates": {s: None for s in data}, "beta": None, "sd": None, "n": 0}
    if not sides:
        return out
    y = np.concatenate([np.asarray(data[s][0], dtype=float) for s in sides])
    d = np.concatenate([np.asarray(data[s][1], dtype=float) for s in sides])
    sd = float(d.std())
    if not sd > 0:
        sd = 1.0  # every difference equal: the length term is constant and beta stays ~0
    k = len(sides)
    x = np.zeros((len(y), k + 1))
    pos = 0
    for j, s in enumerate(sides):
        m = len(data[s][0])
        x[pos:pos + m, j] = 1.0
        pos += m
    x[:, k] = np.tanh(d / sd)
    w = np.zeros(k + 1)
    # the length coefficient carries the penalty; the intercepts only a tiny one, which keeps a
    # side with wins only (or losses only) finite without pulling the others towards 50 %
    penalty = np.full(k + 1, 1e-6)
    penalty[k] = l2
    for _ in range(max_iter):  # Newton-Raphson on the penalised log-likelihood (concave: converges)
        p = _sigmoid(np.clip(x @ w, -500, 500))
        grad = x.T @ (y - p) - penalty * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        w += step
        if np.max(np.abs(step)) < 1e-10:
            break
    for j, s in enumerate(sides):
        out["win_rates"][s] = float(_sigmoid(w[j]))
    out.update(beta=float(w[k]), sd=sd, n=int(len(y)))
    return out


# --------------------------------------------------------------------------- agreement

def rankdata(values) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as ``scipy.stats.rankdata``)."""
    a = np.asarray(values, dtype=float)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a))
    sorted_a = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y) -> float | None:
    """Spearman's rank correlation (Pearson on average ranks); None with < 2 pairs or no spread."""
    if len(x) != len(y):
        raise ValueError("x and y must have the same length")
    if len(x) < 2:
        return None
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return None if den == 0 else float((rx * ry).sum() / den)


def krippendorff_alpha(reliability, level: str = "ordinal") -> float | None:
    """Krippendorff's alpha (``krippendorff`` package) over coders x units, NaN = missing; None
    where it is undefined (fewer than two paired values, or no variation at all)."""
    import krippendorff

    data = np.asarray(reliability, dtype=float)
    paired_units = (np.sum(~np.isnan(data), axis=0) >= 2).sum() if data.size else 0
    if paired_units == 0:
        return None
    values = data[~np.isnan(data)]
    if np.unique(values).size < 2:
        return None
    try:
        a = float(krippendorff.alpha(reliability_data=data, level_of_measurement=level))
    except (ValueError, ZeroDivisionError):
        return None
    return None if math.isnan(a) else a


def percent_agreement(a, b) -> float | None:
    """Share of units where both coders gave the same value (over units both coded)."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    return sum(x == y for x, y in pairs) / len(pairs) if pairs else None
