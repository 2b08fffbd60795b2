"""Reward-model labels (`build-dataset --reward-models`): tiny randomly initialised reward models
built here, labels checked against rewards computed independently, one pair at a time, the way
the authors' pipeline computes them (official-prompts.md)."""
from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import pytest

from conftest import read_jsonl, run_cli, write_jsonl
from metaaligner_core.dataset import build_dataset_files
from metaaligner_core.errors import MetaAlignerError
from metaaligner_core.rewards import (HH_RLHF_REWARD_MODELS, RewardScorer, parse_reward_models, reward_label)

WORDS = ("i can not help with that here is how you do it sure the lock pick tension wrench joke "
         "funny cat dog haha please be careful safe answer question what why how hello hi no yes "
         "rob bank money call police friend laugh story").split()
MAX_LEN = 24  # the tiny tokenizers' model_max_length: long rows must be truncated to it


def _tokenizer(path, max_len=MAX_LEN):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]", *sorted(set(WORDS))])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="[EOS]",
                                  model_max_length=max_len)
    tok.save_pretrained(path)
    return len(vocab)


def _gpt2_rm(path, seed):
    """A GPT-2 reward model like Ray2333's: one logit, no pad token in its config."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(seed)
    n = _tokenizer(path)
    cfg = GPT2Config(vocab_size=n, n_positions=32, n_embd=32, n_layer=2, n_head=2, num_labels=1,
                     initializer_range=0.6)
    GPT2ForSequenceClassification(cfg).save_pretrained(path)
    return path


def _humor_rm(path, seed):
    """A two-class classifier whose name says humor: the authors score the response alone, logit 1."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    n = _tokenizer(path)
    cfg = BertConfig(vocab_size=n, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2, initializer_range=0.6)
    BertForSequenceClassification(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rms(tmp_path_factory):
    root = tmp_path_factory.mktemp("rms")
    return {"harmless": _gpt2_rm(root / "tiny-harmless-rm", 1), "helpful": _gpt2_rm(root / "tiny-helpful-rm", 2),
            "humor": _humor_rm(root / "tiny-humor-no-humor", 3)}


def _records(n=14, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ctx = " ".join(rng.choice(WORDS, 4 + i % 3))
        a = " ".join(rng.choice(WORDS, 3 + (i * 7) % 5)) + f" {WORDS[i % len(WORDS)]}"
        b = " ".join(rng.choice(WORDS, 2 + (i * 3) % 6))
        if i == 3:  # longer than the reward models' 24 tokens (and their 32 positions): must be truncated
            a = " ".join(rng.choice(WORDS, 60))
        out.append({"chosen": f"\n\nHuman: {ctx}\n\nAssistant: {a}", "rejected": f"\n\nHuman: {ctx}\n\nAssistant: {b}"})
    return out


@functools.lru_cache(maxsize=None)
def _load(path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path).eval()


def independent_reward(path, query, response, response_only, index):
    """The authors' get_rewards for one pair: their encoding and truncation, one forward pass."""
    import torch

    tok, model = _load(path)
    max_length = min(tok.model_max_length, 1024)
    enc = (tok(response, return_tensors="pt", truncation=True, max_length=max_length) if response_only
           else tok(query, response, return_tensors="pt", truncation=True, max_length=max_length))
    with torch.no_grad():
        return float(np.round(model(**enc).logits[0][index].item(), 1))


def authors_query(transcript):
    parts = transcript.split("\n\nAssistant:")
    return "\n\nAssistant:".join(parts[:-1]) + " " + "\n\nAssistant:", parts[-1].strip()


def expected_labels(records, models, margin=0.0):
    """{record index: {key: label}} from independently computed rewards."""
    out = {}
    for i, rec in enumerate(records):
        q, a = authors_query(rec["chosen"])
        _, b = authors_query(rec["rejected"])
        labels = {}
        for key, (path, response_only, index) in models.items():
            ra = independent_reward(path, q, a, response_only, index)
            rb = independent_reward(path, q, b, response_only, index)
            labels[key] = "=" if round(abs(ra - rb), 6) <= margin else ">" if ra > rb else "<"
        out[i] = labels
    return out


def labels_from_rows(out_dir, records):
    """Recover each record's labels from the built rows (preference in both directions, equal)."""
    got = {i: {} for i in range(len(records))}
    answers = {i: (authors_query(r["chosen"])[1], authors_query(r["rejected"])[1]) for i, r in enumerate(records)}
    for sub in ("preference", "equal"):
        for row in read_jsonl(out_dir / f"{sub}.jsonl"):
            i = row["source_index"]
            label = "=" if sub == "equal" else ">" if row["completion"] == answers[i][0] else "<"
            for k in row["objectives"]:
                got[i][k] = label
    return got


@pytest.mark.slow  # builds tiny reward models / runs the CLI
def test_labels_equal_independently_computed_rewards_pairs_and_response_only(tmp_path, rms):
    records = _records()
    src = write_jsonl(tmp_path / "harmless-base-train.jsonl", records)
    spec = f"harmlessness={rms['harmless']},helpfulness={rms['helpful']},humour={rms['humor']}"
    res = run_cli("-q", "build-dataset", "--input", src, "--out", tmp_path / "out", "--reward-models", spec,
                  "--warmup-size", "0", "--reward-device", "cpu", "--reward-batch-size", "4")
    assert res.returncode == 0, res.stderr
    want = expected_labels(records, {"harmlessness": (rms["harmless"], False, 0),
                                     "helpfulness": (rms["helpful"], False, 0),
                                     "humour": (rms["humor"], True, 1)})
    got = labels_from_rows(tmp_path / "out", records)
    assert got == want
    flat = [lab for labels in want.values() for lab in labels.values()]
    assert {">", "<", "="} <= set(flat)  # the data exercise all three outcomes, ties included
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["template"] == "hh-rlhf"  # follows the data
    assert stats["reward_models"]["humour"]["scores"] == "response"
    assert stats["reward_models"]["humour"]["logit"] == 1
    assert stats["reward_models"]["harmlessness"]["max_length"] == MAX_LEN
    assert stats["rows"]["equal"] > 0
    row = read_jsonl(tmp_path / "out" / "equal.jsonl")[0]
    assert "make it equal" in row["prompt"] and "Context: \n\nHuman: " in row["prompt"]


@pytest.mark.slow  # builds tiny reward models / runs the CLI
def test_tie_margin_widens_the_tie(tmp_path, rms):
    records = _records(10, seed=1)
    src = write_jsonl(tmp_path / "hh.jsonl", records)
    models = {"harmlessness": (rms["harmless"], False, 0)}
    gaps = sorted(abs(independent_reward(rms["harmless"], *authors_query(r["chosen"]), False, 0)
                      - independent_reward(rms["harmless"], authors_query(r["chosen"])[0],
                                           authors_query(r["rejected"])[1], False, 0)) for r in records)
    wide = round(gaps[len(gaps) // 2], 1)  # about half the pairs fall inside this margin
    assert wide > 0
    for margin in (0.0, wide):
        out = tmp_path / f"out{margin}"
        build_dataset_files([str(src)], out, source="hh-rlhf", template="hh-rlhf", warmup_size=0,
                            reward_models=f"harmlessness={rms['harmless']}", tie_margin=margin, reward_device="cpu")
        assert labels_from_rows(out, records) == expected_labels(records, models, margin)
    ties = [sum(v == "=" for d in labels_from_rows(tmp_path / f"out{m}", records).values() for v in d.values())
            for m in (0.0, wide)]
    assert ties[1] > ties[0]


@pytest.mark.slow  # builds tiny reward models / runs the CLI
def test_scores_are_cached_and_a_rebuild_loads_no_model(tmp_path, rms):
    model_dir = tmp_path / "tiny-harmless-copy"
    shutil.copytree(rms["harmless"], model_dir)
    src = write_jsonl(tmp_path / "hh.jsonl", _records(6, seed=2))
    kw = dict(source="hh-rlhf", warmup_size=0, reward_models=f"harmlessness={model_dir}", reward_device="cpu")
    build_dataset_files([str(src)], tmp_path / "a", **kw)
    cache = tmp_path / "a" / "reward_scores.jsonl"
    assert cache.is_file()
    first = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    shutil.rmtree(model_dir)  # a rebuild must not need the model: every score is cached
    build_dataset_files([str(src)], tmp_path / "a", **kw)
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == first
    # one new record: the model is needed again, and its absence is a clear error
    write_jsonl(src, _records(7, seed=2))
    with pytest.raises(MetaAlignerError, match=r'cannot load reward model ".*tiny-harmless-copy" \(harmlessness\)'):
        build_dataset_files([str(src)], tmp_path / "a", **kw)


@pytest.mark.slow  # builds tiny reward models / runs the CLI
def test_batched_scores_equal_one_at_a_time(rms):
    recs = _records(12, seed=3)
    queries = [authors_query(r["chosen"])[0] for r in recs]
    answers = [authors_query(r["chosen"])[1] for r in recs]
    for spec in parse_reward_models(f"harmlessness={rms['harmless']},humour={rms['humor']}"):
        scorer = RewardScorer(spec, device="cpu", batch_size=5)
        batched = scorer.score(queries, answers)
        single = [scorer.score_one(q, a) for q, a in zip(queries, answers)]
        assert np.allclose(batched, single, atol=1e-4), spec


def test_reward_label_rounds_like_numpy_then_compares():
    assert reward_label(0.34, 0.26) == "="        # both round to 0.3
    assert reward_label(0.25, 0.2) == "="         # np.round(0.25, 1) == 0.2 (half to even)
    assert reward_label(0.36, 0.24) == ">" and reward_label(0.24, 0.36) == "<"
    assert reward_label(0.36, 0.24, tie_margin=0.2) == "="
    assert reward_label(0.3, 0.2, tie_margin=0.1) == "="  # 0.3 - 0.2 is 0.0999...: still a tie
    assert reward_label(0.31, 0.14, tie_margin=0.1) == ">"


def test_reward_model_specs():
    specs = parse_reward_models("hh-rlhf")
    assert [(s.key, s.model, s.response_only, s.logit_index) for s in specs] == [
        ("harmlessness", HH_RLHF_REWARD_MODELS["harmlessness"], False, 0),
        ("helpfulness", HH_RLHF_REWARD_MODELS["helpfulness"], False, 0),
        ("humour", "mohameddhiab/humor-no-humor", True, 1)]
    s = parse_reward_models("empathy=org/my-rm#response#logit=2")[0]
    assert (s.model, s.response_only, s.logit_index) == ("org/my-rm", True, 2)
    for bad, msg in [("harmlessness", "is not KEY=MODEL"), ("a=b#fast", "unknown option #fast"),
                     ("a=x,a=y", "given twice"), ("", "empty")]:
        with pytest.raises(MetaAlignerError, match=msg):
            parse_reward_models(bad)


@pytest.mark.slow  # builds tiny reward models / runs the CLI
def test_cli_errors_for_reward_options(tmp_path):
    src = write_jsonl(tmp_path / "hh.jsonl", _records(2))
    r = run_cli("-q", "build-dataset", "--input", src, "--out", tmp_path / "o", "--reward-models", "wisdom=x/y")
    assert r.returncode != 0 and 'unknown objective "wisdom"' in r.stderr and not (tmp_path / "o").exists()
    r = run_cli("-q", "build-dataset", "--input", src, "--out", tmp_path / "o", "--tie-margin", "0.1")
    assert r.returncode != 0 and "--tie-margin applies to reward-model labels" in r.stderr
