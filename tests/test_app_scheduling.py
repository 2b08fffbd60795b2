"""The web app's generations go through the step scheduler that ``/v1`` uses, and streamed text is
detokenised incrementally.

* ``metaaligner serve`` in-process (a real uvicorn server, the real Gradio app mounted at ``/ui``,
  the embedded SmolLM2-135M as policy and aligner): an Align run through ``/ui``'s queue protocol
  and a ``/v1`` request in flight at the same time are decoded by the one scheduler of the model
  (its counters: jobs joined, rows per step); the app's greedy draft and correction equal the same
  rows decoded alone (the offline engine, which never touches the scheduler); a cancelled Align
  event frees its row (the scheduler's decoded-rows counter stops within a few steps).
* ``python app.py``'s launch path alone: two browser sessions' Align runs share one batch.
* :class:`~metaaligner_core.engine.detokenize.IncrementalText` (and the server's ``TokenText``):
  the joined deltas equal ``tokenizer.decode(all ids)`` on texts with emoji, CJK, accents and
  newlines, no delta carries a half character, and the tokens handed to ``decode`` grow linearly.
"""
from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import openai
import pytest

from metaaligner_core.engine.detokenize import IncrementalText
from metaaligner_core.serve.service import TokenText
from test_security_app import RawGradio, backend_fns, components, fn_by_api_name

QUERY = "Name three fruits and say one thing about each."
OBJECTIVES = ["ultrafeedback/honesty"]


