"""Statistics of an evaluation as pure numpy functions: bootstrap intervals, length-controlled
win rates, rank correlation, agreement. No I/O, no model, no network.

Bootstrap. Paired over queries: one resample draws n rows (queries) with replacement and keeps
every quantity of a drawn row together, so the draft's and the corrections' outcomes on the
same query, on every objective, move together: the interval of a difference (the advantage)
and of an average over objectives (the paper's "Avg.") account for their correlation.
Percentile intervals; seeded (``numpy.random.default_rng``). The draws are those of
``scipy.stats.bootstrap(..., paired=True, batch=chunk, rng=default_rng(seed))``: chunks of
``rng.integers(0, n, (chunk, n))``. :func:`resample_counts` turns each chunk into a matrix of
how often each row was drawn, so every ratio statistic (wins over judgments, whatever the
denominator) of every resample is one matrix product (:func:`joint_bootstrap`).
:func:`bootstrap_means_loop` is the plain Python loop over resamples (same draws, same result);
``bench/bench_bootstrap.py`` compares the two.

Length control (:class:`LCProblem`, :func:`l1_logistic`): AlpacaEval 2's ``length_controlled_v1``
GLM (Dubois et al. 2024, arXiv 2404.04475; ``alpaca_eval/metrics/glm_winrate.py``), fitted
separately for each response side against the golden answer (as AlpacaEval fits each model
against its baseline)::

    P(side preferred over golden) = sigmoid(theta_0 + theta_1 * tanh(delta / sd(delta)))

with ``delta`` = the response's length minus the golden answer's, in characters (``len``), and
``sd`` the sample standard deviation (ddof 1) of the deltas in the fit. The outcome is 1 for a
win, 0.5 for a tie and 0 for a loss (a continuous target, as AlpacaEval's preference). The fit
is AlpacaEval's: logistic regression with an L1 penalty on both coefficients and no separate
intercept (their liblinear ``fit_intercept=False`` with a constant column), ``C`` chosen from
``numpy.logspace(-4, 4, 10)`` (``LogisticRegressionCV``'s default grid) by 5-fold grouped
cross-validation on the continuous log loss (``GroupKFold`` fold assignment), then refitted on
all rows. The length-controlled win rate is ``sigmoid(theta_0)``: the predicted preference for
a response as long as the golden answer. Not used from AlpacaEval: the instruction-difficulty
term and the regularisation towards "gamed" baselines, which need AlpacaEval's precomputed
annotations of its own instruction set (nothing of the kind exists for these test sets).
Intervals refit the GLM on every bootstrap resample (Newton steps warm-started from the full
fit, to convergence) with the ``C`` chosen on the full sample.
"""
from __future__ import annotations

import math

import numpy as np

DEFAULT_RESAMPLES = 10_000
DEFAULT_CHUNK = 256


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


def resample_counts(n: int, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, chunk: int = DEFAULT_CHUNK):
    """Yield ``(b, n)`` matrices: how often each of the n rows is drawn in each of b resamples.

    The draws are ``rng.integers(0, n, (b, n))`` chunk after chunk from
    ``numpy.random.default_rng(seed)`` (the stream does not depend on the chunk size), the same
    as :func:`bootstrap_means` and as ``scipy.stats.bootstrap(paired=True)`` with that generator.
    """
    rng = np.random.default_rng(seed)
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        idx = rng.integers(0, n, size=(b, n))
        flat = (idx + (np.arange(b) * n)[:, None]).ravel()
        yield np.bincount(flat, minlength=b * n).reshape(b, n).astype(float)


