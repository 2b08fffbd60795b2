"""Benchmark: embedded model start-up and batched correction throughput.

1. *start*: time to a ready embedded model (``embedded_model_dir()`` + loading it), first start
   (dequantising the GGUF into an empty temporary ``$METAALIGNER_CACHE``) vs a cached start; each
   in a fresh process, after its imports. Target: cached >= 20x faster.
2. *align*: the embedded aligner correcting N real drafts from ``../shared/data/policy-outputs``
   (generated text when that folder is absent), one by one (``Aligner.align`` per row) vs
   batched (``Aligner.align_batch``), greedy, fp32 on CPU unless ``--dtype bf16``. Prints generated tokens/s of each,
   the ratio (target >= 4x at batch 16), and how many batched rows equal their one-by-one
   output. The batched job (all rows at once) is timed between the two halves of the one-by-one
   run, so a load change on a shared machine biases neither side.
3. *engines* (``--engines``): our decoding engine (``LocalGenerator``, continuous batching over a
   buffered KV cache) against transformers' own continuous batching (``model.generate_batch``),
   the same prompts (``--engine-rows`` drafts, ``--engine-new-tokens`` new tokens, greedy) in the
   same run, in the order ours / transformers / transformers / ours so a load change biases
   neither. Prints tokens/s of each, the ratio, and how many rows give the same tokens.
4. *gpu* (``--gpu``): the same job on CUDA in bf16, batch 1 vs batch ``--gpu-batch`` (64), over
   2 x 64 drafts; then our engine against transformers ``generate`` (dynamic cache), ``generate``
   with a static cache compiled by ``torch.compile``, and ``generate_batch``, at batch 1 and 64
   (:func:`bench_gpu_engines`).

    .venv/bin/python bench/bench_inference.py [--rows 32] [--batch-size 16] [--max-new-tokens 256] [--dtype bf16]
        [--data hh-rlhf/gpt-3.5-turbo.csv] [--threads N] [--skip-start] [--skip-align] [--hf-baseline] [--gpu]
        [--engines [--engine-rows 16] [--engine-new-tokens 64]]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "policy-outputs"
from metaaligner_core.settings import DEFAULT_MAX_NEW_TOKENS  # noqa: E402

OBJECTIVES = {"hh-rlhf": "harmlessness,helpfulness", "ultrafeedback": "honesty,helpfulness", "imhi": "correctness,informative"}

START_CHILD = r"""
import json, sys, time
# The imports (torch, transformers and the Llama modules it loads lazily) cost the same with or
# without the cache, so they are done before the clock starts.
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from metaaligner_core.embedded import embedded_model_dir, is_cached
from metaaligner_core.models import load_causal_lm
cached = is_cached()
t = time.perf_counter()
embedded_model_dir()
model, tok = load_causal_lm("default", device="cpu")
print(json.dumps({"cached_before": cached, "seconds": time.perf_counter() - t}))
"""


def loadavg() -> str:
    try:
        return "%.1f" % os.getloadavg()[0]
    except OSError:
        return "?"


def bench_start() -> None:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "METAALIGNER_CACHE": cache, "TRANSFORMERS_VERBOSITY": "error"}
        runs = []
        for _ in range(3):  # first (dequantise), then two cached starts; the best cached one counts
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", START_CHILD], env=env, cwd=ROOT, capture_output=True,
                                 text=True, check=True).stdout
            runs.append({**json.loads(out.strip().splitlines()[-1]), "process": time.perf_counter() - t})
    assert not runs[0]["cached_before"] and all(r["cached_before"] for r in runs[1:])
    first, cached = runs[0], min(runs[1:], key=lambda r: r["seconds"])
    print(f"start: first (GGUF dequantise + save + load) {first['seconds']:.2f} s, cached {cached['seconds']:.2f} s: "
          f"{first['seconds'] / cached['seconds']:.1f}x faster (target >= 20x)  [load avg {loadavg()}]")
    print(f"  whole process incl. Python/torch/transformers imports: first {first['process']:.1f} s, "
          f"cached {cached['process']:.1f} s")


def load_rows(spec: str, n: int) -> tuple[list[str], list[str], str]:
    """``n`` (query, draft) pairs and the template matching their source."""
    path = DATA / spec
    if path.is_file():
        with open(path, encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))[:n]
        return [r["query"] for r in rows], [r["generated_text"] for r in rows], spec.split("/")[0]
    print(f"({path} not found: using generated text)")
    rng = random.Random(0)
    words = "the model answer should help user with clear steps and honest evidence about it".split()
    text = lambda k: " ".join(rng.choices(words, k=k))  # noqa: E731
    return ([text(rng.randint(10, 40)) + "?" for _ in range(n)], [text(rng.randint(40, 200)) for _ in range(n)],
            "hh-rlhf")


def timed(aligner, fn):
    stats = aligner.generator.stats
    before = stats["generated_tokens"]
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t, stats["generated_tokens"] - before


def bench_align(args, device=None, dtype=None, batch_size=None, label="cpu fp32") -> None:
    import torch

    from metaaligner_core.inference import Aligner

    queries, drafts, family = load_rows(args.data, args.rows)
    objectives = OBJECTIVES[family]
    dtype = dtype or args.dtype
    aligner = Aligner.load("default", template=family, device=device, dtype=dtype)
    label = label if dtype is None else f"{label.split()[0]} {dtype}"
    batch_size = batch_size or args.batch_size
    gen = {"max_new_tokens": args.max_new_tokens}
    lens = sorted(len(aligner.encode(q, d, objectives, args.max_new_tokens)[0]) for q, d in zip(queries, drafts))
    print(f"align ({label}, {torch.get_num_threads()} threads): {len(queries)} drafts from {args.data} "
          f"(prompt tokens min {lens[0]} / median {lens[len(lens) // 2]} / max {lens[-1]}), "
          f"template {family}, objectives {objectives}, max_new_tokens {args.max_new_tokens}, batch {batch_size}")
    aligner.align(queries[0], drafts[0], objectives, max_new_tokens=4)  # warm-up (allocator, prefix cache)

    # One batched job over all the rows (continuous batching keeps ``batch_size`` rows in flight
    # until the queue runs dry), timed between the two halves of the one-by-one run, so a load
    # change on a shared machine biases neither side.
    half = len(queries) // 2
    parts = [(slice(0, half), "single"), (slice(0, None), "batched"), (slice(half, None), "single")]
    results = {"single": [None] * len(queries), "batched": [None] * len(queries)}
    seconds = {"single": 0.0, "batched": 0.0}
    tokens = {"single": 0, "batched": 0}
    for sl, mode in parts:
        q, d = queries[sl], drafts[sl]
        if mode == "single":
            out, dt, nt = timed(aligner, lambda: [aligner.align(x, y, objectives, **gen) for x, y in zip(q, d)])
        else:
            out, dt, nt = timed(aligner, lambda: aligner.align_batch(q, d, objectives, batch_size=batch_size, **gen))
        results[mode][sl] = out
        seconds[mode] += dt
        tokens[mode] += nt
        print(f"  {mode:8s} rows {sl.start}-{(sl.stop or len(queries)) - 1}: {nt} tokens in {dt:.1f} s "
              f"[load avg {loadavg()}]")
    if args.hf_baseline:  # plain transformers generate(), one row at a time, on the first half
        model = aligner.generator.model
        nt, t = 0, time.perf_counter()
        for x, y in zip(queries[:half], drafts[:half]):
            ids = torch.tensor([aligner.encode(x, y, objectives, args.max_new_tokens)[0]], device=model.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                 do_sample=False, pad_token_id=aligner.generator.pad_id)
            nt += sum(1 for tkn in out[0, ids.shape[1]:].tolist() if tkn not in aligner.generator.eos_ids)
        dt = time.perf_counter() - t
        print(f"  plain transformers generate(), one by one, rows 0-{half - 1}: {nt} tokens in {dt:.1f} s "
              f"= {nt / dt:.1f} tokens/s [load avg {loadavg()}]")
    rate = {m: tokens[m] / seconds[m] for m in seconds}
    same = sum(a == b for a, b in zip(results["single"], results["batched"]))
    print(f"  one by one: {tokens['single']} tokens in {seconds['single']:.1f} s = {rate['single']:.1f} tokens/s")
    print(f"  batched:    {tokens['batched']} tokens in {seconds['batched']:.1f} s = {rate['batched']:.1f} tokens/s")
    print(f"  ratio: {rate['batched'] / rate['single']:.2f}x (target >= 4x at batch 16 on CPU); "
          f"batched == one-by-one on {same}/{len(queries)} rows")


def bench_engines(args) -> None:
    """Ours vs transformers' continuous batching (``generate_batch``) on the same encoded prompts."""
    import logging

    import torch
    from transformers import GenerationConfig

    from metaaligner_core.inference import Aligner
    from metaaligner_core.settings import GenerationSettings

    logging.getLogger("transformers").setLevel(logging.ERROR)
    queries, drafts, family = load_rows(args.data, args.engine_rows)
    objectives = OBJECTIVES[family]
    n_new = args.engine_new_tokens
    aligner = Aligner.load("default", template=family, dtype=args.dtype)
    gen = aligner.generator
    prompts = [aligner.encode(q, d, objectives, n_new)[0] for q, d in zip(queries, drafts)]
    prefix_lens = [aligner.shared_prefix_len(p, objectives) for p in prompts]
    settings = GenerationSettings(max_new_tokens=n_new)
    model = gen.model
    ours_attn = model.config._attn_implementation
    eos = sorted(gen.eos_ids)
    config = GenerationConfig(max_new_tokens=n_new, do_sample=False, eos_token_id=eos, pad_token_id=gen.pad_id)

    def run_ours():
        model.set_attn_implementation(ours_attn)
        return gen.generate(prompts, settings, batch_size=args.batch_size, prefix_lens=prefix_lens)

    def run_hf():
        # transformers' manager refuses custom attention functions: plain sdpa for its run.
        model.set_attn_implementation("sdpa")
        res = model.generate_batch(prompts, generation_config=config, max_new_tokens=n_new, progress_bar=False)
        by_id = {r.request_id: r for r in res.values()}
        return [[t for t in by_id[f"req_{i}"].generated_tokens if t not in gen.eos_ids] for i in range(len(prompts))]

    print(f"engines ({torch.get_num_threads()} threads): {len(prompts)} prompts from {args.data}, "
          f"{n_new} new tokens, greedy, batch {args.batch_size}")
    run_ours()  # warm-up of both (allocator, prefix cache, the manager's first start)
    run_hf()
    seconds = {"ours": 0.0, "transformers": 0.0}
    tokens = {"ours": 0, "transformers": 0}
    outs = {}
    for name in ("ours", "transformers", "transformers", "ours"):
        t = time.perf_counter()
        out = run_ours() if name == "ours" else run_hf()
        dt = time.perf_counter() - t
        seconds[name] += dt
        tokens[name] += sum(len(o) for o in out)
        outs[name] = out
        print(f"  {name:12s}: {sum(len(o) for o in out)} tokens in {dt:.1f} s [load avg {loadavg()}]")
    model.set_attn_implementation(ours_attn)
    rate = {k: tokens[k] / seconds[k] for k in seconds}
    same = sum(a == b for a, b in zip(outs["ours"], outs["transformers"]))
    print(f"  ours:         {rate['ours']:.1f} tokens/s")
    print(f"  transformers: {rate['transformers']:.1f} tokens/s (model.generate_batch, continuous batching)")
    print(f"  ratio transformers/ours: {rate['transformers'] / rate['ours']:.2f} (>= 0.80 means: use transformers'); "
          f"same tokens on {same}/{len(prompts)} rows")


