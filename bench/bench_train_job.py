"""Benchmark: the Align tab's first-token latency while the Train tab's job trains.

The app serves corrections while a training job (``annotate train`` as a child process, started
by :class:`webapp.train_jobs.TrainJobs` exactly as the Train tab starts it) fine-tunes the
embedded SmolLM2-135M with LoRA on a synthetic study. Measured in one run, alternating so load
changes on a shared machine hit every condition alike:

- idle: no job;
- bounded: a job whose CPU threads are capped (the Train tab's default: half the cores) and whose
  priority is lowered;
- unbounded: the same job with as many threads as cores and normal priority (what a job
  started without the Train tab's bounds would do).

Latency = time from ``Aligner.stream`` being called (a pasted draft, so the aligner starts at once)
to its first streamed piece, in-process (the model time the Align tab waits for). Prints the
median of each and the ratios to idle.

    .venv/bin/python bench/bench_train_job.py [--repeats 5] [--max-new-tokens 16]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUERY = "How can I fall asleep faster?"
DRAFT = "Just stay up until you are tired, there is nothing else you can do about it."
WORDS = "sleep rest calm routine light screen tea evening morning walk breathe read quiet dark cool".split()


def make_study(root: Path, db: str, n_items: int = 80) -> None:
    """A study with two raters who agree on every rating (every item ready, many pairs)."""
    from annotation.store import Store

    rng = random.Random(0)
    items, rows = [], []
    for i in range(n_items):
        q = f"question {i}: " + " ".join(rng.choice(WORDS) for _ in range(12))
        resp = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(2)]
        items.append({"item_id": f"b{i}", "query": q, "responses": [{"text": t} for t in resp]})
        for t in resp:
            for k in ("correctness", "informative", "professional"):
                s = rng.randint(0, 3)
                rows += [{"item_id": f"b{i}", "query": q, "response": t, "annotator": a, "objective": k, "score": s}
                         for a in ("r1", "r2")]
    for name, data in (("items.jsonl", items), ("ratings.jsonl", rows)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in data))
    store = Store(db)
    store.import_items(root / "items.jsonl", "imhi")
    store.import_ratings(root / "ratings.jsonl", "imhi")


def first_delta(aligner, max_new: int) -> float:
    t0 = time.perf_counter()
    for _ in aligner.stream(QUERY, DRAFT, "helpfulness,readability", max_new_tokens=max_new):
        return time.perf_counter() - t0
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()

    from annotation.store import OPERATOR
    from metaaligner_core.inference import Aligner
    from webapp.train_jobs import TrainJobs, default_threads

    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-job-"))
    db = f"sqlite:///{tmp / 'study.db'}"
    make_study(tmp, db)
    aligner = Aligner.load("default")
    aligner.align(QUERY, DRAFT, "helpfulness", max_new_tokens=4)  # warm-up

    def job(threads: int, nice: bool) -> TrainJobs:
        jobs = TrainJobs(db, tmp / f"runs-{threads}-{nice}", bases=["default"], threads=threads)
        if not nice:
            import webapp.train_jobs as tj

            tj._lower_priority = lambda: None  # noqa: SLF001 (the unbounded comparison only)
        jobs.start_train(OPERATOR, "imhi", "default", max_steps=400, epochs=1, lr=1e-4, holdout=0, min_pairs=1)
        return jobs

    def wait_training(jobs: TrainJobs, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = jobs.state(OPERATOR)
            if st["status"] != "running":
                raise SystemExit(f"the job ended early: {st['status']}\n{st['log']}")
            if st.get("losses") or "step" in st.get("stage", ""):
                return
            time.sleep(1)
        raise SystemExit("the job did not start training in time")

    results: dict[str, list[float]] = {"idle": [], "bounded": [], "unbounded": []}
    for label, threads, nice in (("bounded", default_threads(), True), ("unbounded", cores, False)):
        jobs = job(threads, nice)
        try:
            wait_training(jobs)
            for _ in range(args.repeats):
                results[label].append(first_delta(aligner, args.max_new_tokens))
                # idle interleaved: the job paused (SIGSTOP) holds its memory but no CPU
                os.killpg(jobs.job.proc.pid, signal.SIGSTOP)
                time.sleep(0.5)
                results["idle"].append(first_delta(aligner, args.max_new_tokens))
                os.killpg(jobs.job.proc.pid, signal.SIGCONT)
                time.sleep(1.0)
            print(f"{label}: {threads} job threads; job state {jobs.state(OPERATOR)['stage']}")
        finally:
            jobs.cancel(OPERATOR)
    idle = statistics.median(results["idle"])
    print(f"cores: {cores}; first correction token, median of {args.repeats} (idle: {len(results['idle'])}):")
    print(f"  idle (job paused)      {idle:.3f} s")
    for label in ("bounded", "unbounded"):
        m = statistics.median(results[label])
        print(f"  while training, {label:<9} {m:.3f} s  ({m / idle:.2f}x idle)")


if __name__ == "__main__":
    main()
