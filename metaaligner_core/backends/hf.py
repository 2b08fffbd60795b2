"""Local Hugging Face causal LMs: batched and streamed generation, and the local chat backend.

:class:`LocalGenerator` turns token-id prompts into token-id continuations. It is shared by the
aligner (raw template prompts, :mod:`metaaligner_core.inference`) and by local chat policies
(:class:`HFChatBackend`, the model's own chat template).

Generation is a short decoding loop over ``model(...)`` rather than ``model.generate``, for
three reasons measured on CPU (see ``bench/bench_inference.py``):

* the KV cache is written into a buffer allocated once per batch (:class:`_BufferedLayer`);
  transformers' ``DynamicCache`` concatenates every layer's keys and values on every step,
  which was 70 % of a batch-16 decoding step on two cores;
* rows that reach EOS leave the batch, so a batch costs what its *live* rows cost;
* one loop serves ``generate`` and ``stream``: streamed text is the same tokens, by construction.

Batches are formed from prompts sorted by length (little padding), padded on the left, with
position ids counted from each row's first real token, so a row's tokens do not depend on its
batch under greedy decoding (checked by ``tests/test_inference.py``).
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Iterator

from ..errors import MetaAlignerError
from .base import Completion

log = logging.getLogger(__name__)

from ..settings import DEFAULT_MAX_NEW_TOKENS, GenerationSettings  # noqa: F401  (re-exported)


def _buffered_layer_class():
    from transformers.cache_utils import DynamicLayer

    class _BufferedLayer(DynamicLayer):
        """A ``DynamicLayer`` over one buffer allocated per batch, instead of ``torch.cat`` per step.

        ``keys``/``values`` are views ``[rows, heads, length, dim]`` of the buffer, so the rest
        of transformers (mask sizes, sequence length) works unchanged. Rows can be written one
        at a time (``write``), and dropping finished rows compacts the buffer in place.
        """

        def __init__(self, reserve: int = 0):
            super().__init__()
            self.reserve = reserve
            self._k = self._v = None
            self._rows = self._len = 0

        def allocate(self, like_k, like_v, rows: int, capacity: int) -> None:
            self.lazy_initialization(like_k, like_v)
            # Zeros, not empty: masked (padding) positions must hold finite numbers.
            self._k = like_k.new_zeros((rows, like_k.shape[1], capacity, like_k.shape[-1]))
            self._v = like_v.new_zeros((rows, like_v.shape[1], capacity, like_v.shape[-1]))
            self._rows, self._len = rows, 0
            self._view()

        def _view(self) -> None:
            self.keys = self._k[:self._rows, :, :self._len]
            self.values = self._v[:self._rows, :, :self._len]

        def write(self, rows, start: int, keys, values) -> None:
            """Copy ``keys``/``values`` into buffer rows ``rows`` from column ``start`` on."""
            end = start + keys.shape[-2]
            self._k[rows, :, start:end] = keys
            self._v[rows, :, start:end] = values

        def set_length(self, n: int) -> None:
            self._len = n
            self._view()

        def update(self, key_states, value_states, *args, **kwargs):
            if self._k is None:
                self.allocate(key_states, value_states, key_states.shape[0], key_states.shape[-2] + self.reserve)
            n, m = self._len, self._len + key_states.shape[-2]
            if m > self._k.shape[-2]:  # more tokens than reserved: grow once, with the reserve again
                k, v = self._k, self._v
                self.allocate(key_states, value_states, k.shape[0], m + self.reserve)
                self._k[:, :, :n], self._v[:, :, :n] = k[:, :, :n], v[:, :, :n]
                self._rows = key_states.shape[0]
            self._k[:self._rows, :, n:m] = key_states
            self._v[:self._rows, :, n:m] = value_states
            self.set_length(m)
            return self.keys, self.values

        def move_columns(self, src: int, end: int, dst: int) -> None:
            """Move columns ``[src, end)`` of the live rows to start at ``dst`` (growing if needed)."""
            width = end - src
            if dst + width + self.reserve > self._k.shape[-2]:
                k, v, rows, n = self._k, self._v, self._rows, self._len
                self.allocate(k, v, k.shape[0], dst + width + self.reserve)
                self._k[:, :, :n], self._v[:, :, :n] = k[:, :, :n], v[:, :, :n]
                self._rows, self._len = rows, n
            self._k[:self._rows, :, dst:dst + width] = self._k[:self._rows, :, src:end].clone()
            self._v[:self._rows, :, dst:dst + width] = self._v[:self._rows, :, src:end].clone()

        def set_rows(self, rows: int) -> None:
            self._rows = rows
            self._view()

        def batch_select_indices(self, indices) -> None:
            k = len(indices)
            self._k[:k, :, :self._len] = self._k[indices, :, :self._len]
            self._v[:k, :, :self._len] = self._v[indices, :, :self._len]
            self._rows = k
            self._view()

    return _BufferedLayer


_LAYER_CLASS = None


def _new_cache(config, reserve: int = 0):
    """A ``DynamicCache`` whose full-attention layers are :class:`_BufferedLayer` s."""
    global _LAYER_CLASS
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if _LAYER_CLASS is None:
        _LAYER_CLASS = _buffered_layer_class()
    cache = DynamicCache(config=config)
    cache.layers = [_LAYER_CLASS(reserve) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _all_buffered(cache) -> bool:
    return all(isinstance(layer, _LAYER_CLASS) for layer in cache.layers)


# -- chunked decode attention (CPU) -------------------------------------------------------
# Rows of a batch use different numbers of cache columns (their prompts and outputs differ in
# length); one attention call over the padded buffer reads every row's keys and values at the
# widest row's length. On a CPU that read is the cost (decode attention is memory-bound), so the
# decoding loop keeps rows sorted by the columns they use, longest first, and splits the batch
# into a few chunks of similar width; each chunk attends only to its own columns.
_PLAN = threading.local()
CHUNKED_ATTENTION = "metaaligner_sdpa"
CHUNK_COST = 128  # one more attention call costs about as much as reading this many row-columns


def _chunked_sdpa(module, query, key, value, attention_mask, **kwargs):
    """``sdpa`` attention; while decoding under a chunk plan, one call per chunk of rows."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plan = getattr(_PLAN, "chunks", None)
    if plan is None or query.shape[2] != 1 or attention_mask is None or attention_mask.dim() != 4:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    import torch

    n = key.shape[2]
    outs = []
    for a, b, w in plan:
        w = min(w, n)
        out, _ = sdpa_attention_forward(module, query[a:b], key[a:b, :, n - w:], value[a:b, :, n - w:],
                                        attention_mask[a:b, ..., n - w:], **kwargs)
        outs.append(out)
    return torch.cat(outs), None


