"""Benchmark: aligner training throughput through the trainer of ``metaaligner_core.training``.

Each mode gets its own ``SFTTrainer`` (``make_trainer``, as in ``metaaligner train``) over the same
rows; the batches are the ones its dataloader yields (its sampler, its collator), taken evenly
across one epoch. Steps (the trainer's ``training_step`` — forward and backward — plus the
optimizer step) of the modes are timed in alternation, so that load from other processes on a
shared machine hits every mode alike. Throughput counts real (non-padding) tokens.

CPU (default): SmolLM2-135M (the embedded model), fp32, SDPA; batches in random order padded to
their longest row ("naive") vs length-grouped batches (the CPU default). Rows are UltraFeedback
queries with gpt-3.5-turbo drafts and reference answers from ../shared/data/policy-outputs when
present, else synthetic text. Their lengths at the paper's max length (2048) are scaled down (to
192 by default) so that a CPU runs the steps in a minute or two while the spread of lengths,
which decides the padding, stays the real one. All rows are used: the trainer's length-grouped
sampler sorts mega-batches of up to 50 batches, so a set of a few batches would not be grouped.

    .venv/bin/python bench/bench_train.py [--steps 4] [--batch-size 8] [--max-length 192]

GPU (``--gpu``, needs CUDA): tokens/s, model FLOPs utilisation and peak memory for SmolLM2-135M
and a randomly initialised 1.1B LLaMA-shaped model (TinyLlama dimensions; no weights needed),
padded length-grouped batches vs padding-free batches (padding-free needs a working flash-attn).
Right by construction: each mode runs the trainer's own ``train()`` for ``skip + steps`` optimizer
steps, so bf16 autocast (accelerate wraps the model's forward), gradient checkpointing (on unless
``--no-gradient-checkpointing``), the collator and the optimizer are exactly those of
``metaaligner train``; a callback times the steps after ``skip`` (CUDA synchronised) and reads the
tokens from the trainer's own count. FLOPs per token = 6·N(non-embedding) + 12·L·d_attn·T
(``metaaligner_core.hardware.train_flops_per_token``, T = Σlen²/Σlen of the rows); the peak
is looked up from the device name (``--peak-tflops`` overrides). Rows are random token ids,
lengths uniform in [max_length/8, max_length].

    python bench/bench_train.py --gpu [--max-length 2048] [--batch-size 8] [--steps 10]
"""
from __future__ import annotations

import argparse
import csv
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metaaligner_core.training import (TrainConfig, load_model, make_trainer, release_memory,  # noqa: E402
                                       resolve_runtime, tokenize_example)

REAL = ROOT.parent / "shared" / "data" / "policy-outputs" / "ultrafeedback" / "gpt-3.5-turbo.csv"
OBJECTIVES = ["Honesty: the response should not tell lies",
              "Helpfulness: the response should provide useful resources and suggestions to the user"]
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)


def aligner_rows(seed: int = 0) -> tuple[list[dict], str]:
    """Aligner rows (prompt with a draft, completion = reference answer), shuffled."""
    from metaaligner_core.templates import build_prompt

    rng = random.Random(seed)
    if REAL.is_file():
        with open(REAL, encoding="utf-8", newline="") as fh:
            recs = [r for r in csv.DictReader(fh) if r["goldens"].strip() and r["generated_text"].strip()]
        rng.shuffle(recs)
        return [{"prompt": build_prompt("ultrafeedback", r["query"], r["generated_text"], OBJECTIVES),
                 "completion": r["goldens"]} for r in recs], f"{REAL.name} (UltraFeedback, real)"
    words = "the answer should follow the query and state the truth with clear helpful evidence".split()
    text = lambda mu: " ".join(rng.choices(words, k=int(rng.lognormvariate(mu, 0.7))))  # noqa: E731
    # Long-tailed lengths, like real preference data.
    return [{"prompt": build_prompt("ultrafeedback", text(3.5), text(5), OBJECTIVES), "completion": text(5)}
            for _ in range(1200)], "synthetic text"


def scaled_rows(tokenizer, rows: list[dict], full_length: int, max_length: int) -> list[dict]:
    """Each row tokenized at ``full_length``, then shortened to ``len * max_length / full_length``
    tokens by the trainer's own truncation: the real setting's spread of lengths, at CPU size."""
    out = []
    for r in rows:
        n = len(tokenize_example(tokenizer, r["prompt"], r["completion"], full_length)["input_ids"])
        out.append(tokenize_example(tokenizer, r["prompt"], r["completion"],
                                    max(16, round(n * max_length / full_length))))
    return out


