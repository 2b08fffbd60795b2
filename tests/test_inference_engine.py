"""The decoding engine on a tiny randomly initialised Llama (fast): no deprecated transformers API
is used, and every path (buffered cache, shared prefix, chunked attention, the plain-cache
fallback, sampling with top-p and repetition penalty, streaming) gives consistent tokens."""
from __future__ import annotations

import warnings

import pytest

from conftest import tiny_llama_generator


@pytest.fixture(scope="module")
def tiny(embedded_dir):
    return tiny_llama_generator()


PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 5, 6, 7, 20, 21], [1, 5, 6, 7, 30, 31, 32, 33, 34, 35, 36], [1, 5, 6, 7, 40]]


def _no_deprecations(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    bad = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
           if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not bad, bad
    return result


def test_generation_raises_no_deprecation_or_future_warning(tiny, monkeypatch):
    """A new transformers release that deprecates what the engine calls fails here, not on a user's install."""
    from metaaligner_core.engine import generator as engine
    from metaaligner_core.settings import GenerationSettings

    greedy = GenerationSettings(max_new_tokens=6)
    sampled = GenerationSettings(max_new_tokens=6, temperature=0.8, top_p=0.9, repetition_penalty=1.3, seed=1)
    batched = _no_deprecations(lambda: tiny.generate(PROMPTS, greedy, batch_size=2, prefix_lens=[4] * 4))
    _no_deprecations(lambda: tiny.generate(PROMPTS, sampled, batch_size=4))
    streamed = _no_deprecations(lambda: "".join(tiny.stream(PROMPTS[0], greedy, 4)))
    assert streamed == tiny.decode(batched[0])
    monkeypatch.setattr(engine, "all_buffered", lambda cache: False)  # transformers' own cache path
    plain = _no_deprecations(lambda: tiny.generate(PROMPTS, greedy, batch_size=4))
    assert plain == batched


def test_batched_equals_one_by_one_on_the_tiny_model(tiny):
    from metaaligner_core.settings import GenerationSettings

    s = GenerationSettings(max_new_tokens=8, repetition_penalty=1.2)
    together = tiny.generate(PROMPTS, s, batch_size=3, prefix_lens=[4] * 4)
    alone = [tiny.generate([p], s, batch_size=1)[0] for p in PROMPTS]
    assert together == alone and all(together)


def _next_in_new_thread(gen):
    import threading

    box = {}

    def step():
        try:
            box["item"] = next(gen)
        except StopIteration:
            box["done"] = True
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = e

    t = threading.Thread(target=step)
    t.start()
    t.join(timeout=60)
    if "error" in box:
        raise box["error"]
    return box


@pytest.mark.parametrize("plain_cache", [False, True])
def test_a_stream_resumed_by_other_threads_gives_the_same_tokens(tiny, monkeypatch, plain_cache):
    """Gradio resumes a streaming generator in whichever worker thread is free; inference mode is
    per thread, so every step must enter it itself (a stream resumed elsewhere used to fail writing
    into its cache buffers outside inference mode)."""
    from metaaligner_core.engine import generator as engine
    from metaaligner_core.settings import GenerationSettings

    if plain_cache:
        monkeypatch.setattr(engine, "all_buffered", lambda cache: False)
    greedy = GenerationSettings(max_new_tokens=8)
    want = "".join(tiny.stream(PROMPTS[2], greedy, 4))
    gen, pieces = tiny.stream(PROMPTS[2], greedy, 4), []
    while True:
        box = _next_in_new_thread(gen)
        if box.get("done"):
            break
        pieces.append(box["item"])
    assert "".join(pieces) == want and want
    half = tiny.stream(PROMPTS[2], greedy, 4)  # closed part-way from another thread: no error, no leak
    _next_in_new_thread(half)
    import threading

    t = threading.Thread(target=half.close)
    t.start()
    t.join(timeout=60)
    import torch

    assert not torch.is_inference_mode_enabled()


def test_decoding_loads_sdpa_even_where_flash_attention_is_usable(monkeypatch):
    """flash-attention-2 is for training; decoding (padded rows) uses SDPA on every device."""
    from metaaligner_core import models

    monkeypatch.setattr(models, "flash_attn_available", lambda: True)
    assert models.auto_attention("cuda") == "flash_attention_2"  # training keeps it
    assert models.auto_attention("cuda", decoding=True) == "sdpa"
    assert models.auto_attention("cuda", "flash_attention_2", decoding=True) == "flash_attention_2"  # asked for
    seen = {}
    real = models.auto_attention

    def spy(device, attn=None, **kw):
        seen.update(kw, device=device)
        return real(device, attn, **kw)

    monkeypatch.setattr(models, "auto_attention", spy)
    model, _ = models.load_causal_lm("default", device="cpu")
    assert seen == {"device": "cpu", "decoding": True} and model.config._attn_implementation == "sdpa"
