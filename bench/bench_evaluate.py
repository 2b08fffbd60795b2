"""Benchmark: parallel judge calls against a judge that answers after 50 ms.

Runs ``evaluate`` (pairwise) over the same 200 comparisons with ``--concurrency 1`` and
``--concurrency 16`` against a real HTTP server on 127.0.0.1 speaking the OpenAI wire format
(tests/api_server.py, in a process of its own, as a remote judge would be) through the official
``openai`` client, then once more over the filled cache. Prints the wall times and the ratio,
and checks the three reports agree.

    .venv/bin/python bench/bench_evaluate.py [--comparisons 200] [--delay 0.05] [--concurrency 16]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import socketserver
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from api_server import FakeProvider, prompt_text  # noqa: E402

# The test server writes headers and body in two sends; with Nagle's algorithm on, the client's
# delayed ACK adds ~40 ms to every call. Switch it off so the judge really answers after --delay.
socketserver.StreamRequestHandler.disable_nagle_algorithm = True

from metaaligner_core.evaluation import evaluate  # noqa: E402

PAIR = re.compile(r"RESPONSE 1: (.*) \| RESPONSE 2: (.*)\. Consider the following aspect", re.S)
OBJECTIVES = "honesty,helpfulness"


def longer_wins(body: dict) -> str:
    """Deterministic judge: the longer response is better, equal lengths tie."""
    m = PAIR.search(prompt_text(body))
    if not m:
        return "?"
    a, b = len(m.group(1)), len(m.group(2))
    return "0" if a == b else ("1" if a > b else "2")


def serve(delay: float, conn) -> None:
    """Run the judge server until the parent closes the pipe."""
    with FakeProvider(reply=longer_wins, delay=delay) as server:
        conn.send(server.base_url)
        try:
            conn.recv()
        except EOFError:
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comparisons", type=int, default=200, help="judge calls per run (multiple of 4)")
    ap.add_argument("--delay", type=float, default=0.05, help="seconds the judge takes per answer")
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench")
    rows_n = args.comparisons // 4  # 2 objectives x (draft, aligned) per row
    rows = [{"query": f"question {i}", "golden": "a reference answer " + "x" * (i % 7),
             "draft": "a draft " + "y" * (i % 11), "aligned": "an aligned answer " + "z" * (i % 13)}
            for i in range(rows_n)]
    parent, child = mp.Pipe()
    server = mp.get_context("fork").Process(target=serve, args=(args.delay, child), daemon=True)
    server.start()
    url = parent.recv() + "/v1"
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        # warm-up: imports (openai, matplotlib) and the first connection are paid before timing
        evaluate(data, OBJECTIVES, "openai:warm-up", Path(tmp) / "warm", base_url=url, max_rows=2)
        times, reports = {}, {}
        for c in (1, args.concurrency):
            start = time.perf_counter()
            reports[c] = evaluate(data, OBJECTIVES, "openai:bench-judge", Path(tmp) / f"c{c}", base_url=url,
                                  concurrency=c)
            times[c] = time.perf_counter() - start
            assert reports[c]["calls"]["calls"] == rows_n * 4 and reports[c]["failed"] == 0
        start = time.perf_counter()
        cached = evaluate(data, OBJECTIVES, "openai:bench-judge", Path(tmp) / f"c{args.concurrency}", base_url=url,
                          concurrency=args.concurrency)
        t_cached = time.perf_counter() - start
        assert cached["calls"]["calls"] == 0 and cached["objectives"] == reports[1]["objectives"]
        assert reports[1]["objectives"] == reports[args.concurrency]["objectives"]
    parent.send("stop")
    server.join(5)
    n = rows_n * 4
    print(f"{n} comparisons, judge answers after {args.delay * 1000:.0f} ms (openai client -> 127.0.0.1)")
    print(f"  --concurrency 1:  {times[1]:6.2f} s  ({n / times[1]:6.1f} comparisons/s)")
    print(f"  --concurrency {args.concurrency}: {times[args.concurrency]:6.2f} s  "
          f"({n / times[args.concurrency]:6.1f} comparisons/s)")
    print(f"  speed-up: {times[1] / times[args.concurrency]:.1f}x")
    print(f"  rerun over the cache: {t_cached:.2f} s, 0 calls")


if __name__ == "__main__":
    main()
