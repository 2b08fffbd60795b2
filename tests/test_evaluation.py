"""``metaaligner evaluate`` end to end: the real OpenAI and Anthropic clients against a real HTTP
server on 127.0.0.1 (tests/api_server.py) that judges by a fixed rule.

The rule: the response with more ``+`` signs is better; equal counts tie. It ignores positions,
so the expected win rates follow from the data alone, whatever positions the seed draws.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from api_server import FakeProvider, prompt_text
from conftest import ROOT, read_jsonl, run_cli, write_jsonl
from metaaligner_core.errors import MetaAlignerError
from metaaligner_core.evaluation import evaluate

SECRET = "sk-test-do-not-log-4f1c"
ENV = {"OPENAI_API_KEY": SECRET, "ANTHROPIC_API_KEY": SECRET}
PAIR = re.compile(r"RESPONSE 1: (.*) \| RESPONSE 2: (.*)\. Consider the following aspect", re.S)
SINGLE = re.compile(r"RESPONSE: (.*) Assign a score", re.S)

# golden has two "+"; draft/aligned vary: per row the draft's and aligned's outcome vs golden.
ROWS = [
    {"query": "q0", "golden": "gold ++", "draft": "draft +", "aligned": "aligned +++"},    # L / W
    {"query": "q1", "golden": "gold ++", "draft": "draft ++", "aligned": "aligned ++++"},  # T / W
    {"query": "q2", "golden": "gold ++", "draft": "draft +++", "aligned": "aligned ++"},   # W / T
    {"query": "q3", "golden": "gold ++", "draft": "draft", "aligned": "aligned +"},        # L / L
    {"query": "q4", "golden": "gold ++", "draft": "draft +", "aligned": "aligned +++"},    # L / W
]
# original: 1 win of 5; aligned: 3 wins of 5
EXPECTED_ORIGINAL, EXPECTED_ALIGNED = 1 / 5, 3 / 5


def plus_rule(body: dict) -> str:
    text = prompt_text(body)
    m = PAIR.search(text)
    if m:
        a, b = m.group(1).count("+"), m.group(2).count("+")
        return "0" if a == b else ("1" if a > b else "2")
    m = SINGLE.search(text)
    return str(min(10, 2 * m.group(1).count("+"))) if m else "?"


def always_one(body: dict) -> str:
    return "1"


@pytest.fixture(autouse=True)
def api_keys(monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)


def _data(tmp_path, rows=ROWS):
    return write_jsonl(tmp_path / "rows.jsonl", rows)


def _no_secret_anywhere(proc, out_dir):
    assert SECRET not in proc.stdout + proc.stderr
    for f in out_dir.iterdir():
        if f.suffix in (".json", ".jsonl", ".md"):
            assert SECRET not in f.read_text(encoding="utf-8")


@pytest.mark.parametrize("provider_name", ["openai", "anthropic"])
def test_pairwise_win_rates_through_real_clients_with_429_and_500(tmp_path, provider_name):
    data, out = _data(tmp_path), tmp_path / "out"
    with FakeProvider(reply=plus_rule, faults=[429, 500, 503]) as server:
        proc = run_cli("evaluate", "--input", data, "--objectives", "honesty,helpfulness",
                       "--judge", f"{provider_name}:judge-model", "--base-url", _base(server, provider_name),
                       "--out", out, "--seed", "3", "--concurrency", "4", env=ENV)
        assert proc.returncode == 0, proc.stderr
        # 5 rows x 2 objectives x 2 responses, plus the three faulted attempts retried by the client
        assert len(server.calls) == 20 + 3
        assert [c.status for c in server.calls].count(200) == 20
        paths = {c.path for c in server.calls}
        assert paths == ({"/v1/chat/completions"} if provider_name == "openai" else {"/v1/messages"})
        assert all(c.body.get("temperature", 0) == 0 for c in server.calls)
    report = json.loads((out / "report.json").read_text())
    assert report["judge"] == f"{provider_name}:judge-model" and report["seed"] == 3
    assert report["failed"] == 0 and report["invalid"] == 0 and report["judgments"] == 20
    for key in ("honesty", "helpfulness"):
        r = report["objectives"][key]
        assert r["n"] == 5
        assert r["win_rate_original"] == pytest.approx(EXPECTED_ORIGINAL)
        assert r["win_rate_aligned"] == pytest.approx(EXPECTED_ALIGNED)
        assert r["advantage"] == pytest.approx(EXPECTED_ALIGNED - EXPECTED_ORIGINAL)
        assert r["original"] == {"wins": 1, "ties": 1, "losses": 3, "invalid": 0, "failed": 0}
    assert report["calls"]["calls"] == 20 and report["calls"]["prompt_tokens"] > 0
    # both positions of the golden answer were drawn
    judgments = read_jsonl(out / "judgments.jsonl")
    assert {j["golden_position"] for j in judgments} == {1, 2}
    md = (out / "report.md").read_text()
    assert "| Honesty | Helpfulness |" in md and "+40.00%" in md
    assert (out / "win_rates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "advantage +40.00%" in proc.stdout
    _no_secret_anywhere(proc, out)

    # A rerun against a fresh server (another port) makes no call at all: everything is cached.
    with FakeProvider(reply=plus_rule) as server2:
        proc2 = run_cli("evaluate", "--input", data, "--objectives", "honesty,helpfulness",
                        "--judge", f"{provider_name}:judge-model", "--base-url", _base(server2, provider_name),
                        "--out", out, "--seed", "3", env=ENV)
        assert proc2.returncode == 0, proc2.stderr
        assert server2.calls == []
    report2 = json.loads((out / "report.json").read_text())
    assert report2["objectives"] == report["objectives"]
    assert report2["calls"] == {"calls": 0, "cached": 20, "retries_after_invalid": 0}


def _base(server, provider_name):
    # the OpenAI client wants the /v1 prefix in base_url; the Anthropic client adds /v1 itself
    return server.base_url + "/v1" if provider_name == "openai" else server.base_url


def test_a_failing_comparison_is_reported_failed_never_filled_and_retried_on_rerun(tmp_path):
    data, out = _data(tmp_path), tmp_path / "out"
    # --max-retries 1: the first comparison gets 500 twice and fails; the others succeed
    with FakeProvider(reply=plus_rule, faults=[500, 500]) as server:
        proc = run_cli("evaluate", "--input", data, "--objectives", "honesty", "--judge", "openai:j",
                       "--base-url", server.base_url + "/v1", "--out", out, "--concurrency", "1",
                       "--max-retries", "1", env=ENV)
        assert len(server.calls) == 10 + 2 - 1  # 10 prompts; the failed one was tried twice
    assert proc.returncode == 1
    assert "1 of 10 judgments failed" in proc.stderr and "HTTP 500" in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["failed"] == 1 and len(report["failures"]) == 1
    failure = report["failures"][0]
    r = report["objectives"]["honesty"]
    assert r["n"] == 4 and r[failure["side"]]["failed"] == 1  # the failed row leaves n on both sides
    assert "failed" in (out / "report.md").read_text()
    lines = read_jsonl(out / "judgments.jsonl")
    assert sum("error" in j for j in lines) == 1 and sum("reply" in j for j in lines) == 9
    _no_secret_anywhere(proc, out)

    # the rerun asks only the failed prompt and then matches a clean run
    with FakeProvider(reply=plus_rule) as server:
        proc = run_cli("evaluate", "--input", data, "--objectives", "honesty", "--judge", "openai:j",
                       "--base-url", server.base_url + "/v1", "--out", out, env=ENV)
        assert proc.returncode == 0, proc.stderr
        assert len(server.calls) == 1
    r = json.loads((out / "report.json").read_text())["objectives"]["honesty"]
    assert (r["n"], r["win_rate_original"], r["win_rate_aligned"]) == (5, EXPECTED_ORIGINAL, EXPECTED_ALIGNED)


def test_invalid_reply_is_retried_once_then_excluded(tmp_path):
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def rule(body):
        text = prompt_text(body)
        with lock:
            seen[text] = seen.get(text, 0) + 1
            k = seen[text]
        if "QUERY: hesitant " in text:   # always unsure: invalid after the retry
            return "I am not sure."
        if "QUERY: slow " in text and k == 1:  # unsure once, valid on the retry
            return "Both 1 and 2 are fine"
        return plus_rule(body)

    rows = [dict(ROWS[0], query="hesitant q"), dict(ROWS[1], query="slow q"), ROWS[2]]
    out = tmp_path / "out"
    with FakeProvider(reply=rule) as server:
        report = evaluate(_data(tmp_path, rows), "honesty", "openai:j", out, base_url=server.base_url + "/v1",
                          concurrency=3)
        assert len(server.calls) == 6 + 2 + 2  # 6 prompts, 2 hesitant + 2 slow ones asked twice
    r = report["objectives"]["honesty"]
    assert report["invalid"] == 2 and r["original"]["invalid"] == 1 and r["aligned"]["invalid"] == 1
    assert r["n"] == 2  # the hesitant row is left out; the slow row counts with its second answer
    assert r["win_rate_aligned"] == pytest.approx(0.5) and r["win_rate_original"] == pytest.approx(0.5)
    assert report["calls"]["retries_after_invalid"] == 4
    # the rerun reuses both attempts from the cache: zero calls, same result
    with FakeProvider(reply=rule) as server:
        again = evaluate(_data(tmp_path, rows), "honesty", "openai:j", out, base_url=server.base_url + "/v1")
        assert server.calls == []
    assert again["objectives"] == report["objectives"]


def test_swap_removes_position_bias_and_concurrency_changes_nothing(tmp_path):
    data = _data(tmp_path)
    with FakeProvider(reply=always_one) as server:
        url = server.base_url + "/v1"
        one = evaluate(data, "honesty", "openai:biased", tmp_path / "c1", base_url=url, seed=5, concurrency=1)
        many = evaluate(data, "honesty", "openai:biased", tmp_path / "c8", base_url=url, seed=5, concurrency=8)
        swapped = evaluate(data, "honesty", "openai:biased", tmp_path / "sw", base_url=url, seed=5, swap=True)
    assert one["objectives"] == many["objectives"]
    # "always 1" wins exactly where the golden answer was drawn into position 2
    positions = {(j["row"], j["side"]): j["golden_position"] for j in read_jsonl(tmp_path / "c1" / "judgments.jsonl")}
    expected = sum(positions[(i, "original")] == 2 for i in range(5)) / 5
    assert one["objectives"]["honesty"]["win_rate_original"] == pytest.approx(expected)
    # with both orders judged the biased judge never agrees with itself: all ties
    r = swapped["objectives"]["honesty"]
    assert swapped["swap"] and swapped["judgments"] == 10 and swapped["calls"]["calls"] == 20
    assert r["win_rate_original"] == 0 and r["win_rate_aligned"] == 0 and r["original"]["ties"] == 5


def test_score_mode_means_medians_and_density_plots(tmp_path):
    out = tmp_path / "out"
    with FakeProvider(reply=plus_rule) as server:
        proc = run_cli("evaluate", "--input", _data(tmp_path), "--objectives", "honesty,Brevity: be short",
                       "--judge", "openai:j", "--base-url", server.base_url + "/v1", "--out", out,
                       "--mode", "score", env=ENV)
        assert proc.returncode == 0, proc.stderr
        assert len(server.calls) == 20
    report = json.loads((out / "report.json").read_text())
    r = report["objectives"]["brevity"]
    # scores are 2 x the "+" count: drafts 2,4,6,0,2 ; aligned 6,8,4,2,6
    assert r["mean_original"] == pytest.approx(2.8) and r["median_original"] == 2
    assert r["mean_aligned"] == pytest.approx(5.2) and r["median_aligned"] == 6
    assert r["n"] == 5 and r["advantage"] == pytest.approx(2.4)
    assert sorted(report["plots"]) == ["length_change.png", "score_density_brevity.png", "score_density_honesty.png"]
    for name in report["plots"]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "Aligned mean" in (out / "report.md").read_text()


def test_killed_run_loses_no_answer(tmp_path):
    rows = [dict(r, query=f"{r['query']}-{k}") for k in range(4) for r in ROWS]  # 20 rows, 40 prompts
    data, out = _data(tmp_path, rows), tmp_path / "out"
    with FakeProvider(reply=plus_rule, delay=0.15) as server:
        proc = subprocess.Popen([sys.executable, "-m", "metaaligner_core", "evaluate", "--input", str(data),
                                 "--objectives", "honesty", "--judge", "openai:j", "--base-url",
                                 server.base_url + "/v1", "--out", str(out), "--concurrency", "1"],
                                cwd=ROOT, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        judgments = out / "judgments.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and (not judgments.exists() or judgments.read_text().count("\n") < 5):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    answered = len(read_jsonl(judgments))
    assert 5 <= answered < 40 and not (out / "report.json").exists()
    with FakeProvider(reply=plus_rule) as server:
        report = evaluate(data, "honesty", "openai:j", out, base_url=server.base_url + "/v1", concurrency=4)
        assert len(server.calls) == 40 - answered
    assert report["calls"]["cached"] == answered and report["failed"] == 0
    r = report["objectives"]["honesty"]
    assert (r["n"], r["win_rate_original"], r["win_rate_aligned"]) == (20, EXPECTED_ORIGINAL, EXPECTED_ALIGNED)


def test_bad_rows_and_objectives_name_file_line_field(tmp_path):
    rows = [ROWS[0], {"query": "q", "golden": "g", "draft": "d"}]
    data = _data(tmp_path, rows)
    out = tmp_path / "out"
    proc = run_cli("evaluate", "--input", data, "--objectives", "honesty", "--judge", "openai:j",
                   "--base-url", "http://127.0.0.1:9/v1", "--out", out, env=ENV)
    assert proc.returncode == 2
    assert f'{data}:2: field "aligned": missing' in proc.stderr
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(MetaAlignerError, match='unknown objective "kindness"'):
        evaluate(_data(tmp_path, ROWS), "honesty,kindness", "openai:j", out)
    bad_type = write_jsonl(tmp_path / "t.jsonl", [dict(ROWS[0], draft=3)])
    with pytest.raises(MetaAlignerError, match=r't.jsonl:1: field "draft": expected a string'):
        evaluate(bad_type, "honesty", "openai:j", out)
    failed = write_jsonl(tmp_path / "f.jsonl", [dict(ROWS[0], draft=None, aligned=None, error="HTTP 500")])
    with pytest.raises(MetaAlignerError, match=r'f.jsonl:1: field "draft": null: align failed on this row'):
        evaluate(failed, "honesty", "openai:j", out)
    with pytest.raises(MetaAlignerError, match=r"--max-rows must be at least 1 \(got 0\)"):
        evaluate(_data(tmp_path, ROWS), "honesty", "openai:j", out, max_rows=0)


def test_a_judge_that_never_answers_1_2_or_0_gives_no_rate_and_no_plot(tmp_path):
    out = tmp_path / "out"
    with FakeProvider(reply=lambda body: "It depends.") as server:
        proc = run_cli("evaluate", "--input", _data(tmp_path, ROWS[:2]), "--objectives", "honesty", "--judge",
                       "openai:j", "--base-url", server.base_url + "/v1", "--out", out, env=ENV)
        assert len(server.calls) == 8  # 4 prompts, each asked twice
    assert proc.returncode == 0  # invalid replies are the judge's answers, not failures
    assert "4 of 4 judgments were invalid" in proc.stderr
    report = json.loads((out / "report.json").read_text())
    r = report["objectives"]["honesty"]
    assert r["n"] == 0 and r["win_rate_original"] is None and r["advantage"] is None
    # no win-rate plot without a rate; the length-change plot needs no judge
    assert report["invalid"] == 4 and report["plots"] == ["length_change.png"]
    assert not (out / "win_rates.png").exists()
    assert "| Original | – |" in (out / "report.md").read_text()


@pytest.mark.slow
def test_local_embedded_model_as_judge(tmp_path, embedded_dir, caplog):
    """The offline path: a local model judges in batches; its answers are cached like an API's."""
    out = tmp_path / "out"
    data = _data(tmp_path, ROWS[:2])
    with caplog.at_level("WARNING"):
        report = evaluate(data, "honesty", "default", out, max_tokens=3, concurrency=4)
    assert "poor judge" in caplog.text
    assert report["judge"] == "default" and report["judgments"] == 4
    assert report["failed"] == 0
    lines = read_jsonl(out / "judgments.jsonl")
    assert len(lines) == report["calls"]["calls"] and all("reply" in j for j in lines)
    # The report agrees with the cached replies: a judgment is valid if its first answer or its
    # one retry parses; a row counts (n) when both its sides are valid.
    from metaaligner_core.evaluation.metrics import parse_choice

    replies = {(j["row"], j["side"], j["attempt"]): j["reply"] for j in lines}
    valid = {(r, s): any(parse_choice(replies.get((r, s, a))) is not None for a in (0, 1))
             for r in range(2) for s in ("original", "aligned")}
    assert report["invalid"] == sum(not v for v in valid.values())
    assert report["objectives"]["honesty"]["n"] == sum(valid[(r, "original")] and valid[(r, "aligned")]
                                                       for r in range(2))
    retried = sum(parse_choice(replies[(r, s, 0)]) is None for r, s in valid)
    assert report["calls"]["calls"] == 4 + retried
    again = evaluate(data, "honesty", "default", out, max_tokens=3)
    assert again["calls"]["calls"] == 0 and again["objectives"] == report["objectives"]
