"""Local Hugging Face chat models (:class:`HFChatBackend`) over the decoding engine.

The engine itself (:class:`LocalGenerator`, the KV cache, chunked attention, sampling) lives in
:mod:`metaaligner_core.engine`; its names are re-exported here.
"""
from __future__ import annotations

import logging
from typing import Iterable, Iterator

from ..engine.attention import chunk_plan  # noqa: F401  (re-exported)
from ..engine.generator import LocalGenerator
from ..errors import MetaAlignerError
from ..settings import DEFAULT_MAX_NEW_TOKENS, GenerationSettings  # noqa: F401  (re-exported)
from .base import Completion

log = logging.getLogger(__name__)


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
