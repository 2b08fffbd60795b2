"""``metaaligner serve`` with the official ``openai`` client against a real server on 127.0.0.1.

A tiny randomly initialised Llama (the embedded model's tokenizer) is the local policy and the
aligner, so these tests run in seconds; an OpenAI-compatible upstream is ``tests/api_server.py``.
Expected answers are computed independently, through the library's own entry points
(``HFChatBackend.complete`` for drafts, ``Aligner.align`` for corrections). The embedded
SmolLM2 models are exercised in ``test_serve_embedded.py``.
"""
from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from api_server import FakeProvider
from conftest import run_cli
from metaaligner_core.serve import ServerThread, free_port
from metaaligner_core.serve.api import create_app
from metaaligner_core.serve.service import CorrectionService, conversation_query

KEY = "sk-test-key-1"
N = 8  # new tokens per stage: the random model never stops early
UPSTREAM_DRAFT = "Cats sleep about fifteen hours a day."


def build_tiny_model(path, tokenizer_dir, max_positions: int = 512):
    """A 2-layer random Llama with a real tokenizer; a large init makes its output depend on its input."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True, initializer_range=1.0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, embedded_dir):
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", embedded_dir))


@pytest.fixture(scope="module")
def upstream():
    with FakeProvider(reply=lambda body: UPSTREAM_DRAFT) as fake:
        yield fake


@pytest.fixture(scope="module")
def serve(tiny_dir, upstream):
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    svc = CorrectionService(policies=[f"tiny={tiny_dir}", f"up=openai-compatible:fake@{upstream.base_url}/v1",
                                      f"down=openai-compatible:gone@{dead}"],
                            aligner=tiny_dir, objectives="honesty,helpfulness", max_new_tokens=N, upstream_retries=0)
    svc.load()
    app = create_app(svc, api_keys=[KEY, "sk-second-key"], max_request_bytes=20_000)
    with ServerThread(app) as server:
        server.service = svc
        yield server
    svc.close()


@pytest.fixture
def client(serve):
    return openai.OpenAI(base_url=serve.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def ask(client, content="Why do cats purr?", model="tiny", **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def expected(serve, query, objectives, draft=None):
    """Draft and correction computed without the server."""
    from metaaligner_core.backends.hf import HFChatBackend

    svc = serve.service
    if draft is None:
        draft = HFChatBackend(svc.aligner.generator).complete(query, max_tokens=N).text
    return draft, svc.aligner.align(query, draft, objectives, max_new_tokens=N)


def assert_still_serving(client):
    assert ask(client).choices[0].message.content


# --- answers ------------------------------------------------------------------------------

def test_models_and_health(serve, client):
    assert [m.id for m in client.models.list().data] == ["tiny", "up", "down"]
    health = httpx.get(serve.url + "/healthz")  # no key needed, and so it names no model, URL or objective
    assert health.status_code == 200 and health.json() == {"status": "ok"}


def test_plain_completion_is_the_correction_of_the_policy_draft(serve, client):
    query = "Why do cats purr?"
    r = ask(client, query)
    draft, aligned = expected(serve, query, "honesty,helpfulness")
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == aligned
    assert r.choices[0].finish_reason == "length"
    info = r.metaaligner
    assert info["original"] == draft and info["corrected"] is True
    assert info["objectives"] == ["Honesty: the response should not tell lies",
                                  "Helpfulness: the response should provide useful resources and suggestions to the user"]
    assert info["template"] == "ultrafeedback" and set(info["timings"]) == {"draft_s", "correction_s", "total_s"}
    # metaaligner.usage has both stages, each counted independently here; usage is the answer's
    svc = serve.service
    ids = svc.aligner.generator.tokenizer.apply_chat_template([{"role": "user", "content": query}],
                                                              add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    aligner_ids, _ = svc.aligner.encode(query, draft, "honesty,helpfulness", N)
    assert info["usage"] == {"draft": {"prompt_tokens": len(ids), "completion_tokens": N},
                             "correction": {"prompt_tokens": len(aligner_ids), "completion_tokens": N}}
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(aligner_ids), N)  # the correction only
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chunks_join_to_the_plain_answer(client):
    plain = ask(client, "Tell me about owls.")
    chunks = list(ask(client, "Tell me about owls.", stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # streamed, not one piece
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][0]
    assert final.choices[0].finish_reason == "length"
    assert final.metaaligner["original"] == plain.metaaligner["original"]
    assert final.metaaligner["usage"] == plain.metaaligner["usage"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_raw_stream_is_standard_sse_ending_with_done(serve):
    body = {"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", serve.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert "metaaligner" in json.loads(lines[-2][6:])


def test_extra_body_objectives_list_spec_and_unseen(serve, client):
    query = "How should I store basil?"
    unseen = "Wit: the response should make the reader smile"
    r = ask(client, query, extra_body={"metaaligner": {"objectives": ["length", unseen]}})
    _, aligned = expected(serve, query, ["length", unseen])
    assert r.choices[0].message.content == aligned
    assert r.metaaligner["objectives"] == [
        "Length: the response should be concise and avoid redundant content.", unseen]
    assert r.choices[0].message.content != ask(client, query).choices[0].message.content  # objectives matter
    spec = ask(client, query, extra_body={"metaaligner": {"objectives": f"length,{unseen}"}})
    assert spec.choices[0].message.content == aligned


def test_no_objectives_pass_the_draft_through_and_return_original_false(serve, client):
    r = ask(client, "Name a prime.", extra_body={"metaaligner": {"objectives": []}})
    draft, _ = expected(serve, "Name a prime.", "honesty")
    assert r.choices[0].message.content == draft == r.metaaligner["original"]
    assert r.metaaligner["corrected"] is False and r.metaaligner["objectives"] == []
    assert r.metaaligner["usage"]["correction"] == {"prompt_tokens": 0, "completion_tokens": 0}
    r = ask(client, "Name a prime.", extra_body={"metaaligner": {"return_original": False}})
    assert r.metaaligner["original"] is None and r.choices[0].message.content


def test_openai_compatible_upstream_gets_the_conversation_and_its_draft_is_corrected(serve, client, upstream):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How long do cats sleep?"},
                {"role": "assistant", "content": "A lot."}, {"role": "user", "content": "How many hours?"}]
    r = client.chat.completions.create(model="up", messages=messages)
    assert upstream.calls[-1].body["messages"] == messages
    assert r.metaaligner["original"] == UPSTREAM_DRAFT
    query = "User: How long do cats sleep?\n\nAssistant: A lot.\n\nUser: How many hours?"
    assert conversation_query([(m["role"], m["content"]) for m in messages]) == query
    _, aligned = expected(serve, query, "honesty,helpfulness", draft=UPSTREAM_DRAFT)
    assert r.choices[0].message.content == aligned


def test_eight_concurrent_clients_are_batched_and_answered_as_alone(serve, client):
    queries = [f"Question {i}: what is {i} plus {i}?" for i in range(8)]
    alone = {q: ask(client, q).choices[0].message.content for q in queries}
    assert len(set(alone.values())) > 1  # the answers depend on the query, so a mix-up would show
    before = len(serve.service.batch_sizes())
    results, barrier = {}, threading.Barrier(8)

    def one(q):
        c = openai.OpenAI(base_url=serve.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        barrier.wait()
        results[q] = ask(c, q).choices[0].message.content

    threads = [threading.Thread(target=one, args=(q,)) for q in queries]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert results == alone
    assert max(serve.service.batch_sizes()[before:]) > 1  # decoded together, not one by one


# --- errors: OpenAI-style objects, and the server keeps serving ------------------------------------

def test_wrong_or_missing_key_is_401(serve, client):
    bad = openai.OpenAI(base_url=serve.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        ask(bad)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.get(serve.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
    second = openai.OpenAI(base_url=serve.url + "/v1", api_key="sk-second-key", max_retries=0)
    assert second.models.list().data
    assert_still_serving(client)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        ask(client, model="gpt-17")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert_still_serving(client)


@pytest.mark.parametrize("objectives, match", [
    ("wit", 'unknown objective "wit"'),
    (["Tone:"], "description after the colon is empty"),
    ("@/etc/passwd", "@file SPECs are not accepted"),
    (42, "metaaligner.objectives"),
])
def test_bad_objectives_are_400(client, objectives, match):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, extra_body={"metaaligner": {"objectives": objectives}})
    assert match in e.value.body["message"]
    assert e.value.body["param"].startswith("metaaligner.objectives")
    assert_still_serving(client)


@pytest.mark.parametrize("body, match", [
    ({"model": "tiny", "messages": []}, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 2}, "only n=1"),
    ({"model": "tiny", "messages": [{"role": "assistant", "content": "x"}]}, "must be from the user"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "metaaligner": {"objective": "x"}},
     "metaaligner.objective"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
])
def test_malformed_requests_are_400(serve, client, body, match):
    r = httpx.post(serve.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and match in r.json()["error"]["message"]
    r = httpx.post(serve.url + "/v1/chat/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert_still_serving(client)


def test_too_long_requests_are_400_or_413(client):
    with pytest.raises(openai.BadRequestError) as e:  # over the 512-token context, under the byte limit
        ask(client, "cat " * 2000)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.APIStatusError) as e:  # over --max-request-bytes
        ask(client, "cat " * 10_000)
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"

    def chunks():  # chunked transfer: no Content-Length for the server to check up front
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"cat " * 250
        yield b'"}]}'

    r = httpx.post(f"{client.base_url}chat/completions", content=chunks(),
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert_still_serving(client)


def test_upstream_failure_is_502(client, upstream):
    with pytest.raises(openai.InternalServerError) as e:  # nothing listening
        ask(client, model="down")
    assert e.value.status_code == 502 and e.value.body["type"] == "upstream_error"
    upstream.faults[:] = [500]
    with pytest.raises(openai.InternalServerError) as e:  # the upstream answers 500
        ask(client, model="up")
    assert e.value.status_code == 502 and "injected 500" in e.value.body["message"]
    with pytest.raises(openai.APIError) as e:  # streamed: the role chunk is out at once, the error follows it
        list(ask(client, model="down", stream=True))
    assert e.value.body["type"] == "upstream_error" and e.value.body["code"] == "upstream_unavailable" \
        or e.value.body["code"] == "upstream_error"
    assert ask(client, model="up").metaaligner["original"] == UPSTREAM_DRAFT
    assert_still_serving(client)


# --- the command ------------------------------------------------------------------------------

def test_no_keys_refuses_to_listen_beyond_loopback(tmp_path):
    r = run_cli("serve", "--host", "0.0.0.0", timeout=120)
    assert r.returncode == 2 and "without --api-keys the server only listens on loopback" in r.stderr
    r = run_cli("serve", "--host", "0.0.0.0", "--api-keys", tmp_path / "none.txt", timeout=120)
    assert r.returncode == 2 and "none.txt: API keys file not found" in r.stderr
    (tmp_path / "keys.txt").write_text("# comments only\n\n")
    r = run_cli("serve", "--api-keys", tmp_path / "keys.txt", timeout=120)
    assert r.returncode == 2 and "keys.txt: no API keys in the file" in r.stderr


# --- pure helpers ------------------------------------------------------------------------------

def test_conversation_query_rule():
    assert conversation_query([("system", "Be brief."), ("user", "Hi?")]) == "Hi?"
    assert conversation_query([("user", "A?"), ("assistant", "B."), ("user", "C?")]) == \
        "User: A?\n\nAssistant: B.\n\nUser: C?"
    with pytest.raises(Exception, match="must be from the user"):
        conversation_query([("user", "A?"), ("assistant", "B.")])


def test_policy_ids_and_batch_prefix():
    from metaaligner_core.serve.batcher import Job, common_prefix_len
    from metaaligner_core.serve.service import parse_policy

    assert parse_policy("gpt=openai:gpt-4o-mini") == ("gpt", "openai:gpt-4o-mini")
    assert parse_policy("openai-compatible:m@http://h/v1?a=b") == ("openai-compatible:m@http://h/v1?a=b",) * 2
    assert parse_policy("default") == ("default", "default")
    job = lambda ids, k: Job(ids, k, None, lambda *a: None)  # noqa: E731
    assert common_prefix_len([job([1, 2, 3, 4, 5], 3), job([1, 2, 3, 9, 9], 3)]) == 3
    assert common_prefix_len([job([1, 2, 3, 4, 5], 4), job([1, 2, 7, 4, 5], 4)]) == 2  # objectives differ
    assert common_prefix_len([job([1, 2, 3, 4], 0), job([1, 2, 3, 4], 3)]) == 0


def test_web_app_mounted_at_ui_shares_the_loaded_models(serve, tmp_path, monkeypatch):
    from metaaligner_core.serve.api import mount_ui

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    svc = serve.service
    app = create_app(svc, api_keys=[KEY])
    demo = mount_ui(app, svc, db_url=f"sqlite:///{tmp_path / 'ann.db'}")
    assert demo.service.registry is svc.registry  # one set of weights for the page and the API
    assert demo.service.registry.loaded("aligner", svc.aligner_name).generator is svc.aligner.generator
    with ServerThread(app) as server:
        page = httpx.get(server.url + "/ui/", timeout=60, follow_redirects=True)
        assert page.status_code == 200 and "gradio" in page.text.lower()
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        assert ask(c).choices[0].message.content
