"""Choosing the next token: greedy, or sampling through transformers' own logits processors.

Temperature, top-p and the repetition penalty are transformers' public processors
(``TemperatureLogitsWarper``, ``TopPLogitsWarper``, ``RepetitionPenaltyLogitsProcessor``), so
they behave exactly as in ``model.generate``. The repetition penalty sees each row's prompt and
output so far (:meth:`LogitsPipeline.history`).
"""
from __future__ import annotations

from ..settings import GenerationSettings


class LogitsPipeline:
    """Next tokens of a batch from its last logits, under ``settings``."""

    def __init__(self, settings: GenerationSettings, device):
        import torch
        from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                  TopPLogitsWarper)

        self.settings = settings
        self.device = device
        self.needs_history = settings.repetition_penalty != 1.0
        self.processors = LogitsProcessorList()
        if self.needs_history:
            self.processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
        self.sample = settings.temperature > 0
        if self.sample:
            self.processors.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_p < 1.0:
                self.processors.append(TopPLogitsWarper(settings.top_p))
        self.generator = None
        if self.sample and settings.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(settings.seed)

    def history(self, rows: list[list[int]]):
        """Token lists as one tensor, each padded on the left with its own first token (already
        seen, so the padding changes nothing the penalty does)."""
        import torch

        width = max(len(r) for r in rows)
        return torch.tensor([[r[0]] * (width - len(r)) + r for r in rows], dtype=torch.long, device=self.device)

    def __call__(self, logits, seen: list[list[int]] | None = None):
        """``logits`` [rows, vocab] (any float dtype) -> next token ids [rows]; ``seen``: each row's
        prompt + output, needed when the repetition penalty is on."""
        import torch

        scores = logits.float()
        if self.processors:
            ids = self.history(seen) if self.needs_history else None
            scores = self.processors(ids, scores)
        if not self.sample:
            return scores.argmax(-1)
        return torch.multinomial(scores.softmax(-1), 1, generator=self.generator).squeeze(-1)