def _use_chunked_attention(model) -> bool:
    """Switch a CPU model on ``sdpa`` to :func:`_chunked_sdpa` (same numbers, fewer bytes read)."""
    impl = getattr(model.config, "_attn_implementation", None)
    if model.device.type != "cpu" or impl not in ("sdpa", CHUNKED_ATTENTION):
        return False
    if impl == CHUNKED_ATTENTION:
        return True
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask

        AttentionInterface.register(CHUNKED_ATTENTION, _chunked_sdpa)
        AttentionMaskInterface.register(CHUNKED_ATTENTION, sdpa_mask)
        model.set_attn_implementation(CHUNKED_ATTENTION)
    except Exception as e:  # an older transformers or a model that refuses it: plain sdpa
        log.debug("chunked attention unavailable: %s", e)
        return False
    return True


def chunk_plan(widths: list[int], max_chunks: int = 4, cost: int = CHUNK_COST) -> list[tuple[int, int, int]]:
    """Split rows with ``widths`` into at most ``max_chunks`` runs ``(start, end, width)``, width
    the run's widest row, minimising the columns read (rows x width) plus ``cost`` per run. Rows
    sorted by width, longest first, make the split worthwhile."""
    n = len(widths)
    if n == 0:
        return []
    frontier = {0: (0, [])}  # rows covered -> (cost, runs) with k runs
    result = None
    for _ in range(max_chunks):
        nxt: dict[int, tuple] = {}
        for start, (c0, runs) in frontier.items():
            w = 0
            for end in range(start + 1, n + 1):
                w = max(w, widths[end - 1])  # a run reads its widest row's columns (any order is correct)
                c = c0 + (end - start) * w + cost
                if end not in nxt or c < nxt[end][0]:
                    nxt[end] = (c, runs + [(start, end, w)])
        if n in nxt and (result is None or nxt[n][0] < result[0]):
            result = nxt[n]
        frontier = {k: v for k, v in nxt.items() if k < n}
    return result[1]


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
        self.chunked = _use_chunked_attention(model)
        self._lock = threading.Lock()
        self._cache_name: str | None = None

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
                 progress=False, desc: str = "generating", prefix_lens: list[int] | None = None) -> list[list[int]]:
        """Continuations of ``prompts`` (lists of token ids), in input order.

        Prompts are grouped by their shared prefix (``prefix_lens[i]`` leading tokens of prompt
        i, e.g. the aligner's instruction and objectives: computed once, reused by every row),
        sorted by length within a group (longest first, so an out-of-memory error shows at
        once), generated with at most ``batch_size`` rows in flight (a finished row's place is
        given to the next prompt) and put back in order. ``progress``: True for a progress bar,
        or an existing tqdm bar to advance by one per finished row.
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
                steps = self._decode_steps([prompts[i] for i in order], sampling, len(prefix), batch_size)
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
        """Text deltas of one continuation; joined, they equal ``decode(generate([prompt])[0])``."""
        ids: list[int] = []
        sent = ""
        for _, tokens, _ in self._decode_steps([prompt], sampling, prefix_len):
            if tokens[0] in self.eos_ids:
                continue
            ids.append(tokens[0])
            text = self.decode(ids)
            # Hold back an incomplete multi-byte character and anything the decoder rewrote.
            if text.startswith(sent) and not text.endswith("\ufffd") and len(text) > len(sent):
                yield text[len(sent):]
                sent = text
        text = self.decode(ids)
        if text.startswith(sent):
            if len(text) > len(sent):
                yield text[len(sent):]
        else:  # the decoder rewrote already-sent text (rare): send the difference's tail
            log.debug("streamed text diverged from the final decoding")
            yield text[len(sent):]

    def _prefix_cache(self, prefix: tuple[int, ...]):
        """Per-layer ``(keys, values)`` of a prefix, computed once (batch 1) and kept (LRU)."""
        import torch

        with self._lock:
            if prefix in self._prefix_kv:
                self._prefix_kv.move_to_end(prefix)
                return self._prefix_kv[prefix]
        cache = _new_cache(self.model.config)
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
            cache = _new_cache(self.model.config)
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

    def _decode_steps(self, prompts: list[list[int]], sampling: GenerationSettings, prefix_len: int = 0,
                      batch_size: int | None = None) -> Iterator[tuple[list[int], list[int], list[int]]]:
        """The decoding loop over ``prompts`` (longest first), at most ``batch_size`` in flight.

        Yields ``(prompt indices, their new tokens, prompt indices that just finished)`` per
        step. A row finishes with an EOS token (yielded) or after ``max_new_tokens`` tokens.
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
        cache = _new_cache(self.model.config, reserve=sampling.max_new_tokens)
        if not _all_buffered(cache):  # e.g. sliding-window layers: transformers' own cache, batch by batch
            for start in range(0, len(prompts), batch_size):
                for ids, tokens, done in self._decode_plain(prompts[start:start + batch_size], sampling):
                    yield [start + i for i in ids], tokens, [start + i for i in done]
            return
        dev, P = self.device, prefix_len
        prefix_kv = self._prefix_cache(tuple(prompts[0][:P])) if P else None  # all prompts share it
        generator = None
        if sampling.temperature > 0 and sampling.seed is not None:
            generator = torch.Generator(device=dev).manual_seed(sampling.seed)
        queue = list(range(len(prompts)))
        queue.reverse()  # pop() takes the next prompt
        rows: list[int] = []  # prompt index of each cache row
        count: dict[int, int] = {}  # tokens generated per prompt
        finished: set[int] = set()
        seen: dict[int, list[int]] = {}  # prompt + output, for the repetition penalty
        mask = torch.zeros((0, 0), dtype=torch.long, device=dev)
        logits = None
        T = 0  # columns in use
        plan, plan_at, plan_rows = [], 0, None  # chunked attention: its runs, T and rows when made
        with torch.inference_mode():
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
                        if sampling.repetition_penalty != 1.0:
                            seen[i] = list(prompts[i])
                if not rows:
                    return
                step_logits = logits.float()
                if sampling.repetition_penalty != 1.0:
                    step_logits = _repetition_penalty(step_logits, _pad_rows([seen[i] for i in rows], dev),
                                                      sampling.repetition_penalty)
                nxt = _pick(step_logits, sampling, generator)
                tokens = nxt.tolist()
                emit = [(i, t) for i, t in zip(rows, tokens) if i not in finished]
                done_now = []
                for i, t in emit:
                    count[i] += 1
                    if sampling.repetition_penalty != 1.0:
                        seen[i].append(t)
                    if t in self.eos_ids or count[i] >= sampling.max_new_tokens:
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
                        plan, plan_at, plan_rows = chunk_plan((positions[:, 0] + 1).tolist()), T, list(rows)
                    shift = T - plan_at
                    _PLAN.chunks = [(a, b, w + shift) for a, b, w in plan] if len(plan) > 1 else None
                try:
                    out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions,
                                     use_cache=True, **self._cache_kw(cache))
                finally:
                    _PLAN.chunks = None
                logits = out.logits[:, -1, :]

    def _decode_plain(self, prompts: list[list[int]], sampling: GenerationSettings):
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
        generator = None
        if sampling.temperature > 0 and sampling.seed is not None:
            generator = torch.Generator(device=dev).manual_seed(sampling.seed)
        seen = [list(p) for p in prompts]
        finished = [False] * n
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                             use_cache=True, logits_to_keep=1, **self._cache_kw(cache))
            for step in range(sampling.max_new_tokens):
                logits = out.logits[:, -1, :].float()
                if sampling.repetition_penalty != 1.0:
                    logits = _repetition_penalty(logits, _pad_rows(seen, dev), sampling.repetition_penalty)
                nxt = _pick(logits, sampling, generator)
                emit = [(r, t) for r, t in enumerate(nxt.tolist()) if not finished[r]]
                done_now = []
                for r, t in emit:
                    seen[r].append(t)
                    if t in self.eos_ids or step == sampling.max_new_tokens - 1:
                        finished[r] = True
                        done_now.append(r)
                yield [r for r, _ in emit], [t for _, t in emit], done_now
                if all(finished):
                    return
                mask = torch.cat([mask, mask.new_ones((n, 1))], dim=-1)
                out = self.model(input_ids=nxt[:, None], attention_mask=mask,
                                 position_ids=mask.sum(-1, keepdim=True) - 1, use_cache=True,
                                 **self._cache_kw(cache))


