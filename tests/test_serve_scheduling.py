"""Iteration-level scheduling, cancellation, shutdown and the OpenAI shapes of ``metaaligner serve``.

A tiny randomly initialised Llama (the embedded model's tokenizer, a 4096-token context) is the
local policy and the aligner, so long generations take seconds. Expected tokens come from the
offline engine (``LocalGenerator.generate`` on one row), not from the scheduler under test;
"before"/"after" is measured by the order of events (tokens, chunks, counters), not wall time.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from api_server import FakeProvider
from conftest import ROOT
from metaaligner_core.serve import ServerThread, free_port
from metaaligner_core.serve.api import create_app
from metaaligner_core.serve.service import CorrectionService
from test_serve import build_tiny_model

KEY = "sk-sched-test"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, embedded_dir):
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", embedded_dir, max_positions=4096))


@pytest.fixture(scope="module")
def upstream():
    with FakeProvider(reply=lambda body: "one two three four five six seven eight nine ten",
                      cut_at_max_tokens=True) as fake:
        yield fake


@pytest.fixture(scope="module")
def serve(tiny_dir, upstream):
    svc = CorrectionService(policies=[f"tiny={tiny_dir}", f"up=openai-compatible:fake@{upstream.base_url}/v1"],
                            aligner=tiny_dir, objectives="honesty", max_new_tokens=8, batch_size=4,
                            prefill_chunk=64)
    svc.load()
    with ServerThread(create_app(svc, api_keys=[KEY])) as server:
        server.service = svc
        server.scheduler = svc.schedulers()[0]
        yield server
    svc.close()


@pytest.fixture
def client(serve):
    return openai.OpenAI(base_url=serve.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def wait_for(condition, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# --- the engine's scheduler -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def generator(tiny_dir):
    from metaaligner_core.engine.generator import LocalGenerator

    return LocalGenerator.load(tiny_dir, device="cpu")


class Collect:
    """A job's ``emit``: tokens and the end, in order; cancels the job after ``cancel_after`` tokens."""

    def __init__(self, log, name, cancel_after=None):
        self.log, self.name, self.cancel_after = log, name, cancel_after
        self.tokens, self.end = [], None
        self.finished = threading.Event()
        self.job = None

    def __call__(self, kind, value):
        self.log.append((self.name, kind))
        if kind == "token":
            self.tokens.append(value)
            if self.cancel_after is not None and len(self.tokens) == self.cancel_after:
                self.job.cancelled.set()
                self.finished.set()
        else:
            self.end = (kind, value)
            self.finished.set()


def submit(scheduler, prompt, prefix_len, settings, log, name, cancel_after=None):
    from metaaligner_core.serve.batcher import Job

    c = Collect(log, name, cancel_after)
    c.job = Job(prompt, prefix_len, settings, c)
    scheduler.submit(c.job)
    return c


def test_greedy_rows_equal_alone_under_joins_and_cancellations(generator):
    """Ten requests with different prompt lengths (some prefilled over several chunks), lengths and
    a shared prefix join a 3-row batch at different steps; three are cancelled midway. Every row
    equals the offline engine on that row alone; a cancelled row gets no token after its cancel."""
    import random

    from metaaligner_core.engine.scheduler import StepScheduler
    from metaaligner_core.settings import GenerationSettings

    rng = random.Random(7)
    prefix = [1, 504, 3249, 42, 17, 88]
    prompts = [prefix + [rng.randrange(100, 5000) for _ in range(rng.randrange(1, 50))] for _ in range(10)]
    lengths = [rng.randrange(5, 40) for _ in prompts]
    cancel = {2: 3, 5: 1, 8: 10}  # row -> tokens after which its client goes away
    alone = [generator.generate([p], GenerationSettings(max_new_tokens=n), prefix_lens=[len(prefix)])[0]
             for p, n in zip(prompts, lengths)]
    assert len({tuple(a) for a in alone}) == len(alone)  # rows differ, so a mix-up would show

    sched = StepScheduler(generator, batch_size=3, prefill_chunk=16)
    try:
        log, jobs = [], []
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            jobs.append(submit(sched, p, len(prefix), GenerationSettings(max_new_tokens=n), log, i, cancel.get(i)))
            if i % 3 == 2:  # later jobs arrive while the first ones decode
                wait_for(lambda: sched.stats["steps"] > 0, what="decoding to start")
        for j in jobs:
            assert j.finished.wait(60)
        wait_for(lambda: sched.in_flight == 0, what="rows to leave")
    finally:
        sched.stop()
    for i, j in enumerate(jobs):
        got = [t for t in j.tokens if t not in generator.eos_ids]
        if i in cancel:
            assert len(j.tokens) == cancel[i] and j.end is None  # nothing after the cancel
            assert got == alone[i][:len(got)]
        else:
            assert got == alone[i] and j.end[0] == "done"
    assert max(sched.batches) == 3 and sched.stats["joined"] >= 9  # joined a running batch, never above 3 rows
    assert sched.stats["prefill_tokens"] == sum(len(p) - len(prefix) for p in prompts)
    # every decoded row was a token some client received: cancelled rows stopped at once
    assert sched.stats["decoded_rows"] == sum(len(j.tokens) for j in jobs)


