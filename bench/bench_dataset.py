"""Benchmark: dynamic multi-objective dataset building (Algorithm 1) throughput.

Generates N generic preference records (random labels over the UltraFeedback objectives and
random-length texts), builds the dataset through the same function the CLI uses, and prints
records/s and the peak memory growth (the builder streams: memory must not grow with N).
With ``--real``, also builds from ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz and
prints its stats.

    .venv/bin/python bench/bench_dataset.py [--records 100000] [--real]
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metaaligner_core.dataset import build_dataset_files  # noqa: E402

KEYS = ["instruction following", "honesty", "truthfulness", "helpfulness"]
WORDS = "the a model answer should follow user query truth helpful honest evidence clear step".split()


def generate(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            text = lambda: " ".join(rng.choices(WORDS, k=rng.randint(20, 120)))  # noqa: E731
            rec = {"query": f"Question {i}: " + text(), "response_1": text(), "response_2": text(),
                   "labels": {k: rng.choice(">>><<<==") for k in KEYS}}
            fh.write(json.dumps(rec) + "\n")


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--real", action="store_true", help="also run on ../shared/data/hh-rlhf (if present)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "records.jsonl"
        generate(src, args.records)
        size_mb = src.stat().st_size / 1e6
        rss0 = max_rss_mb()
        t0 = time.perf_counter()
        stats = build_dataset_files([str(src)], Path(tmp) / "out", template="ultrafeedback", warmup_size=1000, seed=1)
        dt = time.perf_counter() - t0
        rows = sum(stats["rows"].values())
        print(f"generic: {args.records} records ({size_mb:.0f} MB) -> {rows} rows in {dt:.2f} s: "
              f"{args.records / dt:,.0f} records/s, {rows / dt:,.0f} rows/s; "
              f"peak RSS growth {max_rss_mb() - rss0:.0f} MB (input file {size_mb:.0f} MB)")
        print(f"target >= 30,000 records/s: {'met' if args.records / dt >= 30_000 else 'NOT met'}")
        real = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
        if args.real and real.exists():
            t0 = time.perf_counter()
            stats = build_dataset_files([str(real)], Path(tmp) / "hh", template="hh-rlhf", seed=1)
            dt = time.perf_counter() - t0
            print(f"hh-rlhf harmless-base test: {stats['records']} records in {dt:.2f} s; stats: {json.dumps(stats)}")


if __name__ == "__main__":
    main()
