"""Correction inference: the aligner reads ``(query, draft, objectives)`` and writes a better answer.

>>> from metaaligner_core.inference import Aligner
>>> aligner = Aligner.load("MetaAligner/MetaAligner-UltraFeedback-1.1B")       # doctest: +SKIP
>>> aligner.align("What is RLHF?", draft, "honesty,helpfulness")               # doctest: +SKIP
>>> aligner.align_batch(queries, drafts, "honesty,helpfulness", batch_size=16)  # doctest: +SKIP

The aligner reads the raw template prompt (:func:`~metaaligner_core.templates.build_prompt`,
no chat template) encoded by :func:`encode_aligner_prompt`: the tokenizer's own encoding with
BOS in front. A prompt longer than the aligner's context loses the end of its *draft*; the
instruction, the objectives and the query are kept whole.

:class:`RemoteAligner` is the same interface over an OpenAI-compatible ``/v1/completions`` server
(``openai-compatible:NAME@URL``: vLLM, SGLang, TGI, a llama.cpp server) that serves a released
checkpoint: it sends the same raw template prompt, many requests in flight for a batch.

``Aligner.load("default")`` is the embedded SmolLM2-135M-Instruct *base* model prompted with the
template, not a trained MetaAligner (``is_base_model`` is True): it runs anywhere, offline, but its
corrections are illustrative only.
"""
from __future__ import annotations

import logging
from typing import Iterator, Sequence

from .backends.hf import LocalGenerator, strip_stream
from .errors import MetaAlignerError
from .models import is_api_model, is_default, parse_model
from .settings import GenerationSettings
from .objectives import Objective, parse_objectives
from .engine.stops import Stops, cut_at_loop, cut_at_stop, cut_stream
from .templates import build_prompt, check_template, choose_template, prompt_parts, stop_texts

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
        self.stopped_at_marker = 0  # align/align_batch corrections that ended at a template marker (not streams)
        self.stopped_at_loop = 0  # ... and that ended at a loop (engine.stops.loop_end)

    @classmethod
    def load(cls, model: str = "default", *, template: str | None = None, device=None, dtype=None,
             attn=None, max_length: int | None = None) -> "Aligner":
        """Load an aligner: ``default``, a hub id, a local directory or a ``.gguf`` file.

        ``template`` None picks the one the checkpoint was trained with from its name
        (HH-RLHF / UltraFeedback / IMHI), else ``ultrafeedback``.
        """
        if is_api_model(model):
            raise MetaAlignerError(f'"{model}" is an API model; Aligner.load takes a local model (a Hugging Face '
                                   "id, a directory, a .gguf file or default); for a completions server use "
                                   "openai-compatible:NAME@URL through load_aligner or RemoteAligner")
        generator = LocalGenerator.load(model, device=device, dtype=dtype, attn=attn, max_length=max_length)
        return cls.from_generator(generator, model, template=template)

    @classmethod
    def from_generator(cls, generator: LocalGenerator, model: str = "default", *,
                       template: str | None = None) -> "Aligner":
        """An aligner over an already loaded model (e.g. the embedded model shared with the policy)."""
        base = is_default(model)
        tpl = choose_template(template, None if base else str(model))
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

    def stops(self, query: str, draft: str) -> Stops:
        """Where a correction ends besides EOS: the template's markers (``| Edit``, ``| Answer:``,
        ``| Query:``) that are not in the query or the draft (see :func:`~.templates.stop_texts`),
        and the end of a loop: a sentence written three times and twice more than the draft has
        it (:mod:`.engine.stops`)."""
        return Stops(stop_texts(self.template, query, draft), draft=draft)

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
        sampling = GenerationSettings.from_kwargs(**gen)
        per_row = _per_row_objectives(objectives, len(queries), self.objectives)  # parsed once, not per row
        stops = [self.stops(q, d) for q, d in zip(queries, drafts)]
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
                                       desc="aligning", prefix_lens=prefix_lens, stops=stops)
        texts = []
        for o, row_stops in zip(outs, stops):
            text, hit = cut_at_stop(self.generator.decode(o), row_stops)
            text, looped = cut_at_loop(text, row_stops)
            self.stopped_at_marker += hit
            self.stopped_at_loop += looped
            texts.append(text.strip())
        return texts

    def complete_raw(self, prompts: list[str], *, batch_size: int = 16, progress=False, **gen) -> list[str]:
        """Continuations of raw text prompts (another corrector's template, e.g. the PKU Aligner's),
        encoded like aligner prompts; a prompt too long for the context keeps its end."""
        sampling = GenerationSettings.from_kwargs(**gen)
        budget = self.generator.max_length - sampling.max_new_tokens
        if budget < 1:
            raise MetaAlignerError(f"max_new_tokens {sampling.max_new_tokens} leaves no room for a prompt in the "
                                   f"context of {self.generator.max_length} tokens")
        encoded = [encode_aligner_prompt(self.generator.tokenizer, p)[-budget:] for p in prompts]
        outs = self.generator.generate(encoded, sampling, batch_size=batch_size, progress=progress, desc="correcting")
        return [self.generator.decode(o).strip() for o in outs]

    def stream(self, query: str, draft: str, objectives: Objectives, **gen) -> Iterator[str]:
        """Text deltas of the correction as it is generated; joined, they equal :meth:`align`."""
        sampling = GenerationSettings.from_kwargs(**gen)
        objectives = self.objectives(objectives)
        ids, cut = self.encode(query, draft, objectives, sampling.max_new_tokens)
        if cut:
            log.warning("the draft was shortened to fit the aligner's context of %d tokens", self.generator.max_length)
        deltas = self.generator.stream(ids, sampling, self.shared_prefix_len(ids, objectives))
        yield from strip_stream(cut_stream(deltas, self.stops(query, draft)))


