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

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class Sampling:
    """Decoding settings.

    max_new_tokens: most tokens generated per row.
    temperature: 0 means greedy (the default); above 0, sampling from the softmax at that temperature.
    top_p: nucleus sampling mass (sampling only).
    repetition_penalty: > 1 discourages tokens already in the prompt or the output (1 = off).
    seed: makes sampling reproducible.
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @classmethod
    def from_kwargs(cls, **gen) -> "Sampling":
        unknown = set(gen) - {"max_new_tokens", "temperature", "top_p", "repetition_penalty", "seed"}
        if unknown:
            raise TypeError(f"unknown generation settings: {', '.join(sorted(unknown))}")
        s = cls(**{k: v for k, v in gen.items() if v is not None})
        if s.max_new_tokens < 1:
            raise MetaAlignerError(f"max_new_tokens must be at least 1 (got {s.max_new_tokens})")
        if s.temperature < 0:
            raise MetaAlignerError(f"temperature must be >= 0 (got {s.temperature})")
        if not 0 < s.top_p <= 1:
            raise MetaAlignerError(f"top_p must be in (0, 1] (got {s.top_p})")
        if s.repetition_penalty <= 0:
            raise MetaAlignerError(f"repetition_penalty must be > 0 (got {s.repetition_penalty})")
        return s


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
        self._lock = threading.Lock()

    @classmethod
    def load(cls, spec: str = "default", *, device=None, dtype=None, attn=None,
             max_length: int | None = None) -> "LocalGenerator":
        from ..models import display_name, load_causal_lm

        model, tok = load_causal_lm(spec, device=device, dtype=dtype, attn=attn, padding_side="left")
        return cls(model, tok, display_name(spec), max_length=max_length)

    @property
    def device(self):
        return self.model.device

    # -- text ------------------------------------------------------------------------------
    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- generation ------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: Sampling, *, batch_size: int = 16,
                 progress=False, desc: str = "generating", prefix_lens: list[int] | None = None) -> list[list[int]]:
        """Continuations of ``prompts`` (lists of token ids), in input order.

        Prompts are grouped by their shared prefix (``prefix_lens[i]`` leading tokens of prompt
        i, e.g. the aligner's instruction and objectives: computed once, reused by every row),
        sorted by length within a group (longest first, so an out-of-memory error shows at
        once), generated ``batch_size`` at a time and put back in order. ``progress``: True for
        a progress bar, or an existing tqdm bar to advance by one per row.
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
                for start in range(0, len(order), batch_size):
                    idx = order[start:start + batch_size]
                    rows = [[] for _ in idx]
                    for alive, tokens in self._decode_steps([prompts[i] for i in idx], sampling, len(prefix)):
                        for r, t in zip(alive, tokens):
                            rows[r].append(t)
                    for i, r in zip(idx, rows):
                        out[i] = [t for t in r if t not in self.eos_ids]
                        self.stats["prompt_tokens"] += len(prompts[i])
                        self.stats["generated_tokens"] += len(out[i])
                    bar.update(len(idx))
        finally:
            if own:
                bar.close()
        return out  # type: ignore[return-value]

    def stream(self, prompt: list[int], sampling: Sampling, prefix_len: int = 0) -> Iterator[str]:
        """Text deltas of one continuation; joined, they equal ``decode(generate([prompt])[0])``."""
        ids: list[int] = []
        sent = ""
        for _, tokens in self._decode_steps([prompt], sampling, prefix_len):
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
            self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        kv = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        with self._lock:
            self._prefix_kv[prefix] = kv
            while len(self._prefix_kv) > self.PREFIX_CACHE_SIZE:
                self._prefix_kv.popitem(last=False)
        return kv

    def _prefill_rows(self, prompts: list[list[int]], prefix_len: int, cache, reserve: int):
        """Prefill each prompt alone (no padding) and place its keys/values, left-padded, in ``cache``.

        On a CPU, prefill is bound by arithmetic: a batch computes no faster per token than
        one row, so padding would be pure waste. Each row's prefill is also exactly the
        computation a batch of one does, whatever batch it is in.
        """
        import torch

        n, dev = len(prompts), self.device
        total = max(len(p) for p in prompts)
        prefix_kv = self._prefix_cache(tuple(prompts[0][:prefix_len])) if prefix_len else None
        last_logits = []
        for r, p in enumerate(prompts):
            rest = p[prefix_len:]
            row = _new_cache(self.model.config)
            if prefix_kv:
                for layer, (k, v) in zip(row.layers, prefix_kv):
                    layer.allocate(k, v, 1, len(p))
                    layer.write(0, 0, k, v)
                    layer.set_length(prefix_len)
            ids = torch.tensor([rest], dtype=torch.long, device=dev)
            positions = torch.arange(prefix_len, len(p), device=dev)[None]
            out = self.model(input_ids=ids, position_ids=positions, past_key_values=row, use_cache=True,
                             logits_to_keep=1)
            last_logits.append(out.logits[0, -1])
            for big, small in zip(cache.layers, row.layers):
                if big._k is None:
                    big.allocate(small.keys, small.values, n, total + reserve)
                big.write(r, total - len(rest), small.keys[:, :, prefix_len:], small.values[:, :, prefix_len:])
        for big, small in zip(cache.layers, prefix_kv or []):
            big.write(slice(None), 0, small[0].expand(n, -1, -1, -1), small[1].expand(n, -1, -1, -1))
        for big in cache.layers:
            big.set_length(total)
        return torch.stack(last_logits)

    def _decode_steps(self, prompts: list[list[int]], sampling: Sampling,
                      prefix_len: int = 0) -> Iterator[tuple[list[int], list[int]]]:
        """The decoding loop: yields ``(rows still generating, their new tokens)`` per step.

        The first ``prefix_len`` tokens (the same in every prompt) come from the prefix cache;
        the rest of each prompt is left-padded after them. A row stops after emitting an EOS
        token (which is yielded) or ``max_new_tokens`` tokens; finished rows leave the batch
        once a quarter of it has finished (one compaction of the cache for several rows).
        """
        import torch

        if not prompts:
            return
        if any(len(p) <= prefix_len for p in prompts):
            raise MetaAlignerError("cannot generate from an empty prompt")
        model, dev = self.model, self.device
        n = len(prompts)
        cache = _new_cache(model.config, reserve=sampling.max_new_tokens)
        buffered = _all_buffered(cache)
        if not buffered:
            prefix_len = 0  # e.g. sliding-window layers: plain transformers caching
        total = max(len(p) for p in prompts)
        mask = torch.zeros((n, total), dtype=torch.long)
        mask[:, :prefix_len] = 1
        for r, p in enumerate(prompts):
            mask[r, total - (len(p) - prefix_len):] = 1
        mask = mask.to(dev)
        seen = None
        if sampling.repetition_penalty != 1.0:
            # Whole prompts, pads replaced by each row's first token so padding never counts as "seen".
            seen = torch.tensor([[p[0]] * (total - len(p)) + list(p) for p in prompts], device=dev)
        generator = None
        if sampling.temperature > 0 and sampling.seed is not None:
            generator = torch.Generator(device=dev).manual_seed(sampling.seed)
        in_batch = list(range(n))  # prompt index of each cache row
        finished = [False] * n
        with torch.inference_mode():
            if buffered and dev.type == "cpu":
                logits = self._prefill_rows(prompts, prefix_len, cache, sampling.max_new_tokens)
            else:  # accelerators: one padded forward pass for the whole batch
                width = total - prefix_len
                input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
                for r, p in enumerate(prompts):
                    input_ids[r, width - (len(p) - prefix_len):] = torch.tensor(p[prefix_len:], dtype=torch.long)
                if prefix_len:
                    for layer, (k, v) in zip(cache.layers, self._prefix_cache(tuple(prompts[0][:prefix_len]))):
                        layer.allocate(k, v, n, total + sampling.max_new_tokens)
                        layer.write(slice(None), 0, k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1))
                        layer.set_length(prefix_len)
                positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, prefix_len:]
                out = model(input_ids=input_ids.to(dev), attention_mask=mask, position_ids=positions,
                            past_key_values=cache, use_cache=True, logits_to_keep=1)
                logits = out.logits[:, -1, :]
            for step in range(sampling.max_new_tokens):
                logits = logits.float()
                if seen is not None:
                    logits = _repetition_penalty(logits, seen, sampling.repetition_penalty)
                nxt = _pick(logits, sampling, generator)
                tokens = nxt.tolist()
                live = [(i, t) for i, t in zip(in_batch, tokens) if not finished[i]]
                yield [i for i, _ in live], [t for _, t in live]
                if step == sampling.max_new_tokens - 1:
                    return
                for i, t in live:
                    finished[i] = t in self.eos_ids
                done = sum(finished[i] for i in in_batch)
                if done == len(in_batch):
                    return
                if done and 4 * done >= len(in_batch):
                    keep = torch.tensor([k for k, i in enumerate(in_batch) if not finished[i]], device=dev)
                    cache.batch_select_indices(keep)
                    in_batch = [in_batch[k] for k in keep.tolist()]
                    nxt, mask = nxt[keep], mask[keep]
                    if seen is not None:
                        seen = seen[keep]
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
                if seen is not None:
                    seen = torch.cat([seen, nxt[:, None]], dim=-1)
                positions = mask.sum(-1, keepdim=True) - 1
                out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions,
                            past_key_values=cache, use_cache=True)
                logits = out.logits[:, -1, :]


def _repetition_penalty(logits, seen, penalty: float):
    """CTRL's repetition penalty, as transformers applies it (divide positive logits, multiply negative)."""
    import torch

    score = torch.gather(logits, 1, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, seen, score)


def _pick(logits, sampling: Sampling, generator):
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
        sampling = Sampling.from_kwargs(max_new_tokens=max_tokens, temperature=temperature, **gen)
        encoded = [self.encode(p, system, max_tokens) for p in prompts]
        outs = self.generator.generate(encoded, sampling, batch_size=batch_size, progress=progress, desc="drafts")
        return [Completion(self.generator.decode(o).strip(), {"prompt_tokens": len(e), "completion_tokens": len(o)})
                for e, o in zip(encoded, outs)]

    def stream(self, prompt: str, *, max_tokens: int = 512, temperature: float = 0.0,
               system: str | None = None, **gen) -> Iterator[str]:
        sampling = Sampling.from_kwargs(max_new_tokens=max_tokens, temperature=temperature, **gen)
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
