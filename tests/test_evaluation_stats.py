"""Bootstrap, length control, agreement and correction behaviour: pure functions, no model, no network."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from metaaligner_core.evaluation import metrics, stats
from metaaligner_core.evaluation.metrics import FAILED, INVALID, LOSS, TIE, WIN


def test_vectorised_bootstrap_equals_the_plain_loop():
    rng = random.Random(3)
    cols = [[rng.random() < 0.3 for _ in range(57)], [rng.random() < 0.6 for _ in range(57)]]
    fast = stats.bootstrap_means(cols, 1000, seed=11, chunk=97)  # a chunk size that does not divide 1000
    slow = np.array(stats.bootstrap_means_loop(cols, 1000, seed=11))
    assert fast.shape == (1000, 2)
    assert np.allclose(fast, slow)
    assert not np.allclose(fast, stats.bootstrap_means(cols, 1000, seed=12))


def test_percentile_interval_of_a_known_sample():
    assert stats.percentile_interval(list(range(101))) == pytest.approx([2.5, 97.5])
    assert stats.percentile_interval([]) is None


def test_paired_interval_covers_the_true_rate_in_a_seeded_simulation():
    """200 simulated evaluations of 300 queries with known rates: the 95 % intervals of both
    rates and of the advantage cover the true values about 95 % of the time."""
    rng = np.random.default_rng(2024)
    p_orig, p_aligned = 0.35, 0.55
    covered = {"win_rate_original": 0, "win_rate_aligned": 0, "advantage": 0}
    truth = {"win_rate_original": p_orig, "win_rate_aligned": p_aligned, "advantage": p_aligned - p_orig}
    runs = 200
    for r in range(runs):
        o = (rng.random(300) < p_orig).astype(float)
        a = (rng.random(300) < p_aligned).astype(float)
        ci = stats.paired_intervals(o, a, 1000, seed=r)
        for k, (lo, hi) in ci.items():
            covered[k] += lo <= truth[k] <= hi
    for k, c in covered.items():
        assert 0.90 <= c / runs <= 0.99, (k, c)


def test_paired_resampling_keeps_the_pair_together():
    # identical columns: every resample has the same mean in both, so the advantage is exactly 0
    x = [1, 0, 1, 1, 0, 0, 1]
    ci = stats.paired_intervals(x, x, 1000, seed=0)
    assert ci["advantage"] == [0.0, 0.0]
    assert ci["win_rate_original"] == ci["win_rate_aligned"]
    assert stats.paired_intervals([], [], 1000)["advantage"] is None


def _lc(y, delta):
    return stats.LCProblem(np.arange(len(y)), y, delta)


def test_length_control_recovers_a_known_logistic_model():
    rng = np.random.default_rng(5)
    a, b, sd, n = 0.4, 1.5, 300.0, 20000
    d = rng.normal(100, sd, n)
    p = 1 / (1 + np.exp(-(a + b * np.tanh(d / sd))))
    fit = _lc((rng.random(n) < p).astype(float), d)
    assert fit.coef[1] == pytest.approx(b, abs=0.1)
    assert fit.rate == pytest.approx(1 / (1 + math.exp(-a)), abs=0.02)
    assert fit.sd == pytest.approx(sd, rel=0.02)


def test_length_control_equals_the_ties_half_rate_when_lengths_match():
    # no length difference: the length column is 0, and the fit is the mean preference (ties 1/2),
    # up to the L1 penalty's pull at the C chosen by cross-validation
    y = [1, 0, 0, 1, 1, 0, 0.5, 0] * 20
    fit = _lc(y, [0] * len(y))
    assert fit.rate == pytest.approx(np.mean(y), abs=0.01)
    assert fit.coef[1] == 0.0
    empty = _lc([], [])
    assert empty.rate is None and empty.as_dict()["win_rate"] is None


def test_length_control_removes_a_pure_length_preference():
    """A judge that prefers whatever is longer (and nothing else): drafts are mostly shorter than
    the golden answer, corrections mostly longer. Raw: a large advantage; length-controlled: both
    sides near 50 % (the judge's preference at equal length), so close to no advantage."""
    rng = np.random.default_rng(0)
    sides = {}
    for side, mean in (("original", -250.0), ("aligned", 250.0)):
        d = rng.normal(mean, 300, 1500)
        p = 1 / (1 + np.exp(-4 * np.tanh(d / 300)))
        sides[side] = ((rng.random(1500) < p).astype(float), d)
    raw = sides["aligned"][0].mean() - sides["original"][0].mean()
    lo, la = _lc(*sides["original"]), _lc(*sides["aligned"])
    assert raw > 0.5
    assert abs(lo.rate - 0.5) < 0.06 and abs(la.rate - 0.5) < 0.06 and abs(la.rate - lo.rate) < 0.08
    assert lo.coef[1] > 3 and la.coef[1] > 3


def test_l1_logistic_solves_many_problems_at_once_like_one_at_a_time():
    rng = np.random.default_rng(1)
    x = np.tanh(rng.normal(0, 1, 50))
    y = (rng.random(50) < 0.6).astype(float)
    weights = rng.integers(0, 3, (4, 50)).astype(float)
    lam = np.array([0.01, 0.5, 5.0, 100.0])
    together = stats.l1_logistic(weights, x, y, lam)
    for j in range(4):
        alone = stats.l1_logistic(weights[j:j + 1], x, y, lam[j])
        assert together[j] == pytest.approx(alone[0], abs=1e-8)
    # a huge penalty zeroes both coefficients (the L1 optimum is exactly 0)
    assert list(together[3]) == [0.0, 0.0]


def test_resample_counts_are_the_bootstrap_draws():
    counts = np.concatenate(list(stats.resample_counts(13, 300, seed=9, chunk=64)))
    idx = np.random.default_rng(9).integers(0, 13, (300, 13))
    assert counts.shape == (300, 13) and (counts.sum(axis=1) == 13).all()
    assert (counts == np.stack([np.bincount(r, minlength=13) for r in idx])).all()


def test_spearman_and_ranks_with_ties():
    assert list(stats.rankdata([10, 20, 20, 5])) == [2, 3.5, 3.5, 1]
    assert stats.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1)
    assert stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    # hand computation: ranks x = 1,2,3,4,5 ; y = 2,1,4,3,5 -> rho = 1 - 6*sum(d^2)/(n(n^2-1)) = 1 - 6*4/120
    assert stats.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert stats.spearman([1], [2]) is None and stats.spearman([1, 1], [2, 3]) is None


