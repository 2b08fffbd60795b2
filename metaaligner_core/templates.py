"""The aligner's prompt templates.

The ``ultrafeedback`` and ``hh-rlhf`` templates and their *equal* variants are, character for
character, the strings of the authors' dataset scripts (``UltraFeedback_make_aligner_data.py``,
``HH_RLHF_make_aligner_data.py``); the ``imhi`` template is the authors' IMHI inference prompt.
The IMHI *equal* variant has no source — neither the paper nor the authors' code shows one —
and is this project's analogue (``better`` → ``equal``), used only to build IMHI equal rows.

One function, :func:`build_prompt`, builds every aligner prompt: the dataset builder uses it for
training rows and the inference code for corrections, so the two can never drift apart. No chat
template is applied; the tokenizer adds BOS.

:func:`choose_template` is the one rule that picks a template for an aligner (every command, the
web app and the server use it).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

from .errors import MetaAlignerError
from .models import is_default
from .objectives import Objective

TEMPLATES: dict[str, str] = {
    "ultrafeedback": (
        "You are an assistant to human. You will be provided with a query and an answer. "
        "Consider the query, then edit the answer to improve it considering these aspects: "
        "{aspects} | Query: {question} | Answer: {answer} | Edit: "
    ),
    "hh-rlhf": (
        "You are an assistant to human. You will be provided with a context and an answer. "
        "Consider the context, then edit the answer to improve it considering these aspects: "
        "{aspects} | Context: {question} | Answer: {answer} | Edit: "
    ),
    "imhi": (
        'Edit the following Question-Answer pair to make it better considering these aspects '
        '"{aspects}" | Question: {question} | Answer: {answer} | Edit: '
    ),
}

# The *equal* variants teach the aligner when a response needs no change (paper §3.1). The
# UltraFeedback and HH-RLHF ones are the authors'; the IMHI one is this project's analogue (no source).
EQUAL_TEMPLATES: dict[str, str] = {
    "ultrafeedback": TEMPLATES["ultrafeedback"].replace("improve it", "make it equal"),
    "hh-rlhf": TEMPLATES["hh-rlhf"].replace("improve it", "make it equal"),
    "imhi": TEMPLATES["imhi"].replace("make it better", "make it equal"),
}

TEMPLATE_NAMES = tuple(TEMPLATES)
AUTO_TEMPLATE = "auto"  # pick the template from the aligner's (or the data's) name
OBJECTIVE_SEPARATOR = "; "


def check_template(name: str) -> str:
    if name not in TEMPLATES:
        raise MetaAlignerError(f'unknown template "{name}" (valid: {", ".join(TEMPLATE_NAMES)})')
    return name


def format_aspects(objectives: Sequence[Objective | str]) -> str:
    return OBJECTIVE_SEPARATOR.join([o.text if isinstance(o, Objective) else str(o) for o in objectives])


def prompt_parts(template: str, question: str, objectives: Sequence[Objective | str],
                 variant: str = "better") -> tuple[str, str]:
    """The prompt split around the answer: ``(before, after)``.

    Inference uses this to shorten the draft alone when a prompt is too long for the aligner.
    Plain concatenation, never ``str.format``: braces in user text stay as they are.
    """
    head, mid, mid2, tail = _pieces(template, variant)
    return head + format_aspects(objectives) + mid + question + mid2, tail


def build_prompt(template: str, question: str, answer: str,
                 objectives: Sequence[Objective | str], variant: str = "better") -> str:
    """``T(q, answer, objectives, variant)``: the exact prompt the aligner reads."""
    before, after = prompt_parts(template, question, objectives, variant)
    return before + answer + after


@lru_cache(maxsize=None)
def _pieces(template: str, variant: str) -> tuple[str, str, str, str]:
    """The fixed text around the {aspects}, {question} and {answer} slots."""
    head, rest = _select(template, variant).split("{aspects}")
    mid, rest = rest.split("{question}")
    mid2, tail = rest.split("{answer}")
    return head, mid, mid2, tail


def _select(template: str, variant: str) -> str:
    check_template(template)
    if variant == "better":
        return TEMPLATES[template]
    if variant == "equal":
        return EQUAL_TEMPLATES[template]
    raise MetaAlignerError(f'unknown template variant "{variant}" (valid: better, equal)')


def stop_texts(template: str, question: str, answer: str) -> tuple[str, ...]:
    """Where a correction ends: the template's own markers, when the aligner writes them.

    An aligner that has copied or edited the draft sometimes goes on with the prompt's next
    marker (``| Edit:``, ``| Edited:``, ``| Answer:``) and starts the answer again; generation
    stops there and the text before the marker is the correction. A marker that occurs in the
    query or the draft is not a stop for that row (the text is the user's).
    """
    _, mid, mid2, tail = _pieces(template, "better")
    markers = [tail.strip().rstrip(":"), mid2.strip(), mid[mid.find("|"):].strip()]  # "| Edit", "| Answer:", "| Query:"
    return tuple(m for m in markers if m.startswith("|") and m not in question and m not in answer)


def template_for_model(model_name: str | None, default: str = "ultrafeedback") -> str:
    """Pick the template a released checkpoint was trained with, from its name."""
    name = (model_name or "").lower().replace("_", "-")
    if "hh-rlhf" in name or "hhrlhf" in name:
        return "hh-rlhf"
    if "ultrafeedback" in name:
        return "ultrafeedback"
    if "imhi" in name:
        return "imhi"
    return default


def choose_template(explicit: str | None = None, aligner: str | None = None, data: str | None = None) -> str:
    """The aligner prompt template, by one rule used by every command and the app:

    1. ``explicit`` when given (``auto`` / empty means not given);
    2. else the family the aligner's MODEL string names (``…-HH-RLHF-…``, ``…UltraFeedback…``, ``…IMHI…``):
       a released checkpoint reads the template it was trained with;
    3. else the family the data's name shows (an input path or dataset id such as
       ``policy-outputs/hh-rlhf/…`` or ``hf:Anthropic/hh-rlhf``);
    4. else ``ultrafeedback``.

    The objectives' wording then follows the template's family (``helpfulness`` on HH-RLHF data
    reads the HH-RLHF definition).
    """
    if explicit and explicit != AUTO_TEMPLATE:
        if explicit not in TEMPLATE_NAMES:
            raise MetaAlignerError(f'unknown template "{explicit}" (valid: {AUTO_TEMPLATE}, {", ".join(TEMPLATE_NAMES)})')
        return explicit
    for hint in (None if is_default(aligner) else aligner, data):
        found = template_for_model(str(hint), default="") if hint else ""
        if found:
            return found
    return "ultrafeedback"
