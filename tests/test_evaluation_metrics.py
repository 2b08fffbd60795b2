"""Algorithm 2 maths and reply parsing: pure functions, milliseconds, no model, no network."""
from __future__ import annotations

import pytest

from metaaligner_core.evaluation import metrics
from metaaligner_core.evaluation.metrics import FAILED, INVALID, LOSS, TIE, WIN


@pytest.mark.parametrize("reply, expected", [
    ("1", 1), ("2", 2), ("0", 0), (" 2\n", 2), ("2.", 2), ("**1**", 1), ('"0"', 0),
    ("Response 2", 2), ("RESPONSE 1 is better.", 1), ("Tie: 0", 0),
    ("Response 1 is better than Response 2", None),  # names both: the authors' scripts would count a win
    ("10", None), ("3", None), ("", None), ("I cannot decide.", None), (None, None), ("1 or 2", None),
])
def test_parse_choice(reply, expected):
    assert metrics.parse_choice(reply) == expected


@pytest.mark.parametrize("reply, expected", [
    ("7", 7.0), ("10", 10.0), ("0", 0.0), ("7.5", 7.5), ("Score: 8", 8.0), ("8/10", 8.0), ("6 out of 10", 6.0),
    ("11", None), ("between 6 and 7", None), ("", None), ("great answer", None), (None, None),
])
def test_parse_score(reply, expected):
    assert metrics.parse_score(reply) == expected


def test_outcome_follows_the_golden_position():
    # golden at 1: the response is at 2
    assert metrics.pairwise_outcome(2, golden_at=1) == WIN
    assert metrics.pairwise_outcome(1, golden_at=1) == LOSS
    # golden at 2: the response is at 1 (a judge that always says "1" wins here and loses above)
    assert metrics.pairwise_outcome(1, golden_at=2) == WIN
    assert metrics.pairwise_outcome(2, golden_at=2) == LOSS
    assert metrics.pairwise_outcome(0, golden_at=1) == TIE
    assert metrics.pairwise_outcome(0, golden_at=2) == TIE
    assert metrics.pairwise_outcome(None, golden_at=2) == INVALID
    with pytest.raises(ValueError):
        metrics.pairwise_outcome(1, golden_at=0)


def test_swap_consistency_rule():
    assert metrics.swap_outcome(WIN, WIN) == WIN
    assert metrics.swap_outcome(LOSS, LOSS) == LOSS
    assert metrics.swap_outcome(WIN, LOSS) == TIE  # position bias: the orders disagree
    assert metrics.swap_outcome(LOSS, WIN) == TIE
    assert metrics.swap_outcome(WIN, TIE) == TIE
    assert metrics.swap_outcome(TIE, TIE) == TIE
    assert metrics.swap_outcome(WIN, INVALID) == INVALID
    assert metrics.swap_outcome(INVALID, FAILED) == FAILED


def test_position_biased_judge_under_swap_gets_no_wins():
    # A judge that always answers "1": every response wins when golden is at 2 and loses at 1.
    outcomes = [metrics.swap_outcome(metrics.pairwise_outcome(1, 1), metrics.pairwise_outcome(1, 2))
                for _ in range(5)]
    assert outcomes == [TIE] * 5
    r = metrics.win_rates(outcomes, outcomes)
    assert r["win_rate_original"] == 0.0 and r["n"] == 5


def test_win_rates_ties_are_not_wins_and_advantage():
    original = [WIN, TIE, LOSS, LOSS]
    aligned = [WIN, WIN, TIE, WIN]
    r = metrics.win_rates(original, aligned)
    assert r["n"] == 4
    assert r["win_rate_original"] == pytest.approx(0.25)
    assert r["win_rate_aligned"] == pytest.approx(0.75)
    assert r["advantage"] == pytest.approx(0.5)
    assert r["original"] == {"wins": 1, "ties": 1, "losses": 2, "invalid": 0, "failed": 0}
    assert r["aligned"] == {"wins": 3, "ties": 1, "losses": 0, "invalid": 0, "failed": 0}


def test_invalid_and_failed_leave_n_on_both_sides():
    original = [WIN, INVALID, LOSS, WIN, FAILED]
    aligned = [WIN, WIN, FAILED, LOSS, WIN]
    r = metrics.win_rates(original, aligned)
    # only rows 0 and 3 are valid on both sides
    assert r["n"] == 2 and r["rows"] == 5
    assert r["win_rate_original"] == pytest.approx(1.0)
    assert r["win_rate_aligned"] == pytest.approx(0.5)
    assert r["advantage"] == pytest.approx(-0.5)
    assert r["original"]["invalid"] == 1 and r["original"]["failed"] == 1
    assert r["aligned"]["invalid"] == 0 and r["aligned"]["failed"] == 1


def test_no_valid_rows_gives_no_rate():
    r = metrics.win_rates([INVALID, FAILED], [WIN, WIN])
    assert r["n"] == 0 and r["win_rate_original"] is None and r["advantage"] is None
    with pytest.raises(ValueError):
        metrics.win_rates([WIN], [])
    with pytest.raises(ValueError):
        metrics.count(["maybe"])


def test_golden_position_is_deterministic_and_balanced():
    draws = [metrics.golden_position(7, row, "honesty", "aligned") for row in range(2000)]
    assert draws == [metrics.golden_position(7, row, "honesty", "aligned") for row in range(2000)]
    assert set(draws) == {1, 2}
    assert 900 < draws.count(1) < 1100
    other_seed = [metrics.golden_position(8, row, "honesty", "aligned") for row in range(2000)]
    assert draws != other_seed
    # draft and aligned comparisons of one row are drawn independently
    sides = [(metrics.golden_position(7, r, "honesty", "original"), metrics.golden_position(7, r, "honesty", "aligned"))
             for r in range(200)]
    assert any(a != b for a, b in sides)


def test_score_summary_mean_median_paired():
    r = metrics.score_summary([2, 4, INVALID, 9], [6, 8, 7, FAILED])
    assert r["n"] == 2
    assert r["mean_original"] == pytest.approx(3) and r["median_original"] == pytest.approx(3)
    assert r["mean_aligned"] == pytest.approx(7) and r["advantage"] == pytest.approx(4)
    assert r["original"] == {"invalid": 1, "failed": 0} and r["aligned"] == {"invalid": 0, "failed": 1}
    assert r["scores_original"] == [2, 4] and r["scores_aligned"] == [6, 8]
    r = metrics.score_summary([1, 2, 10], [5, 5, 6])
    assert r["median_original"] == 2 and r["mean_original"] == pytest.approx(13 / 3)
