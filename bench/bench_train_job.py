"""Benchmark: the Align tab's first-token latency while the Train tab's job trains.

The app serves corrections while a training job (``annotate train`` as a child process, started
by :class:`webapp.train_jobs.TrainJobs` exactly as the Train tab starts it) fine-tunes the
embedded SmolLM2-135M with LoRA on a synthetic study. Three conditions, measured in one run:

- idle: no job running;
- bounded: a job whose CPU threads are capped (the Train tab's default: half the cores) and whose
  priority is lowered;
- unbounded: the same job with as many threads as cores and normal priority (what a job
  started without the Train tab's bounds would do).

Both jobs are started first and each is brought to its training loop (a finished step), then
paused (SIGSTOP: it keeps its memory, takes no CPU). Each round then measures every condition
once, in a rotated order, resuming only that condition's job for ``--settle`` seconds before and
during the measurement; so both jobs are measured in the same phase, and load from other
processes on a shared machine hits the three conditions alike.

Latency = time from ``Aligner.stream`` being called (a pasted draft, so the aligner starts at once)
to its first streamed piece, in-process (the model time the Align tab waits for). Prints the
median of each condition, every run, and the ratios to idle.

    .venv/bin/python bench/bench_train_job.py [--repeats 6] [--max-new-tokens 16] [--settle 2]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
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


def training_step(jobs) -> int:
    """The job's last completed training step (0 while it loads or builds the dataset)."""
    try:
        return int(json.loads((jobs.job.out / "progress.json").read_text(encoding="utf-8")).get("step") or 0)
    except (OSError, ValueError, TypeError):
        return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="rounds; each measures idle, bounded and unbounded once")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds a resumed job runs before a measurement (back in its training loop)")
    args = ap.parse_args()

    from annotation.store import OPERATOR
    from metaaligner_core.inference import Aligner
    import webapp.train_jobs as tj
    from webapp.train_jobs import TrainJobs, default_threads

    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-job-"))
    db = f"sqlite:///{tmp / 'study.db'}"
    make_study(tmp, db)
    aligner = Aligner.load("default")
    aligner.align(QUERY, DRAFT, "helpfulness", max_new_tokens=4)  # warm-up

    def start(label: str, threads: int, nice: bool) -> TrainJobs:
        jobs = TrainJobs(db, tmp / f"runs-{label}", bases=["default"], threads=threads)
        lower = tj._lower_priority  # noqa: SLF001
        if not nice:  # the unbounded comparison only: normal priority
            tj._lower_priority = lambda: None  # noqa: SLF001
        try:
            jobs.start_train(OPERATOR, "imhi", "default", max_steps=2000, epochs=1, lr=1e-4, holdout=0, min_pairs=1)
        finally:
            tj._lower_priority = lower  # noqa: SLF001
        return jobs

    def wait_training(jobs: TrainJobs, timeout: float = 900) -> None:
        """Until the job has finished a training step (dataset built, model loaded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = jobs.state(OPERATOR)
            if st["status"] != "running":
                raise SystemExit(f"the job ended early: {st['status']}\n{st['log']}")
            if training_step(jobs) >= 1:
                return
            time.sleep(1)
        raise SystemExit("the job did not start training in time")

    def pause(jobs: TrainJobs) -> None:
        os.killpg(jobs.job.proc.pid, signal.SIGSTOP)  # holds its memory, takes no CPU

    def resume(jobs: TrainJobs) -> None:
        os.killpg(jobs.job.proc.pid, signal.SIGCONT)

    threads = {"bounded": default_threads(), "unbounded": cores}
    running: dict[str, TrainJobs] = {}
    results: dict[str, list[float]] = {"idle": [], "bounded": [], "unbounded": []}
    try:
        # Both jobs start and reach their training loop first (one at a time, the other paused),
        # so that every measurement below sees a job in the same phase: training steps.
        for label, nice in (("bounded", True), ("unbounded", False)):
            running[label] = start(label, threads[label], nice)
            wait_training(running[label])
            pause(running[label])
        steps0 = {k: training_step(j) for k, j in running.items()}
        order = ["idle", "bounded", "unbounded"]
        for r in range(args.repeats):
            for label in order[r % 3:] + order[:r % 3]:  # rotated, so no condition always goes first
                job = running.get(label)
                if job is not None:
                    resume(job)
                time.sleep(args.settle)
                results[label].append(first_delta(aligner, args.max_new_tokens))
                if job is not None:
                    pause(job)
        steps = {k: training_step(j) - steps0[k] for k, j in running.items()}
    finally:
        for jobs in running.values():
            try:
                resume(jobs)
            except ProcessLookupError:
                pass
            jobs.cancel(OPERATOR)
        shutil.rmtree(tmp, ignore_errors=True)
    load = os.getloadavg()
    idle = statistics.median(results["idle"])
    print(f"cores: {cores}; load average at the end {load[0]:.1f} (1 min) {load[2]:.1f} (15 min)")
    print(f"first correction token ({args.max_new_tokens} new tokens asked), median of {args.repeats} per "
          f"condition, conditions rotated within each round:")
    print(f"  idle (both jobs paused)           {idle:.3f} s   runs: {', '.join(f'{x:.2f}' for x in results['idle'])}")
    for label in ("bounded", "unbounded"):
        m = statistics.median(results[label])
        print(f"  while training, {label:<9} ({threads[label]} thr) {m:.3f} s  ({m / idle:.2f}x idle; job advanced "
              f"{steps[label]} steps while measured)   runs: {', '.join(f'{x:.2f}' for x in results[label])}")


if __name__ == "__main__":
    main()