def joint_bootstrap(numerators, denominators, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                    lc_problems=(), chunk: int = DEFAULT_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """One paired resampling of the n queries for every statistic at once.

    ``numerators`` and ``denominators`` are (n, m) arrays: statistic j of a resample is
    ``sum(count_i * num_ij) / sum(count_i * den_ij)`` (NaN where the denominator is 0), which
    covers every win rate (wins, or wins plus ties, over valid or over all judgments, per row
    of the sample). ``lc_problems`` are :class:`LCProblem` fits refitted on each resample.
    Returns ``(ratios (B, m), lc_rates (B, len(lc_problems)))``.
    """
    num = np.asarray(numerators, dtype=float)
    den = np.asarray(denominators, dtype=float)
    if num.ndim == 1:
        num, den = num[:, None], den[:, None]
    n = num.shape[0]
    ratios = np.full((n_resamples, num.shape[1]), np.nan)
    lc = np.full((n_resamples, len(lc_problems)), np.nan)
    if n == 0:
        return ratios, lc
    pos = 0
    chunk = max(1, min(chunk, 4_000_000 // n))  # at most ~4 million drawn indices at a time, however many rows
    for counts in resample_counts(n, n_resamples, seed, chunk):
        b = counts.shape[0]
        top, bottom = counts @ num, counts @ den
        with np.errstate(invalid="ignore", divide="ignore"):
            ratios[pos:pos + b] = np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1), np.nan)
        for j, problem in enumerate(lc_problems):
            lc[pos:pos + b, j] = problem.refit(counts[:, problem.rows])
        pos += b
    return ratios, lc


# --------------------------------------------------------------------------- length control

LC_CS = np.logspace(-4, 4, 10)   # LogisticRegressionCV's default grid (Cs=10), as AlpacaEval uses it
LC_FOLDS = 5                      # AlpacaEval's length_controlled_v1: kwargs n_splits=5
LC_C_WITHOUT_CV = 100.0           # AlpacaEval's C when it does not cross-validate (n_splits=0)


def _sigmoid(z):
    return np.exp(-np.logaddexp(0.0, -z))


def _lc_features(delta, weights):
    """tanh(delta / sd) per resample: ``weights`` (b, r) frequency weights, sd with ddof 1."""
    total = weights.sum(axis=1, keepdims=True)
    mean = (weights * delta).sum(axis=1, keepdims=True) / np.where(total > 0, total, 1)
    var = (weights * (delta - mean) ** 2).sum(axis=1, keepdims=True) / np.where(total > 1, total - 1, 1)
    sd = np.sqrt(var)
    ok = (total > 1) & (sd > 0)
    return np.where(ok, np.tanh(delta / np.where(ok, sd, 1.0)), 0.0), np.where(ok, sd, np.nan)[:, 0]


def _objective(w, weights, x, y, lam):
    z = w[:, :1] + w[:, 1:] * x
    loss = (weights * (np.logaddexp(0.0, z) - y * z)).sum(axis=1)
    return loss + lam * np.abs(w).sum(axis=1)


def l1_logistic(weights, x, y, lam, w0=None, max_iter: int = 100, tol: float = 1e-10) -> np.ndarray:
    """Minimise ``sum_i weights_i * logloss(y_i, sigmoid(w0 + w1 * x_i)) + lam * (|w0| + |w1|)``
    for b problems at once (rows of ``weights`` and ``x``; ``y`` in [0, 1] shared; ``lam`` a
    scalar or one per problem). Proximal Newton: each step minimises the quadratic model plus
    the L1 term exactly (coordinate descent on the 2x2 model), then backtracks until the
    objective decreases. Returns (b, 2): the constant's coefficient and the slope.
    """
    weights = np.atleast_2d(np.asarray(weights, dtype=float))
    b = weights.shape[0]
    x = np.broadcast_to(np.asarray(x, dtype=float), weights.shape)
    y = np.asarray(y, dtype=float)[None, :]
    lam = np.broadcast_to(np.asarray(lam, dtype=float), (b,)).copy()
    w = np.zeros((b, 2)) if w0 is None else np.array(np.broadcast_to(w0, (b, 2)), dtype=float)
    active = np.ones(b, dtype=bool)
    for _ in range(max_iter):
        if active.all():
            idx, W, X = slice(None), weights, x
        else:
            idx = np.flatnonzero(active)
            if idx.size == 0:
                break
            W, X = weights[idx], x[idx]
        wa = w[idx]
        p = 1.0 / (1.0 + np.exp(-np.clip(wa[:, :1] + wa[:, 1:] * X, -500, 500)))
        r = W * (p - y)
        h = W * p * (1 - p)
        hx = h * X
        g = np.stack([r.sum(axis=1), np.einsum("ij,ij->i", r, X)], axis=1)
        h00, h01, h11 = h.sum(axis=1) + 1e-12, hx.sum(axis=1), np.einsum("ij,ij->i", hx, X) + 1e-12
        la = lam[idx]
        # exact minimiser of the 2-variable quadratic + L1 model: where the Newton point keeps
        # the signs of the current coefficients, it is the smooth solve; else coordinate descent
        det = h00 * h11 - h01 * h01
        sgn = np.sign(wa)
        ga, gb = g[:, 0] + la * sgn[:, 0], g[:, 1] + la * sgn[:, 1]
        v = wa - np.stack([(h11 * ga - h01 * gb), (h00 * gb - h01 * ga)], axis=1) / det[:, None]
        smooth = (det > 0) & np.all(sgn != 0, axis=1) & np.all(np.sign(v) == sgn, axis=1)
        hard = np.flatnonzero(~smooth)
        if hard.size:
            v[hard] = _cd_quadratic(wa[hard], g[hard], h00[hard], h01[hard], h11[hard], la[hard])
        step = v - wa
        # small steps (near the optimum, where Newton converges quadratically) are taken whole;
        # larger ones backtrack until the penalised objective decreases
        t = np.ones(wa.shape[0])
        big = np.flatnonzero(np.max(np.abs(step), axis=1) > 0.25)
        if big.size:
            fb = _objective(wa[big], W[big], X[big], y, la[big])
            tb = np.ones(big.size)
            for _ in range(40):
                fnew = _objective(wa[big] + tb[:, None] * step[big], W[big], X[big], y, la[big])
                worse = fnew > fb + 1e-10 * np.abs(fb)
                if not worse.any():
                    break
                tb = np.where(worse, tb / 2, tb)
            t[big] = tb
        w[idx] = wa + t[:, None] * step
        active[idx] = np.max(np.abs(t[:, None] * step), axis=1) > tol
    return w


def _cd_quadratic(w, g, h00, h01, h11, lam, sweeps: int = 100):
    """Minimise ``g.d + d'Hd/2 + lam*|w + d|_1`` over v = w + d by coordinate descent (2 variables)."""
    v = w.copy()
    for _ in range(sweeps):
        t0 = w[:, 0] - (g[:, 0] + h01 * (v[:, 1] - w[:, 1])) / h00
        v[:, 0] = np.sign(t0) * np.maximum(np.abs(t0) - lam / h00, 0.0)
        t1 = w[:, 1] - (g[:, 1] + h01 * (v[:, 0] - w[:, 0])) / h11
        v[:, 1] = np.sign(t1) * np.maximum(np.abs(t1) - lam / h11, 0.0)
    return v


def lc_folds(r: int, n_splits: int = LC_FOLDS) -> np.ndarray:
    """Fold of each of r rows as ``sklearn.model_selection.GroupKFold(n_splits)`` assigns one
    group per row (AlpacaEval groups each annotation's two duplicated rows)."""
    return (r - 1 - np.arange(r)) % n_splits


def lc_choose_c(x, y, n_splits: int = LC_FOLDS) -> float:
    """``C`` as AlpacaEval's ``LogisticRegressionCV`` picks it: the grid value with the lowest
    held-out continuous log loss summed over the folds (the first on ties)."""
    r = len(y)
    if r < n_splits:
        return LC_C_WITHOUT_CV
    folds = lc_folds(r, n_splits)
    train = np.stack([(folds != k).astype(float) for k in range(n_splits) for _ in LC_CS])
    lam = np.array([1.0 / c for _ in range(n_splits) for c in LC_CS])
    w = l1_logistic(train, np.broadcast_to(x, train.shape), y, lam)
    scores = np.zeros(len(LC_CS))
    for j, (k, ci) in enumerate((k, ci) for k in range(n_splits) for ci in range(len(LC_CS))):
        held = folds == k
        p = np.clip(_sigmoid(w[j, 0] + w[j, 1] * x[held]), 1e-15, 1 - 1e-15)
        scores[ci] += -np.mean(y[held] * np.log(p) + (1 - y[held]) * np.log(1 - p))
    return float(LC_CS[int(np.argmin(scores))])


class LCProblem:
    """One length-controlled fit: a side's outcomes against the golden answer on given rows.

    ``rows``: indices of the queries in the fit (into the bootstrap's n queries); ``y``: 1 win,
    0.5 tie, 0 loss; ``delta``: response length minus golden length (characters). The full fit
    runs at construction (``rate``, ``coef``, ``C``, ``sd``); :meth:`refit` refits on resamples.
    """

    def __init__(self, rows, y, delta):
        self.rows = np.asarray(rows, dtype=int)
        self.y = np.asarray(y, dtype=float)
        self.delta = np.asarray(delta, dtype=float)
        self.n = len(self.rows)
        if self.n == 0:
            self.rate = self.C = self.sd = None
            self.coef = None
            return
        x, sd = _lc_features(self.delta[None, :], np.ones((1, self.n)))
        self.sd = None if np.isnan(sd[0]) else float(sd[0])
        self.C = lc_choose_c(x[0], self.y)
        self._w = l1_logistic(np.ones((1, self.n)), x, self.y, 1.0 / self.C)
        self.coef = [float(self._w[0, 0]), float(self._w[0, 1])]
        self.rate = float(_sigmoid(self._w[0, 0]))

    def refit(self, weights) -> np.ndarray:
        """Length-controlled rates for resamples given as (b, n_rows) frequency weights."""
        if self.n == 0:
            return np.full(weights.shape[0], np.nan)
        x, _ = _lc_features(self.delta[None, :], weights)
        w = l1_logistic(weights, x, self.y, 1.0 / self.C, w0=self._w[0], tol=1e-7)
        out = _sigmoid(w[:, 0])
        return np.where(weights.sum(axis=1) > 0, out, np.nan)

    def as_dict(self) -> dict:
        return {"n": self.n, "C": self.C, "sd_chars": self.sd,
                "coef_const": None if self.coef is None else self.coef[0],
                "coef_length": None if self.coef is None else self.coef[1], "win_rate": self.rate}


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