def load_aligner(model: str = "default", **kwargs):
    """:class:`Aligner` for a local MODEL, :class:`RemoteAligner` for ``openai-compatible:NAME@URL``.

    Local loads take ``template``, ``device``, ``dtype``, ``attn``, ``max_length``; remote ones
    ``template``, ``timeout``, ``max_retries``, ``concurrency``, ``api_key``.
    """
    if parse_model(model).provider == "openai-compatible":
        keep = ("template", "timeout", "max_retries", "concurrency", "api_key")
        return RemoteAligner.load(model, **{k: v for k, v in kwargs.items() if k in keep})
    keep = ("template", "device", "dtype", "attn", "max_length")
    return Aligner.load(model, **{k: v for k, v in kwargs.items() if k in keep})


class RemoteAligner:
    """An aligner served by an OpenAI-compatible ``/v1/completions`` endpoint.

    The prompt is the same raw template text a local :class:`Aligner` reads (the server's
    tokenizer adds BOS, as the released Llama tokenizers do); no chat template. A batch keeps up
    to ``concurrency`` requests in flight (the server batches them). Greedy unless a temperature
    is given; ``repetition_penalty`` is sent as the vLLM/SGLang extra field when it is not 1.
    Drafts are not shortened here: a prompt longer than the server's context is its error.
    The key is ``METAALIGNER_COMPAT_API_KEY`` (never ``OPENAI_API_KEY``).
    """

    is_base_model = False
    generator = None  # nothing local: the registry shares no weights with it

    def __init__(self, model: str, base_url: str, *, name: str | None = None, template: str = "ultrafeedback",
                 timeout: float = 300.0, max_retries: int = 5, concurrency: int = 32, api_key: str | None = None):
        import openai

        from .backends.openai_backend import DUMMY_KEY
        from .models import compat_api_key

        self.model, self.base_url = model, base_url
        self.name = name or f"openai-compatible:{model}@{base_url}"
        self.template = check_template(template)
        self.concurrency = max(1, int(concurrency))
        self._key = api_key or compat_api_key() or DUMMY_KEY
        self._openai = openai
        self.client = openai.OpenAI(api_key=self._key, base_url=base_url, timeout=timeout, max_retries=max_retries)
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0}

    @classmethod
    def load(cls, spec: str, *, template: str | None = None, **kwargs) -> "RemoteAligner":
        m = parse_model(spec)
        if m.provider != "openai-compatible":
            raise MetaAlignerError(f'"{spec}": a remote aligner is given as openai-compatible:NAME@URL')
        return cls(m.name, m.url, name=m.spec, template=choose_template(template, m.spec), **kwargs)

    objectives = Aligner.objectives
    prompt = Aligner.prompt
    stops = Aligner.stops

    def _request(self, prompt: str, s: GenerationSettings, stream: bool = False, stop: Sequence[str] = ()) -> dict:
        req = {"model": self.model, "prompt": prompt, "max_tokens": s.max_new_tokens, "temperature": s.temperature,
               "stream": stream}
        if stop:
            req["stop"] = list(stop)
        if s.temperature > 0 and s.top_p < 1:
            req["top_p"] = s.top_p
        if s.seed is not None:
            req["seed"] = s.seed
        if s.repetition_penalty != 1.0:
            req["extra_body"] = {"repetition_penalty": s.repetition_penalty}
        return req

    def _error(self, e: Exception) -> MetaAlignerError:
        from .backends.base import BackendError, describe_api_error

        return BackendError(describe_api_error(self.name, e, self._key))

    def _complete(self, prompt: str, s: GenerationSettings, stop: Sequence[str] = ()) -> str:
        """One completion; cut at a stop here too, for a server that ignores ``stop``."""
        try:
            resp = self.client.completions.create(**self._request(prompt, s, stop=stop))
        except self._openai.OpenAIError as e:
            raise self._error(e) from None
        if resp.usage is not None:
            self.stats["prompt_tokens"] += resp.usage.prompt_tokens or 0
            self.stats["generated_tokens"] += resp.usage.completion_tokens or 0
        return cut_at_loop(cut_at_stop(resp.choices[0].text or "", stop)[0], stop)[0].strip() if resp.choices else ""

    def align(self, query: str, draft: str, objectives: Objectives, **gen) -> str:
        return self._complete(self.prompt(query, draft, objectives), GenerationSettings.from_kwargs(**gen),
                              self.stops(query, draft))

    def align_batch(self, queries: list[str], drafts: list[str], objectives, *, batch_size: int = 16,
                    progress=False, **gen) -> list[str]:
        """Corrections of many rows, up to ``concurrency`` requests in flight, in input order.
        ``batch_size`` is ignored: the server forms its own batches."""
        if len(queries) != len(drafts):
            raise MetaAlignerError(f"{len(queries)} queries but {len(drafts)} drafts")
        per_row = _per_row_objectives(objectives, len(queries), self.objectives)
        prompts = [self.prompt(q, d, o) for q, d, o in zip(queries, drafts, per_row)]
        return self.complete_raw(prompts, progress=progress, stops=[self.stops(q, d) for q, d in zip(queries, drafts)],
                                 **gen)

    def complete_raw(self, prompts: list[str], *, batch_size: int = 16, progress=False,
                     stops: Sequence[Sequence[str]] | None = None, **gen) -> list[str]:
        """Continuations of raw text prompts, up to ``concurrency`` requests in flight, in order;
        ``stops[i]``: the ``stop`` texts sent with prompt i."""
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        s = GenerationSettings.from_kwargs(**gen)
        if not prompts:
            return []
        if hasattr(progress, "update"):
            bar, own = progress, False
        else:
            bar, own = tqdm(total=len(prompts), desc="aligning", unit="row", disable=not progress, leave=False), True

        def one(prompt, stop):
            out = self._complete(prompt, s, stop)
            bar.update(1)
            return out

        try:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
                return list(pool.map(one, prompts, stops or [()] * len(prompts)))
        finally:
            if own:
                bar.close()

    def stream(self, query: str, draft: str, objectives: Objectives, finish: dict | None = None,
               **gen) -> Iterator[str]:
        """Text deltas of the correction; ``finish``, when given, receives the server's
        ``reason`` (``"stop"``/``"length"``) and ``completion_tokens`` (when it reports usage)."""
        s = GenerationSettings.from_kwargs(**gen)
        finish = {} if finish is None else finish

        def texts(chunks):
            for c in chunks:
                if getattr(c, "usage", None) is not None and c.usage.completion_tokens is not None:
                    finish["completion_tokens"] = c.usage.completion_tokens
                if not c.choices:
                    continue
                if c.choices[0].finish_reason:
                    finish["reason"] = c.choices[0].finish_reason
                if c.choices[0].text:
                    yield c.choices[0].text

        try:
            stop = self.stops(query, draft)
            chunks = self.client.completions.create(**self._request(self.prompt(query, draft, objectives), s, True,
                                                                    stop=stop))
            with chunks:  # closed on a stop too: the server stops generating
                yield from strip_stream(cut_stream(texts(chunks), stop))
        except self._openai.OpenAIError as e:
            raise self._error(e) from None


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