def wait_for(condition, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def align_data(cfg: dict, query: str, draft: str, max_new: int) -> tuple[int, list]:
    """The Align tab's event (``align_stream``) and its inputs as the page sends them (greedy)."""
    fn = fn_by_api_name(cfg, "align_stream")
    comps = components(cfg)
    dep = dict(backend_fns(cfg))[fn]
    by_elem = {comps[i].get("props", {}).get("elem_id"): n for n, i in enumerate(dep["inputs"])}
    data = [comps[i].get("props", {}).get("value") for i in dep["inputs"]]
    data[by_elem["objectives-ultrafeedback"]] = OBJECTIVES
    data[by_elem["query"]] = query
    data[by_elem["draft-in"]] = draft
    data[by_elem["max-new-tokens"]] = max_new
    return fn, data


# --- serve: /ui and /v1 on one scheduler ---------------------------------------------------------

@pytest.fixture(scope="module")
def serve(tmp_path_factory, embedded_dir):
    from metaaligner_core.serve import ServerThread
    from metaaligner_core.serve.api import create_app, mount_ui
    from metaaligner_core.serve.service import CorrectionService

    tmp = tmp_path_factory.mktemp("serve-ui")
    svc = CorrectionService(policies=["default"], aligner="default", objectives="honesty", max_new_tokens=256,
                            batch_size=4, prefill_chunk=64)
    svc.load()
    app = create_app(svc)
    mount_ui(app, svc, db_url=f"sqlite:///{tmp / 'ann.db'}")
    with ServerThread(app) as server:
        server.service = svc
        server.scheduler = svc.schedulers()[0]
        yield server
    svc.close()


def test_ui_and_v1_share_one_scheduler_and_the_ui_answers_as_alone(serve):
    svc, sched = serve.service, serve.scheduler
    assert len(svc.schedulers()) == 1  # policy and aligner: one model, one loop
    gen = sched.generator
    assert gen.scheduler is sched  # what the page's streams go through
    raw = RawGradio(serve.url + "/ui")
    fn, data = align_data(raw.config(), QUERY, "", 24)
    joined0, n_batches0 = sched.stats["joined"], len(sched.batches)
    result = {}
    ui = threading.Thread(target=lambda: result.update(raw.call(fn, data)))
    ui.start()
    wait_for(lambda: sched.stats["joined"] > joined0, what="the Align run's draft to join the scheduler")
    client = openai.OpenAI(base_url=serve.url + "/v1", api_key="none", max_retries=0, timeout=300)
    r = client.chat.completions.create(model="default", max_tokens=8,
                                       messages=[{"role": "user", "content": "Say hello."}])
    ui.join(timeout=300)
    raw.close()
    assert result.get("ok"), result
    # the page's draft and correction and the API's draft and correction: four jobs of this scheduler
    assert sched.stats["joined"] - joined0 == 4
    # ... decoded together: some step ran rows of both clients
    assert max(list(sched.batches)[n_batches0:]) >= 2
    # greedy: the page's texts are the rows decoded alone (the offline engine, not the scheduler)
    policy, aligner = svc.registry.loaded("policy", "default"), svc.aligner
    draft = policy.complete(QUERY, max_tokens=24).text
    aligned = aligner.align(QUERY, draft, ["honesty"], max_new_tokens=24)
    assert result["data"][0] == draft and result["data"][1] == aligned
    api_draft = policy.complete("Say hello.", max_tokens=8).text
    assert r.metaaligner["original"] == api_draft


def test_a_cancelled_align_event_frees_its_row(serve):
    sched = serve.scheduler
    raw = RawGradio(serve.url + "/ui")
    fn, data = align_data(raw.config(), QUERY, "", 256)
    session = uuid.uuid4().hex[:11]
    event = raw.join(fn, data, session)
    rows0 = sched.stats["decoded_rows"]
    with raw.http.stream("GET", serve.url + "/ui/gradio_api/queue/data", params={"session_hash": session}) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data:"):
                continue
            msg = json.loads(line[5:])
            if msg.get("msg") == "process_generating" and sched.stats["decoded_rows"] - rows0 >= 3:
                break  # the draft is streaming
    r = raw.http.post(serve.url + "/ui/gradio_api/cancel",
                      json={"session_hash": session, "fn_index": fn, "event_id": event})
    assert r.status_code == 200, r.text
    at_cancel = sched.stats["decoded_rows"]
    wait_for(lambda: sched.in_flight == 0, timeout=30, what="the cancelled row to leave the batch")
    stopped = sched.stats["decoded_rows"]
    time.sleep(0.3)
    raw.close()
    assert sched.stats["decoded_rows"] == stopped  # nothing decodes for nobody
    assert stopped - at_cancel <= 16  # a few steps after the cancel, of the 256 it asked for
    assert stopped - rows0 < 128


# --- the app alone: browser sessions share batches -------------------------------------------------

def test_app_sessions_share_one_scheduler_batch(tmp_path, embedded_dir):
    from metaaligner_core.serve import free_port
    from webapp.config import AppConfig
    from webapp.launch import launch

    config = AppConfig(port=free_port(), db_url=f"sqlite:///{tmp_path / 'ann.db'}", max_new_tokens=16,
                       preload=False)
    demo = launch(config, block=False, quiet=True)
    try:
        registry = demo.service.registry
        url = f"http://127.0.0.1:{config.port}"
        raw = RawGradio(url)
        cfg = raw.config()
        drafts = ["Apples are red. Bananas are yellow.", "Cherries are small. Grapes grow in bunches."]
        calls = [align_data(cfg, QUERY, d, 16) for d in drafts]
        # load the model first, so that both runs reach the scheduler at once
        first = raw.call(*calls[0])
        assert first["ok"], first
        sched = registry.loaded("aligner", "default").generator.scheduler
        assert sched is not None
        joined0, n0 = sched.stats["joined"], len(sched.batches)
        results = [None, None]

        def run(i):
            results[i] = RawGradio(url).call(*calls[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert all(r and r["ok"] for r in results), results
        assert sched.stats["joined"] - joined0 == 2
        assert max(list(sched.batches)[n0:]) == 2  # the two sessions' rows decoded in one batch
        aligner = registry.loaded("aligner", "default")
        for d, r in zip(drafts, results):  # and each equals its row alone
            assert r["data"][1] == aligner.align(QUERY, d, ["honesty"], max_new_tokens=16)
        raw.close()
    finally:
        demo.close()
        demo.service.registry.stop_schedulers()


# --- incremental detokenisation ----------------------------------------------------------------------

TEXTS = [
    "Café au lait, naïve façade — déjà vu.\nNew line\n\n  indented ✓",
    "Emoji: 🎉🙂👩‍👩‍👧 and 🇫🇷 flags; 😀😀😀!",
    "中文测试：我喜欢吃苹果。日本語のテキストも。한국어도 있어요.",
    "Mixed 🍣 寿司 and ñandú\r\ntabs\tand spaces   end ",
]


class CountingTokenizer:
    """The real tokenizer, counting the token ids each ``decode`` call is given."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kw)


@pytest.fixture(scope="module")
def tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


@pytest.mark.parametrize("make", [lambda t, eos: IncrementalText(t, eos), lambda t, eos: TokenText(t, eos)],
                         ids=["IncrementalText", "TokenText"])
@pytest.mark.parametrize("step", [1, 3])
def test_incremental_text_equals_whole_decoding(tokenizer, make, step):
    eos = {tokenizer.eos_token_id}
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        expected = tokenizer.decode(ids, skip_special_tokens=True)
        inc = make(CountingTokenizer(tokenizer), eos)
        deltas = []
        for i in range(0, len(ids), step):
            d = inc.add(*ids[i:i + step])
            assert "\ufffd" not in d  # a split character is held back, never sent in halves
            deltas.append(d)
            assert expected.startswith("".join(deltas))  # nothing sent is ever rewritten
        deltas.append(inc.finish())
        assert "".join(deltas) == expected, text
        assert sum(bool(d) for d in deltas[:-1]) >= len(ids) // (3 * step)  # it streams, not all at the end


@pytest.mark.parametrize("make", [lambda t, eos: IncrementalText(t, eos), lambda t, eos: TokenText(t, eos)],
                         ids=["IncrementalText", "TokenText"])
def test_an_answer_cut_inside_a_character_ends_as_the_whole_decoding(tokenizer, make):
    """A row stopped by its token limit in the middle of a multi-byte character: the streamed
    deltas hold the half character back, and ``finish`` hands out the rest of the whole decoding."""
    cuts = 0
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        for n in range(1, len(ids)):
            expected = tokenizer.decode(ids[:n], skip_special_tokens=True)
            if not expected.endswith("\ufffd"):
                continue
            cuts += 1
            inc = make(tokenizer, {tokenizer.eos_token_id})
            streamed = "".join(inc.add(t) for t in ids[:n])
            assert not streamed.endswith("\ufffd")
            assert streamed + inc.finish() == expected
    assert cuts >= 5  # the texts hold characters split over several tokens


def test_incremental_text_is_linear(tokenizer):
    ids = []
    for _ in range(30):
        for text in TEXTS:
            ids += tokenizer(text, add_special_tokens=False).input_ids
    n = len(ids)
    counting = CountingTokenizer(tokenizer)
    inc = IncrementalText(counting, ())
    out = "".join(inc.add(t) for t in ids) + inc.finish()
    assert out == tokenizer.decode(ids, skip_special_tokens=True)
    assert n > 1000
    # each token is decoded a bounded number of times (a whole re-decode per token: ~n²/2)
    assert counting.decoded <= 8 * n, (counting.decoded, n)


def test_generator_stream_text_equals_its_tokens_decoded(embedded_dir):
    """LocalGenerator.stream (no scheduler) on a prompt asking for emoji and CJK: the joined text
    equals the decoded continuation."""
    from metaaligner_core.backends.hf import HFChatBackend
    from metaaligner_core.engine.generator import LocalGenerator
    from metaaligner_core.settings import GenerationSettings

    gen = LocalGenerator.load(str(embedded_dir), device="cpu")
    ids = HFChatBackend(gen).encode("Write 'hello' in Chinese and Japanese, then three emoji.", max_tokens=24)
    settings = GenerationSettings(max_new_tokens=24)
    streamed = "".join(gen.stream(ids, settings))
    assert streamed == gen.decode(gen.generate([ids], settings)[0])
