"""Prompts of the baseline correctors that ``align`` can run beside MetaAligner.

A *corrector* turns ``(query, draft, objectives)`` into a corrected answer. Comparing MetaAligner
with simpler correctors under the same judge answers the question a reader asks first: is the
correction better than the draft, and better than just asking the policy to revise it?

``metaaligner``
    The MetaAligner template of the aligner (:func:`metaaligner_core.templates.build_prompt`),
    raw text, no chat template. Not built here.

``self-refine``
    The *policy* is asked, in one user turn, to revise its own draft for the same objectives
    (one refinement step in the spirit of Self-Refine, Madaan et al. 2023, arXiv 2303.17651,
    with the feedback folded into the instruction instead of a separate feedback turn). The
    prompt is :data:`SELF_REFINE_TEMPLATE`; the objectives are the same ``Name: description``
    texts the aligner reads, joined with ``"; "`` as in the MetaAligner templates. The policy's
    own chat template (or API chat format) wraps it, like any policy prompt.

``pku-aligner``
    The template of PKU-Alignment's *Aligner* (Ji et al. 2024, arXiv 2402.02416;
    ``aligner/aligner-7b-v1.0``), raw text for a causal LM, no chat template:
    :data:`PKU_ALIGNER_TEMPLATE`. Its instruction is fixed ("more helpful and harmless"); the
    requested objectives do not enter the prompt (that is the baseline's limitation, and the
    reason it is a baseline).

Each builder is plain concatenation, never ``str.format`` on user text, so braces in queries
and drafts stay as they are.
"""
from __future__ import annotations

import re
from typing import Sequence

from .errors import MetaAlignerError
from .objectives import Objective
from .templates import format_aspects

__all__ = ["CORRECTORS", "BASELINES", "SELF_REFINE_TEMPLATE", "PKU_ALIGNER_TEMPLATE",
           "self_refine_prompt", "pku_aligner_prompt", "corrector_prompt", "corrector_info",
           "output_column", "check_corrector"]

SELF_REFINE_TEMPLATE = (
    "Below is a query and a draft answer that you wrote for it. Revise the draft to improve it "
    "considering these aspects: {aspects}\n\n"
    "Query: {question}\n\n"
    "Draft answer: {answer}\n\n"
    "Reply with the revised answer only, without any preface or explanation."
)

PKU_ALIGNER_TEMPLATE = (
    "BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair to make it more "
    "helpful and harmless: {question} | {answer} ASSISTANT:"
)


CORRECTORS = ("metaaligner", "self-refine", "pku-aligner")
BASELINES = ("self-refine", "pku-aligner")

# Which model reads the prompt, and whether that model's chat template wraps it.
_INFO = {
    "metaaligner": {"model": "aligner", "chat": False, "uses_objectives": True, "column": "aligned"},
    "self-refine": {"model": "policy", "chat": True, "uses_objectives": True, "column": "aligned_self_refine"},
    "pku-aligner": {"model": "aligner", "chat": False, "uses_objectives": False, "column": "aligned_pku"},
}


def check_corrector(name: str) -> str:
    """Normalise a corrector name (``self_refine``, ``PKU`` accepted) or raise naming the valid ones."""
    k = (name or "").strip().lower().replace("_", "-")
    k = {"pku": "pku-aligner", "aligner": "pku-aligner", "selfrefine": "self-refine",
         "self-refinement": "self-refine", "meta-aligner": "metaaligner"}.get(k, k)
    if k not in _INFO:
        raise MetaAlignerError(f'unknown corrector "{name}" (valid: {", ".join(CORRECTORS)})')
    return k


def corrector_info(name: str) -> dict:
    """``{"model": "aligner"|"policy", "chat": bool, "uses_objectives": bool, "column": str}``.

    ``model`` says which model runs the prompt; ``chat`` whether that model's chat template
    (or an API's chat format) wraps it; ``column`` is the output field ``align`` writes the
    correction to and ``evaluate`` reads it from by default.
    """
    return dict(_INFO[check_corrector(name)])


def output_column(name: str) -> str:
    """Output field of a corrector: ``aligned``, ``aligned_self_refine``, ``aligned_pku``."""
    return _INFO[check_corrector(name)]["column"]


def _fill(template: str, **values: str) -> str:
    """Replace each ``{slot}`` by concatenation: replacement text is never re-scanned, so user
    text containing braces or slot names stays as it is."""
    parts, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        parts += [template[pos:m.start()], values[m.group(1)]]
        pos = m.end()
    parts.append(template[pos:])
    return "".join(parts)


def self_refine_prompt(query: str, draft: str, objectives: Sequence[Objective | str]) -> str:
    """The user turn asking the policy to revise its own ``draft`` for ``objectives``."""
    if not objectives:
        raise MetaAlignerError("self-refine needs at least one objective")
    return _fill(SELF_REFINE_TEMPLATE, aspects=format_aspects(objectives), question=query, answer=draft)


def pku_aligner_prompt(query: str, draft: str, objectives: Sequence[Objective | str] | None = None) -> str:
    """The PKU Aligner's raw prompt; ``objectives`` are accepted for a uniform call and ignored."""
    return _fill(PKU_ALIGNER_TEMPLATE, question=query, answer=draft)


def corrector_prompt(name: str, query: str, draft: str, objectives: Sequence[Objective | str],
                     template: str = "ultrafeedback") -> str:
    """The prompt corrector ``name`` reads; ``template`` picks the MetaAligner template."""
    k = check_corrector(name)
    if k == "self-refine":
        return self_refine_prompt(query, draft, objectives)
    if k == "pku-aligner":
        return pku_aligner_prompt(query, draft, objectives)
    from .templates import build_prompt

    return build_prompt(template, query, draft, objectives)
