"""``evaluate`` against local OpenAI-compatible judge servers with known behaviour (a real HTTP
server on 127.0.0.1, tests/api_server.py, through the official ``openai`` client).

Judges: one that always answers "1" (position bias), one that prefers the longer response, a
random one (seeded by the prompt, so reproducible) with known win probabilities, one that
fails some calls, and the "+"-counting rule of test_evaluation.py. Expected figures are
computed here from the data and from what the server was asked, not from the code under test.
"""
from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

from api_server import FakeProvider, prompt_text
from conftest import read_jsonl, run_cli, write_jsonl
from metaaligner_core.errors import MetaAlignerError
from metaaligner_core.evaluation import evaluate
from metaaligner_core.evaluation.prompts import IMHI_SYSTEM

SECRET = "sk-test-judges-8a2e"
ENV = {"OPENAI_API_KEY": SECRET}
PAIR = re.compile(r"RESPONSE 1: (.*) \| RESPONSE 2: (.*)\. Consider the following aspect", re.S)
PAIR_IMHI = re.compile(r"RESPONSE 1: (.*) \n \| RESPONSE 2: (.*)\"\s+\"\n Consider the following aspect", re.S)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


def _pair(body):
    text = prompt_text(body)
    m = PAIR.search(text) or PAIR_IMHI.search(text)
    assert m, text[:200]
    return m.group(1), m.group(2)


def plus_rule(body) -> str:
    a, b = (x.count("+") for x in _pair(body))
    return "0" if a == b else ("1" if a > b else "2")


def _url(server):
    return server.base_url + "/v1"


# --------------------------------------------------------------------------- position bias

