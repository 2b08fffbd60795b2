"""``metaaligner serve --api-keys`` attacked over raw HTTP, as issue 19 describes.

One real ``serve`` process on 127.0.0.1 (a tiny random Llama as local policy and aligner, an
``openai-compatible:`` upstream policy that is a local listener, the web app at ``/ui``). The
operator's upstream key is a canary in the server's environment; the attacker:

* drives the page's Gradio API by hand (``/ui/config``, ``/ui/gradio_api/queue/join``,
  ``/ui/gradio_api/queue/data``, uploads) without signing in, with a wrong key and with a forged
  cookie — the listener must receive nothing; signed in with a key, the same call reaches it
  (so the test would see a leak);
* sends bodies over ``--max-request-bytes`` to every path, with and without ``Content-Length``;
* sends hostile ``/v1`` bodies (deep nesting, out-of-range numbers, ``NaN``, 5000-digit
  integers, wrong ``Content-Type``): each a 400 in OpenAI's error shape;
* puts a secret in a query string, and reads ``/healthz``.

At the end the server log holds no traceback, no 500, no key and no query string.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid

import httpx
import pytest

from api_server import FakeProvider
from conftest import require_chromium, run_cli, serve_process
from metaaligner_core.serve import free_port
from test_security_app import RawGradio, fn_by_api_name
from test_serve import build_tiny_model

KEY = "sk-serve-key-0b7d41e2"
CANARY = "sk-upstream-CANARY-9f31c7"
LIMIT = 100_000


@pytest.fixture(scope="module")
def upstream():
    with FakeProvider(reply=lambda body: "An upstream draft.") as fake:
        yield fake


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedded_dir, upstream):
    tmp = tmp_path_factory.mktemp("serve-hardening")
    tiny = build_tiny_model(tmp / "tiny", embedded_dir)
    keys = tmp / "keys.txt"
    keys.write_text(f"{KEY}\n")
    port = free_port()
    log_path = tmp / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "METAALIGNER_COMPAT_API_KEY": CANARY,
           "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    env.pop("GRADIO_TEMP_DIR", None)
    cmd = [sys.executable, "-m", "metaaligner_core", "serve", "--policy",
           f"up=openai-compatible:fake@{upstream.base_url}/v1", f"tiny={tiny}", "--aligner", str(tiny),
           "--objectives", "honesty", "--max-new-tokens", "8", "--api-keys", str(keys), "--max-request-bytes",
           str(LIMIT), "--port", str(port), "--threads", "1", "--db", f"sqlite:///{tmp / 'ann.db'}"]
    with serve_process(cmd, port=port, cwd=tmp, env=env, log_path=log_path, start_timeout=300) as url:
        yield url, log_path, tiny


def canary_seen(upstream) -> bool:
    return any(CANARY in json.dumps(c.headers) for c in upstream.calls)


def signed_in(url: str) -> RawGradio:
    """A raw client holding the session cookie of the page's sign-in (any user name, the key)."""
    raw = RawGradio(url + "/ui")
    r = raw.http.post(url + "/ui/login", data={"username": "anyone", "password": KEY})
    assert r.status_code == 200, r.text
    return raw


# --- /ui behind the keys ---------------------------------------------------------------------

def attack_ui(url: str, cookies: dict | None = None) -> dict:
    """Everything a caller without the key can send to the page's API -> {what: HTTP status}."""
    raw = RawGradio(url + "/ui")
    raw.http.cookies.update(cookies or {})
    session = uuid.uuid4().hex[:11]
    out = {
        "config": raw.http.get(url + "/ui/config").status_code,
        "info": raw.http.get(url + "/ui/gradio_api/info").status_code,
        "upload": raw.http.post(url + "/ui/gradio_api/upload", files={"files": ("a.txt", b"x")}).status_code,
        "call": raw.http.post(url + "/ui/gradio_api/call/align", json={"data": ["Hi?", "honesty", ""]}).status_code,
    }
    # every handler index the page could have, with the `align` API's arguments and a bearer key
    # (the page's API takes its sign-in, not the /v1 header)
    for i in range(40):
        r = raw.http.post(url + "/ui/gradio_api/queue/join", headers={"Authorization": f"Bearer {KEY}"},
                          json={"data": ["Hi?", "honesty", ""], "fn_index": i, "session_hash": session,
                                "event_data": None, "trigger_id": None})
        out[f"join {i}"] = r.status_code
    out["data"] = raw.http.get(url + "/ui/gradio_api/queue/data", params={"session_hash": session}).status_code
    raw.close()
    return out


