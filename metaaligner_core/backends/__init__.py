"""Model providers behind one protocol (:class:`ChatBackend`), chosen by a MODEL string.

>>> policy = load_backend("openai:gpt-4o")            # doctest: +SKIP
>>> policy.complete("What is RLHF?").text             # doctest: +SKIP

``openai:NAME`` (``OPENAI_API_KEY``; ``base_url`` optional, for any OpenAI-compatible server),
``anthropic:NAME`` (``ANTHROPIC_API_KEY``; ``base_url`` optional),
``openai-compatible:NAME@URL`` (key from ``OPENAI_API_KEY`` if set, else a placeholder);
anything else is a local Hugging Face chat model: ``default`` (the embedded SmolLM2), a
directory, a ``.gguf`` file or a hub id, answering through its chat template.
"""
from __future__ import annotations

from ..errors import MetaAlignerError
from .base import APIBackend, BackendError, ChatBackend, Completion

__all__ = ["APIBackend", "BackendError", "ChatBackend", "Completion", "load_backend", "parse_compatible"]


def parse_compatible(rest: str) -> tuple[str, str]:
    """``NAME@URL`` -> ``(NAME, URL)``; the URL starts at the ``@http`` (a NAME may contain ``@``)."""
    at = max(rest.rfind("@http://"), rest.rfind("@https://"))
    if at <= 0:
        raise MetaAlignerError(f'"openai-compatible:{rest}": expected openai-compatible:NAME@URL '
                               '(e.g. openai-compatible:llama3@http://localhost:8000/v1)')
    return rest[:at], rest[at + 1:]


def load_backend(spec: str, *, base_url: str | None = None, timeout: float = 60.0,
                 max_retries: int = 5, **kwargs) -> ChatBackend:
    """The chat backend for a MODEL string.

    API backends take ``concurrency`` (threads for ``complete_batch``) and ``api_key`` in
    ``kwargs``; local ones take ``device``, ``dtype``, ``attn``, ``max_length``.
    """
    spec = "default" if spec in (None, "") else str(spec)
    provider, sep, rest = spec.partition(":")
    if sep and provider == "openai":
        from .openai_backend import OpenAIBackend

        return OpenAIBackend(_model_name(spec, rest), base_url=base_url, timeout=timeout,
                             max_retries=max_retries, **kwargs)
    if sep and provider == "openai-compatible":
        from .openai_backend import OpenAIBackend

        name, url = parse_compatible(rest)
        return OpenAIBackend(name, base_url=base_url or url, compatible=True, timeout=timeout,
                             max_retries=max_retries, **kwargs)
    if sep and provider == "anthropic":
        from .anthropic_backend import AnthropicBackend

        return AnthropicBackend(_model_name(spec, rest), base_url=base_url, timeout=timeout,
                                max_retries=max_retries, **kwargs)
    from .hf import HFChatBackend

    local = {k: v for k, v in kwargs.items() if k in ("device", "dtype", "attn", "max_length")}
    return HFChatBackend.load(spec, **local)


def _model_name(spec: str, rest: str) -> str:
    if not rest.strip():
        raise MetaAlignerError(f'"{spec}": the model name after the colon is empty')
    return rest.strip()
