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
    r = run_cli("align", "--input", src, "--out", out, "--template", "hh-rlhf", *ARGS)
    assert r.returncode == 0, r.stderr
    assert "not a trained MetaAligner" in r.stderr and "MetaAligner/MetaAligner-UltraFeedback-1.1B" in r.stderr
    got = read_jsonl(out)
    assert [g["id"] for g in got] == ["a", "b", "c"]
    for src_row, g in zip(rows, got):
        assert {k: v for k, v in g.items() if k not in ("draft", "aligned")} == \
            {k: v for k, v in src_row.items() if k != "draft"}
    assert got[0]["draft"] == "Yes, always."
    for g in got[1:]:  # no (or an empty) draft: the embedded policy wrote one
        assert g["draft"] == chat.complete(g["query"], max_tokens=8).text and g["draft"]
    for g in got:
        assert g["aligned"] == aligner.align(g["query"], g["draft"], OBJ, max_new_tokens=8)

    before = out.read_bytes()
    r = run_cli("align", "--input", src, "--out", out, "--template", "hh-rlhf", "--resume", *ARGS)
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
