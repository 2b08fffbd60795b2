"""Iteration-level scheduling: one loop per model, requests join and leave the batch at every step.

:class:`StepScheduler` owns a :class:`~.generator.LocalGenerator` and a thread running one loop.
Each turn of the loop

1. takes newly submitted jobs, and drops the rows of jobs whose client has gone
   (``job.cancelled``) — running, prefilling or waiting;
2. starts the prefill of waiting jobs while fewer than ``batch_size`` rows are in flight;
3. prefills at most ``prefill_chunk`` prompt tokens (over the jobs being prefilled, oldest
   first); a job whose prompt is complete samples its first token and joins the batch;
4. runs one decoding step for every running row; a row that ends (EOS, its ``max_new_tokens``,
   cancelled) leaves before the next step.

So a request joins the running batch at the next step, and the running rows stall for at most
one prefill chunk while it is read. Every job has its own settings (greedy rows and sampled
rows, different lengths, drafts and corrections share one batch).

Greedy rows do not depend on their batch: a row's prompt is prefilled alone (its shared prefix —
the aligner's instruction and objectives — from the generator's prefix cache), in chunks that
depend on the prompt only, and each decoding step reads only the row's own cache columns (the
batch is right-aligned and masked). Sampled rows have their own random generator (seeded per
request when a seed is given).

Per decoding step the host waits for the device once (the new tokens); masks and positions are
computed on the device from each row's start column.
"""
from __future__ import annotations

import logging
import threading
from collections import deque

from . import attention
from .cache import all_buffered, new_cache
from .sampling import LogitsPipeline

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 256  # prompt tokens prefilled between two decoding steps
GROW = 256  # cache columns added when the batch buffer is full


class ShuttingDown(RuntimeError):
    """Emitted to every unfinished job when the scheduler stops."""


class _Row:
    __slots__ = ("job", "prompt", "done", "cache", "used", "count", "last", "pick", "seen", "start", "greedy")

    def __init__(self, job, device):
        self.job = job
        self.prompt = list(job.ids)
        self.done = 0  # prompt tokens whose keys and values are computed
        self.cache = None  # the row's own cache while it is prefilled
        self.used = 0  # cache columns the row uses (prompt + fed tokens)
        self.count = 0  # tokens generated
        self.last = None  # the token to feed at the next step
        s = job.sampling
        self.greedy = s.temperature <= 0 and s.repetition_penalty == 1.0
        self.pick = None if self.greedy else LogitsPipeline(s, device)
        self.seen = list(self.prompt) if (self.pick is not None and self.pick.needs_history) else None