def test_sampled_and_greedy_rows_share_a_batch(generator):
    """A seeded sampled row gives the same tokens batched with greedy rows as alone."""
    from metaaligner_core.engine.scheduler import StepScheduler
    from metaaligner_core.settings import GenerationSettings

    sampled = GenerationSettings(max_new_tokens=20, temperature=0.9, top_p=0.9, repetition_penalty=1.2, seed=5)
    greedy = GenerationSettings(max_new_tokens=30)
    prompt = [1, 900, 901, 902, 903]
    sched = StepScheduler(generator, batch_size=4)
    try:
        log = []
        alone = submit(sched, prompt, 0, sampled, log, "alone")
        assert alone.finished.wait(60)
        others = [submit(sched, [1, 700 + i, 20, 30], 0, greedy, log, f"g{i}") for i in range(3)]
        wait_for(lambda: sched.stats["steps"] > 0)
        batched = submit(sched, prompt, 0, sampled, log, "batched")
        for j in [batched, *others]:
            assert j.finished.wait(60)
    finally:
        sched.stop()
    assert batched.tokens == alone.tokens
    assert others[0].tokens[:30] == generator.generate([[1, 700, 20, 30]], greedy)[0][:len(others[0].tokens)]


def test_short_request_gets_its_first_token_before_a_long_batch_ends(generator):
    from metaaligner_core.engine.scheduler import StepScheduler
    from metaaligner_core.settings import GenerationSettings

    sched = StepScheduler(generator, batch_size=8)
    try:
        log = []
        longs = [submit(sched, [1, 300 + i, 5, 6], 0, GenerationSettings(max_new_tokens=400), log, f"long{i}")
                 for i in range(4)]
        wait_for(lambda: sched.stats["steps"] >= 5, what="the long batch to decode")
        mark = len(log)
        short = submit(sched, [1, 2, 3], 0, GenerationSettings(max_new_tokens=4), log, "short")
        assert short.finished.wait(60)
        for j in longs:
            assert j.finished.wait(120)
    finally:
        sched.stop()
    order = [name for name, kind in log]
    first_short = order.index("short")
    last_long_end = max(i for i, (name, kind) in enumerate(log) if name.startswith("long") and kind == "done")
    assert first_short < last_long_end
    # it joined at the next step: at most two steps of the long rows came between its arrival and its first token
    assert sum(1 for name in order[mark:first_short] if name.startswith("long")) <= 2 * len(longs)


# --- over HTTP: cancellation, shapes ---------------------------------------------------------------

def raw_request(serve, body: dict) -> socket.socket:
    """Send a chat completion over a plain socket (closed by the test to play a client that leaves)."""
    data = json.dumps(body).encode()
    host, port = serve.url.rsplit("//", 1)[1].split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def rows_stop_after_disconnect(serve, body, stage_started):
    """Open a request, wait for ``stage_started(stats)``, hang up; the rows must leave within a
    few steps and the decoded-rows counter must stop."""
    sched = serve.scheduler
    before = dict(sched.stats)
    s = raw_request(serve, body)
    wait_for(lambda: stage_started(before, sched.stats), what="the stage to decode")
    at_close = sched.stats["decoded_rows"]
    s.close()
    wait_for(lambda: sched.in_flight == 0, timeout=10, what="the rows to leave")
    stopped_at = sched.stats["decoded_rows"]
    time.sleep(0.3)
    assert sched.stats["decoded_rows"] == stopped_at  # nothing decodes for nobody
    return stopped_at - at_close


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_during_the_draft_frees_its_row(serve, stream):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 3000, "stream": stream}
    extra = rows_stop_after_disconnect(serve, body, lambda b, s: s["decoded_rows"] - b["decoded_rows"] > 20)
    assert extra < 200  # of the 3000 asked; it stopped at the disconnect, within a few steps


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_during_the_correction_frees_its_row(serve, stream):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Explain tides."}], "max_tokens": 1500,
            "stream": stream}
    # the draft (1500 tokens) is done and the correction (a second row) has joined and decoded
    extra = rows_stop_after_disconnect(
        serve, body, lambda b, s: s["joined"] - b["joined"] >= 2 and s["decoded_rows"] - b["decoded_rows"] > 1520)
    assert extra < 200