def _pad_rows(rows: list[list[int]], device):
    """Token lists as one tensor, each padded with its own first token (already "seen", so harmless)."""
    import torch

    width = max(len(r) for r in rows)
    return torch.tensor([[r[0]] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)


def _repetition_penalty(logits, seen, penalty: float):
    """CTRL's repetition penalty, as transformers applies it (divide positive logits, multiply negative)."""
    import torch

    score = torch.gather(logits, 1, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, seen, score)


def _pick(logits, sampling: GenerationSettings, generator):
    import torch

    if sampling.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_p < 1.0:
        sorted_logits, sorted_idx = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > sampling.top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, sorted_idx, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


class HFChatBackend:
    """A local chat model (hub id, directory, ``.gguf`` or ``default``) answering through its chat template."""

    def __init__(self, generator: LocalGenerator, name: str | None = None):
        self.generator = generator
        self.name = name or generator.name
        self._warned_long = False

    @classmethod
    def load(cls, spec: str = "default", **kwargs) -> "HFChatBackend":
        return cls(LocalGenerator.load(spec, **kwargs), name="default" if spec in (None, "", "default") else spec)

    def encode(self, prompt: str, system: str | None = None, max_tokens: int = 512) -> list[int]:
        tok = self.generator.tokenizer
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False).input_ids
        else:  # a base model without a template: plain text, as its tokenizer encodes it
            ids = tok((system + "\n\n" if system else "") + prompt).input_ids
        budget = self.generator.max_length - max_tokens
        if budget < 1:
            raise MetaAlignerError(f"{self.name}: max_tokens {max_tokens} leaves no room for the prompt "
                                   f"in a context of {self.generator.max_length} tokens")
        if len(ids) > budget:
            if not self._warned_long:
                log.warning("%s: prompts longer than %d tokens are cut from the left", self.name, budget)
                self._warned_long = True
            ids = ids[-budget:]
        return ids

    def complete(self, prompt: str, *, max_tokens: int = 512, temperature: float = 0.0,
                 system: str | None = None, **gen) -> Completion:
        return self.complete_batch([prompt], max_tokens=max_tokens, temperature=temperature, system=system,
                                   batch_size=1, **gen)[0]

    def complete_batch(self, prompts: list[str], *, max_tokens: int = 512, temperature: float = 0.0,
                       system: str | None = None, batch_size: int = 16, progress: bool = False,
                       **gen) -> list[Completion]:
        sampling = GenerationSettings.from_kwargs(max_new_tokens=max_tokens, temperature=temperature, **gen)
        encoded = [self.encode(p, system, max_tokens) for p in prompts]
        outs = self.generator.generate(encoded, sampling, batch_size=batch_size, progress=progress, desc="drafts")
        return [Completion(self.generator.decode(o).strip(), {"prompt_tokens": len(e), "completion_tokens": len(o)})
                for e, o in zip(encoded, outs)]

    def stream(self, prompt: str, *, max_tokens: int = 512, temperature: float = 0.0,
               system: str | None = None, **gen) -> Iterator[str]:
        sampling = GenerationSettings.from_kwargs(max_new_tokens=max_tokens, temperature=temperature, **gen)
        yield from strip_stream(self.generator.stream(self.encode(prompt, system, max_tokens), sampling))


def strip_stream(deltas: Iterable[str]) -> Iterator[str]:
    """Deltas of ``"".join(deltas).strip()``: leading whitespace dropped, trailing held back."""
    started = False
    pending = ""
    for d in deltas:
        if not started:
            d = d.lstrip()
            if not d:
                continue
            started = True
        d = pending + d
        body = d.rstrip()
        pending = d[len(body):]
        if body:
            yield body
