"""Model providers behind one protocol (:class:`ChatBackend`), chosen by a MODEL string.

>>> policy = load_backend("openai:gpt-4o")            # doctest: +SKIP
>>> policy.complete("What is RLHF?").text             # doctest: +SKIP

``openai:NAME`` (``OPENAI_API_KEY``; ``base_url`` optional, for any OpenAI-compatible server),
``anthropic:NAME`` (``ANTHROPIC_API_KEY``; ``base_url`` optional),
``openai-compatible:NAME@URL`` (key from ``METAALIGNER_COMPAT_API_KEY``, never ``OPENAI_API_KEY``;
see :mod:`metaaligner_core.models`);
anything else is a local Hugging Face chat model: ``default`` (the embedded SmolLM2), a
directory, a ``.gguf`` file or a hub id, answering through its chat template.
"""
from __future__ import annotations

from ..models import parse_compatible, parse_model
from .base import APIBackend, BackendError, ChatBackend, Completion

__all__ = ["APIBackend", "BackendError", "ChatBackend", "Completion", "load_backend", "parse_compatible"]


def load_backend(spec: str, *, base_url: str | None = None, timeout: float = 60.0,
                 max_retries: int = 5, **kwargs) -> ChatBackend:
    """The chat backend for a MODEL string.

    API backends take ``concurrency`` (threads for ``complete_batch``) and ``api_key`` in
    ``kwargs``; local ones take ``device``, ``dtype``, ``attn``, ``max_length``.
    """
    m = parse_model(spec)
    api = {k: v for k, v in kwargs.items() if k in ("concurrency", "api_key")}
    if m.provider == "openai":
        from .openai_backend import OpenAIBackend

        return OpenAIBackend(m.name, base_url=base_url, timeout=timeout, max_retries=max_retries, **api)
    if m.provider == "openai-compatible":
        from .openai_backend import OpenAIBackend

        return OpenAIBackend(m.name, base_url=base_url or m.url, compatible=True, timeout=timeout,
                             max_retries=max_retries, **api)
    if m.provider == "anthropic":
        from .anthropic_backend import AnthropicBackend

        return AnthropicBackend(m.name, base_url=base_url, timeout=timeout, max_retries=max_retries, **api)
    from .hf import HFChatBackend

    local = {k: v for k, v in kwargs.items() if k in ("device", "dtype", "attn", "max_length")}
    return HFChatBackend.load(m.spec, **local)
