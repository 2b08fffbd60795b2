"""Benchmark: the decoding engine's step against plain transformers batched ``generate``, its FLOP
rate against this CPU's measured matmul rate, and bf16 against fp32.

The job: ``--rows`` real HH-RLHF drafts (``../shared/data``; generated text when absent) as the
embedded aligner's correction prompts, ``--max-new-tokens`` new tokens, greedy, batch
``--batch-size``. Three ways, in one process, timed in the order ours / transformers /
transformers / ours so that a load change on a shared machine biases neither:

- *ours*: ``LocalGenerator.generate`` (continuous batching over one KV buffer, chunked decode
  attention, the shared prefix computed once), fp32;
- *transformers*: ``model.generate`` on left-padded batches of ``--batch-size`` prompts sorted by
  length (its dynamic cache; sdpa), fp32;
- *ours bf16* (``--bf16``, on CPUs with avx512_bf16 or AMX): the same model loaded in bf16, timed
  between the two halves; the share of rows whose text equals fp32's is printed.

The FLOP rate counts each token's matrix products (2 FLOPs per multiply-add of every
non-embedding weight; the output head once per decoded token and once per prompt, as
``logits_to_keep=1`` computes it) and attention (``4·L·d_attn`` per key attended, the causal half
in prefill), over the whole job (prefill included), and over the decoding steps alone (one batch
of ``--batch-size`` prompts through ``decode_steps``, timed from its first token on). The matmul rate is ``torch.mm`` of this
model's weight shapes at the job's batch (the decode step's products, weights hot in the cache),
of a 1024² square (the compute-bound ceiling), and ``F.linear`` over every weight of the model in
turn at the job's batch (each weight read from memory once, as a decode step reads them: the
ceiling of a step whose products are bound by memory bandwidth), on the same threads.

    .venv/bin/python bench/bench_decode.py [--rows 32] [--batch-size 16] [--max-new-tokens 256] [--bf16]
    .venv/bin/python bench/bench_decode.py --step-only      # the step's rates alone (about a minute)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_inference import OBJECTIVES, load_rows, loadavg  # noqa: E402


def decode_token_flops(n_all: int, layers: int, d_attn: int, keys: int) -> float:
    """FLOPs of one decoded token: every non-embedding weight once, attention to ``keys`` keys."""
    return 2.0 * n_all + 4.0 * layers * d_attn * keys


def job_flops(model, prompts: list[list[int]], outputs: list[list[int]]) -> float:
    """Model FLOPs of prefilling ``prompts`` and decoding ``outputs`` (see the module docstring)."""
    from metaaligner_core.hardware import attention_dims, non_embedding_params

    n_all = non_embedding_params(model)
    head = model.get_output_embeddings().weight.numel()
    n_body = n_all - head
    layers, d_attn = attention_dims(model.config)
    total = 0.0
    for p, o in zip(prompts, outputs):
        n = len(p)
        total += 2.0 * n_body * n + 2.0 * head  # prefill: every layer per token, the head once
        total += 4.0 * layers * d_attn * n * (n + 1) / 2  # causal attention of the prompt
        for k in range(len(o)):  # each decoded token: the whole model, attending to n + k + 1 keys
            total += decode_token_flops(n_all, layers, d_attn, n + k + 1)
    return total


def kv_bytes_per_key(model) -> int:
    """Bytes of K and V cached per position, all layers (grouped-query heads counted once)."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * next(model.parameters()).element_size()


def linear_weight_bytes(model) -> int:
    """Bytes of every linear weight (the output head included): what one decode step reads once."""
    import torch

    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))


def decode_step_rate(gen, prompts: list[list[int]], prefix_len: int, n_new: int) -> tuple[float, float, int, float]:
    """``(FLOP/s, seconds per step, steps, bytes/s)`` of the decoding steps alone: ``prompts`` (one
    batch) through ``decode_steps``, the clock started after the first step's tokens (the prefill).
    The bytes are what a step reads: every linear weight once, and the cached K and V of every key
    each row attends to (a prefix the rows share counted for each row)."""
    from metaaligner_core.hardware import attention_dims, non_embedding_params
    from metaaligner_core.settings import GenerationSettings

    n_all = non_embedding_params(gen.model)
    layers, d_attn = attention_dims(gen.model.config)
    per_key, weights = kv_bytes_per_key(gen.model), linear_weight_bytes(gen.model)
    ctx = {i: len(p) for i, p in enumerate(prompts)}
    flops, moved, steps, t0 = 0.0, 0.0, 0, None
    for rows, _tokens, _done in gen.decode_steps(prompts, GenerationSettings(max_new_tokens=n_new), prefix_len,
                                                 len(prompts)):
        if t0 is None:  # the prefill's tokens: the clock starts now
            t0 = time.perf_counter()
            for i in rows:
                ctx[i] += 1
            continue
        steps += 1
        moved += weights
        for i in rows:  # this step ran the whole model on the row's previous token, attending to ctx[i] keys
            flops += decode_token_flops(n_all, layers, d_attn, ctx[i])
            moved += per_key * ctx[i]
            ctx[i] += 1
    dt = time.perf_counter() - t0
    return flops / dt, dt / max(steps, 1), steps, moved / dt


