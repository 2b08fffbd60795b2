"""Correction inference: the aligner reads ``(query, draft, objectives)`` and writes a better answer.

>>> from metaaligner_core.inference import Aligner
>>> aligner = Aligner.load("MetaAligner/MetaAligner-UltraFeedback-1.1B")       # doctest: +SKIP
>>> aligner.align("What is RLHF?", draft, "honesty,helpfulness")               # doctest: +SKIP
>>> aligner.align_batch(queries, drafts, "honesty,helpfulness", batch_size=16)  # doctest: +SKIP

The aligner reads the raw template prompt (:func:`~metaaligner_core.templates.build_prompt`,
no chat template) encoded by :func:`encode_aligner_prompt`: the tokenizer's own encoding with
BOS in front. A prompt longer than the aligner's context loses the end of its *draft*; the
instruction, the objectives and the query are kept whole.

``Aligner.load("default")`` is the embedded SmolLM2-135M-Instruct *base* model prompted with the
template, not a trained MetaAligner (``is_base_model`` is True): it runs anywhere, offline, but its
corrections are illustrative only.
"""
from __future__ import annotations

import logging
from typing import Iterator, Sequence

from .backends.hf import LocalGenerator, Sampling, strip_stream
from .errors import MetaAlignerError
from .models import is_api_model, is_default
from .objectives import Objective, parse_objectives
from .templates import build_prompt, check_template, prompt_parts, template_for_model

log = logging.getLogger(__name__)

BASE_MODEL_WARNING = (
    "the aligner is the embedded SmolLM2-135M-Instruct base model prompted with the MetaAligner "
    "template, not a trained MetaAligner: its corrections are illustrative only. For real corrections "
    "pass --aligner MetaAligner/MetaAligner-UltraFeedback-1.1B (or a directory written by `metaaligner train`)")

Objectives = str | Sequence[Objective | str]