def test_always_position_1_judge_half_wins_in_paper_mode_and_ties_with_swap(tmp_path):
    rows = [{"query": f"q{i}", "golden": f"golden {i}", "draft": f"draft {i}", "aligned": f"aligned {i}"}
            for i in range(60)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    with FakeProvider(reply=lambda body: "1") as server:
        paper = evaluate(data, "honesty", "openai:biased", tmp_path / "paper", base_url=_url(server), seed=4)
        # what the judge was shown: the response wins exactly when the golden answer is not in position 1
        expected = {"draft": 0, "aligned": 0}
        for call in server.calls:
            first, _ = _pair(call.body)
            if not first.startswith("golden"):
                expected[first.split()[0]] += 1
        server.calls.clear()
        swapped = evaluate(data, "honesty", "openai:biased", tmp_path / "swap", base_url=_url(server), seed=4,
                           swap=True)
        assert len(server.calls) == 2 * 60 * 2
    r = paper["objectives"]["honesty"]
    assert r["original"]["wins"] == expected["draft"] and r["aligned"]["wins"] == expected["aligned"]
    assert r["original"]["wins"] + r["original"]["losses"] == 60 and r["original"]["ties"] == 0
    assert 0.3 < r["win_rate_original"] < 0.7 and 0.3 < r["win_rate_aligned"] < 0.7  # about half
    s = swapped["objectives"]["honesty"]
    assert s["original"]["ties"] == 60 and s["aligned"]["ties"] == 60
    assert s["win_rate_original"] == 0 and s["win_rate_aligned"] == 0 and s["advantage"] == 0
    # the two orders never agree: position consistency 0 over all 120 comparisons
    assert s["position_consistency"] == 0.0
    assert swapped["by_judge"]["openai:biased"]["position_consistency"]["honesty"] == {"consistent": 0, "n": 120,
                                                                                        "rate": 0.0}
    assert "position_consistency" not in r


# --------------------------------------------------------------------------- length preference

def longer_wins(body) -> str:
    a, b = (len(x.split()) for x in _pair(body))
    return "0" if a == b else ("1" if a > b else "2")


def test_length_preferring_judge_loses_its_advantage_under_length_control(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(150):
        n_d = max(1, 20 + int(rng.normal(-8, 7)))
        n_a = max(1, 20 + int(rng.normal(8, 7)))
        rows.append({"query": f"q{i}", "golden": " ".join(["g"] * 20), "draft": " ".join(["d"] * n_d),
                     "aligned": " ".join(["a"] * n_a)})
    with FakeProvider(reply=longer_wins) as server:
        report = evaluate(write_jsonl(tmp_path / "rows.jsonl", rows), "honesty", "openai:long", tmp_path / "out",
                          base_url=_url(server), seed=0)
    r = report["objectives"]["honesty"]
    # independent raw figures: a win is a response longer than the 20-word golden answer
    wins_d = sum(len(x["draft"].split()) > 20 for x in rows)
    wins_a = sum(len(x["aligned"].split()) > 20 for x in rows)
    assert (r["original"]["wins"], r["aligned"]["wins"]) == (wins_d, wins_a)
    assert r["advantage"] == pytest.approx((wins_a - wins_d) / 150)
    assert r["advantage"] > 0.4
    # the length-controlled advantage is well under half the raw one, and each side's fit finds
    # a strong preference for length (positive slope on response minus golden length)
    assert abs(r["lc_advantage"]) < r["advantage"] / 2
    fits = report["by_judge"]["openai:long"]["length_control"]["metaaligner"]["honesty"]
    assert fits["original"]["coef_length"] > 3 and fits["aligned"]["coef_length"] > 3
    assert fits["original"]["n"] == fits["aligned"]["n"] == r["n"]
    assert report["correction"]["metaaligner"]["length"]["mean_change"] == pytest.approx(
        np.mean([len(x["aligned"].split()) - len(x["draft"].split()) for x in rows]))
    assert "length_change.png" in report["plots"]


def test_raw_and_length_controlled_disagreement_is_flagged(tmp_path):
    """The judge picks the longer response when lengths differ by more than 3 words, else the one
    with more "+". Drafts are as long as the golden answer and win 2 rows in 5 on content; the
    corrections lose on content when as long as the golden answer and win only when twice as
    long. Raw, the correction is ahead (50 % vs 40 %); at equal length (length-controlled) it is
    behind: the report must flag it."""
    words10 = " ".join(["w"] * 9)
    rows = []
    for i in range(40):
        rows.append({"query": f"q{i}", "golden": words10 + " ++",
                     "draft": words10 + (" +++" if i % 5 in (0, 1) else " +"),
                     "aligned": (words10 + " x") if i % 2 == 0 else " ".join(["a"] * 20)})

    def rule(body):
        a, b = _pair(body)
        la, lb = len(a.split()), len(b.split())
        if abs(la - lb) > 3:
            return "1" if la > lb else "2"
        pa, pb = a.count("+"), b.count("+")
        return "0" if pa == pb else ("1" if pa > pb else "2")

    with FakeProvider(reply=rule) as server:
        report = evaluate(write_jsonl(tmp_path / "rows.jsonl", rows), "honesty", "openai:r", tmp_path / "out",
                          base_url=_url(server))
    r = report["objectives"]["honesty"]
    assert (r["win_rate_original"], r["win_rate_aligned"]) == (0.4, 0.5)
    assert r["lc_advantage"] < 0 < r["advantage"]
    assert r["lc_disagrees"] is True
    assert report["flags"] == [f"openai:r / metaaligner / honesty: raw and length-controlled results disagree: "
                               f"advantage +0.100 raw, {r['lc_advantage']:+.3f} length-controlled"]
    assert "⚠" in (tmp_path / "out" / "report.md").read_text()


# --------------------------------------------------------------------------- random judge

def test_random_judge_bootstrap_interval_covers_the_true_rate(tmp_path):
    p = {"draft": 0.3, "aligned": 0.6}

    def coin(body):
        r1, r2 = _pair(body)
        response_at = 2 if r1.startswith("golden") else 1
        kind = (r2 if response_at == 2 else r1).split()[0]
        u = int(hashlib.sha256(prompt_text(body).encode()).hexdigest()[:8], 16) / 16 ** 8
        return str(response_at) if u < p[kind] else str(3 - response_at)

    rows = [{"query": f"q{i}", "golden": f"golden {i}", "draft": f"draft {i}", "aligned": f"aligned {i}"}
            for i in range(400)]
    with FakeProvider(reply=coin) as server:
        report = evaluate(write_jsonl(tmp_path / "rows.jsonl", rows), "honesty", "openai:coin", tmp_path / "out",
                          base_url=_url(server), concurrency=16)
    r = report["objectives"]["honesty"]
    ci = r["ci95"]
    assert ci["win_rate_original"][0] <= 0.3 <= ci["win_rate_original"][1]
    assert ci["win_rate_aligned"][0] <= 0.6 <= ci["win_rate_aligned"][1]
    assert ci["advantage"][0] <= 0.3 <= ci["advantage"][1]
    # the interval is about +-1.96 * sqrt(p(1-p)/n) wide (n = 400): ~0.045 for p = 0.3
    width = ci["win_rate_original"][1] - ci["win_rate_original"][0]
    assert 0.06 < width < 0.12
    assert report["definitions"]["ci95"].startswith("paired percentile bootstrap over queries, 10000 resamples")
    assert report["bootstrap"]["resamples"] == 10000


# --------------------------------------------------------------------------- failing judge

def test_failing_calls_are_counted_exactly_in_both_rate_definitions(tmp_path):
    rows = [
        {"query": "q0", "golden": "gold ++", "draft": "draft +", "aligned": "aligned +++"},
        {"query": "q1", "golden": "gold ++", "draft": "draft ++", "aligned": "aligned ++++"},
        {"query": "q2", "golden": "gold ++", "draft": "draft +++", "aligned": "aligned ++"},
        {"query": "q3", "golden": "gold ++", "draft": "draft", "aligned": "aligned +"},
        {"query": "q4", "golden": "gold ++", "draft": "draft +", "aligned": "aligned +++"},
        {"query": "q5", "golden": "gold ++", "draft": "draft ++++", "aligned": "aligned"},
    ]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    # one worker, no client retries: the first three calls (row 0 draft, row 0 aligned, row 1 draft) fail
    with FakeProvider(reply=plus_rule, faults=[500, 500, 500]) as server:
        report = evaluate(data, "honesty", "openai:f", tmp_path / "out", base_url=_url(server), concurrency=1,
                          max_retries=0)
        assert len(server.calls) == 12
    r = report["objectives"]["honesty"]
    assert report["failed"] == 3 and sorted((f["row"], f["side"]) for f in report["failures"]) == [
        (0, "aligned"), (0, "original"), (1, "original")]
    assert r["original"]["failed"] == 2 and r["aligned"]["failed"] == 1
    # rows 2..5: draft W L L W -> 2 wins ; aligned T L W L -> 1 win
    assert (r["n"], r["original"]["wins"], r["aligned"]["wins"]) == (4, 2, 1)
    assert r["n_paper"] == 4 and r["win_rate_original_paper"] == pytest.approx(0.5)
    with FakeProvider(reply=plus_rule) as server:
        again = evaluate(data, "honesty", "openai:f", tmp_path / "out", base_url=_url(server))
        assert len(server.calls) == 3
    r = again["objectives"]["honesty"]
    # all rows: draft L T W L L W -> 2 wins ; aligned W W T L W L -> 3 wins
    assert again["failed"] == 0 and (r["n"], r["original"]["wins"], r["aligned"]["wins"]) == (6, 2, 3)


def test_invalid_replies_count_as_non_wins_in_the_papers_rate_only(tmp_path):
    rows = [{"query": f"q{i}", "golden": "gold ++", "draft": "draft +++", "aligned": "aligned +++"} for i in range(4)]

    def rule(body):
        return "no idea" if "QUERY: q0 " in prompt_text(body) else plus_rule(body)

    with FakeProvider(reply=rule) as server:
        report = evaluate(write_jsonl(tmp_path / "rows.jsonl", rows), "honesty", "openai:i", tmp_path / "out",
                          base_url=_url(server))
    r = report["objectives"]["honesty"]
    assert report["invalid"] == 2 and r["n"] == 3 and r["win_rate_original"] == 1.0
    assert r["n_paper"] == 4 and r["win_rate_original_paper"] == 0.75 and r["win_rate_aligned_paper"] == 0.75


# --------------------------------------------------------------------------- correctors, columns, head to head

def test_three_correctors_mapped_columns_and_head_to_head_through_the_cli(tmp_path):
    rows = []
    for i in range(6):
        rows.append({"prompt": f"q{i}", "goldens": "gold ++", "generated_text": "draft " + "+" * (i % 3 + 1),
                     "aligned": "aligned " + "+" * (i % 3 + 2),            # one more "+" than the draft
                     "aligned_self_refine": "refined " + "+" * (i % 3),    # one fewer
                     "aligned_pku": "draft " + "+" * (i % 3 + 1) + "  "})  # the draft again (whitespace)
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out"
    with FakeProvider(reply=plus_rule) as server:
        proc = run_cli("evaluate", "--input", data, "--objectives", "honesty", "--judge", "openai:j", "--base-url",
                       _url(server), "--out", out, "--columns", "query=prompt,golden=goldens,draft=generated_text",
                       "--head-to-head", env=ENV)
        assert proc.returncode == 0, proc.stderr
        distinct = len({prompt_text(c.body) for c in server.calls})
        assert len(server.calls) == distinct  # no prompt asked twice
    report = json.loads((out / "report.json").read_text())
    assert report["correctors"] == {"metaaligner": {"column": "aligned"},
                                    "self-refine": {"column": "aligned_self_refine"},
                                    "pku-aligner": {"column": "aligned_pku"}}
    assert report["judgments"] == 6 * (4 + 3)
    blocks = report["by_judge"]["openai:j"]["correctors"]
    # golden has 2 "+": drafts have 1,2,3,1,2,3 -> L T W L T W
    for name in blocks:
        assert blocks[name]["honesty"]["original"] == {"wins": 2, "ties": 2, "losses": 2, "invalid": 0, "failed": 0}
    # metaaligner 2,3,4,... -> T W W T W W ; self-refine 0,1,2 -> L L T L L T ; pku = draft
    assert blocks["metaaligner"]["honesty"]["aligned"]["wins"] == 4
    assert blocks["self-refine"]["honesty"]["aligned"]["wins"] == 0
    assert blocks["self-refine"]["honesty"]["aligned"]["losses"] == 4
    assert blocks["pku-aligner"]["honesty"]["aligned"]["wins"] == 2
    # head to head against the draft: metaaligner always wins, self-refine always loses, pku always ties
    hh = {n: blocks[n]["honesty"]["head_to_head"] for n in blocks}
    assert (hh["metaaligner"]["wins"], hh["metaaligner"]["loss_rate"]) == (6, 0.0)
    assert (hh["self-refine"]["losses"], blocks["self-refine"]["honesty"]["loses_to_draft_rate"]) == (6, 1.0)
    assert hh["pku-aligner"]["ties"] == 6
    assert report["correction"]["pku-aligner"]["copy_rate"] == 1.0
    assert report["correction"]["metaaligner"]["copy_rate"] == 0.0
    assert blocks["pku-aligner"]["honesty"]["copy_rate"] == 1.0
    assert report["objectives"] == blocks["metaaligner"]  # the DESIGN keys stay the primary corrector's
    md = (out / "report.md").read_text()
    assert "## self-refine — judge `openai:j`" in md and "Loses to its own draft" in md
    assert "[openai:j / pku-aligner] Honesty" in proc.stdout


def test_missing_mapped_column_names_the_column(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"query": "q", "goldens": "g", "draft": "d", "aligned": "a"},
                                                  {"query": "q", "draft": "d", "aligned": "a"}])
    with pytest.raises(MetaAlignerError, match=r'rows.jsonl:2: field "goldens": missing'):
        evaluate(data, "honesty", "openai:j", tmp_path / "out", columns="golden=goldens")
    with pytest.raises(MetaAlignerError, match=r'--columns: unknown field "gold"'):
        evaluate(data, "honesty", "openai:j", tmp_path / "out", columns="gold=goldens")
    with pytest.raises(MetaAlignerError, match=r'field "aligned_x": missing'):
        evaluate(data, "honesty", "openai:j", tmp_path / "out", columns="golden=goldens",
                 correctors="mine=aligned_x")