def test_first_chunk_is_sent_before_the_draft_ends(serve):
    sched = serve.scheduler
    body = {"model": "tiny", "stream": True, "max_tokens": 2000,
            "messages": [{"role": "user", "content": "Write an essay."}]}
    before = sched.stats["decoded_rows"]
    with httpx.stream("POST", serve.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as r:
        first = next(line for line in r.iter_lines() if line)
        decoded = sched.stats["decoded_rows"] - before
    chunk = json.loads(first[len("data: "):])
    assert chunk["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert decoded < 2000  # the draft (2000 tokens) had not ended when the role chunk arrived


def test_streamed_chunks_carry_openais_null_fields(serve):
    body = {"model": "tiny", "stream": True, "max_tokens": 6, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", serve.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as r:
        events = [line[6:] for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for c in chunks[:-1]:  # every chunk with a choice
        choice = c["choices"][0]
        assert "finish_reason" in choice and "logprobs" in choice and choice["logprobs"] is None
        assert "usage" in c and c["usage"] is None
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 2) + ["length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


def test_finish_reason_is_length_whenever_the_answer_was_cut(serve, client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Name a prime."}],
                                       max_tokens=4, extra_body={"metaaligner": {"objectives": []}})
    assert r.choices[0].finish_reason == "length"  # the draft is the answer, cut at 4 tokens
    assert r.usage.completion_tokens == 4 == r.metaaligner["usage"]["draft"]["completion_tokens"]
    r = client.chat.completions.create(model="up", messages=[{"role": "user", "content": "Count."}],
                                       max_tokens=3, extra_body={"metaaligner": {"objectives": []}})
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content == "one two three"
    r = client.chat.completions.create(model="up", messages=[{"role": "user", "content": "Count."}],
                                       max_tokens=50, extra_body={"metaaligner": {"objectives": []}})
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Name a prime."}],
                                       max_tokens=5)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5 == r.metaaligner["usage"]["correction"]["completion_tokens"]
    assert r.metaaligner["usage"]["draft"]["completion_tokens"] == 5  # the draft stage's tokens are here
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_remote_aligner_cut_is_length(tiny_dir, upstream):
    svc = CorrectionService(policies=[f"tiny={tiny_dir}"], aligner=f"openai-compatible:fake@{upstream.base_url}/v1",
                            template="ultrafeedback", objectives="honesty", max_new_tokens=8)
    svc.load()
    try:
        with ServerThread(create_app(svc)) as server:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
            r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
            assert r.choices[0].finish_reason == "length" and r.choices[0].message.content == "one two three four"
            chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                    max_tokens=4, stream=True))
            assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
            r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=40)
            assert r.choices[0].finish_reason == "stop"
    finally:
        svc.close()


def test_context_length_error_in_openais_words(client):
    with pytest.raises(openai.BadRequestError) as e:  # the conversation alone is over the policy's context
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "cat " * 5000}],
                                       max_tokens=10)
    body = e.value.body
    assert body["code"] == "context_length_exceeded" and body["param"] == "messages"
    assert body["message"].startswith("This model's maximum context length is 4096 tokens. However, you requested ")
    assert "10 in the completion" in body["message"] and "max_tokens" in body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # fits, but not with max_tokens
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "cat " * 100}],
                                       max_tokens=4050)
    assert "maximum context length" in e.value.body["message"] and "4050 in the completion" in e.value.body["message"]


def test_models_list_and_retrieve(client):
    m = client.models.retrieve("tiny")
    assert m.id == "tiny" and m.object == "model"
    assert m.metaaligner["default_max_tokens"] == 8 and m.metaaligner["context_length"] == 4096
    listed = {x.id: x for x in client.models.list().data}
    assert listed["tiny"].metaaligner == m.metaaligner and listed["up"].metaaligner["context_length"] is None
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-17")
    assert e.value.body["code"] == "model_not_found"


