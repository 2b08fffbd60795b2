"""``metaaligner align`` as a user runs it: real embedded model, real HTTP policy servers, bad input."""
from __future__ import annotations

import json

import pytest

from tests.api_server import FakeProvider, prompt_text
from tests.conftest import read_jsonl, run_cli, write_jsonl

OBJ = "harmlessness,helpfulness"
ARGS = ["--objectives", OBJ, "--max-new-tokens", "8", "--batch-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def models(embedded_dir):
    """The library's own aligner and chat policy, to check what the CLI wrote."""
    from metaaligner_core.backends.hf import HFChatBackend, LocalGenerator
    from metaaligner_core.inference import Aligner

    aligner = Aligner.load("default", template="hh-rlhf")
    g = aligner.generator
    return aligner, HFChatBackend(LocalGenerator(g.model, g.tokenizer, g.name))


@pytest.mark.slow
def test_align_end_to_end_with_the_embedded_models(tmp_path, models):
    aligner, chat = models
    rows = [{"id": "a", "query": "Is it safe to eat raw chicken?", "draft": "Yes, always.", "topic": "food"},
            {"id": "b", "query": "How do I say thank you in French?"},
            {"id": "c", "query": "Tell me a joke.", "draft": "", "meta": {"x": [1, 2]}}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    r = run_cli("align", "--input", src, "--out", out, "--template", "hh-rlhf", "--policy", "default", *ARGS)
    assert r.returncode == 0, r.stderr
    assert "not a trained MetaAligner" in r.stderr and "MetaAligner/MetaAligner-UltraFeedback-1.1B" in r.stderr
    got = read_jsonl(out)
    assert [g["id"] for g in got] == ["a", "b", "c"]
    added = ("draft", "aligned", "draft_source", "template", "correctors")
    for src_row, g in zip(rows, got):
        assert {k: v for k, v in g.items() if k not in added} == {k: v for k, v in src_row.items() if k != "draft"}
        assert g["template"] == "hh-rlhf" and g["correctors"] == ["metaaligner"]
    assert [g["draft_source"] for g in got] == ["input", "default", "default"]
    assert got[0]["draft"] == "Yes, always."
    for g in got[1:]:  # no (or an empty) draft: the embedded policy wrote one
        assert g["draft"] == chat.complete(g["query"], max_tokens=8).text and g["draft"]
    for g in got:
        assert g["aligned"] == aligner.align(g["query"], g["draft"], OBJ, max_new_tokens=8)

    before = out.read_bytes()
    r = run_cli("align", "--input", src, "--out", out, "--template", "hh-rlhf", "--policy", "default", "--resume",
                *ARGS)
    assert r.returncode == 0, r.stderr
    assert "nothing to do" in r.stderr and out.read_bytes() == before


@pytest.mark.slow
def test_openai_policy_row_that_keeps_failing_gets_an_error_then_resume_fixes_it(tmp_path):
    rows = [{"query": f"Question {i}?"} for i in range(3)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    env = {"OPENAI_API_KEY": "sk-secret-xyz"}
    with FakeProvider(reply=lambda body: "Draft for " + prompt_text(body), faults=[429, 429]) as server:
        r = run_cli("align", "--input", src, "--out", out, "--policy", "openai:gpt-test",
                    "--policy-base-url", server.base_url + "/v1", "--max-retries", "1", "--concurrency", "1",
                    *ARGS, env=env)
        assert r.returncode == 1, r.stderr
        assert "1 of 3 rows failed (input lines 1)" in r.stderr and "--resume" in r.stderr
        assert "sk-secret-xyz" not in r.stderr + r.stdout
        got = read_jsonl(out)
        assert "429" in got[0]["error"] and got[0]["draft"] is None and got[0]["aligned"] is None
        assert [g["draft"] for g in got[1:]] == ["Draft for Question 1?", "Draft for Question 2?"]
        assert all(g["aligned"] and "error" not in g for g in got[1:])
        assert len(server.calls) == 4  # row 1: try + retry; rows 2 and 3: one call each

        r = run_cli("align", "--input", src, "--out", out, "--policy", "openai:gpt-test",
                    "--policy-base-url", server.base_url + "/v1", "--resume", *ARGS, env=env)
        assert r.returncode == 0, r.stderr
        assert len(server.calls) == 5  # only the failed row was asked again
    fixed = read_jsonl(out)
    assert fixed[0]["draft"] == "Draft for Question 0?" and fixed[0]["aligned"] and "error" not in fixed[0]
    assert fixed[1:] == got[1:]


@pytest.mark.slow
def test_anthropic_policy_serving_the_embedded_model_with_a_429_first(tmp_path, models):
    _, chat = models

    def reply(body):
        return chat.complete(prompt_text(body), max_tokens=body["max_tokens"]).text

    rows = [{"query": "What is the capital of France?"}, {"query": "Name a colour."}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    with FakeProvider(reply=reply, faults=[429]) as server:
        r = run_cli("align", "--input", src, "--out", out, "--policy", "anthropic:claude-test",
                    "--policy-base-url", server.base_url, "--concurrency", "1", *ARGS,
                    env={"ANTHROPIC_API_KEY": "sk-ant-secret"})
    assert r.returncode == 0, r.stderr
    assert [c.status for c in server.calls] == [429, 200, 200]
    got = read_jsonl(out)
    assert [g["draft"] for g in got] == [chat.complete(q["query"], max_tokens=8).text for q in rows]
    assert "Paris" in got[0]["draft"]


def test_missing_api_key_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    src = write_jsonl(tmp_path / "in.jsonl", [{"query": "q?"}])
    out = tmp_path / "out.jsonl"
    r = run_cli("align", "--input", src, "--out", out, "--policy", "openai:gpt-4o", *ARGS)
    assert r.returncode == 2 and "OPENAI_API_KEY" in r.stderr and not out.exists()


@pytest.mark.parametrize("lines,expected", [
    (['{"query": "ok?", "draft": "x"}', '{"draft": "no query"}'], ':2: field "query": missing'),
    (['{"query": ""}'], ':1: field "query": expected a non-empty string'),
    (['{"query": "q", "draft": 3}'], ':1: field "draft": expected a string'),
    (['{"query": "q"', ], ':1: not valid JSON'),
    ([], "no records (empty input file)"),
])
def test_bad_input_names_file_and_line_and_writes_nothing(tmp_path, lines, expected):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    r = run_cli("align", "--input", src, "--out", out, *ARGS)
    assert r.returncode == 2, r.stderr
    assert f"{src}" in r.stderr and expected in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_unknown_objective_is_named(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"query": "q?", "draft": "d"}])
    out = tmp_path / "out.jsonl"
    r = run_cli("align", "--input", src, "--out", out, "--objectives", "honesty,sillyness")
    assert r.returncode == 2 and 'unknown objective "sillyness"' in r.stderr and not out.exists()


def test_resume_refuses_an_output_of_another_input(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"query": "q1?", "draft": "d"}, {"query": "q2?", "draft": "d"}])
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"query": "other?", "draft": "d", "aligned": "a"}) + "\n", encoding="utf-8")
    r = run_cli("align", "--input", src, "--out", out, "--resume", *ARGS)
    assert r.returncode == 2 and f'{out}:1: field "query": differs' in r.stderr


