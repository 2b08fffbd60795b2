"""The server's correction service: conversation → draft (upstream policy) → correction (aligner).

This is the only module of :mod:`metaaligner_core.serve` that touches models; the HTTP layer
(:mod:`.api`) only translates. Models come from the shared registry (one set of weights for a
local policy and an aligner with the same MODEL string); every local model's generations go
through its :class:`~metaaligner_core.engine.scheduler.StepScheduler` (one decoding loop per
model: a request joins the running batch at the next step, drafts and corrections share it, a
client that goes away frees its row at once).

The conversation and the aligner's query
    The policy answers the whole conversation (its chat template for a local model; the
    messages as sent for an OpenAI-compatible upstream). The aligner's template has one
    *query* slot: the last user message when the conversation has a single user turn (system
    messages go to the policy only); otherwise the user and assistant turns rendered as
    ``User: ...`` / ``Assistant: ...`` paragraphs, so the aligner sees the context its draft
    answers.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
import re
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from ..errors import MetaAlignerError
from ..models import display_name, is_api_model
from ..objectives import Objective, builtin_objectives
from ..pipeline import ModelRegistry, choose_template, parse_api_objectives, with_template
from ..settings import GenerationSettings
from ..engine.detokenize import IncrementalText
from ..engine.scheduler import ShuttingDown, StepScheduler
from ..engine.stops import StopCut
from .batcher import Batcher, Job

log = logging.getLogger(__name__)

_ALIAS = re.compile(r"^([A-Za-z0-9][\w.\-]*)=(.+)$")


class RequestError(MetaAlignerError):
    """A request the server refuses: ``status`` (HTTP), OpenAI error ``type``, ``code``, ``param``."""

    def __init__(self, message: str, status: int = 400, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type, code, param


def parse_policy(value: str) -> tuple[str, str]:
    """``--policy`` value → ``(model id clients send, MODEL string)``; ``NAME=MODEL`` sets the id."""
    m = _ALIAS.match(value.strip())
    if m and not is_api_model(value.strip()):
        return m.group(1), m.group(2).strip()
    return value.strip(), value.strip()


def conversation_query(messages: list[tuple[str, str]]) -> str:
    """The aligner's query for a conversation of ``(role, text)`` (see the module docstring)."""
    turns = [(r, t) for r, t in messages if r in ("user", "assistant")]
    if not turns or turns[-1][0] != "user":
        raise RequestError("messages: the last user or assistant message must be from the user", param="messages")
    if len(turns) == 1:
        return turns[0][1]
    return "\n\n".join(f"{'User' if r == 'user' else 'Assistant'}: {t}" for r, t in turns)


def _shutting_down() -> RequestError:
    return RequestError("The server is shutting down; retry the request", 503, type="server_error",
                        code="server_shutting_down")


def context_length_error(limit: int, prompt_tokens: int, max_tokens: int, what: str = "messages") -> RequestError:
    """OpenAI's context-length error (its wording and code, which client libraries match)."""
    return RequestError(f"This model's maximum context length is {limit} tokens. However, you requested "
                        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {what}, {max_tokens} in the "
                        "completion). Please reduce the length of the messages or the completion (max_tokens).",
                        code="context_length_exceeded", param="messages")


@dataclass
class Draft:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    finish_reason: str = "stop"  # "length": the policy was cut at max_tokens


