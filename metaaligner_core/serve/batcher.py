"""Jobs, and the batch-at-a-time scheduler.

A :class:`Job` is one prompt to continue, submitted by a request. The server schedules jobs with
:class:`~metaaligner_core.engine.scheduler.StepScheduler` (a job joins the running batch at the
next decoding step). :class:`Batcher` is the earlier, batch-at-a-time scheduler, kept for models
whose cache layers the step scheduler cannot hold (sliding-window attention) and as the baseline
of ``bench/bench_serve.py``: one thread per model takes every pending job that can share a batch
(same settings) and runs them through the engine's loop
(:meth:`~metaaligner_core.engine.generator.LocalGenerator.decode_steps`) in one call, at most
``batch_size`` rows in flight; jobs that arrive while a batch is running wait for it to end.

Under greedy decoding a row's tokens do not depend on the other rows of its batch (the engine
guarantees this), so a request gets the same answer whether it was batched or alone.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One prompt to continue. ``emit(kind, value)`` receives ``("token", id)`` for each new
    token, then ``("done", reason)`` with reason ``"stop"`` (end of sequence) or ``"length"``,
    or ``("error", exception)``. ``emit`` is called from the batcher's thread."""

    ids: list[int]
    prefix_len: int
    sampling: object  # settings.GenerationSettings
    emit: Callable[[str, object], None]
    group: str = ""  # jobs batch only within a group (drafts apart from corrections: different prefixes)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)

    def key(self) -> tuple:
        s = self.sampling
        return (self.group, s.max_new_tokens, s.temperature, s.top_p, s.repetition_penalty, s.seed)


def common_prefix_len(jobs: list[Job]) -> int:
    """Leading tokens every job's prompt shares within its own shareable prefix (the aligner's
    instruction and objectives): computed once by the engine for the whole batch."""
    n = min(j.prefix_len for j in jobs)
    first = jobs[0].ids
    for j in jobs[1:]:
        k = 0
        for a, b in zip(first[:n], j.ids[:n]):
            if a != b:
                break
            k += 1
        n = k
    return n


class Batcher:
    """A thread that batches the jobs of one :class:`LocalGenerator`.

    ``window``: once a job arrives on an idle batcher, it waits until ``window`` seconds pass
    without another (at most ``max_wait``), so clients that fire together land in one batch.
    ``batch_size``: rows decoded at once.
    """

    def __init__(self, generator, *, batch_size: int = 16, window: float = 0.02, max_wait: float = 0.25,
                 name: str = "batcher"):
        self.generator = generator
        self.batch_size = max(1, int(batch_size))
        self.window, self.max_wait = window, max_wait
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._stopped = False
        self.batches: list[int] = []  # rows per engine call, most recent last (tests, benchmarks)
        self._thread = threading.Thread(target=self._run, name=f"metaaligner-{name}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        if len(job.ids) <= job.prefix_len:
            raise ValueError("prompt shorter than its prefix")
        with self._cond:
            if self._stopped:
                raise RuntimeError("the batcher is stopped")
            self._pending.append(job)
            self._cond.notify()
        return job

    def stop(self, reason: str = "the server is shutting down", timeout: float = 30.0) -> None:
        """Stop: the batch in flight ends at its next step, every unfinished job gets an error."""
        from ..engine.scheduler import ShuttingDown

        with self._cond:
            self._stopped = ShuttingDown(reason)
            self._cond.notify()
        self._thread.join(timeout=timeout)

    def _take(self) -> list[Job]:
        """Wait for jobs and for the burst they belong to (until ``window`` passes without a new
        one, at most ``max_wait``); return the oldest job's batch (the pending jobs with its settings)."""
        with self._cond:
            while not self._pending and not self._stopped:
                self._cond.wait()
            deadline = time.monotonic() + self.max_wait
            seen = 0
            while (not self._stopped and len(self._pending) != seen and len(self._pending) < self.batch_size
                   and time.monotonic() < deadline):
                seen = len(self._pending)
                self._cond.wait(timeout=self.window)
            if self._stopped:
                return []
            live = [j for j in self._pending if not j.cancelled.is_set()]
            if not live:
                self._pending.clear()
                return []
            key = live[0].key()
            batch = [j for j in live if j.key() == key]
            self._pending = [j for j in live if j.key() != key]
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if self._stopped:
                for j in batch + self._pending:
                    j.emit("error", self._stopped)
                return
            if batch:
                self._decode(batch)

    def _decode(self, jobs: list[Job]) -> None:
        gen = self.generator
        sampling = jobs[0].sampling
        self.batches.append(len(jobs))
        last = [None] * len(jobs)
        done = [False] * len(jobs)
        steps = gen.decode_steps([j.ids for j in jobs], sampling, common_prefix_len(jobs), self.batch_size)
        try:
            for rows, tokens, finished in steps:
                if self._stopped:
                    for j, d in zip(jobs, done):
                        if not d:
                            j.emit("error", self._stopped)
                    break
                for r, t in zip(rows, tokens):
                    last[r] = t
                    if not jobs[r].cancelled.is_set():
                        jobs[r].emit("token", t)
                for r in finished:
                    done[r] = True
                    if not jobs[r].cancelled.is_set():
                        jobs[r].emit("done", "stop" if last[r] in gen.eos_ids else "length")
                if all(d or j.cancelled.is_set() for d, j in zip(done, jobs)):
                    break  # every client still waiting has its answer (or has gone)
        except Exception as e:  # a model failure fails this batch's requests, not the server
            log.exception("batch of %d rows failed", len(jobs))
            for j, d in zip(jobs, done):
                if not d:
                    j.emit("error", e)
        finally:
            close = getattr(steps, "close", None)
            if close is not None:
                close()
