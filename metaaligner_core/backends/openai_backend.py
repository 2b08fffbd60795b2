"""OpenAI and any OpenAI-compatible server (vLLM, llama.cpp server, TGI, …) through the official client.

``openai:NAME`` sends ``OPENAI_API_KEY``. ``openai-compatible:NAME@URL`` never does (a third-party
server must not receive the OpenAI key): it sends ``METAALIGNER_COMPAT_API_KEY`` (or the variable
named by ``METAALIGNER_COMPAT_API_KEY_ENV``), else a placeholder.

The client retries 429, 5xx, connection errors and timeouts itself with exponential back-off
(honouring ``Retry-After``); ``max_retries`` sets how often. A call that still fails becomes a
:class:`~metaaligner_core.backends.base.BackendError`.
"""
from __future__ import annotations

import os
from typing import Iterator

from ..errors import MetaAlignerError
from .base import APIBackend, BackendError, Completion, describe_api_error

KEY_VAR = "OPENAI_API_KEY"
DUMMY_KEY = "not-needed"  # OpenAI-compatible servers usually ignore the key, the client insists on one


class OpenAIBackend(APIBackend):
    """``openai:NAME`` (key from ``OPENAI_API_KEY``) or ``openai-compatible:NAME@URL``."""

    def __init__(self, model: str, *, base_url: str | None = None, compatible: bool = False,
                 timeout: float = 60.0, max_retries: int = 5, concurrency: int = 8, api_key: str | None = None):
        import openai

        if compatible:
            from ..models import compat_api_key

            key = api_key or compat_api_key() or DUMMY_KEY
        else:
            key = api_key or os.environ.get(KEY_VAR)
            if not key:
                raise MetaAlignerError(f"openai:{model}: no API key; set the environment variable {KEY_VAR}")
        self.model = model
        self.compatible = compatible
        self.name = f"openai-compatible:{model}@{base_url}" if compatible else f"openai:{model}"
        self.concurrency = concurrency
        self._key = key
        self._openai = openai
        self.client = openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=max_retries)

    def _request(self, prompt: str, max_tokens: int, temperature: float, system: str | None) -> dict:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        # OpenAI's newer models accept only max_completion_tokens; other servers know max_tokens.
        limit = {"max_tokens": max_tokens} if self.compatible else {"max_completion_tokens": max_tokens}
        return {"model": self.model, "messages": messages, "temperature": temperature, **limit}

    def complete(self, prompt: str, *, max_tokens: int = 512, temperature: float = 0.0,
                 system: str | None = None) -> Completion:
        try:
            resp = self.client.chat.completions.create(**self._request(prompt, max_tokens, temperature, system))
        except self._openai.OpenAIError as e:
            raise BackendError(describe_api_error(self.name, e, self._key)) from None
        text = (resp.choices[0].message.content or "") if resp.choices else ""
        usage = {}
        if resp.usage is not None:
            usage = {"prompt_tokens": resp.usage.prompt_tokens, "completion_tokens": resp.usage.completion_tokens}
        return Completion(text, usage)

    def stream(self, prompt: str, *, max_tokens: int = 512, temperature: float = 0.0,
               system: str | None = None) -> Iterator[str]:
        try:
            chunks = self.client.chat.completions.create(stream=True,
                                                         **self._request(prompt, max_tokens, temperature, system))
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        except self._openai.OpenAIError as e:
            raise BackendError(describe_api_error(self.name, e, self._key)) from None
