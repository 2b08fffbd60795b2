"""Benchmark: paired bootstrap intervals, vectorised numpy vs a plain Python loop, in one run.

10,000 judgments (rows with a draft and an aligned win indicator) and 1,000 resamples by
default: the computation ``evaluate`` does per objective and corrector
(:func:`metaaligner_core.evaluation.stats.bootstrap_means`), against the same resampling
written as a Python loop (:func:`~metaaligner_core.evaluation.stats.bootstrap_means_loop`, the
same random draws). Prints both wall times, the ratio, and checks that both give the same
intervals.

    .venv/bin/python bench/bench_bootstrap.py [--judgments 10000] [--resamples 1000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from metaaligner_core.evaluation import stats  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--judgments", type=int, default=10_000)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3, help="vectorised runs; the best is reported")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    original = (rng.random(args.judgments) < 0.35).astype(float)
    aligned = (rng.random(args.judgments) < 0.55).astype(float)
    cols = [original, aligned]

    fast_times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        fast = stats.bootstrap_means(cols, args.resamples, seed=1)
        ci_fast = [stats.percentile_interval(fast[:, 0]), stats.percentile_interval(fast[:, 1]),
                   stats.percentile_interval(fast[:, 1] - fast[:, 0])]
        fast_times.append(time.perf_counter() - t)
    t = time.perf_counter()
    slow = np.array(stats.bootstrap_means_loop(cols, args.resamples, seed=1))
    ci_slow = [stats.percentile_interval(slow[:, 0]), stats.percentile_interval(slow[:, 1]),
               stats.percentile_interval(slow[:, 1] - slow[:, 0])]
    slow_time = time.perf_counter() - t
    if not np.allclose(ci_fast, ci_slow):
        print("MISMATCH: the two computations disagree", ci_fast, ci_slow)
        return 1
    best = min(fast_times)
    print(f"paired bootstrap, {args.judgments} judgments x {args.resamples} resamples (95% intervals of two "
          f"win rates and their difference)")
    print(f"  vectorised numpy: {best:.3f} s (best of {args.repeat}: {', '.join(f'{x:.3f}' for x in fast_times)})")
    print(f"  plain Python loop: {slow_time:.3f} s")
    print(f"  speed-up: {slow_time / best:.1f}x; intervals identical: advantage "
          f"[{ci_fast[2][0]:+.4f}, {ci_fast[2][1]:+.4f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
