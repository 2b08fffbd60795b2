"""What the Gradio app does, without Gradio: objectives from the UI, status lines, bounded
generation slots and the annotation hand-off, on top of :mod:`metaaligner_core.pipeline`.

- :class:`ModelRegistry` is the core registry plus the Markdown status line the app shows.
- :class:`AlignService` is the core :class:`~metaaligner_core.pipeline.Pipeline` with a semaphore
  bounding how many generations run at once (one CPU/GPU is not oversubscribed; concurrent
  sessions queue and see "waiting"), the app's API entry point and "send to annotation".
- Errors the user can fix are :class:`MetaAlignerError` with a one-line message; the UI turns
  them into toasts. User texts are never logged.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from metaaligner_core.errors import MetaAlignerError
from metaaligner_core.models import display_name, missing_api_key  # noqa: F401  (the app imports them from here)
from metaaligner_core.objectives import FAMILIES, Objective, builtin_objectives, parse_objectives  # noqa: F401
from metaaligner_core.pipeline import (AUTO_TEMPLATE, Correction, LoadStatus, Pipeline,  # noqa: F401
                                       choose_template, parse_api_objectives, with_template)
from metaaligner_core.pipeline import ModelRegistry as CoreModelRegistry
from metaaligner_core.settings import GenerationSettings  # noqa: F401
from metaaligner_core.templates import build_prompt

log = logging.getLogger(__name__)

USER_DRAFT_SOURCE = "user"
DRAFT_PLACEHOLDER = "<the policy's draft>"
APP_MAX_NEW_TOKENS = 256  # interactive default for the embedded model; `align` uses the authors' 1024

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


def resolve_template(choice: str | None, aligner_name: str) -> str:
    """``auto`` (or empty) picks the template from the aligner's name (:func:`choose_template`)."""
    return choose_template(choice, aligner_name)


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


# --- models ---------------------------------------------------------------------------------

def status_line(s: LoadStatus) -> str:
    """One model's load status as Markdown."""
    label = display_name(s.name)
    if s.state == "loading":
        return f"{s.kind} **{label}**: loading… ({time.monotonic() - s.started:.0f} s)"
    if s.state == "ready":
        return f"{s.kind} **{label}**: ready (loaded in {s.seconds:.1f} s)"
    return f"{s.kind} **{label}**: failed — {s.detail}"


class ModelRegistry(CoreModelRegistry):
    """The core registry with the app's status line, and one
    :class:`~metaaligner_core.engine.scheduler.StepScheduler` per loaded local model: every Align
    run's draft and correction stream through it (``generator.scheduler``), so concurrent
    sessions share its decoding batches. Models whose cache it cannot hold decode each stream
    alone. ``batch_size``: rows per scheduler in flight."""

    def __init__(self, *args, batch_size: int = 16, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_size = max(1, int(batch_size))
        self._schedulers: dict[int, object] = {}  # id(generator) -> its StepScheduler (or None: cannot)
        self._sched_lock = threading.Lock()

    def get(self, kind: str, name: str | None):
        instance = super().get(kind, name)
        gen = getattr(instance, "generator", None)
        if gen is not None and id(gen) not in self._schedulers:
            self._attach(gen)
        return instance

    def _attach(self, gen) -> None:
        from metaaligner_core.engine.scheduler import StepScheduler

        with self._sched_lock:
            if id(gen) in self._schedulers:
                return
            sched = None  # ours to stop; a loop someone else attached (a server's) stays theirs
            if getattr(gen, "scheduler", None) is None:
                try:
                    sched = StepScheduler(gen, batch_size=self.batch_size, name=f"app-{len(self._schedulers)}")
                except ValueError as e:  # e.g. sliding-window layers: each stream decodes alone
                    log.info("%s: no step scheduler (%s)", gen.name, e)
                gen.scheduler = sched
            self._schedulers[id(gen)] = (gen, sched)
            # models the registry dropped: stop their loops, which would otherwise keep them in memory
            live = {id(getattr(m, "generator", None)) for models in self._models.values() for m in models.values()}
            for key in [k for k in self._schedulers if k not in live]:
                old_gen, old = self._schedulers.pop(key)
                if old is not None:
                    old.stop("the model was unloaded", timeout=0.0)
                    old_gen.scheduler = None

    def stop_schedulers(self) -> None:
        """Stop every model's decoding loop (streams in flight end with an error)."""
        with self._sched_lock:
            for gen, sched in self._schedulers.values():
                if sched is not None:
                    sched.stop("the app is shutting down", timeout=5.0)
                    gen.scheduler = None
            self._schedulers.clear()

    def status_markdown(self) -> str:
        lines = [status_line(s) for s in self.statuses()]
        return "Models — " + " · ".join(lines) if lines else "Models load on first use."


# --- the service ----------------------------------------------------------------------------

@dataclass
class AlignUpdate(Correction):
    """One step of a streamed alignment, with the app's status text. ``phase`` adds ``waiting``."""

    def status(self) -> str:
        return {
            "waiting": "Waiting for a free generation slot…",
            "loading-policy": f"Loading the policy {display_name(self.draft_source)}…",
            "drafting": f"The policy {display_name(self.draft_source)} is writing the draft…",
            "loading-aligner": f"Loading the aligner {display_name(self.aligner_name)}…",
            "aligning": f"The aligner {display_name(self.aligner_name)} is correcting the draft…",
            "done": "Done.",
        }[self.phase]


class AlignService(Pipeline):
    """The pipeline with bounded concurrency, the app's API and the annotation hand-off."""

    update_class = AlignUpdate

    def __init__(self, registry: CoreModelRegistry, *, policy: str = "default", aligner: str = "default",
                 template: str | None = None, settings: GenerationSettings | None = None,
                 concurrency: int = 1, db_url: str | None = None):
        super().__init__(registry, policy=policy, aligner=aligner, template=template,
                         settings=settings or GenerationSettings(max_new_tokens=APP_MAX_NEW_TOKENS),
                         input_draft_source=USER_DRAFT_SOURCE)
        self.db_url = db_url
        self._slots = threading.BoundedSemaphore(max(1, int(concurrency)))

    def preview(self, query: str, draft: str, objectives: list[Objective], template: str) -> str:
        return build_prompt(template, query or "", draft or DRAFT_PLACEHOLDER, objectives)

    def stream(self, query: str, objectives, draft: str = "", **kwargs) -> Iterator[AlignUpdate]:
        """:meth:`Pipeline.stream` in a generation slot; a ``waiting`` update first when none is free."""
        inner = super().stream(query, objectives, draft, **kwargs)
        first = next(inner)  # validates the request before queueing for a slot
        if not self._slots.acquire(blocking=False):
            waiting = AlignUpdate(**{**vars(first), "phase": "waiting"})
            yield waiting
            self._slots.acquire()
        try:
            yield first
            yield from inner
        finally:
            inner.close()
            self._slots.release()

    def align(self, query: str, objectives_spec: str, draft: str = "") -> tuple[str, str]:
        """The ``align`` API: the app's policy, aligner and settings; returns ``(draft, aligned)``."""
        template = self.template_for(self.aligner_name)
        result = self.correct(query, parse_api_objectives(objectives_spec, template), draft)
        return result.draft, result.aligned

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
