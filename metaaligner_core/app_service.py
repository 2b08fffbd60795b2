"""What the Gradio app does, without Gradio: models, objectives, generation, annotation hand-off.

``app.py`` builds the UI and wires its events to :class:`AlignService`; everything here can be
used (and benchmarked) without a browser.

- :class:`ModelRegistry` holds ONE instance per policy / aligner name, shared by every browser
  session. Models load on first use or in a background thread (:meth:`ModelRegistry.preload`),
  and each load has a status the UI shows.
- :class:`AlignService` streams ``(draft, aligned)``: the policy's draft first (unless the user
  pasted one), then the aligner's correction. A semaphore bounds how many generations run at
  once, so one CPU/GPU is not oversubscribed and concurrent sessions queue instead of thrashing.
- Errors the user can fix are :class:`MetaAlignerError` with a one-line message; the UI turns
  them into toasts. User texts are never logged.
"""
from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator

from .errors import MetaAlignerError
from .models import display_name, is_api_model, is_default
from .objectives import FAMILIES, Objective, builtin_objectives, parse_objectives
from .templates import TEMPLATE_NAMES, build_prompt, template_for_model

log = logging.getLogger(__name__)

AUTO_TEMPLATE = "auto"
USER_DRAFT_SOURCE = "user"
DRAFT_PLACEHOLDER = "<the policy's draft>"

FAMILY_TITLES = {
    "ultrafeedback": "UltraFeedback",
    "hh-rlhf": "HH-RLHF",
    "imhi": "IMHI (mental-health analysis)",
    "unseen": "Unseen (paper Table 4)",
}
FAMILY_INFO = {
    "ultrafeedback": "trained objectives of the MetaAligner-UltraFeedback checkpoints",
    "hh-rlhf": "trained objectives of the MetaAligner-HH-RLHF checkpoints",
    "imhi": "trained objectives of the MetaAligner-IMHI checkpoints",
    "unseen": "never seen in training: the aligner follows them zero-shot",
}

# Environment variable each API provider needs; openai-compatible servers usually need none.
API_KEY_VARS = {"openai:": "OPENAI_API_KEY", "anthropic:": "ANTHROPIC_API_KEY"}


@dataclass
class GenerationSettings:
    """Decoding settings shared by the policy and the aligner.

    max_new_tokens: upper bound on generated tokens, for the draft and for the correction.
    temperature: 0 means greedy decoding (reproducible); higher samples.
    top_p: nucleus sampling mass (only used when sampling).
    repetition_penalty: >1 discourages repeating tokens (local models only).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        self.max_new_tokens = int(self.max_new_tokens)
        if not 1 <= self.max_new_tokens <= 8192:
            raise MetaAlignerError(f"max new tokens: expected 1..8192, got {self.max_new_tokens}")
        if not 0.0 <= float(self.temperature) <= 5.0:
            raise MetaAlignerError(f"temperature: expected 0..5, got {self.temperature}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise MetaAlignerError(f"top_p: expected a value in (0, 1], got {self.top_p}")
        if float(self.repetition_penalty) <= 0.0:
            raise MetaAlignerError(f"repetition penalty: expected > 0, got {self.repetition_penalty}")

    def aligner_kwargs(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "temperature": float(self.temperature),
                "top_p": float(self.top_p), "repetition_penalty": float(self.repetition_penalty)}

    def policy_kwargs(self, local: bool = False) -> dict:
        """``ChatBackend.stream`` settings; API providers take no top_p / repetition penalty here."""
        kwargs = {"max_tokens": self.max_new_tokens, "temperature": float(self.temperature)}
        if local:
            kwargs.update(top_p=float(self.top_p), repetition_penalty=float(self.repetition_penalty))
        return kwargs


def missing_api_key(spec: str) -> str | None:
    """The message to show when an API policy cannot be used because its key is not set."""
    for prefix, var in API_KEY_VARS.items():
        if str(spec).startswith(prefix) and not os.environ.get(var):
            return f"{var} is not set on the server, so {spec} cannot be used; set it and restart the app"
    return None


def resolve_template(choice: str | None, aligner_name: str) -> str:
    """``auto`` (or empty) picks the template from the aligner's name, as ``Aligner.load`` does."""
    if not choice or choice == AUTO_TEMPLATE:
        return template_for_model(aligner_name)
    if choice not in TEMPLATE_NAMES:
        raise MetaAlignerError(f'unknown template "{choice}" (valid: {AUTO_TEMPLATE}, {", ".join(TEMPLATE_NAMES)})')
    return choice


