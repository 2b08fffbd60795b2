"""The real `metaaligner serve` command with the embedded models, driven by the `openai` client.

One server process for the module (embedded SmolLM2 as policy and aligner, bearer keys, the web
app at /ui); its log is checked at the end for leaked keys and user texts.
"""
from __future__ import annotations

import os
import sys

import httpx
import openai
import pytest

from conftest import serve_process
from metaaligner_core.serve import free_port

pytestmark = pytest.mark.slow

KEY = "sk-embedded-test-5f2c"
QUERY = "How should I store fresh basil so it lasts?"
UNSEEN = "Wit: the response should make the reader smile"
N = 24


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedded_dir):
    tmp = tmp_path_factory.mktemp("serve")
    keys = tmp / "keys.txt"
    keys.write_text(f"# test keys\n{KEY}\n")
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cmd = [sys.executable, "-m", "metaaligner_core", "serve", "--policy", "default", "--aligner", "default",
           "--port", str(port), "--api-keys", str(keys), "--objectives", "honesty", "--max-new-tokens", str(N)]
    with serve_process(cmd, port=port, cwd=tmp, env=env, log_path=tmp / "server.log") as url:
        yield url, tmp / "server.log"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def reference(embedded_dir):
    """The embedded policy and aligner loaded in this process (independent of the server)."""
    from metaaligner_core.backends.hf import HFChatBackend
    from metaaligner_core.inference import Aligner

    aligner = Aligner.load("default")
    return HFChatBackend(aligner.generator), aligner


def test_plain_and_streamed_corrections_with_an_unseen_objective(client, reference):
    policy, aligner = reference
    r = client.chat.completions.create(model="default", messages=[{"role": "user", "content": QUERY}],
                                       extra_body={"metaaligner": {"objectives": ["honesty", UNSEEN]}})
    draft = policy.complete(QUERY, max_tokens=N).text
    assert r.metaaligner["original"] == draft
    assert r.choices[0].message.content == aligner.align(QUERY, draft, ["honesty", UNSEEN], max_new_tokens=N)
    assert r.metaaligner["objectives"][1] == UNSEEN
    assert r.metaaligner["aligner"] == "SmolLM2-135M-Instruct (embedded)"
    chunks = list(client.chat.completions.create(model="default", stream=True, messages=[
        {"role": "user", "content": QUERY}], extra_body={"metaaligner": {"objectives": ["honesty", UNSEEN]}}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].metaaligner["original"] == draft
    default = client.chat.completions.create(model="default", messages=[{"role": "user", "content": QUERY}])
    assert default.metaaligner["objectives"] == ["Honesty: the response should not tell lies"]  # --objectives


def test_web_app_is_mounted_at_ui(server, client):
    r = httpx.get(server[0] + "/ui/", timeout=60, follow_redirects=True)
    assert r.status_code == 200 and "gradio" in r.text.lower()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[0] + "/v1", api_key="sk-nope", max_retries=0).models.list()


def test_log_holds_neither_keys_nor_texts(server, client):
    client.chat.completions.create(model="default", messages=[{"role": "user", "content": QUERY}])
    text = server[1].read_text()
    assert "POST /v1/chat/completions" in text  # the access log is on
    for secret in (KEY, "sk-nope", QUERY, "basil", UNSEEN):
        assert secret not in text
