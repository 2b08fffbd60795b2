"""The correction pipeline without a local model: a remote aligner on a local completions server,
the registry's hooks, the one template rule, and given drafts marked as such."""
from __future__ import annotations

import pytest

from metaaligner_core.errors import MetaAlignerError
from metaaligner_core.objectives import parse_objectives
from metaaligner_core.pipeline import ModelRegistry, Pipeline
from metaaligner_core.templates import build_prompt
from tests.api_server import FakeProvider


def reverse_draft(body):
    return "  fixed: " + body["prompt"].split(" | Answer: ")[1].split(" | Edit: ")[0][::-1] + " \n"


def test_remote_aligner_streams_and_corrects_through_the_pipeline(monkeypatch):
    monkeypatch.setenv("METAALIGNER_COMPAT_API_KEY", "k")
    with FakeProvider(reply=reverse_draft) as server:
        aligner = f"openai-compatible:MetaAligner-IMHI-7B@{server.base_url}/v1"
        pipe = Pipeline(ModelRegistry(), policy=None, aligner=aligner)
        updates = [(u.phase, u.aligned) for u in pipe.stream("Is the poster depressed?", "correctness",
                                                           draft="Yes, clearly.")]
        result = pipe.correct("Is the poster depressed?", "correctness", draft="Yes, clearly.")
        with pytest.raises(MetaAlignerError, match="no draft given and no policy"):
            pipe.correct("q?", "correctness")
    assert updates[0] == ("loading-aligner", "") and updates[-1] == ("done", "fixed: .ylraelc ,seY")
    assert [p for p, _ in updates[1:-1]] == ["aligning"] * (len(updates) - 2) and len(updates) > 4  # streamed
    objs = parse_objectives("correctness", family="imhi")  # the template follows the aligner's name
    assert result.template == "imhi" and result.draft_source == "input" and result.aligned == "fixed: .ylraelc ,seY"
    assert result.prompt == build_prompt("imhi", "Is the poster depressed?", "Yes, clearly.", objs)
    assert [c.body["prompt"] for c in server.calls] == [result.prompt] * 2
    assert [c.body.get("stream") for c in server.calls] == [True, True]  # correct() is the stream run to its end
    assert set(result.timings) == {"align"}


def test_registry_check_hook_refuses_before_loading_and_reports_status():
    seen = []

    def allow_only_default(kind, name):
        if name != "default":
            raise MetaAlignerError(f"{kind} {name} is not on this server's list")

    reg = ModelRegistry(check=allow_only_default, on_status=lambda s: seen.append((s.kind, s.name, s.state)))
    with pytest.raises(MetaAlignerError, match="not on this server's list"):
        reg.aligner("some/other-model")
    with pytest.raises(MetaAlignerError, match="not on this server's list"):
        reg.policy("openai-compatible:x@http://127.0.0.1:9/v1")
    assert seen == [] and reg.statuses() == []  # refused before anything started loading
    with pytest.raises(MetaAlignerError, match="openai-compatible:NAME@URL"):
        reg.aligner("anthropic:claude")  # API chat models cannot be aligners


def test_remote_aligner_failure_is_one_line_without_the_key(monkeypatch):
    monkeypatch.setenv("METAALIGNER_COMPAT_API_KEY", "compat-SECRET")
    with FakeProvider(faults=[500, 500, 500]) as server:
        from metaaligner_core.inference import RemoteAligner

        remote = RemoteAligner.load(f"openai-compatible:m@{server.base_url}/v1", max_retries=1)
        with pytest.raises(MetaAlignerError) as e:
            remote.align("q?", "d", "honesty")
    assert "HTTP 500" in str(e.value) and "compat-SECRET" not in str(e.value) and "\n" not in str(e.value)


def test_remote_aligner_sends_the_templates_markers_as_stop_and_cuts_at_them(monkeypatch):
    """A completions server gets ``stop``; one that ignores it (this fake) is cut here, plain and streamed."""
    monkeypatch.setenv("METAALIGNER_COMPAT_API_KEY", "k")
    with FakeProvider(reply=lambda body: " The fixed answer. | Edit: The fixed answer. | Edit:") as server:
        from metaaligner_core.inference import RemoteAligner

        remote = RemoteAligner.load(f"openai-compatible:m@{server.base_url}/v1", max_retries=1)
        assert remote.align("q?", "An answer.", "honesty") == "The fixed answer."
        assert "".join(remote.stream("q?", "An answer.", "honesty")) == "The fixed answer."
        assert remote.align_batch(["q?", "q?"], ["An answer.", "x | Answer: y"], "honesty") == ["The fixed answer."] * 2
    stops = [c.body.get("stop") for c in server.calls]
    assert stops[:3] == [["| Edit", "| Answer:", "| Query:"]] * 3
    assert sorted(map(tuple, stops[2:])) == [("| Edit", "| Answer:", "| Query:"), ("| Edit", "| Query:")]


def test_remote_aligner_ends_a_loop_plain_and_streamed(monkeypatch):
    """A server that writes one sentence over and over (here, five times): the correction ends after
    its third copy, as a local aligner's does (engine.stops.loop_end); the stream is closed there."""
    monkeypatch.setenv("METAALIGNER_COMPAT_API_KEY", "k")
    s = "You can assume that the service types are always valid."
    with FakeProvider(reply=lambda body: " " + " ".join([s] * 5)) as server:
        from metaaligner_core.inference import RemoteAligner

        remote = RemoteAligner.load(f"openai-compatible:m@{server.base_url}/v1", max_retries=1)
        assert remote.align("q?", f"Intro. {s}", "honesty") == f"{s} {s} {s}"
        assert "".join(remote.stream("q?", f"Intro. {s}", "honesty")) == f"{s} {s} {s}"
        assert remote.align("q?", " ".join([s] * 4), "honesty") == " ".join([s] * 5)  # four in the draft: no loop
