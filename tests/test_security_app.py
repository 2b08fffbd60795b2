"""The app attacked the way issue 10 describes: over Gradio's raw HTTP protocol, not its client.

A real ``python app.py`` runs in a subprocess on a free 127.0.0.1 port with a small SQLite
database (an admin, a rater, one item) and canary API keys in its environment. The attacker:

* reads ``/config`` for every event handler (``fn_index``) and its input components;
* joins the queue (``POST /gradio_api/queue/join`` with a chosen ``fn_index`` and a
  ``session_hash`` that never signed in) and reads the result from ``GET /gradio_api/queue/data``
  (server-sent events), exactly as the browser does;
* sends hostile values in every input: a policy pointing at a local listener that records any
  request, model strings with user:password in the URL, Markdown links and images, oversized text.

Then: the listener was never contacted (so it never saw a key), a fresh session sees none of the
hostile strings anywhere, and the annotation database is byte-for-byte the same dump.

The app runs twice: as configured by default (Gradio's own dropdown check refuses unknown
values too) and with ``--allow-any-model``, where the server-side checks in the handlers are the
only protection, so a broken check shows up as a failure here.
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # runs the embedded model in the app (a few generations of 4-8 tokens)

KEY = "sk-canary-OPENAI-0123456789abcdef"
ANTHROPIC_KEY = "sk-ant-canary-ANTHROPIC-0123456789"
SECRET_IN_URL = "TOKEN-CANARY-5f3a"
PHISH = "Session expired – sign in again"
PASSWORD = "correct horse battery"
OPERATOR_SECRET = "OPERATOR-SECRET-77c1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Listener:
    """An HTTP server that records every request (path, headers) and answers ``status`` with
    ``body``: the attacker's server, or an operator-configured endpoint that fails."""

    def __init__(self, status: int = 404, body: str = "nothing here"):
        self.requests: list[tuple[str, str, dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                outer.requests.append((self.command, self.path, dict(self.headers)))
                data = json.dumps({"error": {"message": body, "type": "invalid_request_error"}}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _any

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def saw_key(self) -> bool:
        return any(KEY in json.dumps(h) or ANTHROPIC_KEY in json.dumps(h) for _, _, h in self.requests)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# ----------------------------------------------------------------------------- raw Gradio protocol

class RawGradio:
    """Gradio 6's browser protocol by hand: /config, queue/join, queue/data (SSE)."""

    def __init__(self, base: str):
        import httpx

        self.base = base.rstrip("/")
        self.http = httpx.Client(timeout=httpx.Timeout(180.0, connect=10.0))

    def config(self) -> dict:
        return self.http.get(f"{self.base}/config").json()

    def call(self, fn_index: int, data: list, session_hash: str | None = None, on_message=None) -> dict:
        """-> {"ok": bool, "data": outputs | None, "error": text | None, "stream": [outputs...], "status": http,
        "log": [toast texts]}; ``on_message(msg)`` sees each of the event's messages as it arrives."""
        session_hash = session_hash or uuid.uuid4().hex[:11]
        r = self.http.post(f"{self.base}/gradio_api/queue/join",
                           json={"data": data, "fn_index": fn_index, "session_hash": session_hash,
                                 "event_data": None, "trigger_id": None})
        if r.status_code != 200:
            return {"ok": False, "data": None, "error": r.text, "stream": [], "status": r.status_code}
        event_id = r.json()["event_id"]
        out = {"ok": False, "data": None, "error": None, "stream": [], "status": 200, "log": []}
        with self.http.stream("GET", f"{self.base}/gradio_api/queue/data",
                              params={"session_hash": session_hash}) as resp:
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("event_id") not in (None, event_id):
                    continue
                if on_message is not None:
                    on_message(msg)
                kind = msg.get("msg")
                if kind == "log":
                    out["log"].append(msg.get("log"))
                elif kind == "process_generating":
                    out["stream"].append(msg.get("output", {}).get("data"))
                elif kind == "process_completed":
                    output = msg.get("output") or {}
                    out["ok"] = bool(msg.get("success"))
                    out["data"] = output.get("data")
                    out["error"] = output.get("error")
                    break
                elif kind in ("close_stream", "unexpected_error"):
                    out["error"] = out["error"] or msg.get("message") or kind
                    break
        return out

    def join(self, fn_index: int, data: list, session_hash: str) -> str:
        r = self.http.post(f"{self.base}/gradio_api/queue/join",
                           json={"data": data, "fn_index": fn_index, "session_hash": session_hash,
                                 "event_data": None, "trigger_id": None})
        r.raise_for_status()
        return r.json()["event_id"]

    def collect(self, session_hash: str, event_ids: list[str]) -> dict[str, dict]:
        """One SSE stream for the session (as the browser reads it): each event's final message."""
        done: dict[str, dict] = {}
        with self.http.stream("GET", f"{self.base}/gradio_api/queue/data",
                              params={"session_hash": session_hash}) as resp:
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed" and msg.get("event_id") in event_ids:
                    output = msg.get("output") or {}
                    done[msg["event_id"]] = {"ok": bool(msg.get("success")), "error": output.get("error")}
                    if len(done) == len(event_ids):
                        break
        return done

    def close(self):
        self.http.close()


def backend_fns(config: dict) -> list[tuple[int, dict]]:
    """Every event handler with Python code behind it (what queue/join can run)."""
    return [(dep.get("id", i), dep) for i, dep in enumerate(config["dependencies"]) if dep.get("backend_fn")]


def components(config: dict) -> dict[int, dict]:
    return {c["id"]: c for c in config["components"]}


def fn_by_inputs(config: dict, *elem_ids: str) -> int:
    comps = components(config)
    for fn, dep in backend_fns(config):
        ids = [comps[i].get("props", {}).get("elem_id") for i in dep["inputs"]]
        if all(e in ids for e in elem_ids):
            return fn
    raise AssertionError(f"no handler with inputs {elem_ids}")


def fn_by_api_name(config: dict, name: str) -> int:
    for fn, dep in backend_fns(config):
        if dep.get("api_name") == name:
            return fn
    raise AssertionError(f"no handler {name}")


def hostile_sets(listener: Listener) -> list[str]:
    return [
        f"openai-compatible:x@{listener.url}/v1",
        f"openai-compatible:gpt@http://user:{SECRET_IN_URL}@127.0.0.1:{listener.port}/v1",
        f"openai:gpt-4o-mini@{listener.url}/v1",
        f"[{PHISH}]({listener.url}/phish) ![x]({listener.url}/img.png) <img src='{listener.url}/i.png'>",
        f"Politeness: {PHISH} [here]({listener.url}/p)",
        f"anthropic:claude@http://{SECRET_IN_URL}@127.0.0.1:{listener.port}",
        "x" * 1_000_000 + f"{listener.url}",
    ]


def hostile_value(comp: dict, text: str):
    kind = comp.get("type")
    if kind in ("state", "timer", "downloadbutton", "button", "file", "uploadbutton"):
        return None
    if kind in ("checkboxgroup",):
        return [text]
    if kind in ("slider", "number"):
        return 10 ** 9
    if kind == "checkbox":
        return True
    if kind == "dataframe":
        return {"headers": ["a"], "data": [[text]], "metadata": None}
    return text


def markers(listener: Listener) -> list[str]:
    return [SECRET_IN_URL, PHISH, f"127.0.0.1:{listener.port}", KEY, ANTHROPIC_KEY, "xxxxxxxxxxxxxxxx",
            OPERATOR_SECRET]


def db_dump(path: Path) -> list[str]:
    """The annotation database as SQL, without the rows of ``sign_in_throttle``: a failed sign-in
    from any session is meant to write there (throttling shared by every process on the database,
    annotation/throttle.py); everything else must stay byte-for-byte the same."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [line for line in con.iterdump() if not line.startswith('INSERT INTO "sign_in_throttle"')]
    finally:
        con.close()


# ----------------------------------------------------------------------------- the running app

def seed_db(path: Path) -> str:
    from annotation.store import Store

    url = f"sqlite:///{path}"
    store = Store(url)
    store.add_annotator("boss", PASSWORD, role="admin")
    store.add_annotator("rita", PASSWORD, role="rater")
    store.enqueue_item("Is the sky green?", [("No, it is blue.", "m1"), ("Yes.", "m2")])
    from annotation.store import dispose_engine

    dispose_engine(url)
    return url


class App:
    def __init__(self, tmp: Path, *extra: str, env: dict | None = None):
        self.db = tmp / "data" / "annotations.db"
        self.db_url = seed_db(self.db)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "app.log"
        self.log = open(self.log_path, "w")
        full_env = {**os.environ, "OPENAI_API_KEY": KEY, "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                    "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
        full_env.pop("GRADIO_TEMP_DIR", None)
        self.proc = subprocess.Popen([sys.executable, "app.py", "--port", str(self.port), "--db", self.db_url,
                                      "--max-new-tokens", "4", "--no-preload", "--threads", "1", *extra],
                                     cwd=ROOT, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"app.py exited: {self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            raise AssertionError("app.py did not answer within 120 s")
        self.raw = RawGradio(self.url)

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self):
        self.raw.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def listener():
    lst = Listener()
    yield lst
    lst.close()


@pytest.fixture(scope="module")
def upstream():
    """An endpoint the operator configured that fails with a body the visitor must not see."""
    lst = Listener(status=400, body="UPSTREAM-BODY-CANARY: internal details")
    yield lst
    lst.close()


@pytest.fixture(scope="module", params=["configured-only", "allow-any-model"])
def app(request, tmp_path_factory, upstream):
    # The operator's own credentials in a configured URL must not reach any page either.
    extra = ["--concurrency", "2",  # two generations may run at once, but never two of one session
             "--allow-models", f"openai-compatible:up@{upstream.url}/v1,"
             f"openai-compatible:cred@http://op:{OPERATOR_SECRET}@127.0.0.1:{upstream.port}/v1"]
    if request.param == "allow-any-model":
        extra.append("--allow-any-model")
    a = App(tmp_path_factory.mktemp(request.param), *extra)
    try:
        yield a
    finally:
        a.stop()


# ----------------------------------------------------------------------------- the attack

# Valid values for the inputs that need one, so that a call with ONE hostile input gets past
# the others and reaches the check under test (model strings reach the model registry, etc.).
VALID = {"objectives-ultrafeedback": ["ultrafeedback/honesty"], "query": "Hi?", "max-new-tokens": 4}


def baseline(comps: dict, dep: dict) -> list:
    out = []
    for i in dep["inputs"]:
        props = comps[i].get("props", {})
        out.append(VALID.get(props.get("elem_id"), props.get("value")))
    return out


def test_every_handler_from_unsigned_sessions_leaks_nothing_and_writes_nothing(app, listener):
    cfg = app.raw.config()
    comps = components(cfg)
    fns = backend_fns(cfg)
    assert len(fns) >= 20, "the app's handlers were not found in /config"
    before = db_dump(app.db)
    temp_before = set(Path("/tmp").glob("metaaligner-*"))
    calls = 0
    for fn, dep in fns:
        base = baseline(comps, dep)
        res = app.raw.call(fn, base)  # every handler at least once, also those with only state inputs
        calls += 1
        assert KEY not in json.dumps(res) and ANTHROPIC_KEY not in json.dumps(res)
        for pos, i in enumerate(dep["inputs"]):
            if hostile_value(comps[i], "x") is None:
                continue  # server-side state: a request cannot set it
            for text in hostile_sets(listener):
                data = list(base)
                data[pos] = hostile_value(comps[i], text)
                res = app.raw.call(fn, data)
                calls += 1
                # The caller's own replies never carry the server's keys. (Gradio's own "not in the
                # list of choices" error echoes the caller's value back to the caller, harmlessly.)
                reply = json.dumps(res)
                assert KEY not in reply and ANTHROPIC_KEY not in reply
    assert calls > 100
    assert not listener.requests, f"the attacker's server was contacted: {listener.requests[:3]}"
    assert not listener.saw_key()
    assert db_dump(app.db) == before, "an unsigned session changed the annotation database"
    # No side effect before a permission check: e.g. no export folder made for a refused export.
    made = {p for p in set(Path("/tmp").glob("metaaligner-*")) - temp_before if not p.name.startswith("metaaligner-app-")}
    assert not made, made

    # A fresh visitor: every handler with the page's own default values, and the page config.
    fresh = uuid.uuid4().hex[:11]
    seen = [json.dumps(app.raw.config())]
    for fn, dep in fns:
        data = [comps[i].get("props", {}).get("value") for i in dep["inputs"]]
        seen.append(json.dumps(app.raw.call(fn, data, session_hash=fresh)))
    everything = "\n".join(seen)
    for m in markers(listener):
        assert m not in everything, f"another session sees {m!r}"
    assert db_dump(app.db) == before


def test_status_is_plain_text_of_the_operators_models(app):
    cfg = app.raw.config()
    comps = components(cfg)
    status = next(c for c in comps.values() if c.get("props", {}).get("elem_id") == "model-status")
    assert status["type"] == "textbox", "the model status must be plain text, not Markdown"
    fn = fn_by_api_name(cfg, "status")  # the timer's tick: takes the session's own picks
    res = app.raw.call(fn, ["default", "default"])
    assert res["ok"], res


def test_send_to_annotation_needs_a_signed_in_rater(app):
    """The issue's attack: an unsigned client runs a correction with its own draft, then
    "Send to annotation". Nothing may land; a signed-in rater's send lands with their name."""
    cfg = app.raw.config()
    align = fn_by_api_name(cfg, "align_stream")
    send = fn_by_api_name(cfg, "send")
    sign_in = fn_by_inputs(cfg, "ma-name", "ma-password")
    comps = components(cfg)
    dep = dict(backend_fns(cfg))[align]
    by_elem = {comps[i].get("props", {}).get("elem_id"): n for n, i in enumerate(dep["inputs"])}
    data = [comps[i].get("props", {}).get("value") for i in dep["inputs"]]
    data[by_elem["objectives-ultrafeedback"]] = ["ultrafeedback/honesty"]
    data[by_elem["query"]] = "Is the moon made of cheese?"
    data[by_elem["draft-in"]] = "Yes, green cheese."
    data[by_elem["max-new-tokens"]] = 8
    before = db_dump(app.db)
    attacker = uuid.uuid4().hex[:11]
    res = app.raw.call(align, data, session_hash=attacker)
    assert res["ok"], res
    res = app.raw.call(send, [None, "imhi", None], session_hash=attacker)
    assert not res["ok"] and "not signed in" in str(res["error"]), res
    assert db_dump(app.db) == before

    rater = uuid.uuid4().hex[:11]
    signed = app.raw.call(sign_in, ["rita", PASSWORD], session_hash=rater)
    assert signed["ok"], signed
    import re

    assert PASSWORD not in json.dumps(signed)
    assert not re.search(r'"[A-Za-z0-9_-]{43}"', json.dumps(signed["data"])), "the sign-in token must stay on the server"
    assert app.raw.call(align, data, session_hash=rater)["ok"]
    res = app.raw.call(send, [None, "imhi", None], session_hash=rater)
    assert res["ok"], res
    # who will see it: k = 2, and rita and boss can rate (neither has submitted it)
    assert any("queued for 2 raters" in m and "only" not in m for m in res["log"]), res["log"]
    con = sqlite3.connect(f"file:{app.db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT query, added_by FROM items ORDER BY id").fetchall()
    finally:
        con.close()
    assert rows[-1] == ("Is the moon made of cheese?", "rita")


def test_upstream_error_bodies_are_not_relayed(app, upstream):
    cfg = app.raw.config()
    align = fn_by_api_name(cfg, "align_stream")
    comps = components(cfg)
    dep = dict(backend_fns(cfg))[align]
    by_elem = {comps[i].get("props", {}).get("elem_id"): n for n, i in enumerate(dep["inputs"])}
    data = [comps[i].get("props", {}).get("value") for i in dep["inputs"]]
    data[by_elem["policy"]] = f"openai-compatible:up@{upstream.url}/v1"
    data[by_elem["objectives-ultrafeedback"]] = ["ultrafeedback/honesty"]
    data[by_elem["query"]] = "Hello?"
    data[by_elem["draft-in"]] = ""
    res = app.raw.call(align, data)
    assert not res["ok"]
    assert upstream.requests, "the configured endpoint was not called"
    assert "UPSTREAM-BODY-CANARY" not in json.dumps(res)
    assert "model provider returned an error" in str(res["error"])


def test_input_caps_and_upload_limit(app):
    cfg = app.raw.config()
    api = fn_by_api_name(cfg, "align")
    res = app.raw.call(api, ["q" * 4001, "honesty", "d"])
    assert not res["ok"] and "query: 4,001 characters, more than the 4,000" in str(res["error"])
    res = app.raw.call(api, ["Why?", "honesty", "d" * 8001])
    assert not res["ok"] and "draft: 8,001 characters" in str(res["error"])
    import httpx

    big = httpx.post(f"{app.url}/gradio_api/upload", files={"files": ("x.bin", b"\0" * (5 * 1024 * 1024))},
                     timeout=60)
    assert big.status_code in (400, 413), (big.status_code, big.text[:200])
    small = httpx.post(f"{app.url}/gradio_api/upload", files={"files": ("x.txt", b"ok")}, timeout=60)
    assert small.status_code == 200


def test_parallel_guessing_is_throttled_and_logged_without_passwords(app):
    """40 guesses at once from one address: only a handful reach scrypt, the right password is
    refused during the back-off, and the log names the account but never a guessed password."""
    cfg = app.raw.config()
    sign_in = fn_by_inputs(cfg, "ma-name", "ma-password")
    results = []

    def guess(i):
        raw = RawGradio(app.url)
        try:
            results.append(raw.call(sign_in, ["boss", f"guess-{i:04d}-pw"]))
        finally:
            raw.close()

    started = time.monotonic()
    threads = [threading.Thread(target=guess, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    statuses = [str(r["data"]) for r in results]
    checked = sum("wrong name or password" in s for s in statuses)
    throttled = sum("too many failed sign-ins" in s or "already being checked" in s for s in statuses)
    full = sum("Queue is full" in str(r["error"]) for r in results)  # the bounded queue refuses the rest
    assert len(results) == 40 and checked + throttled + full == 40, results[:3]
    assert throttled >= 10, (checked, throttled, full)
    elapsed = time.monotonic() - started
    # Without throttling all 40 run scrypt; with it, 5 free failures and then about one per
    # back-off step (1, 2, 4, ... s) while the loop lasts.
    assert checked <= 5 + 1 + int(elapsed).bit_length(), (checked, elapsed)
    right = app.raw.call(sign_in, ["boss", PASSWORD])
    assert "too many failed sign-ins" in str(right["data"]) or "already being checked" in str(right["data"])
    log = app.log_text()
    assert "failed sign-in for account 'boss'" in log
    assert "guess-0" not in log and PASSWORD not in log


def test_one_generation_per_session(app):
    """With room for two generations, a second Align from the same session is refused while its
    first runs; another session's runs alongside."""
    cfg = app.raw.config()
    align = fn_by_api_name(cfg, "align_stream")
    comps = components(cfg)
    dep = dict(backend_fns(cfg))[align]
    by_elem = {comps[i].get("props", {}).get("elem_id"): n for n, i in enumerate(dep["inputs"])}
    data = [comps[i].get("props", {}).get("value") for i in dep["inputs"]]
    data[by_elem["objectives-ultrafeedback"]] = ["ultrafeedback/honesty"]
    data[by_elem["query"]] = "Tell me about the moon."
    data[by_elem["draft-in"]] = "The moon is made of cheese and it is very close."
    data[by_elem["max-new-tokens"]] = 96
    same, other = uuid.uuid4().hex[:11], uuid.uuid4().hex[:11]
    assert app.raw.call(align, data, session_hash=same)["ok"]  # the model is loaded and warm
    first = app.raw.join(align, data, same)
    time.sleep(1.0)  # the first is generating now
    second = app.raw.join(align, data, same)
    other_result = {}
    t = threading.Thread(target=lambda: other_result.update(app.raw.call(align, data, session_hash=other)))
    t.start()
    results = RawGradio(app.url).collect(same, [first, second])
    t.join(timeout=300)
    assert other_result.get("ok"), other_result
    # Exactly one of the session's two runs went ahead (on a busy machine the queue may start the
    # second before the first has taken the session's slot), and the other was refused.
    outcomes = sorted((r["ok"], str(r["error"])) for r in results.values())
    assert [ok for ok, _ in outcomes] == [False, True], results
    assert "already running in this session" in outcomes[0][1], results


def test_a_corrupt_database_stops_the_app_with_one_line(tmp_path):
    db = tmp_path / "a.db"
    db.write_bytes(b"not a database at all\n" * 100)
    r = subprocess.run([sys.executable, "app.py", "--db", f"sqlite:///{db}", "--no-preload", "--port",
                        str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "app.py: error: sqlite:///" in r.stderr and "not a valid SQLite database" in r.stderr

