"""Decoding settings: one class for the policy's draft and the aligner's correction, in every caller.

The CLI, the app, the server and the decoding engine all take a :class:`GenerationSettings`;
:meth:`GenerationSettings.from_kwargs` builds one from keyword arguments (``max_new_tokens=…``)
and rejects unknown names, so a typo never silently falls back to a default.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import MetaAlignerError

# The authors' aligner inference generates up to 1024 new tokens (their scripts); `align` and the
# server use it. The app keeps a shorter interactive default of its own.
DEFAULT_MAX_NEW_TOKENS = 1024
MAX_NEW_TOKENS_LIMIT = 32768

FIELDS = ("max_new_tokens", "temperature", "top_p", "repetition_penalty", "seed")


@dataclass
class GenerationSettings:
    """How to decode.

    max_new_tokens: most tokens generated per answer (draft or correction).
    temperature: 0 means greedy decoding (reproducible, the default); above 0, sampling at that temperature.
    top_p: nucleus sampling mass (sampling only).
    repetition_penalty: > 1 discourages tokens already in the prompt or the output (1 = off; local models).
    seed: makes sampling reproducible.
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        try:
            self.max_new_tokens = int(self.max_new_tokens)
            self.temperature, self.top_p = float(self.temperature), float(self.top_p)
            self.repetition_penalty = float(self.repetition_penalty)
            self.seed = None if self.seed is None else int(self.seed)
        except (TypeError, ValueError) as e:
            raise MetaAlignerError(f"generation settings: {e}") from None
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise MetaAlignerError(f"max_new_tokens: expected 1..{MAX_NEW_TOKENS_LIMIT}, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 5.0:
            raise MetaAlignerError(f"temperature: expected 0..5, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise MetaAlignerError(f"top_p: expected a value in (0, 1], got {self.top_p}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise MetaAlignerError(f"seed: expected a 64-bit integer, got {self.seed}")
        if self.repetition_penalty <= 0.0:
            raise MetaAlignerError(f"repetition_penalty: expected > 0, got {self.repetition_penalty}")

    @classmethod
    def from_kwargs(cls, **gen) -> "GenerationSettings":
        """Settings from keyword arguments; ``None`` values take the default, unknown names raise."""
        unknown = set(gen) - set(FIELDS)
        if unknown:
            raise TypeError(f"unknown generation settings: {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in gen.items() if v is not None})

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def replace(self, **changes) -> "GenerationSettings":
        return GenerationSettings.from_kwargs(**{**asdict(self), **changes})

    def aligner_kwargs(self) -> dict:
        """Keyword arguments of ``Aligner.align*``/``stream``."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "repetition_penalty": self.repetition_penalty, "seed": self.seed}

    def policy_kwargs(self, local: bool = False) -> dict:
        """``ChatBackend.complete``/``stream`` settings; API providers take no top_p / repetition penalty / seed."""
        kwargs = {"max_tokens": self.max_new_tokens, "temperature": self.temperature}
        if local:
            kwargs.update(top_p=self.top_p, repetition_penalty=self.repetition_penalty, seed=self.seed)
        return kwargs
