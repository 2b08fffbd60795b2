"""The report's numbers against independent computations: the four win-rate definitions and their
average from a hand-made table of verdicts, the joint bootstrap against ``scipy.stats.bootstrap``,
the length-controlled fit against scikit-learn's liblinear fit (AlpacaEval's recipe) and against
simulated judges with known per-side length slopes, ``--sample``, the judge's sampling settings
and the authors' pairwise prompt (``--judge-prompt script``).

The judges are real HTTP servers on 127.0.0.1 (tests/api_server.py) answering from the table;
expected figures are written out or computed here, never read from the code under test.
"""
from __future__ import annotations

import random
import re

import numpy as np
import pytest

from api_server import FakeProvider, prompt_text
from conftest import write_jsonl
from metaaligner_core.errors import MetaAlignerError
from metaaligner_core.evaluation import evaluate, stats

SECRET = "sk-test-numbers-51c0"
PAIR = re.compile(r"RESPONSE 1: (.*) \| RESPONSE 2: (.*)\. Consider the following aspect: (.*?), then return", re.S)
PAIR_SCRIPT = re.compile(r"RESPONSE 1: (.*) \n \| RESPONSE 2: (.*)\"          \"\n Consider the following aspect: "
                         r"(.*?), then return", re.S)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


# Outcome of (draft, correction) per row: W win, T tie, L loss, I invalid reply (asked twice).
TABLE = {
    "honesty":     ["WW", "LW", "TW", "LT", "IW", "WL", "LL", "TI"],
    "helpfulness": ["LW", "LL", "WT", "TT", "LW", "LW", "WI", "LW"],
}
CODE = {"honesty": "H", "helpfulness": "P"}


def _rows():
    rows = []
    for i in range(8):
        codes = {side: " ".join(f"{CODE[k]}={TABLE[k][i][j]}" for k in TABLE) for j, side in enumerate(("d", "a"))}
        rows.append({"query": f"q{i}", "golden": f"golden {i}", "draft": f"draft {i} {codes['d']}",
                     "aligned": f"aligned {i} {codes['a']}"})
    return rows


def table_judge(pattern=PAIR):
    def reply(body) -> str:
        m = pattern.search(prompt_text(body))
        assert m, prompt_text(body)[:300]
        r1, r2, aspect = m.groups()
        key = "honesty" if aspect.startswith("Honesty") else "helpfulness"
        response_at = 2 if r1.startswith("golden") else 1
        code = re.search(rf"{CODE[key]}=(\w)", r2 if response_at == 2 else r1).group(1)
        return {"W": str(response_at), "L": str(3 - response_at), "T": "0", "I": "cannot decide"}[code]
    return reply


def _evaluate(tmp_path, name="out", rows=None, **kw):
    data = write_jsonl(tmp_path / f"{name}.jsonl", rows or _rows())
    pattern = PAIR_SCRIPT if kw.get("judge_prompt_name") == "script" else PAIR
    with FakeProvider(reply=table_judge(pattern)) as server:
        report = evaluate(data, "honesty,helpfulness", "openai:table", tmp_path / name,
                          base_url=server.base_url + "/v1", **kw)
        return report, server.calls


# Written out by hand from TABLE (the draft is "original", the correction "aligned").
EXPECTED = {
    "honesty": {
        # valid pairs: rows 0 1 2 3 5 6 (row 4 draft invalid, row 7 correction invalid)
        "n": 6, "win_rate_original": 2 / 6, "win_rate_aligned": 3 / 6,
        # all 8 judgments: draft wins rows 0 5, correction wins rows 0 1 2 4
        "n_paper": 8, "win_rate_original_paper": 2 / 8, "win_rate_aligned_paper": 4 / 8,
        # wins + ties over all 8: draft 0 5 + 2 7 ; correction 0 1 2 4 + 3
        "n_authors": 8, "win_rate_original_authors": 4 / 8, "win_rate_aligned_authors": 5 / 8,
        # (wins + ties/2) over the 6 valid pairs: draft 2 + 1/2 ; correction 3 + 1/2
        "n_ties_half": 6, "win_rate_original_ties_half": 2.5 / 6, "win_rate_aligned_ties_half": 3.5 / 6,
    },
    "helpfulness": {
        # valid pairs: every row but 6
        "n": 7, "win_rate_original": 1 / 7, "win_rate_aligned": 4 / 7,
        "n_paper": 8, "win_rate_original_paper": 2 / 8, "win_rate_aligned_paper": 4 / 8,
        "n_authors": 8, "win_rate_original_authors": 3 / 8, "win_rate_aligned_authors": 6 / 8,
        "n_ties_half": 7, "win_rate_original_ties_half": 1.5 / 7, "win_rate_aligned_ties_half": 5 / 7,
    },
}
SUFFIXES = ("", "_paper", "_authors", "_ties_half")


