"""The aligner and the local chat backend on the real embedded model (SmolLM2-135M-Instruct, fp32 CPU)."""
from __future__ import annotations

import logging

import pytest

from metaaligner_core.errors import MetaAlignerError
from metaaligner_core.objectives import parse_objectives
from metaaligner_core.templates import build_prompt

OBJ = "honesty,helpfulness"
QUERIES = [
    "What is the capital of France?",
    "How do I boil an egg so that the yolk stays soft? Please explain every step.",
    "Name a fruit.",
    "Is it safe to look directly at the sun during an eclipse?",
    "Write one sentence about cats.",
    "Why is the sky blue? Answer for a ten-year-old who likes dinosaurs and rockets.",
]
DRAFTS = [
    "Lyon is the capital of France.",
    "Put the egg in water. " * 6,
    "A potato.",
    "Yes, it is always safe; eclipses block all harmful light, so stare as long as you like.",
    "Cats.",
    "Because of the ocean reflecting on it.",
]


@pytest.fixture(scope="module")
def aligner(embedded_dir):
    from metaaligner_core.inference import Aligner

    return Aligner.load("default")


@pytest.fixture(scope="module")
def chat(aligner):
    from metaaligner_core.backends.hf import HFChatBackend, LocalGenerator

    g = aligner.generator
    return HFChatBackend(LocalGenerator(g.model, g.tokenizer, g.name), name="default")


# -- the encode rule (real tokenizers, no model) ----------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(embedded_dir):
    from metaaligner_core.models import load_tokenizer

    return load_tokenizer("default")


def test_bos_is_prepended_when_the_tokenizer_does_not_add_it(tokenizer):
    from metaaligner_core.inference import encode_aligner_prompt

    text = "Edit: hello"
    plain = tokenizer(text).input_ids
    assert plain[0] != tokenizer.bos_token_id  # SmolLM2's tokenizer adds no BOS itself
    assert encode_aligner_prompt(tokenizer, text) == [tokenizer.bos_token_id, *plain]


def test_bos_is_not_doubled_when_the_tokenizer_adds_it(tokenizer):
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from metaaligner_core.inference import encode_aligner_prompt

    bos = tokenizer.bos_token
    backend = tokenizer.backend_tokenizer.__class__.from_str(tokenizer.backend_tokenizer.to_str())
    backend.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)])
    llama_like = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos)
    ids = encode_aligner_prompt(llama_like, "Edit: hello")
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    assert ids[1:] == tokenizer("Edit: hello").input_ids


# -- prompts ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_prompt_is_the_template_and_default_is_flagged_as_base_model(aligner):
    assert aligner.is_base_model and aligner.template == "ultrafeedback"
    objs = parse_objectives(OBJ, family="ultrafeedback")
    assert aligner.prompt("q?", "d.", OBJ) == build_prompt("ultrafeedback", "q?", "d.", objs)
    assert aligner.prompt("q?", "d.", objs) == aligner.prompt("q?", "d.", ["honesty", "helpfulness"])
    with pytest.raises(MetaAlignerError, match="unknown objective"):
        aligner.prompt("q?", "d.", "honesty,nonsense")


