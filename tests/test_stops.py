"""Stop texts: a correction ends where the aligner writes one of its template's markers.

Expected outputs come from an independent computation: the unstopped generation decoded prefix by
prefix (the first prefix whose text holds the stop), and plain string slicing; the model is a tiny
random Llama (fast, its output depends on its input) with the embedded tokenizer.
"""
from __future__ import annotations

import random

import pytest

from conftest import tiny_llama_generator

from metaaligner_core.engine.stops import StopCut, Stops, cut_at_loop, cut_at_stop, cut_stream, loop_end
from metaaligner_core.settings import GenerationSettings
from metaaligner_core.templates import TEMPLATES, build_prompt, stop_texts


# -- the text rules ---------------------------------------------------------------------------------

@pytest.mark.parametrize("template", list(TEMPLATES))
def test_the_markers_are_the_templates_own_and_a_users_text_is_never_a_stop(template):
    stops = stop_texts(template, "q?", "An answer.")
    prompt = build_prompt(template, "q?", "An answer.", ["Honesty: be honest"])
    assert stops[0] == "| Edit" and "| Answer:" in stops and len(stops) == 3
    assert all(prompt.count(s) == 1 for s in stops)  # each marker is in the prompt exactly once
    question_marker = stops[2]
    assert stop_texts(template, f"a table {question_marker} x", "An answer.") == stops[:2]
    assert stop_texts(template, "q?", "a | Answer: b | Edited: c") == (question_marker,)


def random_splits(text: str, rng: random.Random, times: int, most: int):
    """``times`` random ways to split ``text`` into at most ``most`` + 1 deltas."""
    for _ in range(times):
        cuts = sorted(rng.sample(range(1, len(text)), k=rng.randint(0, min(most, len(text) - 1))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def test_a_stop_cut_stream_equals_cutting_the_whole_text_however_it_is_split():
    rng = random.Random(7)
    stops = ["| Edit", "| Answer:"]
    texts = ["keep this | Edit: keep this", "no marker here | Ed", "a | b | Answer: x | Edit", "| Edit at once",
             "ends with a partial |", "two | Answer | Answer: y"]
    for text in texts:
        want, hit = cut_at_stop(text, stops)
        for parts in random_splits(text, rng, 50, 6):
            cut = StopCut(stops)
            got = "".join(cut.feed(p) for p in parts) + cut.finish()
            assert (got, cut.hit) == (want, hit), (text, parts)
    assert cut_at_stop("x | Answer: y | Edit", stops) == ("x ", True)


def test_cut_stream_closes_its_source_at_a_stop():
    closed = []

    def source():
        try:
            yield from ["one | Ed", "it: two", "three"]
        finally:
            closed.append(True)

    assert list(cut_stream(source(), ["| Edit"])) == ["one "] and closed == [True]
    assert "".join(cut_stream(iter(["a |", " b"]), ["| Edit"])) == "a | b"


# -- the engine ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(embedded_dir):
    return tiny_llama_generator(max_positions=512, initializer_range=1.0)  # its output depends on its input


PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 5, 6, 7, 20, 21], [1, 5, 6, 7, 30, 31, 32, 33, 34, 35, 36], [1, 5, 6, 7, 40]]
N = 24


def first_prefix_with(tok, ids: list[int], stop: str) -> list[int]:
    """The shortest prefix of ``ids`` whose whole decoding contains ``stop`` (independent of the window)."""
    for k in range(1, len(ids) + 1):
        if stop in tok.decode(ids[:k], skip_special_tokens=True):
            return ids[:k]
    raise AssertionError("stop not in the output")


def a_stop_in(tok, ids: list[int], at: int) -> str:
    """A few characters the output writes after its ``at``-th token: a stop text it will meet."""
    text = tok.decode(ids[:at + 3], skip_special_tokens=True)
    start = len(tok.decode(ids[:at], skip_special_tokens=True))
    stop = text[start:].strip()[:5]
    assert stop
    return stop


@pytest.mark.parametrize("plain_cache", [False, True])
def test_generation_stops_at_the_token_that_completes_a_stop(tiny, monkeypatch, plain_cache):
    from metaaligner_core.engine import generator as engine

    if plain_cache:  # transformers' own cache (models with sliding-window layers)
        monkeypatch.setattr(engine, "all_buffered", lambda cache: False)
    s = GenerationSettings(max_new_tokens=N)
    full = tiny.generate(PROMPTS, s, batch_size=2, prefix_lens=[4] * 4)
    assert all(len(f) == N for f in full)  # no EOS: every stop below is what ends a row
    stops = [(a_stop_in(tiny.tokenizer, full[0], 5),), (), ("never written ~~~",), (a_stop_in(tiny.tokenizer, full[3], 12),)]
    got = tiny.generate(PROMPTS, s, batch_size=2, prefix_lens=[4] * 4, stops=stops)
    assert got[0] == first_prefix_with(tiny.tokenizer, full[0], stops[0][0]) and len(got[0]) < N
    assert got[3] == first_prefix_with(tiny.tokenizer, full[3], stops[3][0]) and len(got[3]) < N
    assert got[1] == full[1] and got[2] == full[2]  # rows without a stop (or never meeting it) run on