def test_the_four_definitions_and_their_average_from_a_hand_made_table(tmp_path):
    report, calls = _evaluate(tmp_path, bootstrap=1000)
    assert len(calls) == 2 * 8 * 2 + 3  # 32 comparisons, the 3 invalid ones asked again
    for key, expected in EXPECTED.items():
        block = report["objectives"][key]
        for k, v in expected.items():
            assert block[k] == pytest.approx(v), (key, k)
        for s in SUFFIXES:
            assert block[f"advantage{s}"] == pytest.approx(expected[f"win_rate_aligned{s}"]
                                                           - expected[f"win_rate_original{s}"])
            # every rate has an interval, and the interval holds the rate
            for rate in (f"win_rate_original{s}", f"win_rate_aligned{s}", f"advantage{s}"):
                lo, hi = block["ci95"][rate]
                assert lo <= block[rate] + 1e-12 and block[rate] - 1e-12 <= hi, (key, rate)
        for rate in ("lc_win_rate_original", "lc_win_rate_aligned", "lc_advantage"):
            assert len(block["ci95"][rate]) == 2
        # both length-controlled fits use the valid pairs, the rows of the valid-only rates
        fits = report["by_judge"]["openai:table"]["length_control"]["metaaligner"][key]
        assert fits["original"]["n"] == fits["aligned"]["n"] == expected["n"]
    avg = report["average"]
    assert avg["objectives"] == ["honesty", "helpfulness"]
    for s in SUFFIXES:
        for side in ("original", "aligned"):
            k = f"win_rate_{side}{s}"
            assert avg[k] == pytest.approx((EXPECTED["honesty"][k] + EXPECTED["helpfulness"][k]) / 2)
        assert avg[f"advantage{s}"] == pytest.approx(avg[f"win_rate_aligned{s}"] - avg[f"win_rate_original{s}"])
        assert len(avg["ci95"][f"advantage{s}"]) == 2
    assert report["judge_settings"] == {"temperature": 0.0, "max_tokens": 32, "prompt": "paper"}
    assert report["bootstrap"]["resamples"] == 1000
    md = (tmp_path / "out" / "report.md").read_text()
    for label in ("valid-only", "paper, Algorithm 2", "authors' scripts", "ties half", "Average"):
        assert label in md
    # the authors' definition counts the draft's ties as wins: 4/8 on honesty
    assert "| Original | 50.00% [" in md
    # 6-7 valid pairs: the cross-validated penalty shrinks every length-controlled fit to 50 %,
    # which is flagged as no information, not as a disagreement with the raw advantage
    block = report["objectives"]["honesty"]
    assert block["lc_win_rate_original"] == block["lc_win_rate_aligned"] == 0.5
    assert block["lc_disagrees"] is False
    assert [f for f in report["flags"] if "too little information" in f] and \
        not [f for f in report["flags"] if "disagree" in f]


def _per_row(definition: str):
    """From TABLE, per objective: (draft numerator, correction numerator, denominator) per row."""
    out = {}
    for k, pairs in TABLE.items():
        valid = np.array([float("I" not in t) for t in pairs])
        judged = np.ones(len(pairs))  # no call failed in these runs
        score = {"": {"W": 1.0}, "_paper": {"W": 1.0}, "_authors": {"W": 1.0, "T": 1.0},
                 "_ties_half": {"W": 1.0, "T": 0.5}}[definition]
        den = judged if definition in ("_paper", "_authors") else valid
        # a verdict is counted only where it is part of the denominator
        num = [np.array([score.get(t[j], 0.0) for t in pairs]) * den for j in (0, 1)]
        out[k] = (num[0], num[1], den)
    return out