def matmul_rates(model, batch: int, seconds: float = 2.0) -> tuple[float, float]:
    """FLOP/s of ``torch.mm`` on (a) ``[batch, in] @ [in, out]`` for every distinct linear weight
    shape of ``model`` (weighted by how often it occurs, as a decode step runs them), (b) 1024²."""
    import torch

    shapes: dict[tuple[int, int], int] = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            shapes[tuple(m.weight.shape)] = shapes.get(tuple(m.weight.shape), 0) + 1
    dtype = next(model.parameters()).dtype

    with torch.inference_mode():
        step = [(torch.randn(batch, i, dtype=dtype), torch.randn(i, o, dtype=dtype), c) for (o, i), c in shapes.items()]
        square = [(torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype), 1)]
        _rate_exact(step, 0.2)  # warm-up
        return _rate_exact(step, seconds), _rate_exact(square, seconds)


def weight_stream_rate(model, batch: int, seconds: float = 2.0) -> tuple[float, float]:
    """``(FLOP/s, weight bytes/s)`` of ``F.linear`` of a ``[batch, in]`` input with every linear
    weight of ``model`` in turn, each once a round: what a decode step's products cost when, as in
    the step, each weight is read from memory once per step rather than reused from the cache (the
    hot-cache rate of :func:`matmul_rates` repeats a handful of shapes)."""
    import torch
    import torch.nn.functional as F

    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=w.dtype) for w in weights}
    per_round = sum(2.0 * batch * w.numel() for w in weights)
    bytes_round = sum(w.numel() * w.element_size() for w in weights)
    with torch.inference_mode():
        for w in weights:  # warm-up round
            F.linear(xs[w.shape[1]], w)
        rounds, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or rounds < 3:
            for w in weights:
                F.linear(xs[w.shape[1]], w)
            rounds += 1
        dt = time.perf_counter() - t0
    return per_round * rounds / dt, bytes_round * rounds / dt


def _rate_exact(pairs, seconds: float) -> float:
    import torch

    per_round = sum(2.0 * a.shape[0] * a.shape[1] * b.shape[1] * c for a, b, c in pairs)
    rounds, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or rounds < 3:
        for a, b, c in pairs:
            for _ in range(c):
                torch.mm(a, b)
        rounds += 1
    return per_round * rounds / (time.perf_counter() - t0)