def test_ui_and_its_queue_refuse_callers_without_the_key(server, upstream):
    url = server[0]
    before = len(upstream.calls)
    assert set(attack_ui(url).values()) == {401}
    # a wrong key at the page's sign-in gets no session, and a made-up cookie is none either
    raw = RawGradio(url + "/ui")
    r = raw.http.post(url + "/ui/login", data={"username": "anyone", "password": "sk-wrong"})
    assert r.status_code in (400, 401) and not raw.http.cookies
    raw.close()
    forged = {"access-token-unsecure": "x", "access-token": "x"}
    assert set(attack_ui(url, forged).values()) == {401}
    assert len(upstream.calls) == before and not canary_seen(upstream)


def test_ui_signed_in_with_a_key_reaches_the_upstream(server, upstream):
    """The positive control: with the key, the very call refused above runs and the operator's
    upstream gets its request (so a leak without the key would have shown)."""
    url = server[0]
    raw = RawGradio(url + "/ui")
    r = raw.http.post(url + "/ui/login", data={"username": "anyone", "password": KEY})
    assert r.status_code == 200, r.text
    config = raw.config()
    result = raw.call(fn_by_api_name(config, "align"), ["Why do cats purr?", "honesty", ""])
    raw.close()
    assert result["ok"], result
    assert result["data"][0] == "An upstream draft."  # the upstream wrote the draft
    assert canary_seen(upstream)  # with the operator's key, as configured
    upstream.calls.clear()


