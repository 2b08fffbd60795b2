"""The correction pipeline: *draft (given or from the policy) → aligner prompt → aligner → result
or stream*, behind the CLI (``metaaligner align``), the web app and the server.

- :class:`ModelRegistry` holds ONE instance per policy / aligner MODEL string, shared by every
  caller (a local policy and a local aligner with the same MODEL string share one set of weights),
  loaded on first use or in the background (:meth:`ModelRegistry.preload`), each load with a
  :class:`LoadStatus`, at most ``max_models`` per kind (least recently used dropped). Hooks:
  ``check`` (called before any load: an allow-list raises :class:`MetaAlignerError` there) and
  ``on_status`` (called with each :class:`LoadStatus` change).
- :func:`~metaaligner_core.templates.choose_template` (re-exported here): the one
  template-selection rule (an explicit choice, else the aligner's name, else the data's name, else
  ``ultrafeedback``); objectives are worded in that template's family everywhere.
- :class:`Pipeline`: one correction, streamed (:meth:`Pipeline.stream`) or whole
  (:meth:`Pipeline.correct`), and batches for the CLI (:meth:`Pipeline.draft_batch`,
  :meth:`Pipeline.correct_batch`).

Errors the user can fix are :class:`MetaAlignerError` with a one-line message. User texts are
never logged.
"""
from __future__ import annotations

import copy
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from .errors import MetaAlignerError
from .models import canonical, display_name, is_default, missing_api_key, parse_model
from .objectives import Objective, parse_objectives
from .settings import GenerationSettings
from .templates import AUTO_TEMPLATE, build_prompt, choose_template  # noqa: F401  (part of this API)

log = logging.getLogger(__name__)

INPUT_DRAFT_SOURCE = "input"  # draft_source of a draft that came with the request / input row

__all__ = ["AUTO_TEMPLATE", "INPUT_DRAFT_SOURCE", "Correction", "GenerationSettings", "LoadStatus",
           "ModelRegistry", "Pipeline", "choose_template", "parse_api_objectives", "with_template"]


# --- templates and objectives ---------------------------------------------------------------

def parse_api_objectives(spec, template: str) -> list[Objective]:
    """An objectives SPEC (string or list) from a remote caller (app API, server). ``@file`` SPECs
    would read files on the server, so they are refused."""
    items = spec if isinstance(spec, (list, tuple)) else (spec or "").strip()
    if any(str(s).strip().startswith("@") for s in (items if isinstance(items, (list, tuple)) else [items])):
        raise MetaAlignerError("objectives: @file SPECs are not accepted here; send keys or "
                               '"Name: description" items separated by commas')
    return parse_objectives(items, family=template)


def with_template(aligner, template: str | None):
    """The shared aligner rendering prompts with another template: a shallow copy shares the
    weights, so choosing a template never loads a second model."""
    if not template or template == aligner.template:
        return aligner
    view = copy.copy(aligner)
    view.template = template
    return view


# --- models ---------------------------------------------------------------------------------

@dataclass
class LoadStatus:
    """The state of one model load (the app shows it; the server reports it in /healthz)."""

    kind: str                 # "policy" | "aligner"
    name: str
    state: str                # "loading" | "ready" | "failed"
    detail: str = ""
    started: float = field(default_factory=time.monotonic)
    seconds: float | None = None