# -- drafts are never invented; the authors' layouts; remote aligners; baselines (no local model) ----
def _csv(path, header, rows):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_a_missing_draft_without_policy_is_an_error_naming_file_line_and_column(tmp_path):
    """The authors' CSVs name the draft generated_text: without --columns or --policy nothing is invented."""
    src = _csv(tmp_path / "gpt.csv", ["query", "goldens", "generated_text"],
               [["Q1?", "g1", "answer one"], ["Q2?", "g2", "answer two"]])
    out = tmp_path / "out.jsonl"
    r = run_cli("align", "--input", src, "--out", out, *ARGS)
    assert r.returncode == 2, r.stderr
    assert f'{src}:2: field "draft": missing or empty (2 of 2 rows)' in r.stderr and "--policy" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    # Mapped, an empty draft on line 3 is named by its real column.
    src2 = _csv(tmp_path / "gpt2.csv", ["query", "generated_text"], [["Q1?", "answer one"], ["Q2?", "  "]])
    r = run_cli("align", "--input", src2, "--out", out, "--columns", "draft=generated_text", *ARGS)
    assert r.returncode == 2 and f'{src2}:3: field "generated_text": missing or empty (1 of 2 rows)' in r.stderr
    r = run_cli("align", "--input", src2, "--out", out, "--columns", "draft=generated_text,colour=x", *ARGS)
    assert r.returncode == 2 and '--columns: unknown field "colour"' in r.stderr and not out.exists()