def encode_aligner_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of an aligner prompt: the tokenizer's own encoding, with BOS in front.

    The released checkpoints (Llama tokenizers) add BOS themselves; for a tokenizer that has a
    BOS token but does not add it, it is prepended. Training uses the same rule, so a model
    trained here sees at inference exactly what it saw in training.
    """
    ids = list(tokenizer(text, add_special_tokens=True).input_ids)
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


class Aligner:
    """A loaded aligner model with its template; see the module docstring for use."""

    def __init__(self, generator: LocalGenerator, *, template: str = "ultrafeedback", name: str | None = None,
                 is_base_model: bool = False):
        self.generator = generator
        self.template = check_template(template)
        self.name = name or generator.name
        self.is_base_model = is_base_model
        self._head_ids: dict[tuple[str, ...], list[int]] = {}

    @classmethod
    def load(cls, model: str = "default", *, template: str | None = None, device=None, dtype=None,
             attn=None, max_length: int | None = None) -> "Aligner":
        """Load an aligner: ``default``, a hub id, a local directory or a ``.gguf`` file.

        ``template`` None picks the one the checkpoint was trained with from its name
        (HH-RLHF / UltraFeedback / IMHI), else ``ultrafeedback``.
        """
        if is_api_model(model):
            raise MetaAlignerError(f'"{model}" is an API model; the aligner must be a local model '
                                   "(a Hugging Face id, a directory, a .gguf file or default)")
        generator = LocalGenerator.load(model, device=device, dtype=dtype, attn=attn, max_length=max_length)
        return cls.from_generator(generator, model, template=template)

    @classmethod
    def from_generator(cls, generator: LocalGenerator, model: str = "default", *,
                       template: str | None = None) -> "Aligner":
        """An aligner over an already loaded model (e.g. the embedded model shared with the policy)."""
        base = is_default(model)
        tpl = template or template_for_model(None if base else str(model))
        return cls(generator, template=tpl, name="default" if base else str(model), is_base_model=base)

    # -- prompts ---------------------------------------------------------------------------
    def objectives(self, objectives: Objectives) -> list[Objective | str]:
        """A SPEC string (keys resolved in this template's family) or a list of objectives."""
        if isinstance(objectives, str):
            return parse_objectives(objectives, family=self.template)
        items = list(objectives)
        if not items:
            raise MetaAlignerError("no objectives given")
        if all(isinstance(o, Objective) for o in items):
            return items
        return parse_objectives(items, family=self.template)

    def prompt(self, query: str, draft: str, objectives: Objectives) -> str:
        """The exact text the aligner reads."""
        return build_prompt(self.template, query, draft, self.objectives(objectives))

    def encode(self, query: str, draft: str, objectives: Objectives, max_new_tokens: int) -> tuple[list[int], bool]:
        """Prompt ids fitting the context with room for ``max_new_tokens``; True when the draft was shortened."""
        objs = self.objectives(objectives)
        tok = self.generator.tokenizer
        ids = encode_aligner_prompt(tok, build_prompt(self.template, query, draft, objs))
        budget = self.generator.max_length - max_new_tokens
        if len(ids) <= budget:
            return ids, False
        before, after = prompt_parts(self.template, query, objs)
        fixed = len(encode_aligner_prompt(tok, before + after))
        if fixed + 1 > budget:
            raise MetaAlignerError(
                f"the instruction, objectives and query take {fixed} tokens, more than the aligner's context of "
                f"{self.generator.max_length} tokens leaves after {max_new_tokens} new tokens; shorten the query "
                "or lower max_new_tokens")
        draft_ids = tok(draft, add_special_tokens=False).input_ids
        keep = min(len(draft_ids), budget - fixed)
        # Token boundaries can shift where the draft meets the template; cut further until it fits.
        while keep > 0:
            short = tok.decode(draft_ids[:keep], skip_special_tokens=True)
            ids = encode_aligner_prompt(tok, before + short + after)
            if len(ids) <= budget:
                return ids, True
            keep -= max(1, len(ids) - budget)
        return encode_aligner_prompt(tok, before + after), True

    def shared_prefix_len(self, ids: list[int], objectives: Objectives) -> int:
        """How many leading tokens of prompt ``ids`` are the instruction and objectives alone.

        Rows with the same objectives share these tokens; their keys and values are computed
        once and reused (see :class:`~metaaligner_core.backends.hf.LocalGenerator`).
        """
        objs = self.objectives(objectives)
        key = (self.template, *(o.text for o in objs))  # template views share this cache
        head = self._head_ids.get(key)
        if head is None:
            marker = "\x00"
            text = prompt_parts(self.template, marker, objs)[0].split(marker)[0]
            # Without its trailing space: BPE tokenizers attach that space to the query's first word.
            head = self._head_ids[key] = encode_aligner_prompt(self.generator.tokenizer, text.rstrip())
        k = 0
        for a, b in zip(ids, head):
            if a != b:
                break
            k += 1
        return min(k, len(ids) - 1)

    # -- generation ------------------------------------------------------------------------
    def align(self, query: str, draft: str, objectives: Objectives, **gen) -> str:
        """The corrected answer to ``query`` given ``draft``, for ``objectives``."""
        return self.align_batch([query], [draft], objectives, batch_size=1, **gen)[0]

    def align_batch(self, queries: list[str], drafts: list[str], objectives, *, batch_size: int = 16,
                    progress=False, **gen) -> list[str]:
        """Corrections for many rows, batched (sorted by length, order restored).

        ``objectives``: one SPEC / list of objectives for every row, or a list holding one list
        per row (e.g. ``[["honesty"], ["helpfulness", "length"]]``). ``progress``: True for a
        progress bar, or a tqdm bar to advance. Under greedy decoding (the default) each result
        equals ``align`` on that row alone.
        """
        if len(queries) != len(drafts):
            raise MetaAlignerError(f"{len(queries)} queries but {len(drafts)} drafts")
        sampling = Sampling.from_kwargs(**gen)
        per_row = _per_row_objectives(objectives, len(queries), self.objectives)  # parsed once, not per row
        encoded, prefix_lens, shortened = [], [], 0
        for q, d, o in zip(queries, drafts, per_row):
            ids, cut = self.encode(q, d, o, sampling.max_new_tokens)
            encoded.append(ids)
            prefix_lens.append(self.shared_prefix_len(ids, o))
            shortened += cut
        if shortened:
            log.warning("%d of %d drafts were shortened to fit the aligner's context of %d tokens "
                        "(with %d new tokens)", shortened, len(queries), self.generator.max_length,
                        sampling.max_new_tokens)
        outs = self.generator.generate(encoded, sampling, batch_size=batch_size, progress=progress,
                                       desc="aligning", prefix_lens=prefix_lens)
        return [self.generator.decode(o).strip() for o in outs]

    def stream(self, query: str, draft: str, objectives: Objectives, **gen) -> Iterator[str]:
        """Text deltas of the correction as it is generated; joined, they equal :meth:`align`."""
        sampling = Sampling.from_kwargs(**gen)
        objectives = self.objectives(objectives)
        ids, cut = self.encode(query, draft, objectives, sampling.max_new_tokens)
        if cut:
            log.warning("the draft was shortened to fit the aligner's context of %d tokens", self.generator.max_length)
        yield from strip_stream(self.generator.stream(ids, sampling, self.shared_prefix_len(ids, objectives)))


def _per_row_objectives(objectives, n: int, resolve) -> list:
    """One resolved objectives list per row: ``objectives`` for every row, or its items when it
    is a per-row list. ``resolve`` turns a SPEC or list into objectives."""
    if isinstance(objectives, str):
        return [resolve(objectives)] * n
    items = list(objectives)
    if items and all(isinstance(o, (str, list, tuple)) for o in items) and any(
            isinstance(o, (list, tuple)) for o in items):
        if len(items) != n:
            raise MetaAlignerError(f"{len(items)} objective lists for {n} rows")
        return [resolve(o) for o in items]
    return [resolve(items)] * n