class ModelRegistry:
    """One shared instance per model name, loaded once, with a status per load.

    ``policy_options`` go to :func:`~metaaligner_core.backends.load_backend` for API policies
    (``base_url``, ``timeout``, ``max_retries``, ``concurrency``); ``local_options`` to local
    loads (``dtype``, ``max_length``, ``attn``). ``check(kind, name)`` runs before every load
    and may raise :class:`MetaAlignerError` (e.g. a model allow-list); ``on_status(status)`` is
    called whenever a load starts, finishes or fails.
    """

    def __init__(self, *, device: str | None = None, max_models: int = 2, threads: int | None = None,
                 policy_options: dict | None = None, local_options: dict | None = None,
                 check: Callable[[str, str], None] | None = None,
                 on_status: Callable[[LoadStatus], None] | None = None):
        self.device = device
        self.max_models = max(1, int(max_models))
        self.threads = threads
        self.policy_options = dict(policy_options or {})
        self.local_options = dict(local_options or {})
        self.check = check
        self.on_status = on_status
        self._models: dict[str, OrderedDict] = {"policy": OrderedDict(), "aligner": OrderedDict()}
        self._status: dict[tuple[str, str], LoadStatus] = {}
        self._load_lock = threading.Lock()  # one load at a time: loads are memory-heavy

    # Loaders are methods so that the heavy imports happen on first use, not at import. A local
    # policy and an aligner with the same MODEL string share one set of weights (the embedded
    # default is both out of the box): half the memory, and the second "load" is instant.
    def _load_policy(self, name: str):
        from .backends import load_backend

        if parse_model(name).is_api:
            return load_backend(name, **self.policy_options)
        aligner = self._models["aligner"].get(name)
        if aligner is not None and hasattr(aligner, "generator"):
            from .backends.hf import HFChatBackend

            return HFChatBackend(aligner.generator, name=name)
        return load_backend(name, device=self.device, **self.local_options)

    def _load_aligner(self, name: str):
        from .inference import Aligner, RemoteAligner

        spec = parse_model(name)
        if spec.provider == "openai-compatible":
            opts = {k: v for k, v in self.policy_options.items() if k in ("timeout", "max_retries", "concurrency")}
            return RemoteAligner.load(name, **opts)
        policy = self._models["policy"].get(name)
        if policy is not None and hasattr(policy, "generator"):
            return Aligner.from_generator(policy.generator, name)
        return Aligner.load(name, device=self.device, **self.local_options)

    def _set_status(self, status: LoadStatus) -> None:
        self._status[(status.kind, status.name)] = status
        if self.on_status is not None:
            self.on_status(status)

    def get(self, kind: str, name: str | None):
        """The shared instance of ``name``, loading it (blocking) if needed."""
        name = canonical(name)
        models = self._models[kind]
        if name in models:
            models.move_to_end(name)
            return models[name]
        spec = parse_model(name)
        if kind == "aligner" and spec.is_api and spec.provider != "openai-compatible":
            raise MetaAlignerError(f'aligner "{name}": openai: and anthropic: models can only be a policy; the aligner '
                                   "must be a local model (default, a directory or a Hugging Face id) or a server "
                                   "given as openai-compatible:NAME@URL")
        if self.check is not None:
            self.check(kind, name)
        if kind == "policy":
            missing = missing_api_key(name)
            if missing:
                raise MetaAlignerError(missing)
        with self._load_lock:
            if name in models:
                return models[name]
            if self.threads and not spec.is_api:
                import torch

                # Set once, before the first local model runs; applies to every generating thread.
                torch.set_num_threads(self.threads)
            status = LoadStatus(kind, name, "loading")
            self._set_status(status)
            log.info("loading %s %s", kind, display_name(name))
            try:
                instance = self._load_policy(name) if kind == "policy" else self._load_aligner(name)
            except MetaAlignerError as e:
                status.state, status.detail = "failed", str(e)
                self._set_status(status)
                raise
            except Exception as e:  # a library error: keep its first line for the user, trace for the log
                log.exception("loading %s %s failed", kind, display_name(name))
                status.state, status.detail = "failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                self._set_status(status)
                raise MetaAlignerError(f"cannot load {kind} {display_name(name)}: {status.detail}") from None
            status.state, status.seconds = "ready", time.monotonic() - status.started
            self._set_status(status)
            models[name] = instance
            while len(models) > self.max_models:
                dropped, _ = models.popitem(last=False)
                self._status.pop((kind, dropped), None)
                log.info("unloaded %s %s (keeping %d)", kind, display_name(dropped), self.max_models)
            return instance

    def policy(self, name: str | None):
        return self.get("policy", name)

    def aligner(self, name: str | None):
        return self.get("aligner", name)

    def loaded(self, kind: str, name: str | None):
        """The instance if already loaded, else None (never loads)."""
        return self._models[kind].get(canonical(name))

    def preload(self, *, policy: str | None, aligner: str | None) -> threading.Thread:
        """Load the start-up models in a background thread; failures show up in the status."""
        def work():
            for kind, name in (("aligner", aligner), ("policy", policy)):
                if name is None:
                    continue
                try:
                    self.get(kind, name)
                except MetaAlignerError as e:
                    log.warning("%s %s not loaded: %s", kind, display_name(name), e)
                    # get() can refuse before it records a status (an API aligner, a missing key):
                    # the "loading" placeholder set below must not stay.
                    st = self._status.get((kind, canonical(name)))
                    if st is None or st.state == "loading":
                        self._set_status(LoadStatus(kind, canonical(name), "failed", str(e)))
        for kind, name in (("aligner", aligner), ("policy", policy)):
            if name is not None and self.loaded(kind, name) is None:
                self._status.setdefault((kind, canonical(name)), LoadStatus(kind, canonical(name), "loading"))
        thread = threading.Thread(target=work, name="metaaligner-preload", daemon=True)
        thread.start()
        return thread

    def statuses(self) -> list[LoadStatus]:
        return list(self._status.values())

    def busy(self) -> bool:
        return any(s.state == "loading" for s in self._status.values())


