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
and a randomly initialised 1.1B LLaMA-shaped model (TinyLlama dimensions; no weights needed), in
the modes of ``GPU_MODES``: SDPA and Flash-Attention 2 (when flash-attn is usable), gradient
checkpointing on and off, padded length-grouped batches, and with Flash-Attention padding-free
batches. Each mode runs the trainer's own ``train()`` for ``skip + steps`` optimizer steps, so
bf16 autocast, checkpointing, the collator and the optimizer are those of ``metaaligner train``;
a callback times the steps after ``skip`` (CUDA synchronised) and a wrapper around the trainer's
``training_step`` records the batches of those steps. Model FLOPs (``mfu_flops``) =
(6·N_body + 12·L·d_attn·T)·tokens + 6·N_head·labelled: the LM head only on the positions TRL's
fused head projects (next-token label not -100), T = Σlen²/Σlen of the timed batches' rows. The
peak is looked up from the device name (``--peak-tflops`` overrides). Rows are random token ids,
lengths uniform in [max_length/8, max_length], 60% of each a masked prompt. ``--device cpu``
runs this path on a tiny model on the CPU (a check that it works; figures meaningless).

    python bench/bench_train.py --gpu [--max-length 2048] [--batch-size 8] [--steps 10] [--modes flash]
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
    rows = rows[:args.rows] if args.rows else rows
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
        for name, grouped, free in (("naive (random order, padded)", False, False), ("length-grouped", True, False)):
            cfg = TrainConfig(data=".", base="default", device="cpu", batch_size=args.batch_size,
                              max_length=args.max_length, lr=1e-5, group_by_length=grouped, padding_free=free,
                              disable_tqdm=True, seed=args.seed)
            rt = resolve_runtime(cfg)
            model = model or load_model("default", cfg, rt)
            trainers[name] = make_trainer(cfg, rt, model, tok, dataset, Path(tmp) / name)
        results = interleaved(trainers, args.steps, args.skip, cuda=False)
    for name, r in results.items():
        print(f"  {name:<30} {r['tokens_per_s']:8.1f} tokens/s  ({r['tokens']} real tokens in {r['seconds']:.1f} s; "
              f"padding over the epoch: {r['padding']:.0%} of batch tokens)")
    naive, grouped = (r["tokens_per_s"] for r in results.values())
    print(f"  ratio length-grouped / naive: {grouped / naive:.2f}x")


def batch_stats(batch) -> tuple[int, int, list[int]]:
    """``(real tokens, labelled positions, row lengths)`` of one collated batch, padded or
    padding-free. Labelled positions are those whose next-token label is not -100: the only ones
    TRL's fused LM head projects."""
    labels = batch["labels"]
    labelled = int((labels[..., 1:] != -100).sum())
    if "attention_mask" in batch:
        lengths = [int(n) for n in batch["attention_mask"].sum(-1).tolist()]
    else:  # padding-free: one row, positions restart at 0 for each sequence
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["position_ids"].shape[1]]
        lengths = [b - a for a, b in zip(starts, starts[1:])]
    return sum(lengths), labelled, lengths


def _step_timer(skip: int, cuda: bool):
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step after the first ``skip``, and the tokens, labelled
        positions and Σ len² of the batches those steps trained on (recorded by :func:`watch`)."""

        def __init__(self):
            self.seconds, self.tokens, self.labelled, self.sq = 0.0, 0, 0, 0
            self._t, self.on = None, False

        def on_step_begin(self, args, state, control, **kwargs):
            self.on = state.global_step >= skip
            if self.on:
                if cuda:
                    torch.cuda.synchronize()
                self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self._t is not None:
                if cuda:
                    torch.cuda.synchronize()
                self.seconds += time.perf_counter() - self._t
                self._t, self.on = None, False

        def watch(self, trainer):
            """Record the statistics of every batch the trainer trains on while a step is timed."""
            step = trainer.training_step

            def training_step(model, inputs, *args, **kwargs):
                if self.on:
                    tokens, labelled, lengths = batch_stats(inputs)
                    self.tokens += tokens
                    self.labelled += labelled
                    self.sq += sum(n * n for n in lengths)
                return step(model, inputs, *args, **kwargs)

            trainer.training_step = training_step

    return StepTimer()


def mfu_flops(n_body: int, n_head: int, layers: int, d_attn: int, tokens: int, labelled: int, sq: int) -> float:
    """Model FLOPs of the timed steps: ``(6·N_body + 12·L·d_attn·T)·tokens + 6·N_head·labelled``
    with T = Σlen²/Σlen of the timed batches' rows. N_body: the non-embedding parameters without
    the output head; the head (vocabulary × hidden) is charged only on the labelled positions,
    the ones TRL's fused head projects."""
    from metaaligner_core.hardware import train_flops_per_token

    seq_len = sq / tokens
    return train_flops_per_token(n_body, layers, d_attn, seq_len) * tokens + 6.0 * n_head * labelled


GPU_MODES = {  # name: (attention, gradient checkpointing, padding-free)
    "sdpa, checkpointing, padded": ("sdpa", True, False),
    "sdpa, no checkpointing, padded": ("sdpa", False, False),
    "flash, checkpointing, padded": ("flash_attention_2", True, False),
    "flash, no checkpointing, padded": ("flash_attention_2", False, False),
    "flash, checkpointing, padding-free": ("flash_attention_2", True, True),
    "flash, no checkpointing, padding-free": ("flash_attention_2", False, True),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)