def test_every_interval_is_scipys_paired_percentile_bootstrap(tmp_path):
    """Per objective and averaged over the objectives, for all four definitions: the report's
    intervals equal ``scipy.stats.bootstrap(paired=True, method="percentile")`` on the same
    queries with the same generator."""
    scipy_stats = pytest.importorskip("scipy.stats", reason="scipy is a test dependency (requirements-dev.txt)")
    report, _ = _evaluate(tmp_path, bootstrap=2000, bootstrap_seed=7)

    def interval(statistic):
        res = scipy_stats.bootstrap((np.arange(8),), statistic, paired=True, vectorized=True, n_resamples=2000,
                                    batch=stats.DEFAULT_CHUNK, method="percentile", rng=np.random.default_rng(7))
        return [float(res.confidence_interval.low), float(res.confidence_interval.high)]

    for suffix in SUFFIXES:
        rows = _per_row(suffix)

        def rate(k, side, idx, axis=-1):
            num_o, num_a, den = rows[k]
            return (num_o if side == "original" else num_a)[idx].sum(axis) / den[idx].sum(axis)

        for k in TABLE:
            ci = report["objectives"][k]["ci95"]
            for side in ("original", "aligned"):
                want = interval(lambda idx, axis=-1: rate(k, side, idx, axis))
                assert ci[f"win_rate_{side}{suffix}"] == pytest.approx(want, abs=1e-12), (k, side, suffix)
            want = interval(lambda idx, axis=-1: rate(k, "aligned", idx, axis) - rate(k, "original", idx, axis))
            assert ci[f"advantage{suffix}"] == pytest.approx(want, abs=1e-12), (k, suffix)

        def average_advantage(idx, axis=-1):
            return np.mean([rate(k, "aligned", idx, axis) - rate(k, "original", idx, axis) for k in TABLE], axis=0)

        assert report["average"]["ci95"][f"advantage{suffix}"] == pytest.approx(interval(average_advantage),
                                                                                abs=1e-12), suffix


def test_script_prompt_gives_the_same_table_and_sends_the_authors_string(tmp_path):
    report, calls = _evaluate(tmp_path, judge_prompt_name="script", bootstrap=1000)
    assert report["judge_prompt"]["name"] == "script" and report["judge_settings"]["prompt"] == "script"
    for k, v in EXPECTED["honesty"].items():
        assert report["objectives"]["honesty"][k] == pytest.approx(v)
    text = prompt_text(calls[0].body)
    assert text.startswith("You will be presented with one query and two different responses to this query.QUERY: q")
    assert text.endswith("If tied, return 0.You must only return 1, 2, or 0.")
    assert all(m["role"] == "user" for m in calls[0].body["messages"])  # no system message


def test_judge_sampling_settings_are_sent_recorded_and_keyed_in_the_cache(tmp_path):
    rows = _rows()[:2]
    report, calls = _evaluate(tmp_path, rows=rows, temperature=0.7, max_tokens=5, bootstrap=1000)
    assert {c.body["temperature"] for c in calls} == {0.7}
    assert {c.body["max_completion_tokens"] for c in calls} == {5}
    assert report["judge_settings"] == {"temperature": 0.7, "max_tokens": 5, "prompt": "paper"}
    # the same settings again: every answer comes from the cache; other settings: asked anew
    _, again = _evaluate(tmp_path, rows=rows, temperature=0.7, max_tokens=5, bootstrap=1000)
    assert again == []
    _, default = _evaluate(tmp_path, rows=rows, bootstrap=1000)
    assert len(default) == len(calls) and {c.body["temperature"] for c in default} == {0.0}
    with pytest.raises(MetaAlignerError, match="--judge-temperature"):
        _evaluate(tmp_path, rows=rows, temperature=3.0)


def test_sample_draws_a_seeded_random_subset_in_file_order(tmp_path):
    rows = _rows()
    picked = {}
    for seed in range(6):
        report, calls = _evaluate(tmp_path, name=f"s{seed}", sample=3, seed=seed, bootstrap=1000)
        queries = sorted({re.search(r"QUERY: (q\d)", prompt_text(c.body)).group(1) for c in calls})
        assert report["rows"] == 3 and len(queries) == 3
        assert report["sample"] == {"rows": 3, "seed": seed} and report["max_rows"] is None
        picked[seed] = queries
    again, calls = _evaluate(tmp_path, name="again", sample=3, seed=2, bootstrap=1000)
    assert sorted({re.search(r"QUERY: (q\d)", prompt_text(c.body)).group(1) for c in calls}) == picked[2]
    assert len({tuple(v) for v in picked.values()}) > 1          # the subset depends on the seed
    assert any(v != ["q0", "q1", "q2"] for v in picked.values())  # not the first rows
    with pytest.raises(MetaAlignerError, match="exclude each other"):
        _evaluate(tmp_path, name="both", sample=3, max_rows=4)
    with pytest.raises(MetaAlignerError, match="has only 8 rows"):
        _evaluate(tmp_path, name="toomany", sample=9)
    assert len(rows) == 8