def _edit_reply(body):
    """A deterministic 'aligner': the last 12 characters of the prompt's draft, reversed."""
    prompt = body["prompt"]
    return "EDIT " + prompt.split(" | Answer: ")[1].split(" | Edit: ")[0][::-1]


def test_remote_aligner_reads_the_template_prompt_with_many_requests_in_flight(tmp_path):
    from tests.api_server import FakeProvider

    from metaaligner_core.objectives import parse_objectives
    from metaaligner_core.templates import build_prompt

    rows = [[f"Question {i}?", f"gold {i}", f"draft number {i}"] for i in range(8)]
    src = _csv(tmp_path / "hh-rlhf-claude.csv", ["query", "goldens", "generated_text"], rows)
    out = tmp_path / "out.jsonl"
    env = {"OPENAI_API_KEY": "sk-openai-must-not-leak", "METAALIGNER_COMPAT_API_KEY": "compat-key-1"}
    with FakeProvider(reply=_edit_reply, delay=0.3) as server:
        aligner = f"openai-compatible:MetaAligner-7B@{server.base_url}/v1"
        r = run_cli("align", "--input", src, "--out", out, "--aligner", aligner, "--objectives", "helpfulness",
                    "--columns", "draft=generated_text,golden=goldens", "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    got = read_jsonl(out)
    # The template follows the data (the file name says hh-rlhf), and so does "helpfulness"'s wording.
    objs = parse_objectives("helpfulness", family="hh-rlhf")
    assert objs[0].text != parse_objectives("helpfulness", family="ultrafeedback")[0].text
    sent = {c.body["prompt"] for c in server.calls}
    assert sent == {build_prompt("hh-rlhf", q, d, objs) for q, _, d in rows}
    assert all(c.path == "/v1/completions" and "messages" not in c.body for c in server.calls)
    assert all(c.body["max_tokens"] == 1024 and c.body["temperature"] == 0 for c in server.calls)  # authors' 1024
    auth = {v for c in server.calls for k, v in c.headers.items() if k.lower() == "authorization"}
    assert auth == {"Bearer compat-key-1"}  # never OPENAI_API_KEY
    assert server.max_in_flight >= 4  # batch align keeps many requests in flight
    for (q, gold, d), g in zip(rows, got):
        assert (g["query"], g["draft"], g["golden"], g["generated_text"]) == (q, d, gold, d)
        assert g["aligned"] == "EDIT " + d[::-1] and g["draft_source"] == "input" and g["template"] == "hh-rlhf"


def test_imhi_outputs_join_their_queries_by_row_and_a_prefix_warns(tmp_path):
    from tests.api_server import FakeProvider

    queries = _csv(tmp_path / "DR.csv", ["query", "gpt-3.5-turbo"], [[f"Post {i}. Depressed?", "ref"] for i in range(5)])
    outputs = _csv(tmp_path / "DR-out.csv", ["goldens", "generated_text"], [[f"g{i}", f"Yes {i}."] for i in range(3)])
    out = tmp_path / "out.jsonl"
    with FakeProvider(reply=_edit_reply) as server:
        aligner = f"openai-compatible:MetaAligner-IMHI-7B@{server.base_url}/v1"
        r = run_cli("align", "--input", outputs, "--queries", queries, "--out", out, "--aligner", aligner,
                    "--objectives", "correctness", "--columns", "draft=generated_text", "--no-progress")
        assert r.returncode == 0, r.stderr
        assert "only the first 3 queries are aligned" in r.stderr
        got = read_jsonl(out)
        assert [g["query"] for g in got] == ["Post 0. Depressed?", "Post 1. Depressed?", "Post 2. Depressed?"]
        assert all(g["template"] == "imhi" and g["aligned"] == "EDIT " + g["draft"][::-1] for g in got)
        # More output rows than queries is an error naming the first row without one.
        short = _csv(tmp_path / "DR-short.csv", ["query"], [["only one"]])
        r = run_cli("align", "--input", outputs, "--queries", short, "--out", tmp_path / "o2.jsonl", "--aligner",
                    aligner, "--objectives", "correctness", "--columns", "draft=generated_text")
        assert r.returncode == 2 and f"{outputs}:3: row 2 has no query: {short} has only 1 rows" in r.stderr


def test_baseline_correctors_and_an_unused_policy_warns(tmp_path):
    """self-refine asks the policy (chat) to revise its draft; pku-aligner sends the PKU raw prompt."""
    from tests.api_server import FakeProvider, prompt_text

    from metaaligner_core.baselines import pku_aligner_prompt, self_refine_prompt
    from metaaligner_core.objectives import parse_objectives

    src = write_jsonl(tmp_path / "rows.jsonl", [{"query": "Q?", "draft": "D."}, {"query": "R?", "draft": "E."}])
    out = tmp_path / "out.jsonl"
    with FakeProvider(reply=lambda b: "REVISED " + prompt_text(b)[-6:]) as policy, \
            FakeProvider(reply=lambda b: "RAW " + b["prompt"][-12:]) as pku, \
            FakeProvider(reply=_edit_reply) as meta:
        r = run_cli("align", "--input", src, "--out", out, "--objectives", "honesty", "--no-progress",
                    "--aligner", f"openai-compatible:MetaAligner@{meta.base_url}/v1",
                    "--policy", f"openai-compatible:policy@{policy.base_url}/v1",
                    "--pku-aligner", f"openai-compatible:aligner-7b@{pku.base_url}/v1",
                    "--correctors", "metaaligner,self-refine,pku-aligner")
        assert r.returncode == 0, r.stderr
        objs = parse_objectives("honesty", family="ultrafeedback")
        assert sorted(prompt_text(c.body) for c in policy.calls) == sorted(
            self_refine_prompt(q, d, objs) for q, d in (("Q?", "D."), ("R?", "E.")))
        assert all(c.path == "/v1/chat/completions" for c in policy.calls)
        assert sorted(c.body["prompt"] for c in pku.calls) == sorted(
            pku_aligner_prompt(q, d) for q, d in (("Q?", "D."), ("R?", "E.")))
        got = read_jsonl(out)
        for g in got:
            assert g["correctors"] == ["metaaligner", "self-refine", "pku-aligner"] and g["draft_source"] == "input"
            assert g["aligned"] == "EDIT " + g["draft"][::-1]
            assert g["aligned_self_refine"] == "REVISED " + self_refine_prompt(g["query"], g["draft"], objs)[-6:]
            assert g["aligned_pku"] == "RAW " + pku_aligner_prompt(g["query"], g["draft"])[-12:]
        # A policy named for rows that all have drafts writes nothing, and says so.
        r = run_cli("align", "--input", src, "--out", tmp_path / "o2.jsonl", "--objectives", "honesty",
                    "--aligner", f"openai-compatible:MetaAligner@{meta.base_url}/v1", "--no-progress",
                    "--policy", f"openai-compatible:policy@{policy.base_url}/v1")
        assert r.returncode == 0 and "no row lacks a draft, so the policy writes none" in r.stderr
    r = run_cli("align", "--input", src, "--out", out, "--objectives", "honesty", "--correctors", "self-refine")
    assert r.returncode == 2 and "self-refine needs --policy" in r.stderr
    r = run_cli("align", "--input", src, "--out", out, "--objectives", "honesty", "--correctors", "pku-aligner")
    assert r.returncode == 2 and "needs --pku-aligner MODEL" in r.stderr


def test_every_draft_failing_leaves_the_corrector_nothing_and_says_so(tmp_path):
    from tests.api_server import FakeProvider

    src = write_jsonl(tmp_path / "rows.jsonl", [{"query": "Q1?"}, {"query": "Q2?"}])
    out = tmp_path / "out.jsonl"
    with FakeProvider(faults=[500] * 10) as policy, FakeProvider(reply=_edit_reply) as meta:
        r = run_cli("align", "--input", src, "--out", out, "--objectives", "honesty", "--no-progress",
                    "--aligner", f"openai-compatible:MetaAligner@{meta.base_url}/v1", "--max-retries", "0",
                    "--policy", f"openai-compatible:policy@{policy.base_url}/v1")
        assert meta.calls == []
    assert r.returncode == 1 and "corrector metaaligner: no row of this chunk to correct (all 2 failed" in r.stderr
    got = read_jsonl(out)
    assert all(g["draft"] is None and g["aligned"] is None and "HTTP 500" in g["error"] for g in got)
    assert {g["draft_source"] for g in got} == {f"openai-compatible:policy@{policy.base_url}/v1"}