def bench_gpu_engines(args) -> None:
    """``--gpu``: four ways to decode the same aligner prompts on CUDA in bf16, at batch 1 and
    ``--gpu-batch``, greedy: our engine (``LocalGenerator.generate``, continuous batching over its
    KV cache); transformers ``generate`` on left-padded batches (dynamic cache); ``generate`` with
    ``cache_implementation="static"``, which transformers compiles with ``torch.compile`` on CUDA
    (every prompt left-padded to the longest, so each batch has the same shapes and compiles once;
    the first call of each batch size is an untimed warm-up that pays the compilation); and
    ``model.generate_batch`` (transformers' continuous batching; at batch 1 one call per prompt,
    at the larger batch all prompts in one call, scheduled by transformers). Prints tokens/s
    (generated tokens, EOS not counted), the ratio to our engine, and on how many rows each
    gives our engine's tokens. Batch 1 runs ``--gpu-single-rows`` prompts, the batch
    ``2 x --gpu-batch``."""
    import logging

    import torch
    from transformers import GenerationConfig

    from metaaligner_core.inference import Aligner
    from metaaligner_core.settings import GenerationSettings

    logging.getLogger("transformers").setLevel(logging.ERROR)
    n_new = args.max_new_tokens
    queries, drafts, family = load_rows(args.data, 2 * args.gpu_batch)
    objectives = OBJECTIVES[family]
    dev = args.gpu_device
    aligner = Aligner.load("default", template=family, device=dev, dtype="bf16")
    gen, model = aligner.generator, aligner.generator.model
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    ours_attn = model.config._attn_implementation
    eos = sorted(gen.eos_ids)
    prompts = [aligner.encode(q, d, objectives, n_new)[0] for q, d in zip(queries, drafts)]
    prefix_lens = [aligner.shared_prefix_len(p, objectives) for p in prompts]
    longest = max(len(p) for p in prompts)
    settings = GenerationSettings(max_new_tokens=n_new)
    config = GenerationConfig(max_new_tokens=n_new, do_sample=False, eos_token_id=eos, pad_token_id=gen.pad_id)

    def strip(tokens):
        out = []
        for t in tokens:
            if t in gen.eos_ids:
                break
            out.append(t)
        return out

    def ours(rows, b):
        model.set_attn_implementation(ours_attn)
        return gen.generate(rows, settings, batch_size=b, prefix_lens=prefix_lens[:len(rows)])

    def hf_generate(rows, b, static=False):
        model.set_attn_implementation("sdpa")
        out = []
        for k in range(0, len(rows), b):
            chunk = rows[k:k + b]
            width = longest if static else max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), gen.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(chunk):
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            extra = {"cache_implementation": "static"} if static else {}
            res = model.generate(ids.to(dev), attention_mask=mask.to(dev), generation_config=config, **extra)
            out += [strip(r[width:].tolist()) for r in res]
        return out

    def hf_generate_batch(rows, b):
        model.set_attn_implementation("sdpa")
        out = []
        for k in range(0, len(rows), 1 if b == 1 else len(rows)):
            chunk = rows[k:k + (1 if b == 1 else len(rows))]
            res = model.generate_batch(chunk, generation_config=config, max_new_tokens=n_new, progress_bar=False)
            by_id = {r.request_id: r for r in res.values()}
            out += [strip(by_id[f"req_{i}"].generated_tokens) for i in range(len(chunk))]
        return out

    engines = {"ours (engine)": ours, "HF generate": hf_generate,
               "HF static cache + torch.compile": lambda rows, b: hf_generate(rows, b, static=True),
               "HF generate_batch": hf_generate_batch}
    where = torch.cuda.get_device_name() if dev.startswith("cuda") else dev
    print(f"gpu engines ({where}, bf16, our attention {ours_attn}, HF sdpa): prompts from "
          f"{args.data} (longest {longest} tokens), {n_new} new tokens, greedy")
    for b, n in ((1, args.gpu_single_rows), (args.gpu_batch, 2 * args.gpu_batch)):
        rows = prompts[:n]
        rates, outs = {}, {}
        for name, run in engines.items():
            run(rows[:b], b)  # warm-up: allocator, prefix cache, compilation of this batch size
            sync()
            t = time.perf_counter()
            outs[name] = run(rows, b)
            sync()
            dt = time.perf_counter() - t
            tokens = sum(len(o) for o in outs[name])
            rates[name] = tokens / dt
        model.set_attn_implementation(ours_attn)
        for name, rate in rates.items():
            same = sum(a == b_ for a, b_ in zip(outs[name], outs["ours (engine)"]))
            print(f"  batch {b:3d}, {n} rows  {name:<32} {rate:9.1f} tokens/s  {rate / rates['ours (engine)']:5.2f}x ours"
                  f"  same tokens as ours on {same}/{n} rows")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=256,
                    help=f"most tokens per correction (default 256; metaaligner align uses {DEFAULT_MAX_NEW_TOKENS})")
    ap.add_argument("--dtype", default=None, help="fp32 (the CPU default) or bf16 (fast on CPUs with AMX)")
    ap.add_argument("--data", default="hh-rlhf/gpt-3.5-turbo.csv",
                    help="CSV under ../shared/data/policy-outputs with query and generated_text columns")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--skip-start", action="store_true")
    ap.add_argument("--skip-align", action="store_true")
    ap.add_argument("--hf-baseline", action="store_true",
                    help="also time plain transformers generate() one by one (first half of the rows)")
    ap.add_argument("--engines", action="store_true",
                    help="compare our engine with transformers' continuous batching (model.generate_batch)")
    ap.add_argument("--engine-rows", type=int, default=16)
    ap.add_argument("--engine-new-tokens", type=int, default=64)
    ap.add_argument("--gpu", action="store_true", help="also run the job on CUDA in bf16, batch 1 vs --gpu-batch")
    ap.add_argument("--gpu-batch", type=int, default=64)
    ap.add_argument("--gpu-single-rows", type=int, default=16, help="--gpu: prompts decoded at batch 1 (default 16)")
    ap.add_argument("--gpu-engines-only", action="store_true", help="--gpu: only the engine comparison")
    ap.add_argument("--gpu-device", default="cuda", help="--gpu-engines-only on another device (cpu: a check that the "
                    "code path works; figures meaningless, no compilation there)")
    args = ap.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_start:
        bench_start()
    if not args.skip_align:
        bench_align(args)
    if args.engines:
        bench_engines(args)
    if args.gpu and args.gpu_engines_only:
        bench_gpu_engines(args)
    elif args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu: no CUDA device")
        rows = args.rows
        args.rows = max(args.rows, 2 * args.gpu_batch)  # the batched job keeps a full batch in flight
        bench_align(args, device="cuda", dtype="bf16", batch_size=args.gpu_batch, label="cuda bf16")
        args.rows = rows
        bench_gpu_engines(args)


if __name__ == "__main__":
    main()
