"""Benchmark: reward-model scoring, batched (``build-dataset --reward-models``) vs one pair at a time
(the authors' ``get_rewards`` loop).

A GPT-2-shaped sequence-classification reward model (randomly initialised: the hub is not
reachable here; ``--layers``/``--width`` set its size, default 2 × 128; the real GPT-2-large
reward models are 36 × 1280) with the embedded
SmolLM2 tokenizer scores (query, response) pairs from real HH-RLHF transcripts
(``../shared/data/hh-rlhf/harmless-base-test.jsonl.gz`` when present, else synthetic text), built
the authors' way (context up to the last ``\\n\\nAssistant:``, truncation at 1024 tokens). Both
modes run in this process on the same rows, alternating in rounds so load from other processes
hits both alike; the script prints responses/s for each, the ratio, and how many labels (rewards
rounded to one decimal, compared per pair) agree between the two modes.

    .venv/bin/python bench/bench_reward.py [--rows 64] [--batch-size 16] [--rounds 2] [--layers 2 --width 128]
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metaaligner_core.dataset import hh_prompt  # noqa: E402
from metaaligner_core.rewards import RewardModelSpec, RewardScorer, reward_label  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def rows(n: int, seed: int) -> tuple[list[tuple[str, str, str]], str]:
    rng = random.Random(seed)
    if REAL.is_file():
        with gzip.open(REAL, "rt", encoding="utf-8") as fh:
            recs = [json.loads(line) for line in fh]
        rng.shuffle(recs)
        out = []
        for r in recs[:n]:
            q, a = hh_prompt(r["chosen"])
            _, b = hh_prompt(r["rejected"])
            out.append((q, a, b))
        return out, f"{REAL.name} (real)"
    words = "the answer is not safe please ask someone you trust here is how it works".split()
    text = lambda k: " ".join(rng.choices(words, k=k))  # noqa: E731
    return [(text(rng.randint(20, 200)), text(rng.randint(5, 80)), text(rng.randint(5, 80))) for _ in range(n)], \
        "synthetic text"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=64, help="pairs (each scored twice: both responses)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="passes over the rows")
    ap.add_argument("--chunk", type=int, default=64, help="responses per alternation (default 64)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch
    import transformers
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from metaaligner_core.models import load_tokenizer

    transformers.logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    data, source = rows(args.rows, args.seed)
    queries = [q for q, _, _ in data] * 2
    answers = [a for _, a, _ in data] + [b for _, _, b in data]
    with tempfile.TemporaryDirectory() as tmp:
        tok = load_tokenizer("default", padding_side="right")
        tok.save_pretrained(tmp)
        cfg = GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=args.width, n_layer=args.layers,
                         n_head=max(1, args.width // 64), num_labels=1, initializer_range=0.2)
        GPT2ForSequenceClassification(cfg).save_pretrained(tmp)
        scorer = RewardScorer(RewardModelSpec("harmlessness", tmp, False, 0), device="cpu",
                              batch_size=args.batch_size)
        lengths = sorted(len(scorer._encode([q], [a], padding=False)["input_ids"][0]) for q, a in zip(queries, answers))
        print(f"{len(answers)} responses ({args.rows} pairs) from {source}; {lengths[0]}-{lengths[-1]} tokens "
              f"(median {lengths[len(lengths) // 2]}); GPT-2-shaped reward model {args.layers}x{args.width}, "
              f"fp32, CPU, {torch.get_num_threads()} threads; {args.rounds} alternating rounds")
        one_name, batch_name = "one at a time", f"batched ({args.batch_size})"
        spent = {one_name: 0.0, batch_name: 0.0}
        result = {one_name: [0.0] * len(answers), batch_name: [0.0] * len(answers)}
        # Alternate in chunks of --chunk responses: a shared machine's load changes by the second,
        # and each chunk is timed in both modes back to back.
        for _ in range(args.rounds):
            for start in range(0, len(answers), args.chunk):
                qs, rs = queries[start:start + args.chunk], answers[start:start + args.chunk]
                t = time.perf_counter()
                result[one_name][start:start + len(rs)] = [scorer.score_one(q, a) for q, a in zip(qs, rs)]
                spent[one_name] += time.perf_counter() - t
                t = time.perf_counter()
                result[batch_name][start:start + len(rs)] = scorer.score(qs, rs)
                spent[batch_name] += time.perf_counter() - t
    n = len(answers) * args.rounds
    for name, s in spent.items():
        print(f"  {name:<16} {n / s:8.1f} responses/s  ({s:.1f} s)")
    one, batched = result.values()
    print(f"  ratio batched / one at a time: {spent['one at a time'] / spent[f'batched ({args.batch_size})']:.2f}x")
    k = args.rows
    same = sum(reward_label(one[i], one[k + i]) == reward_label(batched[i], batched[k + i]) for i in range(k))
    diff = max(abs(a - b) for a, b in zip(one, batched))
    print(f"  labels equal in both modes: {same}/{k}; largest reward difference {diff:.2e}")


if __name__ == "__main__":
    main()