def padding_factor(lengths: list[int], batch_size: int, grouped: bool, seed: int = 0) -> float:
    """Batch tokens / real tokens over one epoch in the trainer's sampler order (no model needed)."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    gen = torch.Generator().manual_seed(seed)
    order = (list(LengthGroupedSampler(batch_size, lengths=lengths, generator=gen)) if grouped
             else torch.randperm(len(lengths), generator=gen).tolist())
    batches = [[lengths[i] for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]
    return sum(max(b) * len(b) for b in batches) / sum(lengths)


def real_tokens(batch) -> int:
    mask = batch.get("attention_mask")
    return int(batch["input_ids"].numel() if mask is None else mask.sum())  # padding-free: no padding


def epoch_batches(trainer, steps: int, skip: int) -> tuple[list, float]:
    """``skip + steps`` batches evenly spaced over one epoch of the trainer's dataloader, and the
    epoch's padding share."""
    batches = list(trainer.get_train_dataloader())
    real = sum(real_tokens(b) for b in batches)
    total = sum(b["input_ids"].numel() for b in batches)
    n = skip + steps
    return [batches[i * len(batches) // n] for i in range(n)], 1 - real / total


def interleaved(trainers: dict, steps: int, skip: int, cuda: bool) -> dict:
    """Real tokens/s of each trainer's batches, steps of the modes timed in alternation."""
    import torch

    plan = {name: epoch_batches(tr, steps, skip) for name, tr in trainers.items()}
    for tr in trainers.values():
        tr.create_optimizer()
        tr.current_gradient_accumulation_steps = 1  # set by train() for each accumulation window
        tr.model.train()
    spent = {name: 0.0 for name in trainers}
    tokens = {name: 0 for name in trainers}
    for i in range(skip + steps):
        for name, tr in trainers.items():
            batch = plan[name][0][i]
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            tr.training_step(tr.model, batch)
            tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if i >= skip:
                spent[name] += time.perf_counter() - t
                tokens[name] += real_tokens(batch)
    return {name: {"tokens_per_s": tokens[name] / spent[name], "tokens": tokens[name], "seconds": spent[name],
                   "padding": plan[name][1]} for name in trainers}


def cpu_bench(args) -> None:
    import datasets

    from metaaligner_core.models import load_tokenizer

    tok = load_tokenizer("default")
    rows, source = aligner_rows(args.seed)
    full = [len(x["input_ids"]) for x in scaled_rows(tok, rows, args.full_length, args.full_length)]
    print(f"Rows: {len(rows)} from {source}. At max length {args.full_length} and batch {args.batch_size}, an "
          f"epoch's batches hold {padding_factor(full, args.batch_size, False):.2f}x the real tokens in random "
          f"order, {padding_factor(full, args.batch_size, True):.2f}x length-grouped.")
    dataset = datasets.Dataset.from_list(scaled_rows(tok, rows, args.full_length, args.max_length))
    lengths = sorted(len(x) for x in dataset["input_ids"])
    print(f"CPU, SmolLM2-135M (embedded), fp32, sdpa: the same rows scaled by {args.max_length}/{args.full_length} "
          f"to {lengths[0]}-{lengths[-1]} tokens (median {lengths[len(lengths) // 2]}), batch {args.batch_size}, "
          f"{args.steps} timed steps per mode after {args.skip} untimed, alternating")
    trainers = {}
    model = None
    with tempfile.TemporaryDirectory() as tmp:
        for name, grouped in (("naive (random order, padded)", False), ("length-grouped", True)):
            cfg = TrainConfig(data=".", base="default", device="cpu", batch_size=args.batch_size,
                              max_length=args.max_length, lr=1e-5, group_by_length=grouped, disable_tqdm=True,
                              seed=args.seed)
            rt = resolve_runtime(cfg)
            model = model or load_model("default", cfg, rt)
            trainers[name] = make_trainer(cfg, rt, model, tok, dataset, Path(tmp) / name)
        results = interleaved(trainers, args.steps, args.skip, cuda=False)
    for name, r in results.items():
        print(f"  {name:<30} {r['tokens_per_s']:8.1f} tokens/s  ({r['tokens']} real tokens in {r['seconds']:.1f} s; "
              f"padding over the epoch: {r['padding']:.0%} of batch tokens)")
    naive, grouped = (r["tokens_per_s"] for r in results.values())
    print(f"  ratio length-grouped / naive: {grouped / naive:.2f}x")


def _step_timer(skip: int, cuda: bool):
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time and input tokens of each optimizer step after the first ``skip``."""

        def __init__(self):
            self.seconds, self.tokens, self._t, self._tokens = 0.0, 0, None, 0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step >= skip:
                if cuda:
                    torch.cuda.synchronize()
                self._t, self._tokens = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            if self._t is not None:
                if cuda:
                    torch.cuda.synchronize()
                self.seconds += time.perf_counter() - self._t
                self.tokens += state.num_input_tokens_seen - self._tokens
                self._t = None

    return StepTimer()


def gpu_bench(args) -> None:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from metaaligner_core.embedded import embedded_model_dir
    from metaaligner_core.hardware import (attention_dims, bf16_peak_tflops, flash_attention_status,
                                           non_embedding_params, train_flops_per_token)
    from metaaligner_core.models import load_tokenizer

    if not torch.cuda.is_available():
        sys.exit("--gpu needs CUDA")
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or bf16_peak_tflops(name)
    if peak is None:
        sys.exit(f"no bf16 peak known for {name!r}: pass --peak-tflops")
    tok = load_tokenizer("default")
    rng = random.Random(args.seed)
    rows = []
    for _ in range(max(512, 2 * args.batch_size * (args.steps + args.skip))):
        n = rng.randint(args.max_length // 8, args.max_length)
        ids = [rng.randrange(100, 30000) for _ in range(n)]
        rows.append({"input_ids": ids, "labels": [-100] * int(n * 0.6) + ids[int(n * 0.6):]})
    dataset = datasets.Dataset.from_list(rows)
    lengths = [len(r["input_ids"]) for r in rows]
    seq_len = sum(x * x for x in lengths) / sum(lengths)  # attention span of the average token
    flash = flash_attention_status()
    print(f"GPU {name} (bf16 peak {peak:.0f} TFLOP/s), bf16 autocast, batch {args.batch_size}, lengths "
          f"{args.max_length // 8}-{args.max_length}, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, {args.steps} timed steps per mode after {args.skip}; "
          f"flash-attn: {flash.reason}{'' if flash.usable else ' (SDPA; padding-free skipped)'}")
    models = {"SmolLM2-135M": lambda cfg, rt: load_model(str(embedded_model_dir()), cfg, rt),
              "1.1B LLaMA-shaped (random init)": lambda cfg, rt: AutoModelForCausalLM.from_config(
                  LlamaConfig(**TINYLLAMA, use_cache=False), dtype=torch.float32, attn_implementation=rt.attn)}
    modes = {"padded, length-grouped": False, **({"padding-free": True} if flash.usable else {})}
    for model_name, make in models.items():
        for mode, free in modes.items():
            with tempfile.TemporaryDirectory() as tmp:
                cfg = TrainConfig(data=".", base="default", device="cuda", precision="bf16",
                                  batch_size=args.batch_size, max_length=args.max_length, padding_free=free,
                                  group_by_length=not free, gradient_checkpointing=args.gradient_checkpointing,
                                  max_steps=args.skip + args.steps, warmup_ratio=0.0, logging_steps=10 ** 6,
                                  save_steps=10 ** 6, disable_tqdm=True, seed=args.seed)
                rt = resolve_runtime(cfg)
                model = make(cfg, rt)
                n_params = non_embedding_params(model)
                layers, d_attn = attention_dims(model.config)
                timer = _step_timer(args.skip, cuda=True)
                trainer = make_trainer(cfg, rt, model, tok, dataset, Path(tmp), [timer])
                torch.cuda.reset_peak_memory_stats()
                trainer.train()
                mem = torch.cuda.max_memory_allocated() / 2 ** 30
                trainer.accelerator.free_memory()
                del trainer, model
                release_memory()
            tps = timer.tokens / timer.seconds
            mfu = train_flops_per_token(n_params, layers, d_attn, seq_len) * tps / (peak * 1e12)
            print(f"  {model_name:<32} {mode:<24} {tps:12,.0f} tokens/s  MFU {mfu:6.1%}  peak memory {mem:5.1f} GiB "
                  f"(N non-embedding {n_params / 1e6:,.0f}M)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="GPU mode: tokens/s and MFU (needs CUDA)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    ap.add_argument("--max-length", type=int, default=None, help="default 192 on CPU, 2048 on GPU")
    ap.add_argument("--full-length", type=int, default=2048, help="CPU: the real setting's max length (default 2048)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per mode (default 4 on CPU, 10 on GPU)")
    ap.add_argument("--skip", type=int, default=None, help="untimed warm-up steps per mode (default 1 on CPU, 3 on GPU)")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="GPU: recompute activations, as training does on CUDA (default on; not counted in MFU)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="GPU bf16 dense peak (default: from the device name, metaaligner_core.hardware)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    if args.gpu:
        defaults = dict(max_length=2048, steps=10, skip=3)
    else:
        defaults = dict(max_length=192, steps=4, skip=1)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.gpu:
        gpu_bench(args)
    else:
        cpu_bench(args)


if __name__ == "__main__":
    main()