# --- objectives -----------------------------------------------------------------------------

def objective_choices() -> dict[str, list[tuple[str, str]]]:
    """Per family, ``(label, value)`` checkbox choices: label = the full objective text,
    value = a family-qualified key (``hh-rlhf/helpfulness``) so same-named objectives of two
    families stay distinct."""
    return {fam: [(o.text, f"{fam}/{o.key}") for o in builtin_objectives(fam)] for fam in FAMILIES}


def parse_new_objectives(text: str | None) -> list[str]:
    """Lines of the "new objectives" box: one ``Name: description`` (or a built-in key) per line.

    Each line is one objective, so descriptions may contain commas.
    """
    items = []
    for n, line in enumerate((text or "").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            parse_objectives([line])
        except MetaAlignerError as e:
            raise MetaAlignerError(f"new objectives, line {n}: {e}") from None
        items.append(line)
    return items


def collect_objectives(checked: list[str] | None, new_text: str | None, template: str) -> list[Objective]:
    """Ticked built-ins (in order) followed by the typed ones; duplicates dropped."""
    items = list(checked or []) + parse_new_objectives(new_text)
    if not items:
        raise MetaAlignerError("no objectives: tick at least one or type a new one as \"Name: description\"")
    return parse_objectives(items, family=template)


def parse_api_objectives(spec: str | None, template: str) -> list[Objective]:
    """An objectives SPEC from an API caller. ``@file`` SPECs would read files on the server, so
    they are refused here."""
    spec = (spec or "").strip()
    if spec.startswith("@"):
        raise MetaAlignerError("objectives: @file SPECs are not accepted by the app; send keys or "
                               '"Name: description" items separated by commas')
    return parse_objectives(spec, family=template)


# --- models ---------------------------------------------------------------------------------

@dataclass
class LoadStatus:
    kind: str                 # "policy" | "aligner"
    name: str
    state: str                # "loading" | "ready" | "failed"
    detail: str = ""
    started: float = field(default_factory=time.monotonic)
    seconds: float | None = None

    def line(self) -> str:
        label = display_name(self.name)
        if self.state == "loading":
            return f"{self.kind} **{label}**: loading… ({time.monotonic() - self.started:.0f} s)"
        if self.state == "ready":
            return f"{self.kind} **{label}**: ready (loaded in {self.seconds:.1f} s)"
        return f"{self.kind} **{label}**: failed — {self.detail}"


class ModelRegistry:
    """One shared instance per model name, loaded once, with a status per load.

    Up to ``max_models`` instances of each kind stay in memory; the least recently used one is
    dropped when a further model is requested (a public demo lets anyone type model names).
    """

    def __init__(self, *, device: str | None = None, max_models: int = 2, threads: int | None = None):
        self.device = device
        self.max_models = max(1, int(max_models))
        self.threads = threads
        self._models: dict[str, OrderedDict] = {"policy": OrderedDict(), "aligner": OrderedDict()}
        self._status: dict[tuple[str, str], LoadStatus] = {}
        self._load_lock = threading.Lock()  # one load at a time: loads are memory-heavy

    # Loaders are methods so that the heavy imports happen on first use, not at import. A local
    # policy and an aligner with the same MODEL string share one set of weights (the embedded
    # default is both out of the box): half the memory, and the second "load" is instant.
    def _load_policy(self, name: str):
        from .backends import load_backend

        if is_api_model(name):
            return load_backend(name)
        aligner = self._models["aligner"].get(name)
        if aligner is not None:
            from .backends.hf import HFChatBackend

            return HFChatBackend(aligner.generator, name=name)
        return load_backend(name, device=self.device)

    def _load_aligner(self, name: str):
        from .inference import Aligner

        policy = self._models["policy"].get(name)
        if policy is not None and hasattr(policy, "generator"):
            return Aligner.from_generator(policy.generator, name)
        return Aligner.load(name, device=self.device)

    def get(self, kind: str, name: str):
        """The shared instance of ``name``, loading it (blocking) if needed."""
        name = (name or "default").strip() or "default"
        models = self._models[kind]
        if name in models:
            models.move_to_end(name)
            return models[name]
        if kind == "aligner" and is_api_model(name):
            raise MetaAlignerError(f'aligner "{name}": an API model can only be a policy; the aligner '
                                   "must be a local model (default, a directory or a Hugging Face id)")
        if kind == "policy":
            missing = missing_api_key(name)
            if missing:
                raise MetaAlignerError(missing)
        with self._load_lock:
            if name in models:
                return models[name]
            if self.threads and not is_api_model(name):
                import torch

                # Set once, before the first local model runs; applies to every generating thread.
                torch.set_num_threads(self.threads)
            status = LoadStatus(kind, name, "loading")
            self._status[(kind, name)] = status
            log.info("loading %s %s", kind, display_name(name))
            try:
                instance = self._load_policy(name) if kind == "policy" else self._load_aligner(name)
            except MetaAlignerError as e:
                status.state, status.detail = "failed", str(e)
                raise
            except Exception as e:  # a library error: keep its first line for the user, trace for the log
                log.exception("loading %s %s failed", kind, display_name(name))
                status.state, status.detail = "failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                raise MetaAlignerError(f"cannot load {kind} {display_name(name)}: {status.detail}") from None
            status.state, status.seconds = "ready", time.monotonic() - status.started
            models[name] = instance
            while len(models) > self.max_models:
                dropped, _ = models.popitem(last=False)
                self._status.pop((kind, dropped), None)
                log.info("unloaded %s %s (keeping %d)", kind, display_name(dropped), self.max_models)
            return instance

    def policy(self, name: str):
        return self.get("policy", name)

    def aligner(self, name: str):
        return self.get("aligner", name)

    def loaded(self, kind: str, name: str):
        """The instance if already loaded, else None (never loads)."""
        return self._models[kind].get((name or "default").strip() or "default")

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
                    st = self._status.get((kind, name))
                    if st is None or st.state == "loading":
                        self._status[(kind, name)] = LoadStatus(kind, name, "failed", str(e))
        for kind, name in (("aligner", aligner), ("policy", policy)):
            if name is not None and self.loaded(kind, name) is None:
                self._status.setdefault((kind, name), LoadStatus(kind, name, "loading"))
        thread = threading.Thread(target=work, name="metaaligner-preload", daemon=True)
        thread.start()
        return thread

    def statuses(self) -> list[LoadStatus]:
        return list(self._status.values())

    def busy(self) -> bool:
        return any(s.state == "loading" for s in self._status.values())

    def status_markdown(self) -> str:
        lines = [s.line() for s in self.statuses()]
        return "Models — " + " · ".join(lines) if lines else "Models load on first use."


def with_template(aligner, template: str | None):
    """The shared aligner rendering prompts with another template: a shallow copy shares the
    weights, so choosing a template never loads a second model."""
    if not template or template == aligner.template:
        return aligner
    view = copy.copy(aligner)
    view.template = template
    return view


# --- the service ----------------------------------------------------------------------------

@dataclass
class AlignUpdate:
    """One step of a streamed alignment."""

    draft: str
    aligned: str
    phase: str          # waiting | loading-policy | drafting | loading-aligner | aligning | done
    prompt: str = ""    # the exact aligner prompt, once the draft is complete
    draft_source: str = ""
    aligner_name: str = ""

    def status(self) -> str:
        return {
            "waiting": "Waiting for a free generation slot…",
            "loading-policy": f"Loading the policy {display_name(self.draft_source)}…",
            "drafting": f"The policy {display_name(self.draft_source)} is writing the draft…",
            "loading-aligner": f"Loading the aligner {display_name(self.aligner_name)}…",
            "aligning": f"The aligner {display_name(self.aligner_name)} is correcting the draft…",
            "done": "Done.",
        }[self.phase]


class AlignService:
    """Streams drafts and corrections with the shared models; bounded concurrency."""

    def __init__(self, registry: ModelRegistry, *, policy: str = "default", aligner: str = "default",
                 template: str | None = None, settings: GenerationSettings | None = None,
                 concurrency: int = 1, db_url: str | None = None):
        self.registry = registry
        self.policy_name = policy
        self.aligner_name = aligner
        self.template = template or AUTO_TEMPLATE
        self.settings = settings or GenerationSettings()
        self.db_url = db_url
        self._slots = threading.BoundedSemaphore(max(1, int(concurrency)))

    def template_for(self, aligner_name: str, choice: str | None = None) -> str:
        return resolve_template(choice if choice not in (None, "", AUTO_TEMPLATE) else self.template, aligner_name)

    def is_base_model(self, aligner_name: str) -> bool:
        """Whether the aligner is the untrained embedded model (known before loading for ``default``)."""
        loaded = self.registry.loaded("aligner", aligner_name)
        if loaded is not None:
            return bool(getattr(loaded, "is_base_model", False))
        return is_default(aligner_name)

    def preview(self, query: str, draft: str, objectives: list[Objective], template: str) -> str:
        return build_prompt(template, query or "", draft or DRAFT_PLACEHOLDER, objectives)

    def stream(self, query: str, objectives: list[Objective], draft: str = "", *,
               policy: str | None = None, aligner: str | None = None, template: str | None = None,
               settings: GenerationSettings | None = None) -> Iterator[AlignUpdate]:
        """Yield growing ``(draft, aligned)`` snapshots: the draft streams first (from the policy,
        unless ``draft`` is given), then the correction. Closing the iterator stops generation."""
        query = (query or "").strip()
        if not query:
            raise MetaAlignerError("query: empty; type a question or instruction")
        if not objectives:
            raise MetaAlignerError("no objectives given")
        policy = (policy or self.policy_name).strip() or "default"
        aligner_name = (aligner or self.aligner_name).strip() or "default"
        template = self.template_for(aligner_name, template)
        settings = settings or self.settings
        draft = (draft or "").strip()
        source = USER_DRAFT_SOURCE if draft else policy
        upd = AlignUpdate(draft=draft, aligned="", phase="waiting", draft_source=source, aligner_name=aligner_name)

        if not self._slots.acquire(blocking=False):
            yield upd
            self._slots.acquire()
        try:
            if not draft:
                if self.registry.loaded("policy", policy) is None:
                    upd.phase = "loading-policy"
                    yield upd
                backend = self.registry.policy(policy)
                upd.phase = "drafting"
                yield upd
                pieces: list[str] = []
                kwargs = settings.policy_kwargs(local=hasattr(backend, "generator"))
                for delta in _closing(backend.stream(query, **kwargs)):
                    pieces.append(delta)
                    upd.draft = "".join(pieces)
                    yield upd
                upd.draft = upd.draft.strip()
                if not upd.draft:
                    raise MetaAlignerError(f"the policy {display_name(policy)} returned an empty draft; "
                                           "try more new tokens or paste a draft")
            if self.registry.loaded("aligner", aligner_name) is None:
                upd.phase = "loading-aligner"
                yield upd
            model = with_template(self.registry.aligner(aligner_name), template)
            upd.prompt = model.prompt(query, upd.draft, objectives)
            upd.phase = "aligning"
            yield upd
            pieces = []
            for delta in _closing(model.stream(query, upd.draft, objectives, **settings.aligner_kwargs())):
                pieces.append(delta)
                upd.aligned = "".join(pieces)
                yield upd
            upd.aligned = upd.aligned.strip()
            upd.phase = "done"
            yield upd
        finally:
            self._slots.release()

    def align(self, query: str, objectives_spec: str, draft: str = "") -> tuple[str, str]:
        """The ``align`` API: the app's policy, aligner and settings; returns ``(draft, aligned)``."""
        template = self.template_for(self.aligner_name)
        objectives = parse_api_objectives(objectives_spec, template)
        last = None
        for last in self.stream(query, objectives, draft):
            pass
        return last.draft, last.aligned

    def send_to_annotation(self, query: str, draft: str, draft_source: str, aligned: str,
                           aligner_name: str, protocol: str = "imhi") -> str:
        """Queue the query with its draft and correction as one annotation item; returns its id."""
        query, draft, aligned = (query or "").strip(), (draft or "").strip(), (aligned or "").strip()
        if not (query and draft and aligned):
            raise MetaAlignerError("nothing to send yet: run Align first so both the draft and the correction exist")
        if not self.db_url:
            raise MetaAlignerError("no annotation database configured (--db)")
        try:
            from annotation.store import enqueue_item
        except ImportError:
            raise MetaAlignerError("the annotation store is not installed in this build") from None
        sources = [(draft, display_name(draft_source) if draft_source != USER_DRAFT_SOURCE else USER_DRAFT_SOURCE),
                   (aligned, display_name(aligner_name))]
        return enqueue_item(self.db_url, query, sources, protocol=protocol or "imhi")


def _closing(iterator):
    """Iterate and always close the inner generator, so a cancelled request stops the model."""
    try:
        yield from iterator
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
