"""The one protocol every model provider implements: a chat model that answers one user turn.

A *policy* (it writes the drafts) and an evaluation *judge* are both a :class:`ChatBackend`.
Local Hugging Face models, OpenAI, Anthropic and OpenAI-compatible servers each live in one
small module of this package; :func:`metaaligner_core.backends.load_backend` picks one from a
MODEL string.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Protocol, runtime_checkable

from ..errors import MetaAlignerError


@dataclass
class Completion:
    """One reply. ``usage`` is ``{"prompt_tokens", "completion_tokens"}`` when known, else ``{}``."""

    text: str
    usage: dict = field(default_factory=dict)


class BackendError(MetaAlignerError):
    """A call that still fails after the retries. The message never contains an API key."""


@runtime_checkable
class ChatBackend(Protocol):
    name: str

    def complete(self, prompt: str, *, max_tokens: int = 512, temperature: float = 0.0,
                 system: str | None = None) -> Completion: ...

    def stream(self, prompt: str, *, max_tokens: int = 512, temperature: float = 0.0,
               system: str | None = None) -> Iterator[str]: ...

    def complete_batch(self, prompts: list[str], *, max_tokens: int = 512, temperature: float = 0.0,
                       system: str | None = None, batch_size: int = 16) -> list[Completion]: ...


class APIBackend:
    """Shared behaviour of the HTTP providers: batches are concurrent single calls."""

    name: str
    concurrency: int = 8

    def complete(self, prompt: str, *, max_tokens: int = 512, temperature: float = 0.0,
                 system: str | None = None) -> Completion:
        raise NotImplementedError

    def complete_each(self, prompts: list[str], *, max_tokens: int = 512, temperature: float = 0.0,
                      system: str | None = None, batch_size: int | None = None) -> list[Completion | BackendError]:
        """Concurrent calls (``concurrency`` threads, at most ``batch_size``), in input order; a
        call that still fails after the client's retries gives its :class:`BackendError`."""
        def call(prompt):
            try:
                return self.complete(prompt, max_tokens=max_tokens, temperature=temperature, system=system)
            except BackendError as e:
                return e

        if not prompts:
            return []
        workers = max(1, min(batch_size or self.concurrency, self.concurrency, len(prompts)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(call, prompts))

    def complete_batch(self, prompts: list[str], *, max_tokens: int = 512, temperature: float = 0.0,
                       system: str | None = None, batch_size: int = 16) -> list[Completion]:
        """:meth:`complete_each`, raising the first failure (for per-row errors use that)."""
        results = self.complete_each(prompts, max_tokens=max_tokens, temperature=temperature, system=system,
                                     batch_size=batch_size)
        for r in results:
            if isinstance(r, BackendError):
                raise r
        return results


def describe_api_error(name: str, err: Exception, secret: str | None = None) -> str:
    """A one-line description of a provider error: status and the provider's message.

    ``secret`` (the API key) is scrubbed from the text in case a server echoes it back.
    """
    status = getattr(err, "status_code", None)
    body = getattr(err, "body", None)
    message = None
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else None
    if not message:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
    where = f"HTTP {status}" if status else type(err).__name__
    text = f"{name}: {where}: {message}"
    if secret:
        text = text.replace(secret, "***")
    return text
