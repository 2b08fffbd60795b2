"""Anthropic models through the official client (``anthropic:NAME``, key from ``ANTHROPIC_API_KEY``).

The client retries 429, 5xx, 529 (overloaded), connection errors and timeouts with exponential
back-off; ``max_retries`` sets how often. A call that still fails becomes a
:class:`~metaaligner_core.backends.base.BackendError`.
"""
from __future__ import annotations

import os
from typing import Iterator

from ..errors import MetaAlignerError
from .base import APIBackend, BackendError, Completion, describe_api_error

KEY_VAR = "ANTHROPIC_API_KEY"


class AnthropicBackend(APIBackend):
    def __init__(self, model: str, *, base_url: str | None = None, timeout: float = 60.0,
                 max_retries: int = 5, concurrency: int = 8, api_key: str | None = None):
        import anthropic

        key = api_key or os.environ.get(KEY_VAR)
        if not key:
            raise MetaAlignerError(f"anthropic:{model}: no API key; set the environment variable {KEY_VAR}")
        self.model = model
        self.name = f"anthropic:{model}"
        self.concurrency = concurrency
        self._key = key
        self._anthropic = anthropic
        self.client = anthropic.Anthropic(api_key=key, base_url=base_url, timeout=timeout, max_retries=max_retries)

    def _request(self, prompt: str, max_tokens: int, temperature: float, system: str | None) -> dict:
        # This client release has no `temperature` argument; the Messages API still takes the field.
        req = {"model": self.model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": prompt}],
               "extra_body": {"temperature": temperature}}
        if system:
            req["system"] = system
        return req

    def complete(self, prompt: str, *, max_tokens: int = 512, temperature: float = 0.0,
                 system: str | None = None) -> Completion:
        try:
            msg = self.client.messages.create(**self._request(prompt, max_tokens, temperature, system))
        except self._anthropic.AnthropicError as e:
            raise BackendError(describe_api_error(self.name, e, self._key)) from None
        text = "".join(block.text for block in msg.content if getattr(block, "type", None) == "text")
        usage = {}
        if msg.usage is not None:
            usage = {"prompt_tokens": msg.usage.input_tokens, "completion_tokens": msg.usage.output_tokens}
        return Completion(text, usage)

    def stream(self, prompt: str, *, max_tokens: int = 512, temperature: float = 0.0,
               system: str | None = None) -> Iterator[str]:
        try:
            with self.client.messages.stream(**self._request(prompt, max_tokens, temperature, system)) as s:
                yield from s.text_stream
        except self._anthropic.AnthropicError as e:
            raise BackendError(describe_api_error(self.name, e, self._key)) from None