@dataclass
class Correction:
    """Filled in while the correction streams; complete once the stream ends."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    seconds: float = 0.0
    text: str = ""
    started: float = field(default_factory=time.monotonic)


class TokenText(IncrementalText):
    """Token ids → text deltas (incremental: linear in the answer's tokens); an incomplete
    multi-byte character is held back until complete."""

    def __init__(self, tokenizer, skip_ids):
        super().__init__(tokenizer, skip_ids, skip_special_tokens=True)


class Stripper:
    """Deltas of the stripped whole: leading whitespace dropped, trailing held back until more text."""

    def __init__(self):
        self.started, self.pending = False, ""

    def feed(self, d: str) -> str:
        if not self.started:
            d = d.lstrip()
            if not d:
                return ""
            self.started = True
        d = self.pending + d
        body = d.rstrip()
        self.pending = d[len(body):]
        return body


class CorrectionService:
    """Loaded policies and aligner, objectives defaults, batchers; async draft and correction.

    policies: ``--policy`` values (``MODEL`` or ``NAME=MODEL``); the first is listed first.
    objectives: the server's default SPEC; None: every built-in objective of the template's family.
    scheduling: ``"step"`` (iteration-level: requests join and leave the running batch at every
    decoding step) or ``"batch"`` (a batch at a time: requests that arrive while one decodes wait
    for it to end; kept for comparison, and for models whose cache the step scheduler cannot hold).
    """

    def __init__(self, *, policies: list[str], aligner: str = "default", template: str | None = None,
                 objectives: str | None = None, max_new_tokens: int = 1024, batch_size: int = 16,
                 window: float = 0.02, device: str | None = None, dtype: str | None = None,
                 upstream_retries: int = 2, upstream_timeout: float = 120.0, registry_class=ModelRegistry,
                 scheduling: str = "step", prefill_chunk: int = 256):
        if scheduling not in ("step", "batch"):
            raise MetaAlignerError(f'scheduling "{scheduling}": expected step or batch')
        self.scheduling, self.prefill_chunk = scheduling, prefill_chunk
        self.policies: dict[str, str] = {}
        for value in policies or ["default"]:
            model_id, spec = parse_policy(value)
            if model_id in self.policies:
                raise MetaAlignerError(f'--policy: model id "{model_id}" given twice; name them with NAME=MODEL')
            self.policies[model_id] = spec
        self.aligner_name = aligner or "default"
        self.template = choose_template(template, self.aligner_name)
        self.default_spec = objectives
        self.default_objectives = (self._parse(objectives, "--objectives", files=True) if objectives
                                   else builtin_objectives(self.template))
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size, self.window = batch_size, window
        # Holds every model the service uses (its LRU bound never drops one); API policies get the
        # server's retry and timeout settings.
        self.registry = registry_class(device=device, max_models=len(self.policies) + 1,
                                       policy_options={"timeout": upstream_timeout, "max_retries": upstream_retries},
                                       local_options={"dtype": dtype} if dtype and dtype != "auto" else None)
        self._batchers: dict[int, StepScheduler | Batcher] = {}
        self._owned: dict[int, object] = {}  # id(loop) -> its generator: the loops this service started
        self._jobs: dict[int, tuple] = {}  # id(job) -> (job, its loop): this service's jobs in flight
        self.aligner = None
        self.stopping = False

    # -- models --------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the aligner and the local policies now (the server answers once they are ready)."""
        self.aligner = with_template(self.registry.aligner(self.aligner_name), self.template)
        if self.aligner.generator is not None:
            self._batcher(self.aligner.generator)
        for spec in self.policies.values():
            backend = self.registry.policy(spec)
            if getattr(backend, "generator", None) is not None:
                self._batcher(backend.generator)

    def _batcher(self, generator) -> StepScheduler | Batcher:
        b = self._batchers.get(id(generator))
        if b is None:
            created = True
            name = f"scheduler-{len(self._batchers)}"
            if self.scheduling == "step" and isinstance(getattr(generator, "scheduler", None), StepScheduler):
                b = generator.scheduler  # one loop per model, whoever started it (theirs to stop)
                created = False
            elif self.scheduling == "step":
                try:
                    b = StepScheduler(generator, batch_size=self.batch_size, prefill_chunk=self.prefill_chunk,
                                      name=name)
                    # the web app at /ui streams through the generator: the same loop, shared batches
                    generator.scheduler = b
                except ValueError as e:  # e.g. sliding-window layers
                    log.info("%s: batch-at-a-time scheduling (%s)", generator.name, e)
            if b is None:
                b = Batcher(generator, batch_size=self.batch_size, window=self.window, name=name)
            if created:
                self._owned[id(b)] = generator
            self._batchers[id(generator)] = b
        return b

    def schedulers(self) -> list:
        return list(self._batchers.values())

    def batch_sizes(self) -> list[int]:
        """Rows per decoding step (batch-at-a-time: per engine call) so far, over every model."""
        return [n for b in self._batchers.values() for n in list(b.batches)]

    def shutdown(self, reason: str = "the server is shutting down", wait: bool = True) -> None:
        """Stop the decoding loops this service started: requests in flight are answered with a
        503 error within one decoding step. A loop someone else started (the web app's, attached
        to the model before the server loaded it) keeps running for them; this service's rows in
        it are cancelled and answered with the same 503. ``wait``: until the loops have ended
        (else only tell them)."""
        self.stopping = True
        for b in self._batchers.values():
            gen = self._owned.get(id(b))
            if gen is None:
                continue
            b.stop(reason, timeout=30.0 if wait else 0.0)
            if getattr(gen, "scheduler", None) is b:
                gen.scheduler = None  # streams after this decode alone instead of failing
        for job, loop in list(self._jobs.values()):
            if id(loop) not in self._owned:
                job.cancelled.set()  # its row leaves their loop at the next step
                try:
                    job.emit("error", ShuttingDown(reason))
                except RuntimeError:  # its event loop has already closed: nobody is waiting
                    pass

    def close(self) -> None:
        self.shutdown()

    def policy_spec(self, model_id: str) -> str:
        spec = self.policies.get(model_id)
        if spec is None:
            raise RequestError(f"The model `{model_id}` does not exist on this server; GET /v1/models lists "
                               f"the configured ones", 404, code="model_not_found", param="model")
        return spec

    # -- objectives ----------------------------------------------------------------------------
    def parse_objectives(self, value, where: str = "metaaligner.objectives") -> list[Objective]:
        """A SPEC string or a list of items; absent: the defaults; ``[]`` / ``""``: no correction."""
        if value is None:
            return list(self.default_objectives)
        if not (value.strip() if isinstance(value, str) else value):
            return []
        return self._parse(value, where)

    def _parse(self, value, where: str, files: bool = False) -> list[Objective]:
        from ..objectives import parse_objectives

        try:
            return parse_objectives(value, family=self.template) if files else parse_api_objectives(value, self.template)
        except MetaAlignerError as e:
            raise RequestError(f"{where}: {e}", param=where) from None

    # -- generation through the batchers ---------------------------------------------------------
    async def _tokens(self, generator, ids: list[int], prefix_len: int, settings: GenerationSettings,
                      group: str) -> AsyncIterator[list[tuple[str, object]]]:
        """Lists of ``("token", id)`` items, the last ending with ``("done", reason)``: what the
        decoding loop produced since the request last looked (one list per step while it keeps
        up; several steps' worth, sent as one chunk, when it falls behind)."""
        loop = asyncio.get_running_loop()
        pending: deque = deque()
        ready = asyncio.Event()
        waking = [False]

        def emit(kind, value):  # the scheduler's thread: one wake-up of the event loop per batch of items
            pending.append((kind, value))
            if not waking[0]:
                waking[0] = True
                loop.call_soon_threadsafe(ready.set)

        job = Job(ids, prefix_len, settings, emit, group=group)
        if self.stopping:
            raise _shutting_down()
        loop_ = self._batcher(generator)
        try:
            loop_.submit(job)
        except (ShuttingDown, RuntimeError):
            raise _shutting_down() from None
        self._jobs[id(job)] = (job, loop_)
        try:
            while True:
                await ready.wait()
                ready.clear()
                waking[0] = False
                items = []
                while pending:
                    items.append(pending.popleft())
                if not items:
                    continue
                if items[-1][0] == "error":
                    value = items[-1][1]
                    if isinstance(value, ShuttingDown) or self.stopping:
                        raise _shutting_down()
                    raise RequestError(f"generation failed ({type(value).__name__})", 500, type="server_error")
                yield items
                if items[-1][0] == "done":
                    return
        finally:
            self._jobs.pop(id(job), None)
            job.cancelled.set()  # a client that went away frees its row at the next step

    # -- draft -----------------------------------------------------------------------------------
    async def draft(self, model_id: str, messages: list[tuple[str, str]], settings: GenerationSettings) -> Draft:
        spec = self.policy_spec(model_id)
        start = time.monotonic()
        try:
            backend = await asyncio.to_thread(self.registry.policy, spec)
        except MetaAlignerError as e:
            raise RequestError(f"upstream model {model_id} unavailable: {e}", 502, type="upstream_error",
                               code="upstream_unavailable") from None
        if getattr(backend, "generator", None) is not None:
            draft = await self._local_draft(backend.generator, messages, settings)
        else:
            draft = await asyncio.to_thread(self._api_draft, backend, model_id, messages, settings)
        draft.seconds = time.monotonic() - start
        return draft

    def model_info(self, model_id: str) -> dict:
        """``/v1/models``' ``metaaligner`` object of a model id."""
        backend = self.registry.loaded("policy", self.policies[model_id]) if hasattr(self.registry, "loaded") else None
        gen = getattr(backend, "generator", None)
        dtype = str(gen.model.dtype).replace("torch.", "") if gen else None
        return {"default_max_tokens": self.max_new_tokens, "context_length": gen.max_length if gen else None,
                "aligner": display_name(self.aligner_name), "template": self.template,
                "dtype": {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)}

    async def check_draft(self, model_id: str, messages: list[tuple[str, str]], settings: GenerationSettings) -> None:
        """Refuse a conversation too long for a local policy's context (with ``max_tokens``)."""
        spec = self.policy_spec(model_id)
        backend = self.registry.loaded("policy", spec) if hasattr(self.registry, "loaded") else None
        if getattr(backend, "generator", None) is not None:
            self._draft_ids(backend.generator, messages, settings)

    @staticmethod
    def _draft_ids(gen, messages, settings: GenerationSettings) -> list[int]:
        tok = gen.tokenizer
        chat = [{"role": "system" if r == "developer" else r, "content": t} for r, t in messages]
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        else:
            ids = tok("\n\n".join(t for _, t in messages)).input_ids
        if len(ids) + settings.max_new_tokens > gen.max_length:
            raise context_length_error(gen.max_length, len(ids), settings.max_new_tokens)
        return ids

    async def _local_draft(self, gen, messages, settings: GenerationSettings) -> Draft:
        ids = self._draft_ids(gen, messages, settings)
        out: list[int] = []
        reason = "stop"
        async for items in self._tokens(gen, ids, 0, settings, "draft"):
            for kind, value in items:
                if kind == "token" and value not in gen.eos_ids:
                    out.append(value)
                elif kind == "done":
                    reason = value
        return Draft(gen.decode(out).strip(), len(ids), len(out), finish_reason=reason)

    def _api_draft(self, backend, model_id: str, messages, settings: GenerationSettings) -> Draft:
        from ..backends.base import BackendError

        try:
            if hasattr(backend, "client") and hasattr(backend.client, "chat"):  # OpenAI-compatible: the messages as sent
                limit = ({"max_tokens": settings.max_new_tokens} if getattr(backend, "compatible", False)
                         else {"max_completion_tokens": settings.max_new_tokens})
                import openai

                from ..backends.base import describe_api_error

                try:
                    resp = backend.client.chat.completions.create(
                        model=backend.model, messages=[{"role": r, "content": t} for r, t in messages],
                        temperature=settings.temperature, **limit)
                except openai.OpenAIError as e:  # the key is scrubbed should the upstream echo it
                    raise BackendError(describe_api_error(model_id, e, getattr(backend, "_key", None))) from None
                text = (resp.choices[0].message.content or "") if resp.choices else ""
                usage = resp.usage
                reason = "length" if resp.choices and resp.choices[0].finish_reason == "length" else "stop"
                return Draft(text.strip(), usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0,
                             finish_reason=reason)
            system = "\n\n".join(t for r, t in messages if r in ("system", "developer")) or None
            turns = [(r, t) for r, t in messages if r not in ("system", "developer")]
            done = backend.complete(conversation_query(turns), max_tokens=settings.max_new_tokens,
                                    temperature=settings.temperature, system=system)
            n = done.usage.get("completion_tokens", 0)
            reason = getattr(done, "finish_reason", None) or ("length" if n >= settings.max_new_tokens else "stop")
            return Draft(done.text.strip(), done.usage.get("prompt_tokens", 0), n,
                         finish_reason="length" if reason in ("length", "max_tokens") else "stop")
        except BackendError as e:
            log.warning("upstream %s failed", model_id)
            raise RequestError(f"upstream model {model_id} failed: {e}", 502, type="upstream_error",
                               code="upstream_error") from None

    # -- correction ------------------------------------------------------------------------------
    def aligner_prompt(self, query: str, draft: str, objectives: list[Objective], settings: GenerationSettings):
        """``(ids, shared prefix length)`` of a local aligner's prompt; a query too long is a 400."""
        try:
            ids, cut = self.aligner.encode(query, draft, objectives, settings.max_new_tokens)
        except MetaAlignerError:
            from ..inference import encode_aligner_prompt

            fixed = len(encode_aligner_prompt(self.aligner.generator.tokenizer, self.aligner.prompt(query, "", objectives)))
            raise context_length_error(self.aligner.generator.max_length, fixed, settings.max_new_tokens,
                                       "messages and the aligner's instructions") from None
        if cut:
            log.warning("a draft was shortened to fit the aligner's context of %d tokens",
                        self.aligner.generator.max_length)
        return ids, self.aligner.shared_prefix_len(ids, objectives)

    def check_query(self, query: str, objectives: list[Objective], settings: GenerationSettings) -> None:
        """Refuse a query the local aligner cannot take before the policy is asked (a remote
        aligner's server judges its own context)."""
        if objectives and self.aligner.generator is not None:
            self.aligner_prompt(query, "", objectives, settings)

    async def correct(self, query: str, draft: str, objectives: list[Objective], settings: GenerationSettings,
                      result: Correction) -> AsyncIterator[str]:
        """Text deltas of the correction as it is generated; ``result`` holds the totals at the end."""
        gen = self.aligner.generator
        pieces: list[str] = []
        if gen is None:  # a remote aligner (openai-compatible:NAME@URL): its server batches
            async for d in self._remote_correct(query, draft, objectives, settings, result):
                pieces.append(d)
                yield d
        else:
            ids, prefix = self.aligner_prompt(query, draft, objectives, settings)
            result.prompt_tokens = len(ids)
            text, strip = TokenText(gen.tokenizer, gen.eos_ids), Stripper()
            cut = StopCut(self.aligner.stops(query, draft))
            tokens = self._tokens(gen, ids, prefix, settings, "correction")
            try:
                async for items in tokens:
                    new = [v for k, v in items if k == "token"]
                    result.completion_tokens += sum(v not in gen.eos_ids for v in new)
                    d = text.add(*new)
                    if items[-1][0] == "done":
                        result.finish_reason = items[-1][1]
                        d += text.finish()
                    d = cut.feed(d) + (cut.finish() if items[-1][0] == "done" else "")
                    if cut.hit:  # the aligner wrote a template marker: the correction ends before it
                        result.finish_reason = "stop"
                    d = strip.feed(d)
                    if d:
                        pieces.append(d)
                        yield d
                    if cut.hit:
                        break
            finally:
                await tokens.aclose()  # on a stop, its row leaves the batch at the next step
        result.text = "".join(pieces)
        result.seconds = time.monotonic() - result.started

    async def _remote_correct(self, query, draft, objectives, settings: GenerationSettings,
                              result: Correction) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        finish: dict = {}

        def work():
            try:
                for d in self.aligner.stream(query, draft, objectives, finish=finish, **settings.aligner_kwargs()):
                    if stop.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, ("delta", d))
                loop.call_soon_threadsafe(queue.put_nowait, ("done", None))
            except Exception as e:  # noqa: BLE001  (reported to the client as a 502)
                loop.call_soon_threadsafe(queue.put_nowait, ("error", e))

        threading.Thread(target=work, name="metaaligner-remote-aligner", daemon=True).start()
        try:
            while True:
                kind, value = await queue.get()
                if kind == "done":
                    result.finish_reason = "length" if finish.get("reason") == "length" else "stop"
                    result.completion_tokens = finish.get("completion_tokens", 0)
                    return
                if kind == "error":
                    raise RequestError(f"the aligner failed: {value}" if isinstance(value, MetaAlignerError)
                                       else f"the aligner failed ({type(value).__name__})", 502,
                                       type="upstream_error", code="upstream_error")
                yield value
        finally:
            stop.set()

    def describe(self) -> dict:
        return {"aligner": display_name(self.aligner_name), "template": self.template,
                "policies": list(self.policies), "default_objectives": [o.text for o in self.default_objectives]}
