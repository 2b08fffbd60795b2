"""Policy backends against a real HTTP server on 127.0.0.1, through the official openai/anthropic clients."""
from __future__ import annotations

import logging

import pytest

from metaaligner_core.backends import BackendError, Completion, load_backend, parse_compatible
from metaaligner_core.errors import MetaAlignerError
from tests.api_server import FakeProvider, prompt_text

KEY = "sk-test-SECRET-0123456789"


def echo(body):
    return "echo: " + prompt_text(body)


@pytest.fixture
def keys(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)


def openai(server, **kw):
    return load_backend("openai:gpt-test", base_url=server.base_url + "/v1", **kw)


def anthropic(server, **kw):
    return load_backend("anthropic:claude-test", base_url=server.base_url, **kw)


@pytest.mark.parametrize("make", [openai, anthropic], ids=["openai", "anthropic"])
def test_complete_sends_the_prompt_and_returns_text_and_usage(keys, make):
    with FakeProvider(reply=echo) as server:
        backend = make(server)
        c = backend.complete("What is RLHF?", max_tokens=7, system="Be brief.")
    assert isinstance(c, Completion)
    assert c.text == "echo: What is RLHF?"
    assert c.usage == {"prompt_tokens": 3, "completion_tokens": 4}
    (call,) = server.calls
    body = call.body
    headers = {k.lower(): v for k, v in call.headers.items()}
    assert body["model"] in ("gpt-test", "claude-test")
    assert body["temperature"] == 0.0
    if make is openai:
        assert call.path == "/v1/chat/completions"
        assert body["max_completion_tokens"] == 7
        assert body["messages"] == [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "What is RLHF?"}]
        assert headers["authorization"] == f"Bearer {KEY}"
    else:
        assert call.path == "/v1/messages"
        assert body["max_tokens"] == 7 and body["system"] == "Be brief."
        assert KEY in (headers.get("x-api-key"), headers.get("authorization", "").removeprefix("Bearer "))


@pytest.mark.parametrize("make", [openai, anthropic], ids=["openai", "anthropic"])
def test_stream_yields_the_reply_in_pieces(keys, make):
    reply = "one two three four"
    with FakeProvider(reply=lambda body: reply) as server:
        pieces = list(make(server).stream("q"))
    assert len(pieces) == 4 and "".join(pieces) == reply
    assert server.calls[0].body["stream"] is True


@pytest.mark.parametrize("make", [openai, anthropic], ids=["openai", "anthropic"])
@pytest.mark.parametrize("status", [429, 500, 503])
def test_a_fault_then_success_is_retried(keys, make, status):
    with FakeProvider(reply=echo, faults=[status]) as server:
        c = make(server, max_retries=2).complete("hello")
    assert c.text == "echo: hello"
    assert [call.status for call in server.calls] == [status, 200]


@pytest.mark.parametrize("make", [openai, anthropic], ids=["openai", "anthropic"])
def test_a_call_that_keeps_failing_raises_backend_error_without_the_key(keys, make, caplog):
    caplog.set_level(logging.DEBUG)
    with FakeProvider(reply=echo, faults=[429, 429, 429]) as server:
        backend = make(server, max_retries=2)
        with pytest.raises(BackendError) as err:
            backend.complete("hello")
    assert len(server.calls) == 3  # the first try and two retries
    msg = str(err.value)
    assert "429" in msg and backend.name in msg
    assert KEY not in msg and KEY not in caplog.text


@pytest.mark.parametrize("spec,var", [("openai:gpt-4o", "OPENAI_API_KEY"),
                                      ("anthropic:claude-3-5-sonnet", "ANTHROPIC_API_KEY")])
def test_a_missing_key_names_the_variable(monkeypatch, spec, var):
    monkeypatch.delenv(var, raising=False)
    with pytest.raises(MetaAlignerError, match=var):
        load_backend(spec)


def test_openai_compatible_needs_no_key_and_sends_max_tokens(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeProvider(reply=echo) as server:
        backend = load_backend(f"openai-compatible:llama@3@{server.base_url}/v1")
        assert backend.name == f"openai-compatible:llama@3@{server.base_url}/v1"
        assert backend.complete("hi", max_tokens=5).text == "echo: hi"
    body = server.calls[0].body
    assert body["model"] == "llama@3" and body["max_tokens"] == 5 and "max_completion_tokens" not in body


def test_parse_compatible():
    assert parse_compatible("m@http://h:8000/v1") == ("m", "http://h:8000/v1")
    with pytest.raises(MetaAlignerError, match="NAME@URL"):
        parse_compatible("just-a-name")


@pytest.mark.parametrize("make", [openai, anthropic], ids=["openai", "anthropic"])
def test_complete_batch_keeps_the_order_of_concurrent_calls(keys, make):
    prompts = [f"p{i}" for i in range(12)]
    with FakeProvider(reply=echo, delay=0.02) as server:
        outs = make(server, concurrency=4).complete_batch(prompts)
    assert [c.text for c in outs] == [f"echo: {p}" for p in prompts]
    assert len(server.calls) == 12


def test_empty_model_name_is_an_error(keys):
    with pytest.raises(MetaAlignerError, match="empty"):
        load_backend("openai:")


def _auth(call) -> str:
    return next(v for k, v in call.headers.items() if k.lower() == "authorization")


def test_openai_compatible_never_sends_the_openai_key(monkeypatch):
    """A third-party server gets its own key (METAALIGNER_COMPAT_API_KEY, or the variable the
    operator names in METAALIGNER_COMPAT_API_KEY_ENV), never OPENAI_API_KEY."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("METAALIGNER_COMPAT_API_KEY", raising=False)
    monkeypatch.delenv("METAALIGNER_COMPAT_API_KEY_ENV", raising=False)
    with FakeProvider(reply=echo) as server:
        spec = f"openai-compatible:m@{server.base_url}/v1"
        load_backend(spec).complete("a")
        monkeypatch.setenv("METAALIGNER_COMPAT_API_KEY", "compat-1")
        load_backend(spec).complete("b")
        monkeypatch.setenv("VLLM_KEY", "vllm-2")
        monkeypatch.setenv("METAALIGNER_COMPAT_API_KEY_ENV", "VLLM_KEY")
        load_backend(spec).complete("c")
    assert [_auth(c) for c in server.calls] == ["Bearer not-needed", "Bearer compat-1", "Bearer vllm-2"]
    assert all(KEY not in str(c.headers) for c in server.calls)


def test_model_grammar_is_one_parser():
    from metaaligner_core.models import parse_model

    m = parse_model(" openai-compatible:org/Meta@Aligner@https://h:8000/v1 ")
    assert (m.provider, m.name, m.url, m.is_api) == ("openai-compatible", "org/Meta@Aligner", "https://h:8000/v1", True)
    assert (parse_model("anthropic: claude-x").provider, parse_model("anthropic: claude-x").name) == ("anthropic",
                                                                                                    "claude-x")
    assert parse_model("").is_default and parse_model(None).spec == "default"
    local = parse_model("MetaAligner/MetaAligner-HH-RLHF-7B")
    assert (local.provider, local.name, local.is_api) == ("local", "MetaAligner/MetaAligner-HH-RLHF-7B", False)
    with pytest.raises(MetaAlignerError, match="empty"):
        parse_model("anthropic:  ")