# --------------------------------------------------------------------------- length control

def _simulate(rng, n, a, b, mean, sd=300.0, ties=0.1):
    """Outcomes 1 / 0.5 / 0 with mean sigmoid(a + b * tanh(delta / sd)) for deltas ~ N(mean, sd)."""
    delta = rng.normal(mean, sd, n)
    p = 1 / (1 + np.exp(-(a + b * np.tanh((delta - 0) / sd))))
    u = rng.random(n)
    y = np.where(u < p - ties / 2, 1.0, np.where(u < p + ties / 2, 0.5, 0.0))
    return y, delta


def test_length_control_recovers_per_side_slopes_within_its_interval():
    """The issue's simulation: the judge's length slope is 1.2 for drafts and 0.4 for corrections.
    Each side's own fit recovers its slope, and the true length-controlled rates and advantage
    lie inside the bootstrap intervals."""
    rng = np.random.default_rng(11)
    n = 4000
    truth = {"original": (-0.4, 1.2, -100.0), "aligned": (0.2, 0.4, 250.0)}
    problems = []
    for side, (a, b, mean) in truth.items():
        y, delta = _simulate(rng, n, a, b, mean)
        problems.append(stats.LCProblem(np.arange(n), y, delta))
    _, lc = stats.joint_bootstrap(np.zeros((n, 0)), np.zeros((n, 0)), 1000, 3, problems)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    for j, (side, (a, b, _)) in enumerate(truth.items()):
        fit = problems[j]
        assert fit.coef[1] == pytest.approx(b, abs=0.2), side
        lo, hi = stats.percentile_interval(lc[:, j])
        assert lo <= sig(a) <= hi, (side, lo, sig(a), hi)
        assert lo <= fit.rate <= hi
    true_adv = sig(truth["aligned"][0]) - sig(truth["original"][0])
    lo, hi = stats.percentile_interval(lc[:, 1] - lc[:, 0])
    assert lo <= true_adv <= hi
    assert problems[1].rate - problems[0].rate == pytest.approx(true_adv, abs=0.04)


def test_length_control_matches_scikit_learns_liblinear_fit_the_way_alpacaeval_runs_it():
    sk = pytest.importorskip("sklearn", reason="scikit-learn is a test dependency (requirements-dev.txt)")
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold

    rng = np.random.default_rng(4)
    r = 300
    y, delta = _simulate(rng, r, 0.3, 1.0, 200.0, sd=250.0)
    fit = stats.LCProblem(np.arange(r), y, delta)

    # AlpacaEval's fit_LogisticRegressionCV: each row twice (label 1 weighted by the preference,
    # label 0 by its complement), L1, liblinear, no intercept beyond the constant column, the
    # default grid of 10 C values, GroupKFold(5) on the continuous log loss, refit on all rows.
    x = np.tanh(delta / delta.std(ddof=1))
    X = np.stack([np.ones(r), x], axis=1)
    Xd, yd = np.concatenate([X, X]), np.concatenate([np.ones(r), np.zeros(r)])
    wd, groups = np.concatenate([y, 1 - y]), np.concatenate([np.arange(r), np.arange(r)])
    cs = np.logspace(-4, 4, 10)

    def liblinear(c, rows):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the penalty argument's deprecation notice
            return LogisticRegression(C=c, penalty="l1", solver="liblinear", fit_intercept=False, tol=1e-10,
                                      max_iter=100_000).fit(Xd[rows], yd[rows], sample_weight=wd[rows])

    loss = np.zeros(len(cs))
    folds = list(GroupKFold(n_splits=5).split(Xd, groups=groups))
    for train, test in folds:
        for j, c in enumerate(cs):
            p = np.clip(liblinear(c, train).predict_proba(Xd[test])[:, 1], 1e-15, 1 - 1e-15)
            target = np.where(yd[test] == 1, wd[test], 1 - wd[test])
            loss[j] += -np.mean(target * np.log(p) + (1 - target) * np.log(1 - p))
    best = cs[int(np.argmin(loss))]
    model = liblinear(best, np.arange(2 * r))
    assert fit.C == pytest.approx(best)
    assert fit.coef == pytest.approx(list(model.coef_[0]), abs=1e-5)
    assert fit.rate == pytest.approx(1 / (1 + np.exp(-model.coef_[0, 0])), abs=1e-6)
    # the fold of each row is GroupKFold's
    for k, (_, test) in enumerate(folds):
        assert sorted(set(groups[test])) == sorted(np.flatnonzero(stats.lc_folds(r) == k))
    assert sk.__version__


