"""Benchmark: the bootstrap behind every interval of ``evaluate``, at its default of 10,000 resamples.

10,000 judgments by default: 1,250 queries x 4 objectives x 2 responses (draft and correction)
judged against the golden answer. Three timings in one run:

1. the paired bootstrap of two win rates (:func:`stats.bootstrap_means`, vectorised numpy) against
   the same resampling as a plain Python loop (:func:`stats.bootstrap_means_loop`, the same
   draws) over 10,000 judgments as two columns. The loop runs ``--loop-resamples`` (default
   1,000: 10,000 would take minutes); the vectorised run's first resamples must equal the
   loop's exactly, and the speed-up is per resample;
2. what ``evaluate`` does for the rates: one joint resampling of the queries for every objective
   and the four win-rate definitions (:func:`stats.joint_bootstrap`), 10,000 resamples;
3. the length-controlled intervals: each side's GLM refitted on every resample (8 fits: 4
   objectives x 2 sides), 10,000 resamples.

    .venv/bin/python bench/bench_bootstrap.py [--queries 1250] [--resamples 10000] [--loop-resamples 1000]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from metaaligner_core.evaluation import stats  # noqa: E402

OBJECTIVES = 4


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=1250)
    ap.add_argument("--resamples", type=int, default=stats.DEFAULT_RESAMPLES)
    ap.add_argument("--loop-resamples", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3, help="vectorised runs of part 1; the best is reported")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n = args.queries
    judgments = n * OBJECTIVES * 2
    print(f"{judgments} judgments: {n} queries x {OBJECTIVES} objectives x 2 responses; "
          f"{args.resamples} resamples")

    # 1. two win-rate columns of all 10,000 judgments: vectorised vs the plain loop
    m = judgments // 2
    cols = [(rng.random(m) < 0.35).astype(float), (rng.random(m) < 0.55).astype(float)]
    print(f"load average at start: {os.getloadavg()[0]:.1f} (2-core machine: wall times grow with the load, CPU "
          f"times much less)")
    fast_times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        fast = stats.bootstrap_means(cols, args.resamples, seed=1)
        ci = stats.percentile_interval(fast[:, 1] - fast[:, 0])
        fast_times.append(time.perf_counter() - t)
    t = time.perf_counter()
    slow = np.array(stats.bootstrap_means_loop(cols, args.loop_resamples, seed=1))
    slow_time = time.perf_counter() - t
    if not np.allclose(fast[:args.loop_resamples], slow):
        print("MISMATCH: the loop's resamples differ from the vectorised ones")
        return 1
    best = min(fast_times)
    per_fast, per_slow = best / args.resamples, slow_time / args.loop_resamples
    print(f"1. paired bootstrap of two win rates over {m} rows")
    print(f"   vectorised numpy, {args.resamples} resamples: {best:.3f} s "
          f"(best of {args.repeat}: {', '.join(f'{x:.3f}' for x in fast_times)})")
    print(f"   plain Python loop, {args.loop_resamples} resamples: {slow_time:.3f} s "
          f"(same draws: the first {args.loop_resamples} resamples are identical)")
    print(f"   speed-up per resample: {per_slow / per_fast:.1f}x; advantage interval [{ci[0]:+.4f}, {ci[1]:+.4f}]")

    # 2. the report's rates: 4 objectives x 4 definitions x 2 sides, one joint resampling
    outcome = {}
    for k in range(OBJECTIVES):
        for side, p in (("original", 0.35), ("aligned", 0.55)):
            u = rng.random(n)
            outcome[(k, side)] = np.where(u < 0.03, "invalid", np.where(u < 0.03 + p, "win",
                                                                         np.where(u < 0.13 + p, "tie", "loss")))
    num, den = [], []
    for k in range(OBJECTIVES):
        o, a = outcome[(k, "original")], outcome[(k, "aligned")]
        valid = ((o != "invalid") & (a != "invalid")).astype(float)
        judged = np.ones(n)
        for side in (o, a):
            num += [valid * (side == "win"), judged * (side == "win"),
                    judged * np.isin(side, ["win", "tie"]), valid * ((side == "win") + 0.5 * (side == "tie"))]
            den += [valid, judged, judged, valid]
    num, den = np.stack(num, axis=1), np.stack(den, axis=1)
    t, c = time.perf_counter(), time.process_time()
    ratios, _ = stats.joint_bootstrap(num, den, args.resamples, seed=0)
    avg = np.mean(ratios[:, 4::8] - ratios[:, 0::8], axis=1)  # valid-only advantage averaged over objectives
    ci = stats.percentile_interval(avg)
    rates_time, rates_cpu = time.perf_counter() - t, time.process_time() - c
    print(f"2. joint bootstrap of every rate ({num.shape[1]} ratio statistics over {n} queries), "
          f"{args.resamples} resamples: {rates_time:.3f} s ({rates_cpu:.3f} s CPU); average advantage interval "
          f"[{ci[0]:+.4f}, {ci[1]:+.4f}]")

    # 3. the length-controlled GLMs refitted on every resample
    problems = []
    for k in range(OBJECTIVES):
        for side, shift in (("original", -100.0), ("aligned", 250.0)):
            delta = rng.normal(shift, 400, n)
            p = 1 / (1 + np.exp(-(0.2 + 1.0 * np.tanh(delta / 400))))
            u = rng.random(n)
            y = np.where(u < p - 0.05, 1.0, np.where(u < p + 0.05, 0.5, 0.0))
            problems.append(stats.LCProblem(np.arange(n), y, delta))
    t, c = time.perf_counter(), time.process_time()
    _, lc = stats.joint_bootstrap(np.zeros((n, 0)), np.zeros((n, 0)), args.resamples, seed=0,
                                  lc_problems=problems)
    lc_time, lc_cpu = time.perf_counter() - t, time.process_time() - c
    ci = stats.percentile_interval(lc[:, 1] - lc[:, 0])
    print(f"3. length-controlled fits refitted per resample ({len(problems)} GLMs over {n} queries), "
          f"{args.resamples} resamples: {lc_time:.3f} s ({lc_cpu:.3f} s CPU; {lc_time / len(problems):.3f} s a GLM); "
          f"LC advantage interval [{ci[0]:+.4f}, {ci[1]:+.4f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