def test_concurrent_requests_share_steps_and_answer_as_alone(serve, client):
    queries = [f"Question {i}: what is {i} times {i}?" for i in range(6)]
    alone = {q: client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}],
                                               max_tokens=12).choices[0].message.content for q in queries}
    before = len(serve.service.batch_sizes())
    results = {}

    def one(q, delay):
        time.sleep(delay)
        c = openai.OpenAI(base_url=serve.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        results[q] = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}],
                                               max_tokens=12).choices[0].message.content

    threads = [threading.Thread(target=one, args=(q, 0.01 * i)) for i, q in enumerate(queries)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == alone
    assert max(serve.service.batch_sizes()[before:]) > 1


# --- the command: SIGTERM ------------------------------------------------------------------------------

def test_sigterm_stops_a_busy_server_in_seconds(tiny_dir, tmp_path):
    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(  # this checkout's package
        [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])}
    proc = subprocess.Popen([sys.executable, "-m", "metaaligner_core", "serve", "--policy", tiny_dir, "--aligner",
                             tiny_dir, "--objectives", "honesty", "--no-ui", "--port", str(port),
                             "--batch-size", "4", "--max-new-tokens", "1900"], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is not None or _healthy(url), timeout=300, what="the server to start")
        assert proc.poll() is None, open(tmp_path / "server.log").read()
        outcomes, started = [], threading.Semaphore(0)

        def one(i):
            body = {"model": tiny_dir, "stream": i % 2 == 0, "messages": [{"role": "user", "content": f"Essay {i}"}]}
            try:
                if not body["stream"]:  # its headers come with the answer
                    started.release()
                with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
                    if body["stream"]:
                        started.release()
                    lines = [line for line in r.iter_lines() if line]
                    outcomes.append((r.status_code, lines[-1] if lines else ""))
            except httpx.HTTPError as e:
                outcomes.append((None, type(e).__name__))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for _ in threads:
            assert started.acquire(timeout=120)
        time.sleep(1.0)  # decoding 4 x (1900 + 1900) tokens: tens of seconds of work
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        assert time.monotonic() - t0 < 8, "the server took too long to stop:\n" + open(tmp_path / "server.log").read()
        for t in threads:
            t.join(30)
        assert len(outcomes) == 4
        errors = [last for status, last in outcomes if "server_shutting_down" in last]
        assert len(errors) == 4, outcomes  # every in-flight request was answered with the error
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def _healthy(url) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_shutdown_stops_its_own_loops_and_leaves_anothers_running(tiny_dir):
    """A loop someone else attached to a model (the web app's) survives the server's shutdown;
    the server's own request in it gets the 503, and the server's own loop stops and detaches."""
    import asyncio

    from metaaligner_core.engine.generator import LocalGenerator
    from metaaligner_core.engine.scheduler import StepScheduler
    from metaaligner_core.serve.service import RequestError
    from metaaligner_core.settings import GenerationSettings

    theirs_gen, own_gen = (LocalGenerator.load(tiny_dir, device="cpu") for _ in range(2))
    theirs = StepScheduler(theirs_gen, batch_size=4, name="app-0")
    theirs_gen.scheduler = theirs
    svc = CorrectionService(policies=[f"tiny={tiny_dir}"], aligner=tiny_dir, max_new_tokens=8)
    try:
        assert svc._batcher(theirs_gen) is theirs
        own = svc._batcher(own_gen)
        assert own is not theirs and own_gen.scheduler is own
        log = []
        other = submit(theirs, [1, 301, 5, 6], 0, GenerationSettings(max_new_tokens=300), log, "app-row")

        async def request(gen):
            got = []
            async for items in svc._tokens(gen, [1, 302, 5, 6], 0, GenerationSettings(max_new_tokens=300), "c"):
                got += items
                if len(got) >= 3 and not started[gen is own_gen].is_set():
                    started[gen is own_gen].set()
            return got

        async def main():
            tasks = [asyncio.create_task(request(g)) for g in (theirs_gen, own_gen)]
            for e in started.values():
                await asyncio.wait_for(e.wait(), 60)
            await asyncio.to_thread(svc.shutdown)
            return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)

        started = {False: asyncio.Event(), True: asyncio.Event()}
        results = asyncio.run(main())
        for r in results:  # both of the service's requests: the 503, not a finished answer
            assert isinstance(r, RequestError) and r.status == 503, r
        assert own_gen.scheduler is None and not own._thread.is_alive()
        assert theirs_gen.scheduler is theirs and theirs._thread.is_alive()
        wait_for(lambda: theirs.in_flight <= 1, timeout=10, what="the service's row to leave their loop")
        assert other.finished.wait(120) and other.end == ("done", "length") and len(other.tokens) == 300
        with pytest.raises(RequestError) as e:  # a request after shutdown is refused at once
            asyncio.run(request(theirs_gen))
        assert e.value.status == 503
    finally:
        theirs.stop()
        svc.shutdown()


def test_a_correction_ends_where_the_aligner_writes_a_stop(serve, client, monkeypatch):
    """A stop (the aligner's template marker; here a piece of what it writes anyway) ends the
    correction there, plain and streamed, with finish_reason "stop"; its row leaves the batch."""
    msgs = [{"role": "user", "content": "Name a prime."}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16)
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason == "length" and len(text) > 12
    stop = text[len(text) // 4:].lstrip()[:3]
    want = text[:text.find(stop)].strip()
    monkeypatch.setattr(serve.service.aligner, "stops", lambda query, draft: (stop,))
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    assert r.metaaligner["usage"]["correction"]["completion_tokens"] < 16
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    wait_for(lambda: serve.scheduler.in_flight == 0, timeout=10, what="the stopped rows to leave the batch")