def test_each_resample_is_a_full_refit_of_the_resampled_rows():
    """The interval's refits equal fitting each resampled data set from scratch (its own sd of the
    length differences, the full sample's C) with scikit-learn's liblinear."""
    pytest.importorskip("sklearn", reason="scikit-learn is a test dependency (requirements-dev.txt)")
    import warnings

    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(8)
    r = 120
    y, delta = _simulate(rng, r, -0.2, 1.5, 150.0, sd=300.0)
    fit = stats.LCProblem(np.arange(r), y, delta)
    counts = next(stats.resample_counts(r, 5, seed=3, chunk=5))
    refits = fit.refit(counts)
    for b in range(5):
        rows = np.repeat(np.arange(r), counts[b].astype(int))  # the resample, materialised
        d, t = delta[rows], y[rows]
        x = np.tanh(d / d.std(ddof=1))
        X = np.stack([np.ones(len(rows)), x], axis=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = LogisticRegression(C=fit.C, penalty="l1", solver="liblinear", fit_intercept=False, tol=1e-10,
                                       max_iter=100_000).fit(np.concatenate([X, X]),
                                                             np.concatenate([np.ones(len(rows)), np.zeros(len(rows))]),
                                                             sample_weight=np.concatenate([t, 1 - t]))
        assert refits[b] == pytest.approx(1 / (1 + np.exp(-model.coef_[0, 0])), abs=1e-5), b


def noisy_longer_wins(body) -> str:
    """Prefers the longer response (in characters), with a coin from the prompt's hash."""
    m = PAIR.search(prompt_text(body))
    r1, r2, _ = m.groups()
    import hashlib
    u = int(hashlib.sha256(prompt_text(body).encode()).hexdigest()[:8], 16) / 16 ** 8
    if u < 0.1:
        return "0"
    p1 = 1 / (1 + np.exp(-(len(r1) - len(r2)) / 40))
    return "1" if u < 0.1 + 0.9 * p1 else "2"


def test_an_unrelated_corrector_changes_nothing_for_the_others(tmp_path):
    rng = np.random.default_rng(2)
    rows = [{"query": f"q{i}", "golden": "g" * int(rng.integers(40, 120)), "draft": "d" * int(rng.integers(20, 120)),
             "aligned": "a" * int(rng.integers(40, 200)), "aligned_other": "o" * int(rng.integers(1, 400))}
            for i in range(120)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    with FakeProvider(reply=noisy_longer_wins) as server:
        one = evaluate(data, "honesty,helpfulness", "openai:len", tmp_path / "one", base_url=server.base_url + "/v1",
                       correctors="metaaligner=aligned", bootstrap=1000)
        two = evaluate(data, "honesty,helpfulness", "openai:len", tmp_path / "two", base_url=server.base_url + "/v1",
                       correctors="metaaligner=aligned,other=aligned_other", bootstrap=1000)
    a = one["by_judge"]["openai:len"]
    b = two["by_judge"]["openai:len"]
    for key in ("honesty", "helpfulness"):
        x, y = a["correctors"]["metaaligner"][key], b["correctors"]["metaaligner"][key]
        assert x["lc_win_rate_aligned"] is not None
        for k in ("win_rate_original", "win_rate_aligned", "advantage", "lc_win_rate_original",
                  "lc_win_rate_aligned", "lc_advantage", "advantage_authors", "ci95"):
            assert x[k] == y[k], (key, k)
        assert a["length_control"]["metaaligner"][key] == b["length_control"]["metaaligner"][key]
    assert a["average"]["metaaligner"]["ci95"] == b["average"]["metaaligner"]["ci95"]
    assert "other" in b["correctors"] and "other" in b["average"]
