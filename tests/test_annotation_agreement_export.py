"""Agreement and export as pure functions: no database, milliseconds."""
from __future__ import annotations

import csv
import json
import math

import krippendorff
import numpy as np
import pytest

from annotation.agreement import alpha_by_objective, agreement_table
from annotation.export import (ScoredItem, ScoredResponse, compare_means, derive_pairs, neutralise_cell,
                               write_pairs, write_ratings)
from metaaligner_core.errors import MetaAlignerError


def test_alpha_is_one_for_perfect_agreement_and_counts_units_and_annotators():
    rows = [("correctness", u, a, s) for u, s in [("r1", 0), ("r2", 3), ("r3", 2)] for a in ("x", "y", "z")]
    rows.append(("correctness", "r4", "x", 1))  # a single rating: not a pairable unit
    res = alpha_by_objective(rows, ["correctness", "informative"])
    assert res["correctness"].alpha == pytest.approx(1.0)
    assert (res["correctness"].units, res["correctness"].annotators) == (3, 3)
    assert res["informative"].to_dict() == {"alpha": None, "units": 0, "annotators": 0}
    assert list(res) == ["correctness", "informative"]


def test_alpha_matches_krippendorff_on_the_reliability_matrix_with_missing_values():
    # annotators x responses; nan = not rated
    matrix = np.array([
        [0, 1, 2, 3, 3, np.nan, 2, 1],
        [0, 2, 2, 3, np.nan, 1, 2, np.nan],
        [1, 1, np.nan, 2, 3, 0, np.nan, np.nan],
    ])
    rows = [("informative", f"resp{j}", f"ann{i}", int(matrix[i, j]))
            for i in range(3) for j in range(8) if not math.isnan(matrix[i, j])]
    rows.reverse()  # row order must not matter
    expected = krippendorff.alpha(reliability_data=matrix, level_of_measurement="ordinal", value_domain=[0, 1, 2, 3])
    res = alpha_by_objective(rows)["informative"]
    assert res.alpha == pytest.approx(expected)
    assert 0 < res.alpha < 1
    assert res.units == 7  # resp7 has one rating only
    # an ordinal scale: disagreeing by 0 vs 3 costs more than 1 vs 2
    near = alpha_by_objective([("o", u, a, s) for u, (s1, s2) in enumerate([(1, 2), (0, 0), (3, 3)])
                               for a, s in (("x", s1), ("y", s2))])["o"].alpha
    far = alpha_by_objective([("o", u, a, s) for u, (s1, s2) in enumerate([(0, 3), (1, 1), (2, 2)])
                              for a, s in (("x", s1), ("y", s2))])["o"].alpha
    assert near > far


def test_alpha_is_undefined_without_pairable_units_or_without_variation():
    assert alpha_by_objective([("o", "r1", "x", 2), ("o", "r2", "y", 2)])["o"].alpha is None
    same = alpha_by_objective([("o", "r1", "x", 2), ("o", "r1", "y", 2)])["o"]
    assert same.alpha is None and same.units == 1
    assert agreement_table({"o": same}) == [["o", "n/a", 1, 2]]


def test_compare_means_is_exact():
    assert compare_means([1, 1, 0], [2, 0, 0]) == "="  # 2/3 == 2/3, no float rounding
    assert compare_means([3], [1, 2]) == ">"
    assert compare_means([0, 1], [1]) == "<"


def test_pairs_follow_the_mean_score_rule_in_import_order():
    item = ScoredItem("i1", "the query", [
        ScoredResponse("first", {"correctness": [3, 2], "informative": [1], "professional": [2]}),
        ScoredResponse("second", {"correctness": [1, 1], "informative": [1]}),
        ScoredResponse("third", {"professional": [3, 3], "correctness": [2, 3]}),
    ])
    lonely = ScoredItem("i2", "only one", [ScoredResponse("solo", {"correctness": [3]})])
    disjoint = ScoredItem("i3", "disjoint", [ScoredResponse("a", {"correctness": [3]}),
                                             ScoredResponse("b", {"informative": [3]})])
    pairs = list(derive_pairs([item, lonely, disjoint], ["correctness", "informative", "professional"]))
    assert pairs == [
        {"query": "the query", "response_1": "first", "response_2": "second",
         "labels": {"correctness": ">", "informative": "="}, "item_id": "i1"},
        {"query": "the query", "response_1": "first", "response_2": "third",
         "labels": {"correctness": "=", "professional": "<"}, "item_id": "i1"},
        {"query": "the query", "response_1": "second", "response_2": "third",
         "labels": {"correctness": "<"}, "item_id": "i1"},
    ]


@pytest.mark.parametrize("value,expected", [
    ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"), ("+1+2", "'+1+2"), ("-2+3", "'-2+3"),
    ("@SUM(A1)", "'@SUM(A1)"), ("\t=1", "'\t=1"), ("plain text", "plain text"), ("a=b", "a=b"),
    (3, "3"), (None, ""),
])
def test_csv_cells_that_would_run_as_formulas_are_neutralised(value, expected):
    assert neutralise_cell(value) == expected


def test_ratings_csv_and_jsonl_exports(tmp_path):
    records = [{"item_id": "i1", "query": "=cmd|' /C calc'!A0", "response": "-1 is negative", "source": "@m",
                "annotator": "+ann", "objective": "correctness", "score": 2, "note": None, "seconds": 3.5}]
    assert write_ratings(tmp_path / "r.csv", records) == 1
    rows = list(csv.DictReader((tmp_path / "r.csv").open(encoding="utf-8")))
    assert rows == [{"item_id": "i1", "query": "'=cmd|' /C calc'!A0", "response": "'-1 is negative", "source": "'@m",
                     "annotator": "'+ann", "objective": "correctness", "score": "2", "note": "", "seconds": "3.5",
                     "protocol": "", "protocol_version": "", "gold": ""}]
    write_ratings(tmp_path / "r.jsonl", records)
    assert [json.loads(line) for line in (tmp_path / "r.jsonl").read_text(encoding="utf-8").splitlines()] == records
    with pytest.raises(MetaAlignerError, match=r"\.jsonl or \.csv"):
        write_ratings(tmp_path / "r.txt", records)
    with pytest.raises(MetaAlignerError, match="JSON Lines"):
        write_pairs(tmp_path / "p.csv", [])


def test_bootstrap_interval_matches_resampling_units_one_by_one():
    """The pattern-multinomial bootstrap has the distribution of resampling units directly."""
    from annotation.agreement import bootstrap_interval, ordinal_alpha, unit_counts

    rng = np.random.default_rng(3)
    units = []
    for _ in range(400):
        base = int(rng.integers(0, 4))
        units.append({a: int(np.clip(base + rng.integers(-1, 2), 0, 3)) for a in range(int(rng.integers(2, 4)))})
    counts = unit_counts(units)
    lo, hi = bootstrap_interval(counts, reps=4000, seed=1)
    n = len(counts)
    brute = [ordinal_alpha(counts, np.bincount(rng.integers(0, n, n), minlength=n).astype(float)) for _ in range(2000)]
    b_lo, b_hi = np.quantile(brute, [0.025, 0.975])
    assert lo == pytest.approx(b_lo, abs=0.015) and hi == pytest.approx(b_hi, abs=0.015)
    assert lo < ordinal_alpha(counts) < hi
    assert bootstrap_interval(unit_counts([{0: 1, 1: 1}]), reps=100) is None  # one unit: no interval