def test_krippendorff_alpha_and_percent_agreement():
    assert stats.krippendorff_alpha([[0, 1, 2, 2], [0, 1, 2, 2]]) == pytest.approx(1)
    assert stats.krippendorff_alpha([[1, 1], [1, 1]]) is None  # no variation: undefined
    assert stats.krippendorff_alpha([[0, np.nan], [np.nan, 1]]) is None  # no unit coded twice
    assert stats.percent_agreement([0, 1, 2, None], [0, 2, 2, 1]) == pytest.approx(2 / 3)


def test_win_rates_both_ways():
    original = [WIN, LOSS, INVALID, TIE, FAILED, WIN]
    aligned = [WIN, WIN, WIN, INVALID, WIN, LOSS]
    r = metrics.win_rates(original, aligned)
    # valid-only: rows 0, 1, 5 -> original 2/3, aligned 2/3
    assert r["n"] == 3 and r["win_rate_original"] == pytest.approx(2 / 3) and r["win_rate_aligned"] == pytest.approx(2 / 3)
    # paper: every row with no failed call (0,1,2,3,5) in the denominator, invalid = non-win
    assert r["n_paper"] == 5
    assert r["win_rate_original_paper"] == pytest.approx(2 / 5) and r["win_rate_aligned_paper"] == pytest.approx(3 / 5)
    assert r["advantage_paper"] == pytest.approx(1 / 5)


def test_position_consistency_and_head_to_head_rates():
    pc = metrics.position_consistency([(WIN, LOSS), (WIN, WIN), (TIE, TIE), (INVALID, WIN), (LOSS, LOSS), (WIN, TIE)])
    assert pc == {"consistent": 3, "n": 5, "rate": 0.6}
    hh = metrics.outcome_rates([WIN, LOSS, LOSS, TIE, INVALID, FAILED])
    assert (hh["wins"], hh["losses"], hh["n"], hh["loss_rate"]) == (1, 2, 4, 0.5)


def test_correction_behaviour_copy_edit_length():
    drafts = ["a b c d", "one two", "x  y\n", "keep this"]
    fixed = ["a b c d e f", "one two", "x y", "totally new words here"]
    b = metrics.correction_behaviour(drafts, fixed, ["g g g"] * 4)
    assert b["copies"] == 2 and b["copy_rate"] == 0.5  # whitespace-only change counts as a copy
    assert b["length_changes"] == [2, 0, 0, 2]
    assert b["length"]["mean_change"] == 1 and b["length"]["mean_golden"] == 3
    # difflib word ratio: 2*4/(4+6) = 0.8 -> 0.2 changed ; copies 0 ; disjoint -> 1
    assert metrics.edit_size("a b c d", "a b c d e f") == pytest.approx(0.2)
    assert b["edit_size"]["max"] == 1.0 and b["edit_size"]["min"] == 0.0
    assert b["edit_size"]["histogram"]["0 (copy)"] == 2 and b["edit_size"]["histogram"]["[0.75, 1]"] == 1