# --- the pipeline ---------------------------------------------------------------------------

@dataclass
class Correction:
    """One correction, complete or in progress (:meth:`Pipeline.stream` yields it as it grows).

    ``phase``: loading-policy | drafting | loading-aligner | aligning | done.
    ``draft_source``: :data:`INPUT_DRAFT_SOURCE` (or the caller's own label) for a given draft,
    else the policy's MODEL string. ``timings``: seconds of ``draft`` and ``align`` (wall clock).
    """

    query: str
    draft: str
    aligned: str
    phase: str
    draft_source: str
    aligner_name: str
    template: str
    objectives: list = field(default_factory=list)
    prompt: str = ""          # the exact aligner prompt, once the draft is complete
    timings: dict = field(default_factory=dict)


class Pipeline:
    """Draft → prompt → aligner with the shared models of a :class:`ModelRegistry`.

    ``policy``, ``aligner``, ``template`` (``None``/``auto``: :func:`choose_template`) and
    ``settings`` are defaults each call may override.
    """

    update_class = Correction  # the app subclasses it to add its status strings

    def __init__(self, registry: ModelRegistry, *, policy: str | None = "default", aligner: str = "default",
                 template: str | None = None, settings: GenerationSettings | None = None,
                 input_draft_source: str = INPUT_DRAFT_SOURCE):
        self.registry = registry
        self.policy_name = policy
        self.aligner_name = aligner
        self.template = template or AUTO_TEMPLATE
        self.settings = settings or GenerationSettings()
        self.input_draft_source = input_draft_source

    def template_for(self, aligner_name: str | None, choice: str | None = None, data: str | None = None) -> str:
        """:func:`choose_template` with this pipeline's template as the explicit choice fallback."""
        explicit = choice if choice not in (None, "", AUTO_TEMPLATE) else self.template
        return choose_template(explicit, canonical(aligner_name or self.aligner_name), data)

    def is_base_model(self, aligner_name: str | None) -> bool:
        """Whether the aligner is the untrained embedded model (known before loading for ``default``)."""
        loaded = self.registry.loaded("aligner", aligner_name)
        if loaded is not None:
            return bool(getattr(loaded, "is_base_model", False))
        return is_default(aligner_name)

    def aligner(self, name: str | None = None, template: str | None = None):
        """The shared aligner ``name`` rendering ``template`` (loading it if needed)."""
        name = canonical(name or self.aligner_name)
        return with_template(self.registry.aligner(name), self.template_for(name, template))

    def prompt(self, query: str, draft: str, objectives: Sequence[Objective | str], template: str) -> str:
        return build_prompt(template, query, draft, objectives)

    # -- one correction ----------------------------------------------------------------------
    def stream(self, query: str, objectives, draft: str = "", *, policy: str | None = None,
               aligner: str | None = None, template: str | None = None,
               settings: GenerationSettings | None = None) -> Iterator[Correction]:
        """Yield the growing correction: the draft streams first (from the policy, unless
        ``draft`` is given), then the aligner's text. Closing the iterator stops generation.

        ``objectives``: a list of :class:`Objective` or a SPEC (``@file`` refused).
        """
        query = (query or "").strip()
        if not query:
            raise MetaAlignerError("query: empty; type a question or instruction")
        aligner_name = canonical(aligner or self.aligner_name)
        template = self.template_for(aligner_name, template)
        if isinstance(objectives, str) or (objectives and not all(isinstance(o, Objective) for o in objectives)):
            objectives = parse_api_objectives(objectives, template)
        if not objectives:
            raise MetaAlignerError("no objectives given")
        settings = settings or self.settings
        draft = (draft or "").strip()
        policy = policy or self.policy_name
        policy = canonical(policy) if (policy and not draft) else None
        if not draft and policy is None:
            raise MetaAlignerError("no draft given and no policy configured to write one")
        upd = self.update_class(query=query, draft=draft, aligned="", phase="drafting",
                                draft_source=self.input_draft_source if draft else policy,
                                aligner_name=aligner_name, template=template, objectives=list(objectives))
        if not draft:
            if self.registry.loaded("policy", policy) is None:
                upd.phase = "loading-policy"
                yield upd
            backend = self.registry.policy(policy)
            upd.phase = "drafting"
            yield upd
            started = time.monotonic()
            pieces: list[str] = []
            kwargs = settings.policy_kwargs(local=hasattr(backend, "generator"))
            for delta in _closing(backend.stream(query, **kwargs)):
                pieces.append(delta)
                upd.draft = "".join(pieces)
                yield upd
            upd.draft = upd.draft.strip()
            upd.timings["draft"] = time.monotonic() - started
            if not upd.draft:
                raise MetaAlignerError(f"the policy {display_name(policy)} returned an empty draft; "
                                       "try more new tokens or give a draft")
        if self.registry.loaded("aligner", aligner_name) is None:
            upd.phase = "loading-aligner"
            yield upd
        model = self.aligner(aligner_name, template)
        upd.prompt = model.prompt(query, upd.draft, objectives)
        upd.phase = "aligning"
        yield upd
        started = time.monotonic()
        pieces = []
        for delta in _closing(model.stream(query, upd.draft, objectives, **settings.aligner_kwargs())):
            pieces.append(delta)
            upd.aligned = "".join(pieces)
            yield upd
        upd.aligned = upd.aligned.strip()
        upd.timings["align"] = time.monotonic() - started
        upd.phase = "done"
        yield upd

    def correct(self, query: str, objectives, draft: str = "", **kwargs) -> Correction:
        """:meth:`stream` run to the end: the finished :class:`Correction`."""
        last = None
        for last in self.stream(query, objectives, draft, **kwargs):
            pass
        return last

    # -- batches (the CLI) -------------------------------------------------------------------
    def draft_batch(self, queries: list[str], *, policy: str | None = None,
                    settings: GenerationSettings | None = None, batch_size: int = 16,
                    progress=False) -> list[tuple[str | None, str | None]]:
        """Drafts from the policy, in order, as ``(text, None)`` or ``(None, error)``: an API call
        that still fails after its retries marks its row instead of stopping the batch."""
        from .backends.base import APIBackend, BackendError

        settings = settings or self.settings
        backend = self.registry.policy(policy or self.policy_name)
        if isinstance(backend, APIBackend):
            return [(None, str(r)) if isinstance(r, BackendError) else (r.text, None)
                    for r in backend.complete_each(queries, **settings.policy_kwargs())]
        comps = backend.complete_batch(queries, batch_size=batch_size, progress=progress,
                                       **settings.policy_kwargs(local=True))
        return [(c.text, None) for c in comps]

    def ask_batch(self, prompts: list[str], *, policy: str | None = None,
                  settings: GenerationSettings | None = None, batch_size: int = 16,
                  progress=False) -> list[tuple[str | None, str | None]]:
        """Any one-turn prompts to the policy (e.g. the self-refine baseline), like :meth:`draft_batch`."""
        return self.draft_batch(prompts, policy=policy, settings=settings, batch_size=batch_size, progress=progress)

    def correct_batch(self, queries: list[str], drafts: list[str], objectives, *, aligner: str | None = None,
                      template: str | None = None, settings: GenerationSettings | None = None,
                      batch_size: int = 16, progress=False) -> list[str]:
        """Corrections of many rows, batched on a local aligner, many requests in flight on a
        remote one; under greedy decoding each equals its one-row correction."""
        settings = settings or self.settings
        model = self.aligner(aligner, template)
        return model.align_batch(queries, drafts, objectives, batch_size=batch_size, progress=progress,
                                 **settings.aligner_kwargs())


def _closing(iterator):
    """Iterate and always close the inner generator, so a cancelled request stops the model."""
    try:
        yield from iterator
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
