"""Benchmark: `metaaligner serve` answering 16 concurrent clients vs the same 16 requests one by one.

A real server (uvicorn on 127.0.0.1, the embedded SmolLM2 as policy and aligner, CPU, greedy)
is driven by the official ``openai`` client. Each request makes the policy write a draft and the
aligner correct it. *Sequential*: one client sends the 16 requests one after another.
*Concurrent*: 16 clients send them at once; the server decodes them in shared batches. To keep
a load change on a shared machine from favouring either side, the concurrent run is timed
between the two halves of the sequential one.

Prints each side's aggregate correction tokens/s (correction tokens of all answers / wall time
of the whole run, drafts included), the ratio (target >= 3x), the engine batch sizes the
concurrent run used, and how many concurrent answers equal their sequential one (must be all).
Exit status 1 when any answer differs.

    .venv/bin/python bench/bench_serve.py [--clients 16] [--max-tokens 64] [--threads N] [--objectives SPEC]
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUERIES = [
    "How do I keep basil fresh after buying it?",
    "What is the difference between weather and climate?",
    "Explain what a hash table is to a new programmer.",
    "Why do cats purr?",
    "Give me three tips for a first job interview.",
    "How does a vaccine train the immune system?",
    "What should I pack for a two-day hike?",
    "Why is the sky blue?",
    "How can I fall asleep faster?",
    "What is compound interest?",
    "Suggest a simple vegetarian dinner.",
    "How do noise-cancelling headphones work?",
    "What causes the seasons on Earth?",
    "How do I politely decline a meeting?",
    "What is the purpose of a budget?",
    "How do plants make food from sunlight?",
]


def loadavg() -> str:
    try:
        return "%.1f" % os.getloadavg()[0]
    except OSError:
        return "?"


def ask(client, query: str, max_tokens: int):
    r = client.chat.completions.create(model="default", messages=[{"role": "user", "content": query}],
                                       max_tokens=max_tokens, temperature=0)
    return r.choices[0].message.content, r.metaaligner["usage"]["correction"]["completion_tokens"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64, help="draft and correction length (default 64)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--objectives", default="honesty,helpfulness", help="the server's default objectives")
    args = p.parse_args(argv)

    import openai
    import torch

    from metaaligner_core.serve import ServerThread
    from metaaligner_core.serve.api import create_app
    from metaaligner_core.serve.service import CorrectionService

    if args.threads:
        torch.set_num_threads(args.threads)
    queries = (QUERIES * (args.clients // len(QUERIES) + 1))[:args.clients]
    service = CorrectionService(policies=["default"], aligner="default", objectives=args.objectives,
                                max_new_tokens=args.max_tokens, batch_size=args.clients, device="cpu")
    t = time.perf_counter()
    service.load()
    print(f"models loaded in {time.perf_counter() - t:.1f} s; torch threads {torch.get_num_threads()}; "
          f"{args.clients} requests, {args.max_tokens} new tokens per stage, load average {loadavg()}", flush=True)
    with ServerThread(create_app(service)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=3600)
        ask(client, "Hello!", 8)  # warm-up: first-call allocations, prefix cache

        sequential: dict[int, tuple[str, int]] = {}

        def run_sequential(indices) -> float:
            t0 = time.perf_counter()
            for i in indices:
                sequential[i] = ask(client, queries[i], args.max_tokens)
            return time.perf_counter() - t0

        half = len(queries) // 2
        seq_s = run_sequential(range(half))
        print(f"sequential, first half: {seq_s:.1f} s", flush=True)

        concurrent: dict[int, tuple[str, int]] = {}
        barrier = threading.Barrier(len(queries) + 1)

        def one(i):
            c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=3600)
            barrier.wait()
            concurrent[i] = ask(c, queries[i], args.max_tokens)

        first_batch = len(service.batch_sizes())
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(queries))]
        for th in threads:
            th.start()
        barrier.wait()
        t0 = time.perf_counter()
        for th in threads:
            th.join()
        conc_s = time.perf_counter() - t0
        batches = service.batch_sizes()[first_batch:]
        print(f"concurrent: {conc_s:.1f} s", flush=True)

        seq_s += run_sequential(range(half, len(queries)))
    service.close()

    seq_tokens = sum(n for _, n in sequential.values())
    conc_tokens = sum(n for _, n in concurrent.values())
    same = sum(concurrent[i][0] == sequential[i][0] for i in range(len(queries)))
    seq_rate, conc_rate = seq_tokens / seq_s, conc_tokens / conc_s
    print(f"sequential: {seq_tokens} correction tokens in {seq_s:.1f} s = {seq_rate:.1f} tokens/s")
    print(f"concurrent: {conc_tokens} correction tokens in {conc_s:.1f} s = {conc_rate:.1f} tokens/s "
          f"(engine batches: {batches})")
    ratio = conc_rate / seq_rate
    print(f"ratio: {ratio:.2f}x (target >= 3x: {'met' if ratio >= 3 else 'NOT met'}); "
          f"concurrent answers equal to sequential: {same}/{len(queries)}; load average {loadavg()}")
    return 0 if same == len(queries) else 1


if __name__ == "__main__":
    sys.exit(main())