def gpu_bench(args) -> None:
    """Every mode of GPU_MODES (flash modes only when flash-attn is usable) for each model.

    ``--device cpu`` runs the same code on the CPU in fp32 with a tiny random model, as a check
    that the path works where no GPU is present (its figures mean nothing)."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from metaaligner_core.embedded import embedded_model_dir
    from metaaligner_core.hardware import (attention_dims, bf16_peak_tflops, flash_attention_status,
                                           non_embedding_params)
    from metaaligner_core.models import load_tokenizer

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("--gpu needs CUDA (or --device cpu for a check of the code path)")
    name = torch.cuda.get_device_name() if cuda else "CPU"
    peak = args.peak_tflops or (bf16_peak_tflops(name) if cuda else None)
    if peak is None:
        sys.exit(f"no bf16 peak known for {name!r}: pass --peak-tflops")
    tok = load_tokenizer("default")
    rng = random.Random(args.seed)
    rows = []
    for _ in range(max(64 if not cuda else 512, 2 * args.batch_size * (args.steps + args.skip))):
        n = rng.randint(args.max_length // 8, args.max_length)
        ids = [rng.randrange(100, 30000) for _ in range(n)]
        rows.append({"input_ids": ids, "labels": [-100] * int(n * 0.6) + ids[int(n * 0.6):]})
    dataset = datasets.Dataset.from_list(rows)
    flash = flash_attention_status() if cuda else None
    flash_ok = bool(flash and flash.usable)
    modes = {k: v for k, v in GPU_MODES.items()
             if (flash_ok or v[0] == "sdpa") and (not args.modes or any(m in k for m in args.modes))}
    precision = "bf16" if cuda else "fp32"
    print(f"{name} ({'bf16 peak' if cuda else 'peak given'} {peak:.0f} TFLOP/s), {precision}, batch {args.batch_size}, "
          f"lengths {args.max_length // 8}-{args.max_length} (60% prompt, masked), {args.steps} timed steps per mode "
          f"after {args.skip}; flash-attn: {flash.reason if flash else 'n/a on CPU'}"
          f"{'' if flash_ok else ' (flash modes skipped)'}")
    print("MFU = model FLOPs of the timed steps / time / peak: (6·N_body + 12·L·d_attn·T)·tokens + 6·N_head·labelled, "
          "T = Σlen²/Σlen of the timed batches; recomputation not counted")
    if cuda:
        models = {"SmolLM2-135M": lambda rt: load_model(str(embedded_model_dir()), cfg_for(rt), rt),
                  "1.1B LLaMA-shaped (random init)": lambda rt: AutoModelForCausalLM.from_config(
                      LlamaConfig(**TINYLLAMA, use_cache=False), dtype=torch.float32, attn_implementation=rt.attn)}
    else:
        models = {"tiny random LLaMA (CPU check)": lambda rt: AutoModelForCausalLM.from_config(
            LlamaConfig(**TINY, use_cache=False), dtype=torch.float32, attn_implementation=rt.attn)}

    def cfg_for(rt):
        return TrainConfig(data=".", base="default", device=args.device, precision=precision)

    for model_name, make in models.items():
        for mode, (attn, ckpt, free) in modes.items():
            with tempfile.TemporaryDirectory() as tmp:
                cfg = TrainConfig(data=".", base="default", device=args.device, precision=precision, attn=attn,
                                  batch_size=args.batch_size, max_length=args.max_length, padding_free=free,
                                  group_by_length=not free, gradient_checkpointing=ckpt,
                                  max_steps=args.skip + args.steps, warmup_ratio=0.0, logging_steps=10 ** 6,
                                  save_steps=10 ** 6, disable_tqdm=True, seed=args.seed)
                rt = resolve_runtime(cfg)
                model = make(rt)
                n_params = non_embedding_params(model)
                n_head = model.get_output_embeddings().weight.numel()
                layers, d_attn = attention_dims(model.config)
                timer = _step_timer(args.skip, cuda=cuda)
                trainer = make_trainer(cfg, rt, model, tok, dataset, Path(tmp), [timer])
                timer.watch(trainer)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                trainer.train()
                mem = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")
                trainer.accelerator.free_memory()
                del trainer, model
                release_memory()
            tps = timer.tokens / timer.seconds
            flops = mfu_flops(n_params - n_head, n_head, layers, d_attn, timer.tokens, timer.labelled, timer.sq)
            mfu = flops / timer.seconds / (peak * 1e12)
            print(f"  {model_name:<32} {mode:<38} {tps:12,.0f} tokens/s  MFU {mfu:6.1%}  peak memory {mem:5.1f} GiB "
                  f"(T {timer.sq / timer.tokens:,.0f}, labelled {timer.labelled / timer.tokens:.0%})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="GPU mode: tokens/s and MFU (needs CUDA)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    ap.add_argument("--max-length", type=int, default=None, help="default 192 on CPU, 2048 on GPU")
    ap.add_argument("--full-length", type=int, default=2048, help="CPU: the real setting's max length (default 2048)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per mode (default 4 on CPU, 10 on GPU)")
    ap.add_argument("--skip", type=int, default=None, help="untimed warm-up steps per mode (default 1 on CPU, 3 on GPU)")
    ap.add_argument("--modes", nargs="*", default=None,
                    help="GPU: run only the modes whose name contains one of these words (e.g. flash padding-free); "
                         "default all: sdpa/flash x checkpointing on/off x padded/padding-free")
    ap.add_argument("--device", default="cuda", help="GPU mode's device; cpu runs its code path on a tiny model "
                    "(a check that it works, figures meaningless; needs --peak-tflops)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="GPU bf16 dense peak (default: from the device name, metaaligner_core.hardware)")
    ap.add_argument("--rows", type=int, default=None, help="CPU: use the first N (shuffled) rows only (default all)")
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
