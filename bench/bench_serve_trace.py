"""Benchmark: an arrival trace replayed against `metaaligner serve`'s two schedulers, and transformers.

A seeded trace of requests with Poisson arrivals and mixed lengths (short: ``--short-tokens``,
long: ``--long-tokens`` per stage), half of them streamed, is replayed three times in one run:

- *batch*: the server with the batch-at-a-time scheduler (``scheduling="batch"``: requests that
  arrive while a batch decodes wait for it to end);
- *step*: the server with the iteration-level scheduler (the default: a request joins the running
  batch at the next decoding step);
- *transformers*: the same requests through transformers' own continuous batching
  (``model.init_continuous_batching()``, the online form of ``generate_batch``) — draft, then the
  correction of that draft — with no HTTP server in between (the library anchor).

Each request is a draft by the embedded policy and its correction by the embedded aligner (same
weights, one decoding loop), greedy, fp32 on CPU, through the official ``openai`` client on
127.0.0.1. Time to first token (TTFT) is when the first answer text arrives: the first content
chunk of a streamed request, the whole answer of a plain one; time to last token (TTLT) is when
the answer is complete. Prints p50/p95 of both (all requests, and the short ones), aggregate
answer tokens/s (answer tokens of all requests / time from the first arrival to the last answer),
the step/batch ratios (targets: short requests' p95 TTFT >= 5x lower; aggregate tokens/s not
lower), and how many answers are equal across the two schedulers (greedy: all).

    .venv/bin/python bench/bench_serve_trace.py [--requests 16] [--rate 0.5] [--short-tokens 16]
        [--long-tokens 128] [--batch-size 16] [--threads N] [--skip-transformers]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_serve import QUERIES  # noqa: E402  (the same 16 queries as the batching benchmark)
OBJECTIVES = "honesty,helpfulness"


def loadavg() -> str:
    try:
        return "%.1f" % os.getloadavg()[0]
    except OSError:
        return "?"


def make_trace(n: int, rate: float, short: int, long: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    t, trace = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        trace.append({"at": t, "query": QUERIES[i % len(QUERIES)], "short": i % 2 == 0,
                      "max_tokens": short if i % 2 == 0 else long, "stream": rng.random() < 0.5})
    return trace


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def replay_server(url: str, trace: list[dict]) -> list[dict]:
    """Each request from its own thread at its arrival time; returns per-request timings."""
    import openai

    results: list[dict] = [{} for _ in trace]
    t0 = time.perf_counter() + 0.2

    def one(i: int, req: dict) -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
        time.sleep(max(0.0, t0 + req["at"] - time.perf_counter()))
        sent = time.perf_counter()
        first = None
        messages = [{"role": "user", "content": req["query"]}]
        if req["stream"]:
            parts, tokens = [], 0
            for c in client.chat.completions.create(model="default", messages=messages, max_tokens=req["max_tokens"],
                                                    temperature=0, stream=True,
                                                    stream_options={"include_usage": True}):
                if c.choices and c.choices[0].delta.content:
                    first = first or time.perf_counter()
                    parts.append(c.choices[0].delta.content)
                if c.usage is not None:
                    tokens = c.usage.completion_tokens
            text = "".join(parts)
        else:
            r = client.chat.completions.create(model="default", messages=messages, max_tokens=req["max_tokens"],
                                               temperature=0)
            text, tokens = r.choices[0].message.content, r.usage.completion_tokens
        last = time.perf_counter()
        results[i] = {"ttft": (first or last) - sent, "ttlt": last - sent, "tokens": tokens, "text": text,
                      "sent": sent, "done": last}

    threads = [threading.Thread(target=one, args=(i, r)) for i, r in enumerate(trace)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results


def run_server(trace, scheduling: str, batch_size: int) -> list[dict]:
    from metaaligner_core.serve import ServerThread
    from metaaligner_core.serve.api import create_app
    from metaaligner_core.serve.service import CorrectionService

    service = CorrectionService(policies=["default"], aligner="default", objectives=OBJECTIVES,
                                max_new_tokens=max(r["max_tokens"] for r in trace), batch_size=batch_size,
                                device="cpu", scheduling=scheduling)
    service.load()
    try:
        with ServerThread(create_app(service)) as server:
            replay_server(server.url, [{**trace[0], "at": 0.0, "max_tokens": 4}])  # warm-up
            return replay_server(server.url, trace)
    finally:
        service.close()


def run_transformers(trace, batch_size: int) -> list[dict]:
    """The trace through transformers' continuous-batching manager: draft, then its correction."""
    import logging

    from transformers import GenerationConfig

    from metaaligner_core.backends.hf import HFChatBackend
    from metaaligner_core.inference import Aligner

    logging.getLogger("transformers").setLevel(logging.ERROR)
    aligner = Aligner.load("default", template="ultrafeedback")
    gen = aligner.generator
    policy = HFChatBackend(gen)
    model = gen.model
    attn = model.config._attn_implementation
    model.set_attn_implementation("sdpa")  # the manager refuses custom attention functions
    eos = sorted(gen.eos_ids)
    config = GenerationConfig(max_new_tokens=max(r["max_tokens"] for r in trace), do_sample=False,
                              eos_token_id=eos, pad_token_id=gen.pad_id)
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    lock = threading.Lock()

    def run(ids, n, on_token=None):
        with lock:
            rid = manager.add_request(ids, max_new_tokens=n, streaming=on_token is not None)
        out = []
        for res in manager.request_id_iter(rid):
            out = [t for t in res.generated_tokens if t not in gen.eos_ids]
            if on_token and out:
                on_token()
            if res.is_finished():
                break
        return out

    results: list[dict] = [{} for _ in trace]
    t0 = time.perf_counter() + 0.2

    def one(i, req):
        time.sleep(max(0.0, t0 + req["at"] - time.perf_counter()))
        sent = time.perf_counter()
        n = req["max_tokens"]
        draft = gen.decode(run(policy.encode(req["query"], None, n), n)).strip()
        ids, _ = aligner.encode(req["query"], draft, OBJECTIVES, n)
        first = []
        out = run(ids, n, (lambda: first.append(time.perf_counter()) if not first else None) if req["stream"] else None)
        last = time.perf_counter()
        results[i] = {"ttft": (first[0] if first else last) - sent, "ttlt": last - sent, "tokens": len(out),
                      "text": gen.decode(out).strip(), "sent": sent, "done": last}

    try:
        one(0, {**trace[0], "at": 0.0, "max_tokens": 4})  # warm-up
        t0 = time.perf_counter() + 0.2
        threads = [threading.Thread(target=one, args=(i, r)) for i, r in enumerate(trace)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        manager.stop(block=True)
        model.set_attn_implementation(attn)
    return results


def summary(name: str, trace, res) -> dict:
    short = [r for q, r in zip(trace, res) if q["short"]]
    span = max(r["done"] for r in res) - min(r["sent"] for r in res)
    s = {"ttft50": pct([r["ttft"] for r in res], .5), "ttft95": pct([r["ttft"] for r in res], .95),
         "ttlt50": pct([r["ttlt"] for r in res], .5), "ttlt95": pct([r["ttlt"] for r in res], .95),
         "short_ttft50": pct([r["ttft"] for r in short], .5), "short_ttft95": pct([r["ttft"] for r in short], .95),
         "tokens": sum(r["tokens"] for r in res), "span": span}
    s["rate"] = s["tokens"] / span
    print(f"  {name:12s} TTFT p50 {s['ttft50']:6.2f} s  p95 {s['ttft95']:6.2f} s | short TTFT p50 "
          f"{s['short_ttft50']:6.2f} s  p95 {s['short_ttft95']:6.2f} s | TTLT p50 {s['ttlt50']:6.2f} s  p95 "
          f"{s['ttlt95']:6.2f} s | {s['tokens']} answer tokens in {span:.1f} s = {s['rate']:.1f} tokens/s "
          f"[load avg {loadavg()}]", flush=True)
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--rate", type=float, default=0.5, help="mean arrivals per second (Poisson; default 0.5)")
    p.add_argument("--short-tokens", type=int, default=16, help="max_tokens of short requests (default 16)")
    p.add_argument("--long-tokens", type=int, default=128, help="max_tokens of long requests (default 128)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-transformers", action="store_true", help="leave out transformers' continuous batching")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    trace = make_trace(args.requests, args.rate, args.short_tokens, args.long_tokens, args.seed)
    print(f"trace: {args.requests} requests over {trace[-1]['at']:.1f} s (Poisson, {args.rate}/s), "
          f"{sum(r['short'] for r in trace)} short ({args.short_tokens} tokens per stage), "
          f"{sum(not r['short'] for r in trace)} long ({args.long_tokens}), {sum(r['stream'] for r in trace)} streamed; "
          f"batch size {args.batch_size}; torch threads {torch.get_num_threads()}; load avg {loadavg()}", flush=True)
    results, summaries = {}, {}
    for name in ("batch", "step"):
        results[name] = run_server(trace, name, args.batch_size)
        summaries[name] = summary(name, trace, results[name])
    if not args.skip_transformers:
        try:
            results["transformers"] = run_transformers(trace, args.batch_size)
            summaries["transformers"] = summary("transformers", trace, results["transformers"])
        except Exception as e:  # noqa: BLE001  (the anchor is optional; say why it is missing)
            print(f"  transformers: failed ({type(e).__name__}: {e})")
    b, s = summaries["batch"], summaries["step"]
    ttft_ratio = b["short_ttft95"] / s["short_ttft95"]
    rate_ratio = s["rate"] / b["rate"]
    same = sum(x["text"] == y["text"] for x, y in zip(results["batch"], results["step"]))
    print(f"short requests' p95 TTFT, batch / step: {ttft_ratio:.2f}x (target >= 5x: "
          f"{'met' if ttft_ratio >= 5 else 'NOT met'}); all requests' p95 TTFT: {b['ttft95'] / s['ttft95']:.2f}x; "
          f"p95 TTLT: {b['ttlt95'] / s['ttlt95']:.2f}x")
    print(f"aggregate answer tokens/s, step / batch: {rate_ratio:.2f}x (target >= 1: "
          f"{'met' if rate_ratio >= 1 else 'NOT met'}); answers equal across schedulers: {same}/{len(trace)}")
    if "transformers" in summaries:
        t = summaries["transformers"]
        print(f"transformers' continuous batching: short p95 TTFT {t['short_ttft95']:.2f} s "
              f"(step: {s['short_ttft95']:.2f} s), {t['rate']:.1f} answer tokens/s (step: {s['rate']:.1f})")
    return 0 if same == len(trace) else 1


if __name__ == "__main__":
    sys.exit(main())