def test_ui_page_asks_for_the_key_once_in_a_browser(server, upstream):
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    url = server[0]
    expect.set_options(timeout=60_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            page.goto(url + "/ui/")
            expect(page.get_by_text("requires an API key")).to_be_visible()
            page.get_by_label("username").fill("anyone")
            page.get_by_label("password").fill("sk-wrong")
            page.get_by_role("button", name="Login").click()
            expect(page.get_by_text("Incorrect Credentials")).to_be_visible()
            page.get_by_label("username").fill("anyone")  # the form empties after a failure
            page.get_by_label("password").fill(KEY)
            page.get_by_role("button", name="Login").click()
            expect(page.locator("#model-status")).to_be_visible()
            page.reload()  # kept for the session: no second sign-in
            expect(page.locator("#model-status")).to_be_visible()
        finally:
            browser.close()


# --- bodies over the limit, on every path -------------------------------------------------------

@pytest.mark.parametrize("path", ["/ui/gradio_api/upload", "/ui/gradio_api/queue/join", "/ui/login", "/healthz",
                                  "/v1/chat/completions", "/nowhere"])
def test_body_limit_applies_to_every_path(server, path):
    url = server[0]
    big = b"x" * (LIMIT + 1)
    r = httpx.post(url + path, content=big, headers={"Content-Type": "application/json",
                                                     "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the server must count as it reads
        for _ in range(LIMIT // 1000 + 2):
            yield b"x" * 1000

    r = httpx.post(url + path, content=chunks(), headers={"Content-Type": "application/json",
                                                          "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(url + "/healthz").status_code == 200  # still serving


# --- hostile /v1 bodies ------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "Hi?"}]


def _nested(depth: int):
    v = "x"
    for _ in range(depth):
        v = [v]
    return v


HOSTILE = {
    "90k open brackets": b"[" * 90_000,
    "deep nesting in a field": json.dumps({"model": "tiny", "messages": MESSAGES, "user": _nested(60)}).encode(),
    "deep nesting in a message": json.dumps({"model": "tiny", "messages": [{"role": "user",
                                                                           "content": _nested(60)}]}).encode(),
    "seed 2^100": {"seed": 2 ** 100}, "seed -2^70": {"seed": -(2 ** 70)}, "seed 1.5": {"seed": 1.5},
    "max_tokens 2^100": {"max_tokens": 2 ** 100}, "max_tokens 0": {"max_tokens": 0},
    "max_tokens -5": {"max_tokens": -5}, "max_completion_tokens 2^64": {"max_completion_tokens": 2 ** 64},
    "top_p 2": {"top_p": 2}, "top_p -1": {"top_p": -1}, "top_p 0": {"top_p": 0},
    "top_p 1e999": b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi?"}], "top_p": 1e999}',
    "temperature 3": {"temperature": 3}, "temperature -0.1": {"temperature": -0.1},
    "temperature NaN": b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi?"}], "temperature": NaN}',
    "NaN in a field the server ignores": b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi?"}], '
                                         b'"presence_penalty": NaN}',
    "temperature -Infinity": b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi?"}], '
                             b'"temperature": -Infinity}',
    "n 2^100": {"n": 2 ** 100}, "n 0": {"n": 0}, "n -1": {"n": -1},
    "5000-digit integer": b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi?"}], "seed": '
                          + b"9" * 5000 + b"}",
    "not UTF-8": b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_bodies_are_400_in_openai_shape(server, name):
    body = HOSTILE[name]
    content = body if isinstance(body, bytes) else json.dumps({"model": "tiny", "messages": MESSAGES,
                                                               **body}).encode()
    assert len(content) < LIMIT
    r = httpx.post(server[0] + "/v1/chat/completions", content=content, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["message"] and "Traceback" not in err["message"]


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None])
def test_wrong_content_type_is_400(server, ctype):
    headers = {"Authorization": f"Bearer {KEY}"} | ({"Content-Type": ctype} if ctype else {})
    r = httpx.post(server[0] + "/v1/chat/completions", headers=headers,
                   content=json.dumps({"model": "tiny", "messages": MESSAGES}).encode())
    assert r.status_code == 400 and "Content-Type must be application/json" in r.json()["error"]["message"]
    ok = httpx.post(server[0] + "/v1/chat/completions", timeout=120,
                    headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json; charset=utf-8"},
                    content=json.dumps({"model": "tiny", "messages": MESSAGES, "seed": 2 ** 63 - 1}).encode())
    assert ok.status_code == 200, ok.text  # the largest 64-bit seed is fine


# --- what the server reveals -----------------------------------------------------------------------

def test_healthz_names_no_model_or_url(server, upstream):
    url, _, tiny = server
    r = httpx.get(url + "/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    for secret in (upstream.base_url, str(tiny), "tiny", "up", "fake", "honesty"):
        assert secret not in r.text


def test_access_log_leaves_out_query_strings_and_the_log_is_clean(server):
    url, log_path, _ = server
    secret = "QS-SECRET-" + uuid.uuid4().hex
    httpx.post(url + f"/v1/chat/completions?api_key={secret}", json={"model": "tiny", "messages": MESSAGES},
               headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    httpx.get(url + f"/ui/?token={secret}")
    httpx.get(url + f"/healthz?key={secret}")
    time.sleep(0.5)
    text = log_path.read_text(errors="replace")
    assert "POST /v1/chat/completions 200" in text and "GET /healthz 200" in text  # the access log is on
    assert secret not in text and "?" not in "".join(ln for ln in text.splitlines() if "GET /" in ln or "POST /" in ln)
    for leaked in (KEY, CANARY, "Traceback", " 500"):
        assert leaked not in text, leaked


# --- the command -----------------------------------------------------------------------------------

def test_listening_beyond_loopback_with_keys_warns_and_bad_forwarded_ips_are_refused(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{KEY}\n")
    r = run_cli("serve", "--host", "0.0.0.0", "--api-keys", keys, "--aligner", tmp_path / "no-such-model",
                "--no-ui", timeout=300)
    assert "warning: listening on 0.0.0.0: the bearer keys and the /ui sign-in travel in clear text" in r.stderr
    assert r.returncode != 0  # the missing aligner stops it before it listens
    r = run_cli("serve", "--forwarded-allow-ips", "10.0.0.1,not-an-ip", timeout=120)
    assert r.returncode == 2 and '--forwarded-allow-ips: "not-an-ip" is not an IP address' in r.stderr


def test_forwarded_headers_are_trusted_only_from_listed_proxies():
    from metaaligner_core.commands.serve import forwarded_settings

    assert forwarded_settings("") == {"proxy_headers": False, "forwarded_allow_ips": None}
    assert forwarded_settings(" 10.0.0.5 , 10.1.0.0/16") == {"proxy_headers": True,
                                                             "forwarded_allow_ips": "10.0.0.5,10.1.0.0/16"}