# --------------------------------------------------------------------------- several judges

def test_two_judges_agreement_from_their_own_verdicts(tmp_path):
    rows = [{"query": f"q{i}", "golden": "gold ++", "draft": "draft " + "+" * (i % 4),
             "aligned": "aligned " + "+" * ((i + 1) % 4)} for i in range(30)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    with FakeProvider(reply=plus_rule) as a, FakeProvider(reply=plus_rule) as b, \
            FakeProvider(reply=lambda body: "1") as c:
        judges = [f"openai-compatible:plus@{_url(a)}", f"openai-compatible:plus2@{_url(b)}",
                  f"openai-compatible:one@{_url(c)}"]
        report = evaluate(data, "honesty", judges, tmp_path / "out")
    assert report["judges"] == judges and report["judge"] == judges[0]
    ja = report["judge_agreement"]["objectives"]["honesty"]
    assert ja["pairs"][f"{judges[0]} | {judges[1]}"] == {"n": 60, "agreement": 1.0}
    # independent: the "+" rule's outcome per response vs the always-"1" judge's, read from its cache records
    plus = {}
    for i, r in enumerate(rows):
        for side, text in (("original", r["draft"]), ("aligned", r["aligned"])):
            k = text.count("+")
            plus[(i, side)] = "tie" if k == 2 else ("win" if k > 2 else "loss")
    one = {(j["row"], j["side"]): ("loss" if j["golden_position"] == 1 else "win")
           for j in read_jsonl(tmp_path / "out" / "judgments.jsonl") if j["judge"] == judges[2]}
    expected = sum(plus[u] == one[u] for u in plus) / 60
    assert ja["pairs"][f"{judges[0]} | {judges[2]}"]["agreement"] == pytest.approx(expected)
    assert ja["units"] == 60 and -1 <= ja["alpha"] < 1
    assert set(report["by_judge"]) == set(judges)
    assert "win_rates_openai_compatible_one" in " ".join(report["plots"])


# --------------------------------------------------------------------------- cost control

def test_dry_run_then_max_calls_then_resume(tmp_path):
    rows = [{"query": f"q{i}", "golden": "gold ++", "draft": "draft +", "aligned": "aligned +++"} for i in range(5)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out"
    args = ["evaluate", "--input", data, "--objectives", "honesty,helpfulness", "--judge", "openai:j", "--out", out,
            "--concurrency", "1"]
    with FakeProvider(reply=plus_rule) as server:
        url = ["--base-url", _url(server)]
        proc = run_cli(*args, *url, "--dry-run", env=ENV)
        assert proc.returncode == 0, proc.stderr
        assert "dry run: 20 judge calls to make (0 already answered" in proc.stdout
        assert server.calls == [] and not out.exists()
        proc = run_cli(*args, *url, "--max-calls", "7", env=ENV)
        assert proc.returncode == 3, proc.stderr
        assert "stopped after 7 judge calls" in proc.stderr and len(server.calls) == 7
        assert not (out / "report.json").exists() and len(read_jsonl(out / "judgments.jsonl")) == 7
        proc = run_cli(*args, *url, "--dry-run", env=ENV)
        assert "dry run: 13 judge calls to make (7 already answered" in proc.stdout
        proc = run_cli(*args, *url, env=ENV)
        assert proc.returncode == 0, proc.stderr
        assert len(server.calls) == 20
    report = json.loads((out / "report.json").read_text())
    assert report["calls"]["calls"] == 13 and report["calls"]["cached"] == 7
    assert report["objectives"]["honesty"]["win_rate_aligned"] == 1.0
    assert report["objectives"]["honesty"]["win_rate_original"] == 0.0
    assert SECRET not in proc.stdout + proc.stderr


def test_compare_two_runs_side_by_side(tmp_path):
    rows = [{"query": f"q{i}", "golden": "gold ++", "draft": "draft +", "aligned": "aligned " + "+" * (i % 4)}
            for i in range(8)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    with FakeProvider(reply=plus_rule) as server:
        evaluate(data, "honesty", "openai:a", tmp_path / "run1", base_url=_url(server))
        evaluate(data, "honesty", "openai:b", tmp_path / "run2", base_url=_url(server), swap=True)
    proc = run_cli("evaluate", "--compare", tmp_path / "run1", tmp_path / "run2", "--out", tmp_path / "cmp")
    assert proc.returncode == 0, proc.stderr
    assert f"| {tmp_path / 'run1'} | openai:a | metaaligner |" in proc.stdout
    assert f"| {tmp_path / 'run2'} | openai:b | metaaligner |" in proc.stdout
    assert (tmp_path / "cmp" / "compare.md").read_text() == proc.stdout
    proc = run_cli("evaluate", "--compare", tmp_path / "run1", tmp_path / "nope")
    assert proc.returncode == 2 and "nope/report.json: not found" in proc.stderr


# --------------------------------------------------------------------------- template, IMHI judge, experts

def test_hh_rlhf_wording_follows_the_template_and_the_objectives(tmp_path):
    rows = [{"query": "q", "golden": "gold ++", "draft": "draft +", "aligned": "aligned +++"}]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    hh = "Helpfulness: The response should provide useful resources and suggestions to the user"
    uf = "Helpfulness: the response should provide useful resources and suggestions to the user"
    with FakeProvider(reply=plus_rule) as server:
        r1 = evaluate(data, "helpfulness", "openai:j", tmp_path / "a", base_url=_url(server), template="hh-rlhf")
        assert all(hh in prompt_text(c.body) for c in server.calls)
        server.calls.clear()
        r2 = evaluate(data, "harmlessness,helpfulness", "openai:j", tmp_path / "b", base_url=_url(server))
        assert sum(hh in prompt_text(c.body) for c in server.calls) == 2
        server.calls.clear()
        r3 = evaluate(data, "helpfulness", "openai:j", tmp_path / "c", base_url=_url(server))
        assert all(uf in prompt_text(c.body) for c in server.calls)
    assert (r1["template"], r1["template_source"]) == ("hh-rlhf", "--template")
    assert r2["template"] == "hh-rlhf" and "harmlessness" in r2["template_source"]
    assert r3["template"] is None
    assert r1["objectives"]["helpfulness"]["text"] == hh


def _imhi_rows():
    # golden has two "+": outcome per response is L (1 "+"), T (2) or W (3)
    return [{"query": f"post {i}", "golden": "gold ++", "draft": "draft " + "+" * (1 + i % 3),
             "aligned": "aligned " + "+" * (1 + (i + 1) % 3)} for i in range(9)]


def test_imhi_judge_prompt_and_system_message_reach_the_server_and_experts_agree(tmp_path, db_url):
    from annotation.store import Store
    from metaaligner_core.commands.evaluate import rating_records

    rows = _imhi_rows()
    # expert ratings: correctness follows the "+" count (rho = 1 with the judge); informative reverses it
    ratings = []
    for r in rows:
        for text in (r["draft"], r["aligned"]):
            k = text.count("+")
            for who in ("ann1", "ann2"):
                ratings.append({"query": r["query"], "response": text, "annotator": who, "objective": "correctness",
                                "score": k - 1 if who == "ann1" else k})
                ratings.append({"query": r["query"], "response": text, "annotator": who, "objective": "informative",
                                "score": 3 - k})
    ratings_file = write_jsonl(tmp_path / "ratings.jsonl", ratings)
    Store(db_url).import_ratings(ratings_file, "imhi")
    seen_system = []

    def rule(body):
        seen_system.append(body["messages"][0])
        return "Response " + plus_rule(body) if plus_rule(body) != "0" else "0"

    with FakeProvider(reply=rule) as server:
        report = evaluate(write_jsonl(tmp_path / "rows.jsonl", rows), "correctness,informative", "openai:psy",
                          tmp_path / "out", base_url=_url(server), expert_ratings=rating_records(db_url),
                          ratings_source=db_url)
        texts = [prompt_text(c.body) for c in server.calls]
    assert report["template"] == "imhi" and report["judge_prompt"]["name"] == "imhi"
    assert all(t.startswith("You will be presented with one mental health analysis query") for t in texts)
    assert all(m == {"role": "system", "content": IMHI_SYSTEM} for m in seen_system)
    assert report["failed"] == 0 and report["invalid"] == 0  # "Response 2" parses
    ea = report["expert_agreement"]["judges"]["openai:psy"]
    assert ea["correctness"]["n"] == 18 and ea["correctness"]["spearman"] == pytest.approx(1.0)
    assert ea["informative"]["spearman"] == pytest.approx(-1.0)
    assert report["expert_agreement"]["ratings"] == len(ratings)
    # the same join from a ratings export file
    with FakeProvider(reply=rule) as server:
        again = evaluate(write_jsonl(tmp_path / "rows.jsonl", rows), "correctness,informative", "openai:psy",
                         tmp_path / "out", base_url=_url(server), expert_ratings=rating_records(str(ratings_file)),
                         ratings_source=str(ratings_file))
        assert server.calls == []
    assert again["expert_agreement"]["judges"] == report["expert_agreement"]["judges"]
    # and through the command, which reads the ratings from the database itself
    with FakeProvider(reply=rule) as server:
        proc = run_cli("evaluate", "--input", tmp_path / "rows.jsonl", "--objectives", "correctness,informative",
                       "--judge", "openai:psy", "--base-url", _url(server), "--out", tmp_path / "out",
                       "--ratings-db", db_url, env=ENV)
        assert proc.returncode == 0, proc.stderr
        assert server.calls == []  # every judgment from the cache
    cli_report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert cli_report["expert_agreement"]["judges"] == report["expert_agreement"]["judges"]
    assert cli_report["expert_agreement"]["ratings"] == len(ratings)


def test_paper_prompt_on_request_for_imhi(tmp_path):
    with FakeProvider(reply=plus_rule) as server:
        report = evaluate(write_jsonl(tmp_path / "rows.jsonl", _imhi_rows()[:2]), "correctness", "openai:j",
                          tmp_path / "out", base_url=_url(server), judge_prompt_name="paper")
        assert all(prompt_text(c.body).startswith("You are a skilled evaluator") for c in server.calls)
        assert all(c.body["messages"][0]["role"] == "user" for c in server.calls)
    assert report["prompt"] == "paper Appendix C.1 (pairwise)"


# --------------------------------------------------------------------------- openai: vs openai-compatible:

def test_openai_with_base_url_needs_a_key_openai_compatible_does_not(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    data = write_jsonl(tmp_path / "rows.jsonl", [{"query": "q", "golden": "gold ++", "draft": "d +",
                                                  "aligned": "a +++"}])
    env = {"OPENAI_API_KEY": ""}
    with FakeProvider(reply=plus_rule) as server:
        proc = run_cli("evaluate", "--input", data, "--objectives", "honesty", "--judge", "openai:m", "--base-url",
                       _url(server), "--out", tmp_path / "a", env=env)
        assert proc.returncode == 2
        assert f"use --judge openai-compatible:m@{_url(server)}" in proc.stderr and server.calls == []
        for judge, extra in ((f"openai-compatible:m@{_url(server)}", []),
                             ("openai-compatible:m", ["--base-url", _url(server)])):
            proc = run_cli("evaluate", "--input", data, "--objectives", "honesty", "--judge", judge, *extra,
                           "--out", tmp_path / "b", env=env)
            assert proc.returncode == 0, proc.stderr
        assert len(server.calls) == 2  # the second run was answered from the cache (same judge name)
        proc = run_cli("evaluate", "--input", data, "--objectives", "honesty", "--judge",
                       f"openai-compatible:m@{_url(server)}", "--base-url", "http://127.0.0.1:9/v1", "--out",
                       tmp_path / "b", "--dry-run", env=env)
        assert "dry run: 0 judge calls to make (2 already answered" in proc.stdout, proc.stderr
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["judge"] == f"openai-compatible:m@{_url(server)}"


def test_adding_a_corrector_or_a_judge_re_judges_nothing_already_judged(tmp_path):
    rows = [{"query": f"q{i}", "golden": "gold ++", "draft": "draft +", "aligned": "aligned +++"} for i in range(4)]
    out = tmp_path / "out"
    with FakeProvider(reply=plus_rule) as a, FakeProvider(reply=plus_rule) as b:
        ja, jb = f"openai-compatible:a@{_url(a)}", f"openai-compatible:b@{_url(b)}"
        first = evaluate(write_jsonl(tmp_path / "one.jsonl", rows), "honesty", ja, out)
        assert len(a.calls) == 8 and first["correctors"] == {"metaaligner": {"column": "aligned"}}
        more = [dict(r, aligned_self_refine="refined ++") for r in rows]
        second = evaluate(write_jsonl(tmp_path / "two.jsonl", more), "honesty", [ja, jb], out)
        # judge a: only the 4 new self-refine comparisons; judge b: everything (12)
        assert len(a.calls) == 8 + 4 and len(b.calls) == 12
    assert second["by_judge"][ja]["calls"] == {"calls": 4, "cached": 8, "retries_after_invalid": 0,
                                               "prompt_tokens": second["by_judge"][ja]["calls"]["prompt_tokens"],
                                               "completion_tokens": 4}
    assert second["by_judge"][ja]["correctors"]["metaaligner"] == first["objectives"]
    assert second["by_judge"][ja]["correctors"]["self-refine"]["honesty"]["aligned"]["ties"] == 4


def test_score_mode_script_variant_and_two_correctors(tmp_path):
    rows = [{"query": f"q{i}", "golden": "g", "draft": "d " + "+" * i, "aligned": "a " + "+" * (i + 2),
             "aligned_pku": "d " + "+" * i} for i in range(4)]
    single = re.compile(r"RESPONSE: (.*)\"\s+\"\n Assign a score", re.S)

    def scorer(body):
        m = single.search(prompt_text(body))
        assert m, prompt_text(body)[:120]
        return str(min(10, 2 * m.group(1).count("+")))

    with FakeProvider(reply=scorer) as server:
        report = evaluate(write_jsonl(tmp_path / "rows.jsonl", rows), "honesty", "openai:s", tmp_path / "out",
                          base_url=_url(server), mode="score", judge_prompt_name="script")
        assert all(prompt_text(c.body).startswith("You will be presented with one query and a response to this "
                                                  "query.QUERY: ") for c in server.calls)
        assert len(server.calls) == 8  # the pku correction repeats the draft: same prompt, asked once
    blocks = report["by_judge"]["openai:s"]["correctors"]
    # drafts 0,2,4,6 ; metaaligner 4,6,8,10 ; pku = drafts
    assert blocks["metaaligner"]["honesty"]["mean_original"] == pytest.approx(3)
    assert blocks["metaaligner"]["honesty"]["mean_aligned"] == pytest.approx(7)
    assert blocks["metaaligner"]["honesty"]["advantage"] == pytest.approx(4)
    assert blocks["metaaligner"]["honesty"]["ci95"]["advantage"] == pytest.approx([4.0, 4.0])
    assert blocks["pku-aligner"]["honesty"]["advantage"] == 0 and blocks["pku-aligner"]["honesty"]["copy_rate"] == 1
    assert report["prompt"].startswith("authors' evaluation/UltraFeedback_GPT4_rate.py")
    assert "score_density_honesty.png" in report["plots"]
