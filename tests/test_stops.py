"""Stop texts: a correction ends where the aligner writes one of its template's markers.

Expected outputs come from an independent computation: the unstopped generation decoded prefix by
prefix (the first prefix whose text holds the stop), and plain string slicing; the model is a tiny
random Llama (fast, its output depends on its input) with the embedded tokenizer.
"""
from __future__ import annotations

import random

import pytest

from conftest import tiny_llama_generator

from metaaligner_core.engine.stops import StopCut, cut_at_stop, cut_stream
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


def test_a_stop_cut_stream_equals_cutting_the_whole_text_however_it_is_split():
    rng = random.Random(7)
    stops = ["| Edit", "| Answer:"]
    texts = ["keep this | Edit: keep this", "no marker here | Ed", "a | b | Answer: x | Edit", "| Edit at once",
             "ends with a partial |", "two | Answer | Answer: y"]
    for text in texts:
        want, hit = cut_at_stop(text, stops)
        for _ in range(50):
            cuts = sorted(rng.sample(range(1, len(text)), k=rng.randint(0, min(6, len(text) - 1))))
            parts = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
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