def main(argv=None) -> int:
    import logging

    import torch
    from transformers import GenerationConfig

    from metaaligner_core.hardware import cpu_has_fast_bf16
    from metaaligner_core.inference import Aligner
    from metaaligner_core.settings import GenerationSettings

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--data", default="hh-rlhf/gpt-3.5-turbo.csv")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--bf16", action="store_true", help="also ours in bf16 (CPUs with avx512_bf16 or AMX)")
    ap.add_argument("--step-only", action="store_true",
                    help="only the decode step's rates (FLOP/s, bytes/s) against the matmul and memory rates")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)

    queries, drafts, family = load_rows(args.data, args.rows)
    objectives = OBJECTIVES[family]
    aligner = Aligner.load("default", template=family, device="cpu", dtype="fp32")
    gen, model = aligner.generator, aligner.generator.model
    n_new, b = args.max_new_tokens, args.batch_size
    prompts = [aligner.encode(q, d, objectives, n_new)[0] for q, d in zip(queries, drafts)]
    prefix_lens = [aligner.shared_prefix_len(p, objectives) for p in prompts]
    settings = GenerationSettings(max_new_tokens=n_new)
    ours_attn = model.config._attn_implementation
    config = GenerationConfig(max_new_tokens=n_new, do_sample=False, eos_token_id=sorted(gen.eos_ids),
                              pad_token_id=gen.pad_id)
    lens = sorted(len(p) for p in prompts)
    print(f"decode job ({torch.get_num_threads()} threads, load avg {loadavg()}): {len(prompts)} prompts from "
          f"{args.data} (prompt tokens min {lens[0]} / median {lens[len(lens) // 2]} / max {lens[-1]}), "
          f"{n_new} new tokens, greedy, batch {b}, fp32")

    def ours(g=gen):
        return g.generate(prompts, settings, batch_size=b, prefix_lens=prefix_lens)

    def transformers_generate():
        model.set_attn_implementation("sdpa")
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out: list = [None] * len(prompts)
        try:
            with torch.inference_mode():
                for k in range(0, len(order), b):
                    chunk = order[k:k + b]
                    width = max(len(prompts[i]) for i in chunk)
                    ids = torch.full((len(chunk), width), gen.pad_id, dtype=torch.long)
                    mask = torch.zeros_like(ids)
                    for j, i in enumerate(chunk):
                        ids[j, width - len(prompts[i]):] = torch.tensor(prompts[i])
                        mask[j, width - len(prompts[i]):] = 1
                    res = model.generate(ids, attention_mask=mask, generation_config=config)
                    for j, i in enumerate(chunk):
                        out[i] = [t for t in res[j, width:].tolist() if t not in gen.eos_ids and t != gen.pad_id]
        finally:
            model.set_attn_implementation(ours_attn)
        return out

    gen.generate(prompts[:2], GenerationSettings(max_new_tokens=4), batch_size=2, prefix_lens=prefix_lens[:2])
    if args.step_only:
        step_figures(gen, model, prompts[:b], prefix_lens[:b], n_new)
        return 0
    seconds = {"ours": 0.0, "transformers": 0.0}
    tokens = {"ours": 0, "transformers": 0}
    outs: dict = {}
    bf16 = None
    plan = ["ours", "transformers", "bf16", "transformers", "ours"] if args.bf16 else \
        ["ours", "transformers", "transformers", "ours"]
    if args.bf16:
        if not cpu_has_fast_bf16():
            print("  --bf16: this CPU has neither avx512_bf16 nor AMX; skipped")
            plan.remove("bf16")
        else:
            bf16 = Aligner.load("default", template=family, device="cpu", dtype="bf16").generator
            bf16.generate(prompts[:2], GenerationSettings(max_new_tokens=4), batch_size=2, prefix_lens=prefix_lens[:2])
    for name in plan:
        t = time.perf_counter()
        out = ours(bf16) if name == "bf16" else ours() if name == "ours" else transformers_generate()
        dt = time.perf_counter() - t
        n = sum(len(o) for o in out)
        if name == "bf16":
            seconds["ours bf16"], tokens["ours bf16"] = dt, n
        else:
            seconds[name] += dt
            tokens[name] += n
        outs[name] = out
        print(f"  {name:12s}: {n} tokens in {dt:.1f} s [load avg {loadavg()}]")
    rate = {k: tokens[k] / seconds[k] for k in seconds}
    texts = {k: [gen.decode(o) for o in v] for k, v in outs.items()}
    same = sum(a == c for a, c in zip(texts["ours"], texts["transformers"]))
    print(f"  ours:         {rate['ours']:.1f} tokens/s")
    print(f"  transformers: {rate['transformers']:.1f} tokens/s (model.generate, left-padded, length-sorted batches)")
    print(f"  ratio ours/transformers: {rate['ours'] / rate['transformers']:.2f}x (target >= 3x); "
          f"same text on {same}/{len(prompts)} rows")
    if "ours bf16" in rate:
        same16 = sum(a == c for a, c in zip(texts["bf16"], texts["ours"]))
        print(f"  ours bf16:    {rate['ours bf16']:.1f} tokens/s, {rate['ours bf16'] / rate['ours']:.2f}x fp32; "
              f"text equal to fp32 on {same16}/{len(prompts)} rows ({100 * same16 / len(prompts):.0f}%)")

    flops = job_flops(model, prompts, outs["ours"])
    achieved = flops / (seconds["ours"] / 2)
    print(f"  FLOP rate: the whole job (prefill + decode, {flops / 1e12:.2f} TFLOP) ran at {achieved / 1e9:.1f} GFLOP/s")
    step_figures(gen, model, prompts[:b], prefix_lens[:b], n_new)
    return 0


def step_figures(gen, model, prompts: list[list[int]], prefix_lens: list[int], n_new: int) -> None:
    """Print the decode step's FLOP and byte rates against the matmul and weight-streaming rates."""
    b = len(prompts)
    shared = prefix_lens[0] if len(set(prefix_lens)) == 1 else 0
    step_flops, step_s, steps, step_bytes = decode_step_rate(gen, prompts, shared, n_new)
    mm_rate, square_rate = matmul_rates(model, b)
    print(f"  the decode step alone ({steps} steps of {b} rows, {1000 * step_s:.0f} ms each) at "
          f"{step_flops / 1e9:.1f} GFLOP/s = {100 * step_flops / mm_rate:.0f}% of torch.mm at the step's shapes "
          f"({mm_rate / 1e9:.1f} GFLOP/s at batch {b}) and {100 * step_flops / square_rate:.0f}% of a 1024² matmul "
          f"({square_rate / 1e9:.1f} GFLOP/s) [load avg {loadavg()}]")
    stream_rate, stream_bytes = weight_stream_rate(model, b)
    print(f"  the step's products with each weight read from memory once, as a step reads them (every linear "
          f"weight in turn at batch {b}, {stream_bytes / 1e9:.1f} GB/s of weights): {stream_rate / 1e9:.1f} GFLOP/s; "
          f"the decode step reaches {100 * step_flops / stream_rate:.0f}% of that [load avg {loadavg()}]")
    print(f"  memory: the decode step reads about {step_bytes * step_s / 1e6:.0f} MB a step (every linear weight "
          f"once, {linear_weight_bytes(model) / 1e6:.0f} MB, and the K/V of every key it attends to), i.e. "
          f"{step_bytes / 1e9:.1f} GB/s = {100 * step_bytes / stream_bytes:.0f}% of the weight-streaming rate above")


if __name__ == "__main__":
    sys.exit(main())