class StepScheduler:
    """One decoding loop for a :class:`LocalGenerator`; jobs from any thread via :meth:`submit`.

    A job has ``ids`` (the prompt's token ids), ``prefix_len`` (leading tokens shareable between
    prompts: their keys and values come from the generator's prefix cache), ``sampling``
    (:class:`~metaaligner_core.settings.GenerationSettings`), ``emit(kind, value)`` and
    ``cancelled`` (a ``threading.Event``). ``emit`` receives ``("token", id)`` per new token
    (end-of-sequence tokens included), then ``("done", "stop" | "length")``, or ``("error",
    exception)`` — from the scheduler's thread.

    ``stats``: ``steps`` (decoding steps run), ``decoded_rows`` (row-steps decoded, prefill's
    first tokens included), ``prefill_tokens``, ``joined``, ``cancelled``. ``batches``: rows of
    the most recent decoding steps.
    """

    def __init__(self, generator, *, batch_size: int = 16, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 name: str = "scheduler"):
        if not all_buffered(new_cache(generator.model.config)):
            raise ValueError("this model's cache layers are not all full attention; use the batch-at-a-time Batcher")
        self.generator = generator
        self.batch_size = max(1, int(batch_size))
        self.prefill_chunk = max(1, int(prefill_chunk))
        self.stats = {"steps": 0, "decoded_rows": 0, "prefill_tokens": 0, "joined": 0, "cancelled": 0}
        self.batches: deque[int] = deque(maxlen=100_000)
        self._incoming: list = []
        self._cond = threading.Condition()
        self._stopping: Exception | None = None
        self._waiting: deque[_Row] = deque()
        self._prefilling: list[_Row] = []
        self._running: list[_Row] = []  # in batch order: columns used, most first
        self._cache = None
        self._T = 0  # batch cache columns in use
        self._start = None  # device tensor: each running row's first column
        self._next = None  # device tensor of the tokens to feed, when the rows have not changed
        self._plan, self._plan_at = None, 0
        self._prev_order: list[_Row] = []
        self._ended: list[_Row] = []  # rows that ended at the last step (they leave at the next turn)
        self.idle = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"metaaligner-{name}", daemon=True)
        self._thread.start()

    # -- the outside -----------------------------------------------------------------------------
    def submit(self, job):
        if len(job.ids) <= job.prefix_len:
            raise ValueError("prompt shorter than its prefix")
        with self._cond:
            if self._stopping is not None:
                raise ShuttingDown("the server is shutting down")
            self._incoming.append(job)
            self.idle.clear()
            self._cond.notify()
        return job

    def stop(self, reason: str = "the server is shutting down", timeout: float = 30.0) -> None:
        """Stop the loop: unfinished jobs get ``("error", ShuttingDown(reason))`` within one step."""
        with self._cond:
            if self._stopping is None:
                self._stopping = ShuttingDown(reason)
            self._cond.notify()
        self._thread.join(timeout=timeout)

    @property
    def in_flight(self) -> int:
        return len(self._running) + len(self._prefilling)

    # -- the loop --------------------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._incoming and self._stopping is None and not self._busy():
                        self.idle.set()
                        self._cond.wait()
                    new, self._incoming = self._incoming, []
                    stopping = self._stopping
                self._waiting.extend(_Row(j, self.generator.device) for j in new)
                if stopping is not None:
                    self._fail_all(stopping)
                    self.idle.set()
                    return
                try:
                    self._turn()
                except Exception as e:  # a model failure fails the rows in flight, not the loop
                    log.exception("decoding step failed (%d rows)", self.in_flight)
                    for r in self._running + self._prefilling:
                        r.job.emit("error", e)
                    self._running, self._prefilling = [], []
                    self._reset_batch()

    def _busy(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running)

    def _fail_all(self, error: Exception) -> None:
        for r in [*self._running, *self._prefilling, *self._waiting]:
            if not r.job.cancelled.is_set():
                r.job.emit("error", error)
        self._running, self._prefilling = [], []
        self._waiting.clear()
        self._reset_batch()

    def _reset_batch(self) -> None:
        self._cache, self._T, self._start, self._next = None, 0, None, None
        self._prev_order, self._ended = [], []

    def _turn(self) -> None:
        # 1. clients that went away: their rows leave now
        cancelled = [r for r in self._running if r.job.cancelled.is_set() and r not in self._ended]
        gone = self._ended + cancelled
        self._ended = []
        self.stats["cancelled"] += len(cancelled) + sum(r.job.cancelled.is_set() for r in self._prefilling) \
            + sum(r.job.cancelled.is_set() for r in self._waiting)
        self._prefilling = [r for r in self._prefilling if not r.job.cancelled.is_set()]
        self._waiting = deque(r for r in self._waiting if not r.job.cancelled.is_set())
        # 2. admit waiting jobs while there is room
        while self._waiting and self.in_flight - len(gone) < self.batch_size:
            self._prefilling.append(self._waiting.popleft())
        # 3. one chunk of prefill; complete rows join
        joined = self._prefill_chunk()
        if gone or joined:
            self._relayout([r for r in self._running if r not in gone], joined)
        # 4. one decoding step
        if self._running:
            self._step()

    # -- prefill ---------------------------------------------------------------------------------
    def _prefill_chunk(self) -> list[_Row]:
        import torch

        gen = self.generator
        budget, joined = self.prefill_chunk, []
        for row in list(self._prefilling):
            if budget <= 0:
                break
            P = row.job.prefix_len
            if row.cache is None:
                row.cache = new_cache(gen.model.config, reserve=len(row.prompt))
                row.done = 0
                if P:
                    for layer, (k, v) in zip(row.cache.layers, gen._prefix_cache(tuple(row.prompt[:P]))):
                        layer.allocate(k, v, 1, len(row.prompt))
                        layer.write(slice(None), 0, k, v)
                        layer.set_length(P)
                    row.done = P
            a = row.done
            b = min(len(row.prompt), a + budget)
            ids = torch.tensor([row.prompt[a:b]], dtype=torch.long, device=gen.device)
            pos = torch.arange(a, b, dtype=torch.long, device=gen.device)[None]
            out = gen.model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1,
                            **gen._cache_kw(row.cache))
            budget -= b - a
            row.done = b
            self.stats["prefill_tokens"] += b - a
            if b < len(row.prompt):
                continue
            self._prefilling.remove(row)
            row.used = len(row.prompt)
            token = int(self._pick_rows(out.logits[:, -1, :], [row])[0])
            if self._emit(row, token):
                joined.append(row)
                self.stats["joined"] += 1
        return joined

    # -- the batch cache ---------------------------------------------------------------------------
    def _relayout(self, kept: list[_Row], joined: list[_Row]) -> None:
        """Rebuild the batch: ``kept`` running rows (in their batch order) and ``joined`` new
        rows, sorted by columns used (most first), right-aligned at the widest row."""
        import torch

        gen = self.generator
        dev = gen.device
        order = sorted(kept + joined, key=lambda r: -r.used)
        self._running = order
        self._next = None
        if not order:
            self._reset_batch()
            return
        old_T = self._T
        W = max(r.used for r in order)
        old_slot = {id(r): i for i, r in enumerate(self._prev_order)} if self._cache is not None else {}
        moved = [(i, old_slot[id(r)]) for i, r in enumerate(order) if id(r) in old_slot]
        same = W == old_T and all(d == s for d, s in moved)  # kept rows stay where they are
        if self._cache is None:
            self._cache = new_cache(gen.model.config, reserve=GROW)
        for li, layer in enumerate(self._cache.layers):
            if layer._k is None or layer._k.shape[-2] < W + 1:  # (re)allocate: room for W + GROW columns
                like = joined[0].cache.layers[li] if joined else None
                old_k, old_v = layer._k, layer._v
                k0 = old_k if like is None else like.keys
                v0 = old_v if like is None else like.values
                layer.allocate(k0, v0, self.batch_size, W + GROW)
                src_k, src_v = old_k, old_v
            else:
                src_k, src_v = layer._k, layer._v
            if moved and not (same and src_k is layer._k):
                dst = torch.tensor([d for d, _ in moved], dtype=torch.long, device=dev)
                src = torch.tensor([s for _, s in moved], dtype=torch.long, device=dev)
                w = min(old_T, W)
                k = src_k[src, :, old_T - w:old_T]  # a copy (advanced indexing): safe to write back in place
                v = src_v[src, :, old_T - w:old_T]
                layer._k[dst, :, W - w:W] = k
                layer._v[dst, :, W - w:W] = v
            for i, r in enumerate(order):
                if r.cache is not None:  # joined: its own prefill cache
                    src_layer = r.cache.layers[li]
                    layer._k[i, :, W - r.used:W] = src_layer.keys[0]
                    layer._v[i, :, W - r.used:W] = src_layer.values[0]
            layer.set_rows(len(order))
            layer.set_length(W)
        for r in joined:
            r.cache = None
        self._T = W
        self._prev_order = list(order)
        self._start = torch.tensor([W - r.used for r in order], dtype=torch.long, device=dev)
        self._plan = None

    # -- decoding ----------------------------------------------------------------------------------
    def _step(self) -> None:
        import torch

        gen = self.generator
        dev = gen.device
        rows = self._running
        n, T = len(rows), self._T
        cache = self._cache
        for layer in cache.layers:
            layer.set_rows(n)
            layer.set_length(T)
        ids = self._next if self._next is not None else torch.tensor([r.last for r in rows], dtype=torch.long,
                                                                      device=dev)
        cols = torch.arange(T + 1, device=dev)
        mask = (cols[None, :] >= self._start[:, None])[:, None, None, :]
        positions = (T - self._start)[:, None]
        if gen.chunked and n > 1:
            if self._plan is None:
                self._plan, self._plan_at = attention.chunk_plan([r.used + 1 for r in rows]), T
            shift = T - self._plan_at
            attention.PLAN.chunks = [(a, b, w + shift) for a, b, w in self._plan] if len(self._plan) > 1 else None
        try:
            out = gen.model(input_ids=ids[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                            **gen._cache_kw(cache))
        finally:
            attention.PLAN.chunks = None
        self._T = T + 1
        for r in rows:
            r.used += 1
        nxt = self._pick_rows(out.logits[:, -1, :], rows)
        tokens = nxt.tolist()  # the step's one wait for the device
        self.stats["steps"] += 1
        self.batches.append(n)
        self._ended = [r for r, t in zip(rows, tokens) if not self._emit(r, t)]
        self._next = None if self._ended else nxt

    def _pick_rows(self, logits, rows: list[_Row]):
        """Next token per row: one argmax for the greedy rows, each sampled row its own pipeline."""
        nxt = logits.argmax(-1)
        for i, r in enumerate(rows):
            if not r.greedy:
                nxt[i] = r.pick(logits[i:i + 1], [r.seen] if r.seen is not None else None)[0]
        return nxt

    def _emit(self, row: _Row, token: int) -> bool:
        """Hand ``token`` to the row's job; False when the row has ended (or its client has gone)."""
        row.count += 1
        row.last = token
        self.stats["decoded_rows"] += 1
        if row.seen is not None:
            row.seen.append(token)
        job = row.job
        if job.cancelled.is_set():
            return False
        job.emit("token", token)
        if job.cancelled.is_set():  # gone while the token was handed over
            return False
        if token in self.generator.eos_ids:
            job.emit("done", "stop")
            return False
        if row.count >= job.sampling.max_new_tokens or row.used >= self.generator.max_length:
            job.emit("done", "length")
            return False
        return True