def test_the_aligner_cuts_batches_and_streams_alike_and_counts_them(tiny, monkeypatch):
    from metaaligner_core.inference import Aligner

    aligner = Aligner(tiny, template="ultrafeedback", name="tiny")
    q, drafts = "Which is it?", ["One answer.", "Another, longer answer to it.", "A third."]
    s = dict(max_new_tokens=N)
    full = aligner.align_batch([q] * 3, drafts, "honesty", **s)  # the template's markers: never written here
    assert aligner.stopped_at_marker == 0
    stop = full[1][len(full[1]) // 2:][:4]
    assert stop.strip() and stop not in drafts[1] and stop not in q
    monkeypatch.setattr(aligner, "stops", lambda query, draft: (stop,) if draft == drafts[1] else ())
    cut = aligner.align_batch([q] * 3, drafts, "honesty", **s)
    assert cut[1] == full[1][:full[1].find(stop)].strip() and cut[0] == full[0] and cut[2] == full[2]
    assert aligner.stopped_at_marker == 1
    assert "".join(aligner.stream(q, drafts[1], "honesty", **s)) == cut[1]
    assert aligner.align(q, drafts[1], "honesty", **s) == cut[1]


# -- loops --------------------------------------------------------------------------------------------

S = "You can assume that the service types are always valid."
DRAFT = f"The function returns the wait time.\n\n{S}\n\nYou can assume that the staff count is at least one."


def test_a_loop_ends_after_the_third_copy_of_a_sentence_the_draft_has_once():
    looped = f"The function returns the wait time.\n\n{S}\n\n{S}\n\n{S}\n\n{S}\n\n{S}"
    third = len(f"The function returns the wait time.\n\n{S}\n\n{S}\n\n{S}")  # by hand: three copies
    assert loop_end(looped, DRAFT) == third
    assert cut_at_loop(looped, Stops([], draft=DRAFT)) == (looped[:third], True)
    assert cut_at_loop(looped, ("| Edit",)) == (looped, False)  # plain stop texts carry no draft
    assert loop_end(f"{S} {S}", DRAFT) is None  # twice: an edit may restate once
    # the count is the draft's plus two: a sentence the draft has twice may be written three times
    assert loop_end(f"{S} {S} {S}", f"{S} {S}") is None and loop_end(f"{S} {S} {S} {S}", f"{S} {S}") is not None
    # case, punctuation and spacing do not hide a copy; a line without a full stop is a sentence too
    assert loop_end(f"{S}\n{S.upper()}\n{S[:-1]}\nmore", "") == len(f"{S}\n{S.upper()}\n{S[:-1]}")
    # short sentences never count, nor does a sentence still being written
    assert loop_end("Yes. Yes. Yes. Yes.", "") is None
    assert loop_end(f"{S} {S} {S[:-1]}", "", final=False) is None and loop_end(f"{S} {S} {S}", "", final=False) is None
    assert loop_end(f"{S} {S} {S} ", "", final=False) == len(f"{S} {S} {S}")


def test_a_loop_cut_stream_equals_cutting_the_whole_text_however_it_is_split():
    rng = random.Random(11)
    stops = Stops(["| Edit"], draft=DRAFT)
    texts = [f"Intro line here.\n{S}\n{S}\n{S}\n{S}\nend", f"{S} {S} {S}", f"{S} {S} | Edit: {S}",
             f"{S} {S} {S}| Edit", f"A fine edit of it. {S}", f"{S}\n{S}\n{S}\n", "no loop at all, ever, here"]
    for text in texts:
        marker_cut, marker = cut_at_stop(text, stops)
        want, looped = cut_at_loop(marker_cut, stops)
        for parts in random_splits(text, rng, 60, 8):
            cut = StopCut(stops)
            got = "".join(cut.feed(p) for p in parts) + cut.finish()
            assert (got, cut.hit, cut.looped) == (want, marker or looped, looped), (text, parts)


def test_the_decoding_check_finds_a_loop_at_the_token_that_completes_it(embedded_dir):
    from metaaligner_core.engine.stops import tail_check
    from metaaligner_core.models import load_tokenizer

    tok = load_tokenizer("default")
    out = tok(f"Sure.\n\n{S}\n\n{S}\n\n{S}\n\n{S}\n\n{S}", add_special_tokens=False).input_ids
    check = tail_check(tok, [Stops([], draft=DRAFT), Stops([], draft=f"{S} {S} {S}"), ()])
    for ids in (out, tok(f"{S} {S} {S} Furthermore, the next sentence goes on.", add_special_tokens=False).input_ids):
        # independent: the first prefix whose decoding (as a stream would see it) ends a third copy
        first = next(k for k in range(1, len(ids) + 1) if loop_end(tok.decode(ids[:k]), DRAFT, final=False) is not None)
        assert [check(0, ids[:k]) for k in range(1, len(ids) + 1)].index(True) + 1 == first
    assert not any(check(1, out[:k]) for k in range(1, len(out) + 1))  # the draft has it three times
    assert not check(2, out)  # no stops, no draft: never
    assert tail_check(tok, [(), ()]) is None and tail_check(tok, [Stops([], draft="x")]) is not None


def looping_generator(sentence: str):
    """A real one-layer Llama whose weights make it a bigram model that writes ``sentence`` (with a
    leading space) over and over, whatever the prompt: each token of the sentence points to the next,
    every other token to the first; the layer's output projections are zero (the residual stream is
    the token's embedding)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from metaaligner_core.backends.hf import LocalGenerator
    from metaaligner_core.models import load_tokenizer

    tok = load_tokenizer("default")
    cycle = tok(" " + sentence, add_special_tokens=False).input_ids
    assert len(set(cycle)) == len(cycle) < 31
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.norm.weight.fill_(1.0)
        emb, head, n = model.model.embed_tokens.weight, model.lm_head.weight, len(cycle)
        emb[:, n] = 1.0  # every token: the "start" direction ...
        for i, t in enumerate(cycle):
            emb[t] = 0.0
            emb[t, i] = 1.0  # ... but the sentence's own tokens: a direction each
            head[cycle[(i + 1) % n], i] = 10.0
        head[cycle[0], n] = 10.0
    model.set_attn_implementation("sdpa")
    return LocalGenerator(model, tok, "looping")


@pytest.mark.parametrize("plain_cache", [False, True])
def test_the_aligner_stops_a_loop_in_batches_and_streams_alike_and_counts_it(embedded_dir, monkeypatch, plain_cache):
    from metaaligner_core.engine import generator as engine
    from metaaligner_core.inference import Aligner

    if plain_cache:  # transformers' own cache (models with sliding-window layers)
        monkeypatch.setattr(engine, "all_buffered", lambda cache: False)

    aligner = Aligner(looping_generator(S), template="ultrafeedback", name="looping")
    q, s = "What may I assume?", dict(max_new_tokens=60)
    drafts = [DRAFT, " ".join([S] * 6)]  # S once; S six times (writing it five times is no loop)
    got = aligner.align_batch([q, q], drafts, "honesty", **s)
    assert got[0] == f"{S} {S} {S}" and aligner.stopped_at_loop == 1  # by hand: the third copy ends it
    budget = aligner.generator.tokenizer(got[1], add_special_tokens=False).input_ids
    assert len(budget) == 60 and got[1].startswith(f"{S} {S} {S} {S}")  # ran to the token limit
    assert "".join(aligner.stream(q, drafts[0], "honesty", **s)) == got[0]
    assert aligner.align(q, drafts[0], "honesty", **s) == got[0] and aligner.stopped_at_loop == 2
    # generation itself stops: at the token after the third copy's full stop (the space that ends it)
    ids = aligner.encode(q, drafts[0], "honesty", 60)[0]
    n = len(aligner.generator.tokenizer(" " + S, add_special_tokens=False).input_ids)
    for draft, tokens in ((DRAFT, 3 * n + 1), (drafts[1], 60)):
        out = aligner.generator.generate([ids], GenerationSettings(max_new_tokens=60), stops=[Stops([], draft=draft)])
        assert len(out[0]) == tokens


def test_serve_ends_a_looping_correction_plain_and_streamed(embedded_dir, tmp_path):
    """Through ``metaaligner serve``'s OpenAI API (a real HTTP server): the policy (an OpenAI-shaped
    server on 127.0.0.1) writes a draft, the looping aligner's correction ends after the third copy."""
    import openai

    from api_server import FakeProvider
    from metaaligner_core.serve import ServerThread
    from metaaligner_core.serve.api import create_app
    from metaaligner_core.serve.service import CorrectionService

    gen = looping_generator(S)
    gen.model.save_pretrained(tmp_path / "looping")
    gen.tokenizer.save_pretrained(tmp_path / "looping")
    with FakeProvider(reply=lambda body: "Any service type is fine to ask about.") as up:
        svc = CorrectionService(policies=[f"up=openai-compatible:fake@{up.base_url}/v1"], aligner=str(tmp_path / "looping"),
                                objectives="honesty", max_new_tokens=60, batch_size=2)
        svc.load()
        try:
            with ServerThread(create_app(svc, api_keys=["sk-loop"])) as server:
                client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-loop", max_retries=0, timeout=60)
                msgs = [{"role": "user", "content": "What may I assume?"}]
                r = client.chat.completions.create(model="up", messages=msgs, max_tokens=60)
                assert r.choices[0].message.content == f"{S} {S} {S}" and r.choices[0].finish_reason == "stop"
                assert r.metaaligner["usage"]["correction"]["completion_tokens"] < 60
                chunks = list(client.chat.completions.create(model="up", messages=msgs, max_tokens=60, stream=True))
                assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == f"{S} {S} {S}"
                assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        finally:
            svc.close()
