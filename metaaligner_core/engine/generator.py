"""The decoding loop: batched, streamed and continuously batched generation from token ids.

:class:`LocalGenerator` turns token-id prompts into token-id continuations. It is shared by the
aligner (raw template prompts, :mod:`metaaligner_core.inference`) and by local chat policies
(:class:`~metaaligner_core.backends.hf.HFChatBackend`, the model's own chat template).

It is a short loop over ``model(...)`` rather than ``model.generate`` (measured on CPU, see
``bench/bench_inference.py`` and ``docs/inference.md``, which also compares it with transformers'
own continuous batching): the KV cache is one buffer per batch (:mod:`.cache`); rows that finish
leave the batch and the next prompts take their places; decode attention is chunked by row width
on CPU (:mod:`.attention`); prompts sharing a prefix (the aligner's instruction + objectives)
reuse its keys and values; one loop serves ``generate`` and ``stream``. Temperature, top-p and
the repetition penalty are transformers' own logits processors (:mod:`.sampling`).

Batches are formed from prompts sorted by length, padded on the left, with position ids counted
from each row's first real token, so a row's tokens do not depend on its batch under greedy
decoding (checked by ``tests/test_inference.py`` and ``tests/test_inference_engine.py``).
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from ..errors import MetaAlignerError
from ..settings import GenerationSettings
from . import attention
from .cache import all_buffered, new_cache
from .detokenize import IncrementalText
from .sampling import LogitsPipeline
from .stops import tail_check

log = logging.getLogger(__name__)

def _steps_in_inference_mode(steps):
    """Run each step of a decoding generator under ``torch.inference_mode()``.

    Inference mode is per thread, and a streamed generator may be resumed by another thread at
    every step (Gradio hands each ``next()`` to a worker pool): a ``with`` block around the whole
    loop would leave later steps outside inference mode, where writing into the cache buffers (made
    in inference mode) raises. So the mode is entered for each step, in whichever thread runs it."""
    import functools

    @functools.wraps(steps)
    def run(*args, **kwargs):
        import torch

        gen = steps(*args, **kwargs)
        try:
            while True:
                with torch.inference_mode():
                    try:
                        item = next(gen)
                    except StopIteration:
                        return
                yield item
        finally:
            with torch.inference_mode():
                gen.close()

    return run


@dataclass
class StreamJob:
    """A :class:`~.scheduler.StepScheduler` job of :meth:`LocalGenerator.stream`."""

    ids: list[int]
    prefix_len: int
    sampling: GenerationSettings
    emit: Callable[[str, object], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


class LocalGenerator:
    """A loaded causal LM and its tokenizer, generating from token ids.

    ``max_length`` is the context (prompt + new tokens): the model's ``max_position_embeddings``
    unless a smaller one is given.
    """

    PREFIX_CACHE_SIZE = 8  # distinct shared prefixes (instruction + objectives) kept as KV tensors

    def __init__(self, model, tokenizer, name: str, max_length: int | None = None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        ctx = getattr(model.config, "max_position_embeddings", None) or 4096
        self.max_length = min(ctx, max_length) if max_length else ctx
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if isinstance(eos, (list, tuple)) else [eos]
        self.eos_ids = {int(e) for e in [*eos, tokenizer.eos_token_id] if e is not None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids or {0})
        self._prefix_kv: OrderedDict[tuple[int, ...], list] = OrderedDict()
        # Running totals over this generator's life (benchmarks and usage reports read them).
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0}
        # Prefill prompts one at a time (CPU: no padding waste) or as one padded batch (accelerators).
        self.row_prefill = model.device.type == "cpu"
        self.chunked = attention.use_chunked_attention(model)
        self._lock = threading.Lock()
        self._cache_name: str | None = None
        # The StepScheduler that decodes this model's streamed rows (set by whoever owns one:
        # the server, the app); None: each stream decodes alone.
        self.scheduler = None

    @classmethod
    def load(cls, spec: str = "default", *, device=None, dtype=None, attn=None,
             max_length: int | None = None) -> "LocalGenerator":
        from ..models import display_name, load_causal_lm

        model, tok = load_causal_lm(spec, device=device, dtype=dtype, attn=attn, padding_side="left")
        return cls(model, tok, display_name(spec), max_length=max_length)

    @property
    def device(self):
        return self.model.device

    def _cache_kw(self, cache) -> dict:
        """The cache argument under the name this model's ``forward`` takes: ``cache`` in
        transformers >= 5.24 (``past_key_values`` is deprecated there), ``past_key_values`` before."""
        if self._cache_name is None:
            import inspect

            params = inspect.signature(self.model.forward).parameters
            self._cache_name = "cache" if "cache" in params else "past_key_values"
        return {self._cache_name: cache}

    # -- text ------------------------------------------------------------------------------
    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- generation ------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: GenerationSettings, *, batch_size: int = 16,
                 progress=False, desc: str = "generating", prefix_lens: list[int] | None = None,
                 stops: Sequence[Sequence[str]] | None = None) -> list[list[int]]:
        """Continuations of ``prompts`` (lists of token ids), in input order.

        Prompts are grouped by their shared prefix (``prefix_lens[i]`` leading tokens of prompt
        i, e.g. the aligner's instruction and objectives: computed once, reused by every row),
        sorted by length within a group (longest first, so an out-of-memory error shows at
        once), generated with at most ``batch_size`` rows in flight (a finished row's place is
        given to the next prompt) and put back in order. ``progress``: True for a progress bar,
        or an existing tqdm bar to advance by one per finished row. ``stops[i]``: texts that end
        prompt i's row once its output contains one (the ids returned still hold it; see
        :mod:`.stops`).
        """
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise MetaAlignerError(f"batch size must be at least 1 (got {batch_size})")
        prefix_lens = prefix_lens or [0] * len(prompts)
        prefixes = [tuple(p[:k]) for p, k in zip(prompts, prefix_lens)]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])):
            groups.setdefault(prefixes[i], []).append(i)
        out: list[list[int] | None] = [None] * len(prompts)
        if hasattr(progress, "update"):
            bar, own = progress, False
        else:
            bar, own = tqdm(total=len(prompts), desc=desc, unit="row", disable=not progress, leave=False), True
        try:
            for prefix, order in groups.items():
                rows: dict[int, list[int]] = {i: [] for i in order}
                steps = self.decode_steps([prompts[i] for i in order], sampling, len(prefix), batch_size,
                                          stops=[stops[i] for i in order] if stops else None)
                for alive, tokens, finished in steps:
                    for r, t in zip(alive, tokens):
                        rows[order[r]].append(t)
                    bar.update(len(finished))
                for i, r in rows.items():
                    out[i] = [t for t in r if t not in self.eos_ids]
                    self.stats["prompt_tokens"] += len(prompts[i])
                    self.stats["generated_tokens"] += len(out[i])
        finally:
            if own:
                bar.close()
        return out  # type: ignore[return-value]

    def stream(self, prompt: list[int], sampling: GenerationSettings, prefix_len: int = 0) -> Iterator[str]:
        """Text deltas of one continuation; joined, they equal ``decode(generate([prompt])[0])``.

        With a :attr:`scheduler` attached (the app's and the server's models), the row is decoded
        in the scheduler's shared batch, joining it at the next step; closing the iterator
        cancels the row, which leaves the batch at the next step. Without one, the row is
        decoded alone here. The text is detokenised incrementally (:class:`IncrementalText`)."""
        if self.scheduler is not None:
            yield from self._scheduled_stream(prompt, sampling, prefix_len)
            return
        text = IncrementalText(self.tokenizer, self.eos_ids)
        for _, tokens, _ in self.decode_steps([prompt], sampling, prefix_len):
            d = text.add(tokens[0])
            if d:
                yield d
        d = text.finish()
        if d:
            yield d

    def _scheduled_stream(self, prompt: list[int], sampling: GenerationSettings, prefix_len: int) -> Iterator[str]:
        import queue

        from .scheduler import ShuttingDown

        items: queue.SimpleQueue = queue.SimpleQueue()
        job = StreamJob(list(prompt), max(0, min(prefix_len, len(prompt) - 1)), sampling,
                        lambda kind, value: items.put((kind, value)))
        text = IncrementalText(self.tokenizer, self.eos_ids)
        try:
            try:
                self.scheduler.submit(job)
            except ShuttingDown as e:
                raise MetaAlignerError(f"{self.name}: {e}") from None
            while True:
                kind, value = items.get()
                new = [value] if kind == "token" else []
                while kind == "token" and not items.empty():  # everything the loop produced meanwhile
                    kind, value = items.get()
                    if kind == "token":
                        new.append(value)
                d = text.add(*new)
                if kind == "done":
                    d += text.finish()
                if d:
                    yield d
                if kind == "done":
                    return
                if kind == "error":
                    if isinstance(value, ShuttingDown):
                        raise MetaAlignerError(f"{self.name}: {value}")
                    raise MetaAlignerError(f"{self.name}: generation failed ({type(value).__name__})")
        finally:
            job.cancelled.set()  # a reader that stopped (closed, cancelled, gone) frees its row

    def _prefix_cache(self, prefix: tuple[int, ...]):
        """Per-layer ``(keys, values)`` of a prefix, computed once (batch 1) and kept (LRU)."""
        import torch

        with self._lock:
            if prefix in self._prefix_kv:
                self._prefix_kv.move_to_end(prefix)
                return self._prefix_kv[prefix]
        cache = new_cache(self.model.config)
        ids = torch.tensor([prefix], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **self._cache_kw(cache))
        kv = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        with self._lock:
            self._prefix_kv[prefix] = kv
            while len(self._prefix_kv) > self.PREFIX_CACHE_SIZE:
                self._prefix_kv.popitem(last=False)
        return kv

    def _prefill(self, prompts: list[list[int]], prefix_len: int):
        """Keys/values of each prompt after the shared prefix, and each prompt's next-token logits.

        Returns ``(kv, logits)``: ``kv[layer][row] = (keys, values)`` of shape
        ``[1, heads, len(prompt) - prefix_len, dim]``. On a CPU each prompt is prefilled alone:
        prefill is bound by arithmetic there, a batch computes no faster per token than one row,
        and padding would be pure waste; each row's prefill is also then exactly what a batch of
        one computes. Accelerators run one padded forward pass.
        """
        import torch

        dev, n = self.device, len(prompts)
        prefix_kv = self._prefix_cache(tuple(prompts[0][:prefix_len])) if prefix_len else None
        groups = [[r] for r in range(n)] if self.row_prefill else [list(range(n))]
        kv: list[list] = []
        logits = [None] * n
        for group in groups:
            rests = [prompts[r][prefix_len:] for r in group]
            width = max(len(x) for x in rests)
            ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(group), prefix_len + width), dtype=torch.long)
            mask[:, :prefix_len] = 1
            for j, rest in enumerate(rests):
                ids[j, width - len(rest):] = torch.tensor(rest, dtype=torch.long)
                mask[j, prefix_len + width - len(rest):] = 1
            cache = new_cache(self.model.config)
            if prefix_kv:
                for layer, (k, v) in zip(cache.layers, prefix_kv):
                    layer.allocate(k, v, len(group), prefix_len + width)
                    layer.write(slice(None), 0, k.expand(len(group), -1, -1, -1), v.expand(len(group), -1, -1, -1))
                    layer.set_length(prefix_len)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, prefix_len:]
            padded = bool((mask == 0).any())
            out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev) if padded else None,
                             position_ids=positions.to(dev), use_cache=True, logits_to_keep=1,
                             **self._cache_kw(cache))
            if not kv:
                kv = [[None] * n for _ in cache.layers]
            for li, layer in enumerate(cache.layers):
                for j, r in enumerate(group):
                    cut = prefix_len + width - len(rests[j])
                    kv[li][r] = (layer.keys[j:j + 1, :, cut:], layer.values[j:j + 1, :, cut:])
            for j, r in enumerate(group):
                logits[r] = out.logits[j, -1]
        return kv, torch.stack(logits)

    @_steps_in_inference_mode
    def decode_steps(self, prompts: list[list[int]], sampling: GenerationSettings, prefix_len: int = 0,
                     batch_size: int | None = None, stops: Sequence[Sequence[str]] | None = None,
                     ) -> Iterator[tuple[list[int], list[int], list[int]]]:
        """The decoding loop over ``prompts`` (longest first), at most ``batch_size`` in flight.

        Yields ``(prompt indices, their new tokens, prompt indices that just finished)`` per
        step. A row finishes with an EOS token (yielded), after ``max_new_tokens`` tokens, or once
        its output contains one of ``stops[i]`` (its texts for prompt i, if given).
        When a quarter of the rows in flight have finished, they leave the cache and the next
        prompts take their places (continuous batching), so the batch stays full.

        Cache layout: each row's prefix, prompt and output sit right-aligned, left of them is
        masked. With chunked attention (CPU) rows are kept sorted by the columns they use, longest
        first, and each decoding step attends in a few runs of rows of similar width.
        """
        import torch

        if not prompts:
            return
        if any(len(p) <= prefix_len for p in prompts):
            raise MetaAlignerError("cannot generate from an empty prompt")
        batch_size = batch_size or len(prompts)
        cache = new_cache(self.model.config, reserve=sampling.max_new_tokens)
        if not all_buffered(cache):  # e.g. sliding-window layers: transformers' own cache, batch by batch
            for start in range(0, len(prompts), batch_size):
                part = stops[start:start + batch_size] if stops else None
                for ids, tokens, done in self._decode_plain(prompts[start:start + batch_size], sampling, part):
                    yield [start + i for i in ids], tokens, [start + i for i in done]
            return
        dev, P = self.device, prefix_len
        prefix_kv = self._prefix_cache(tuple(prompts[0][:P])) if P else None  # all prompts share it
        pick = LogitsPipeline(sampling, dev)
        queue = list(range(len(prompts)))
        queue.reverse()  # pop() takes the next prompt
        rows: list[int] = []  # prompt index of each cache row
        count: dict[int, int] = {}  # tokens generated per prompt
        finished: set[int] = set()
        seen: dict[int, list[int]] = {}  # prompt + output, for the repetition penalty
        stopped = tail_check(self.tokenizer, stops)
        outs: dict[int, list[int]] = {}  # each row's output, when stops are checked
        mask = torch.zeros((0, 0), dtype=torch.long, device=dev)
        logits = None
        T = 0  # columns in use
        plan, plan_at, plan_rows = [], 0, None  # chunked attention: its runs, T and rows when made
        while True:
            live = [i for i in rows if i not in finished]
            if queue and (not live or len(live) <= batch_size - max(1, batch_size // 4)):
                # Compact: finished rows leave, the next prompts take their places, and the
                # buffer shrinks to the widest live row.
                keep = [k for k, i in enumerate(rows) if i not in finished]
                new = [queue.pop() for _ in range(min(batch_size - len(keep), len(queue)))]
                kv, new_logits = self._prefill([prompts[i] for i in new], P)
                used = [T - int(mask[k].argmax()) for k in keep]  # columns each kept row uses
                width = max(used + [len(prompts[i]) for i in new])
                keep_w = min(T, width)
                keep_t = torch.tensor(keep, dtype=torch.long, device=dev)
                if keep:
                    cache.batch_select_indices(keep_t)
                for li, layer in enumerate(cache.layers):
                    if layer._k is None:
                        k0, v0 = kv[li][0]
                        layer.allocate(k0, v0, batch_size, width + sampling.max_new_tokens)
                        layer.set_rows(0)
                    if keep and width != T:
                        layer.move_columns(T - keep_w, T, width - keep_w)
                    for j, i in enumerate(new):
                        r = len(keep) + j
                        k, v = kv[li][j]
                        if P:
                            pk, pv = prefix_kv[li]
                            layer.write(r, width - len(prompts[i]), pk, pv)
                        layer.write(r, width - k.shape[-2], k, v)
                    layer.set_rows(len(keep) + len(new))
                    layer.set_length(width)
                new_mask = torch.zeros((len(keep) + len(new), width), dtype=torch.long, device=dev)
                if keep:
                    new_mask[:len(keep), width - keep_w:] = mask[keep_t, T - keep_w:]
                for j, i in enumerate(new):
                    new_mask[len(keep) + j, width - len(prompts[i]):] = 1
                mask, T = new_mask, width
                logits = new_logits if not keep else torch.cat([logits[keep_t], new_logits.to(logits.dtype)])
                rows = [rows[k] for k in keep] + new
                if self.chunked:  # rows by columns used, longest first (kept in order as all grow)
                    used = (T - mask.argmax(-1)).tolist()
                    perm = sorted(range(len(rows)), key=lambda r: -used[r])
                    if perm != list(range(len(rows))):
                        perm_t = torch.tensor(perm, dtype=torch.long, device=dev)
                        cache.batch_select_indices(perm_t)
                        mask, logits = mask[perm_t], logits[perm_t]
                        rows = [rows[r] for r in perm]
                for i in new:
                    count[i] = 0
                    outs[i] = []
                    if pick.needs_history:
                        seen[i] = list(prompts[i])
            if not rows:
                return
            nxt = pick(logits, [seen[i] for i in rows] if pick.needs_history else None)
            tokens = nxt.tolist()
            emit = [(i, t) for i, t in zip(rows, tokens) if i not in finished]
            done_now = []
            for i, t in emit:
                count[i] += 1
                if pick.needs_history:
                    seen[i].append(t)
                if stopped is not None:
                    outs[i].append(t)
                if (t in self.eos_ids or count[i] >= sampling.max_new_tokens
                        or (stopped is not None and stopped(i, outs[i]))):
                    finished.add(i)
                    done_now.append(i)
            yield [i for i, _ in emit], [t for _, t in emit], done_now
            live = [i for i in rows if i not in finished]
            if not live:
                if not queue:
                    return
                continue  # everything in flight finished: the next prompts take over
            if not queue and 4 * (len(rows) - len(live)) >= len(rows):
                keep = [k for k, i in enumerate(rows) if i not in finished]
                keep_t = torch.tensor(keep, dtype=torch.long, device=dev)
                cache.batch_select_indices(keep_t)
                rows = [rows[k] for k in keep]
                nxt, mask = nxt[keep_t], mask[keep_t]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            T += 1
            positions = mask.sum(-1, keepdim=True) - 1
            if self.chunked and mask.shape[0] > 1:
                # Every row grows by one column a step, so a plan holds until the rows change.
                if plan_rows != rows:
                    plan, plan_at, plan_rows = attention.chunk_plan((positions[:, 0] + 1).tolist()), T, list(rows)
                shift = T - plan_at
                attention.PLAN.chunks = [(a, b, w + shift) for a, b, w in plan] if len(plan) > 1 else None
            try:
                # A 4-D boolean mask is used as given: transformers' own mask building would ask
                # the device whether every row is unpadded (a second host wait per step).
                out = self.model(input_ids=nxt[:, None], attention_mask=mask.bool()[:, None, None, :],
                                 position_ids=positions, use_cache=True, **self._cache_kw(cache))
            finally:
                attention.PLAN.chunks = None
            logits = out.logits[:, -1, :]

    _decode_steps = decode_steps  # the name metaaligner_core.serve used first

    @_steps_in_inference_mode
    def _decode_plain(self, prompts: list[list[int]], sampling: GenerationSettings,
                      stops: Sequence[Sequence[str]] | None = None):
        """One padded batch through transformers' own cache (models whose layers are not all full attention)."""
        import torch

        dev, n = self.device, len(prompts)
        width = max(len(p) for p in prompts)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        pick = LogitsPipeline(sampling, dev)
        seen = [list(p) for p in prompts]
        outs: list[list[int]] = [[] for _ in prompts]
        stopped = tail_check(self.tokenizer, stops)
        finished = [False] * n
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         use_cache=True, logits_to_keep=1, **self._cache_kw(cache))
        for step in range(sampling.max_new_tokens):
            nxt = pick(out.logits[:, -1, :], seen if pick.needs_history else None)
            emit = [(r, t) for r, t in enumerate(nxt.tolist()) if not finished[r]]
            done_now = []
            for r, t in emit:
                seen[r].append(t)
                outs[r].append(t)
                if (t in self.eos_ids or step == sampling.max_new_tokens - 1
                        or (stopped is not None and stopped(r, outs[r]))):
                    finished[r] = True
                    done_now.append(r)
            yield [r for r, _ in emit], [t for _, t in emit], done_now
            if all(finished):
                return
            mask = torch.cat([mask, mask.new_ones((n, 1))], dim=-1)
            out = self.model(input_ids=nxt[:, None], attention_mask=mask,
                             position_ids=mask.sum(-1, keepdim=True) - 1, use_cache=True,
                             **self._cache_kw(cache))