@pytest.mark.slow
def test_a_long_draft_is_shortened_and_nothing_else(aligner, caplog):
    from metaaligner_core.backends.hf import LocalGenerator
    from metaaligner_core.inference import Aligner

    g = aligner.generator
    small = Aligner(LocalGenerator(g.model, g.tokenizer, g.name, max_length=160), template="ultrafeedback")
    long_draft = "Paris is the capital of France and its largest city. " * 40
    ids, cut = small.encode("Capital of France?", long_draft, OBJ, max_new_tokens=8)
    assert cut and len(ids) <= 160 - 8
    text = g.tokenizer.decode(ids, skip_special_tokens=True)
    before, after = build_prompt("ultrafeedback", "Capital of France?", "\x00", parse_objectives(OBJ)).split("\x00")
    assert text.startswith(before + "Paris is the capital of France") and text.endswith(after)
    caplog.set_level(logging.WARNING)
    out = small.align_batch(["Capital of France?"] * 3, [long_draft, "Paris.", long_draft], OBJ, max_new_tokens=4)
    assert len(out) == 3
    warnings = [r.getMessage() for r in caplog.records if "shortened" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("2 of 3 drafts")
    with pytest.raises(MetaAlignerError, match="query"):
        small.encode("why? " * 200, "x", OBJ, max_new_tokens=8)


# -- generation -------------------------------------------------------------------------------
@pytest.mark.slow
def test_batched_output_equals_one_by_one_under_greedy(aligner):
    single = [aligner.align(q, d, OBJ, max_new_tokens=12) for q, d in zip(QUERIES, DRAFTS)]
    batched = aligner.align_batch(QUERIES, DRAFTS, OBJ, batch_size=4, max_new_tokens=12)
    assert batched == single
    assert all(s.strip() for s in single)
    # Another batch size groups the rows differently; the texts stay the same.
    assert aligner.align_batch(QUERIES, DRAFTS, OBJ, batch_size=3, max_new_tokens=12) == single


@pytest.mark.slow
def test_per_row_objectives_and_repetition_penalty_batch_like_single(aligner):
    per_row = [["honesty"], ["helpfulness", "length"], ["Humour: the response should be funny"]]
    gen = dict(max_new_tokens=8, repetition_penalty=1.3)
    single = [aligner.align(q, d, o, **gen) for q, d, o in zip(QUERIES[:3], DRAFTS[:3], per_row)]
    assert aligner.align_batch(QUERIES[:3], DRAFTS[:3], per_row, **gen) == single
    assert single != [aligner.align(q, d, o, max_new_tokens=8) for q, d, o in zip(QUERIES[:3], DRAFTS[:3], per_row)]


@pytest.mark.slow
def test_stream_joins_to_align(aligner):
    for q, d in zip(QUERIES[:2], DRAFTS[:2]):
        pieces = list(aligner.stream(q, d, OBJ, max_new_tokens=16))
        assert len(pieces) > 1
        assert "".join(pieces) == aligner.align(q, d, OBJ, max_new_tokens=16)


@pytest.mark.slow
def test_sampling_is_reproducible_with_a_seed(aligner):
    gen = dict(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=3)
    assert aligner.align(QUERIES[0], DRAFTS[0], OBJ, **gen) == aligner.align(QUERIES[0], DRAFTS[0], OBJ, **gen)
    with pytest.raises(MetaAlignerError, match="temperature"):
        aligner.align(QUERIES[0], DRAFTS[0], OBJ, temperature=-1)


@pytest.mark.slow
def test_local_chat_backend_uses_the_chat_template(chat):
    tok = chat.generator.tokenizer
    ids = chat.encode("Name a fruit.", system="Answer in one word.")
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nAnswer in one word.") and text.endswith("<|im_start|>assistant\n")
    batch = chat.complete_batch(QUERIES[:3], max_tokens=10, batch_size=2)
    assert [c.text for c in batch] == [chat.complete(q, max_tokens=10).text for q in QUERIES[:3]]
    assert batch[0].usage["prompt_tokens"] > 0 and 0 < batch[0].usage["completion_tokens"] <= 10
    assert "Paris" in batch[0].text  # the real model knows this one
    assert "".join(chat.stream(QUERIES[0], max_tokens=10)) == batch[0].text


@pytest.mark.slow
def test_an_api_model_is_not_an_aligner():
    from metaaligner_core.inference import Aligner

    with pytest.raises(MetaAlignerError, match="API model"):
        Aligner.load("openai:gpt-4o")


@pytest.mark.slow
def test_plain_cache_fallback_matches_the_buffered_path(aligner):
    """Models with sliding-window layers decode through transformers' own cache; same tokens."""
    from metaaligner_core.settings import GenerationSettings

    g = aligner.generator
    prompts = [aligner.encode(q, d, OBJ, 10)[0] for q, d in zip(QUERIES[:3], DRAFTS[:3])]
    sampling = GenerationSettings(max_new_tokens=10)
    rows = {i: [] for i in range(3)}
    for ids, tokens, _ in g._decode_plain(prompts, sampling):
        for i, t in zip(ids, tokens):
            rows[i].append(t)
    plain = [[t for t in rows[i] if t not in g.eos_ids] for i in range(3)]
    assert plain == g.generate(prompts, sampling, batch_size=2)


@pytest.mark.slow
def test_padded_batch_prefill_used_on_accelerators_gives_the_same_tokens(aligner):
    from metaaligner_core.backends.hf import LocalGenerator
    from metaaligner_core.inference import Aligner

    g = aligner.generator
    padded = Aligner(LocalGenerator(g.model, g.tokenizer, g.name), template=aligner.template)
    padded.generator.row_prefill = False
    gen = dict(max_new_tokens=10, batch_size=4)
    assert padded.align_batch(QUERIES, DRAFTS, OBJ, **gen) == aligner.align_batch(QUERIES, DRAFTS, OBJ, **gen)


def test_chunk_plan_covers_every_row_with_its_width():
    from metaaligner_core.backends.hf import chunk_plan

    assert chunk_plan([]) == []
    assert chunk_plan([300, 299, 298]) == [(0, 3, 300)]  # similar widths: one call is cheaper
    assert chunk_plan([800] * 4 + [100] * 12) == [(0, 4, 800), (4, 16, 100)]
    for widths in ([900, 700, 650, 400, 390, 120, 100, 90], [50, 900, 60, 800], [5] * 16):
        runs = chunk_plan(widths, max_chunks=3)
        assert 1 <= len(runs) <= 3
        assert [a for a, _, _ in runs] == [0] + [b for _, b, _ in runs[:-1]] and runs[-1][1] == len(widths)
        assert all(w >= max(widths[a:b]) for a, b, w in runs)  # no row loses a column it attends to


@pytest.mark.slow
def test_chunked_decode_attention_gives_the_same_tokens(aligner, monkeypatch):
    """On CPU a decoding step attends in runs of rows of similar width; same tokens as one call."""
    import metaaligner_core.engine.attention as attention
    from metaaligner_core.backends.hf import LocalGenerator
    from metaaligner_core.inference import Aligner

    g = aligner.generator
    assert g.chunked  # CPU + sdpa
    plans = []
    real = attention.chunk_plan
    monkeypatch.setattr(attention, "chunk_plan", lambda widths, **kw: plans.append(real(widths, **kw)) or plans[-1])
    drafts = [*DRAFTS[:-1], "Because of the ocean. " * 60]  # one row far wider than the rest
    gen = dict(max_new_tokens=10, batch_size=6)
    chunked = aligner.align_batch(QUERIES, drafts, OBJ, **gen)
    assert any(len(p) > 1 for p in plans), plans  # the batch was split
    whole = Aligner(LocalGenerator(g.model, g.tokenizer, g.name), template=aligner.template)
    whole.generator.chunked = False  # one attention call over the padded batch
    assert whole.align_batch(QUERIES, drafts, OBJ, **gen) == chunked
    assert chunked == [aligner.align(q, d, OBJ, max_new_tokens=10) for q, d in zip(QUERIES, drafts)]


@pytest.mark.slow
def test_shared_prefix_is_found_for_every_template_of_one_aligner(aligner):
    """Template views of one aligner (the app's template picker) share its caches; each still
    finds its own instruction + objectives prefix."""
    from metaaligner_core.pipeline import with_template

    fresh = {}
    for template in ("ultrafeedback", "hh-rlhf", "imhi"):
        view = with_template(aligner, template)
        ids = view.encode(QUERIES[0], DRAFTS[0], OBJ, 8)[0]
        fresh[template] = view.shared_prefix_len(ids, OBJ)
        assert fresh[template] > 20  # the instruction and objectives, not just BOS
    for template in ("imhi", "hh-rlhf", "ultrafeedback"):  # again, cache warm, other order
        view = with_template(aligner, template)
        assert view.shared_prefix_len(view.encode(QUERIES[0], DRAFTS[0], OBJ, 8)[0], OBJ) == fresh[template]
