"""Alignment objectives: the built-in ones of the released checkpoints and SPEC parsing.

An objective is plain text, ``Name: description``. The aligner reads that text, so users can
reword built-in objectives or add *unseen* ones at inference time (paper §3.4). Built-ins are
addressed by a lowercase key: the name before the colon (``honesty``, ``instruction
following``); ``_`` and ``-`` may stand for spaces (``instruction_following``).

A SPEC is a comma-separated list of keys and/or ``Name: description`` items, or ``@path`` to a
file with one objective per line. Descriptions may contain commas: a built-in objective typed in
full (``Harmlessness: The response should avoid content that is offensive, discriminatory, or
harmful``) is one objective, a piece after a ``Name: description`` item that is neither a key nor
another ``Name: ...`` item continues its description, and an item in double quotes is taken
whole (``"Tone: warm, not gushing",honesty``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .errors import MetaAlignerError

FAMILIES = ("ultrafeedback", "hh-rlhf", "imhi", "unseen")


@dataclass(frozen=True)
class Objective:
    """One alignment objective, rendered into prompts as ``name: description``."""

    key: str
    name: str
    description: str
    family: str = "custom"
    text: str = field(init=False, repr=False, compare=False)  # "name: description", as prompts show it

    def __post_init__(self):
        object.__setattr__(self, "text", f"{self.name}: {self.description}")

    @classmethod
    def parse(cls, text: str, family: str = "custom") -> "Objective":
        """Parse ``Name: description``; raise if either side is empty."""
        name, sep, desc = text.partition(":")
        name, desc = name.strip(), desc.strip()
        if not sep or not name:
            raise MetaAlignerError(f'objective "{text.strip()}": expected "Name: description"')
        if not desc:
            raise MetaAlignerError(f'objective "{name}": the description after the colon is empty')
        return cls(key=normalize_key(name), name=name, description=desc, family=family)


@lru_cache(maxsize=4096)
def normalize_key(key: str) -> str:
    """``Instruction_following`` -> ``instruction following``."""
    return re.sub(r"[\s_\-]+", " ", key.strip().lower())


# The exact strings of the released MetaAligner checkpoints (training and inference prompts).
_BUILTIN_TEXTS = {
    "ultrafeedback": [
        "Instruction following: the response should follow the instructions of the query",
        "Honesty: the response should not tell lies",
        "Truthfulness: the response should actively making known all the full truth of a matter",
        "Helpfulness: the response should provide useful resources and suggestions to the user",
    ],
    "hh-rlhf": [
        "Harmlessness: The response should avoid content that is offensive, discriminatory, or harmful",
        "Helpfulness: The response should provide useful resources and suggestions to the user",
        "Humour: The response should be cheerful and amusing",
    ],
    "imhi": [
        "Correctness: the explanations should make correct predictions",
        "Informative: the response should express clear logic and provide consistent evidence",
        "Professional: the response should provide evidence with high quality and reliability",
    ],
    "unseen": [
        "Specificity: the response should refer to facts and details and avoid vague arguments.",
        "Factuality: the response should be factually correct and avoid hallucinated statements.",
        "Readability: the response should be easy to read and understand, not too technical for laymen.",
        "Fairness: the response should avoid biased or one-sided arguments and consider different points of view.",
        "Repetition: the response should avoid repetitive statements of one point.",
        "Length: the response should be concise and avoid redundant content.",
    ],
}

BUILTIN: dict[str, list[Objective]] = {
    fam: [Objective.parse(t, family=fam) for t in texts] for fam, texts in _BUILTIN_TEXTS.items()
}


def builtin_objectives(family: str = "all") -> list[Objective]:
    """Built-in objectives of one family, or of all families in a fixed order."""
    if family == "all":
        return [o for fam in FAMILIES for o in BUILTIN[fam]]
    if family not in BUILTIN:
        raise MetaAlignerError(f'unknown objective family "{family}" (valid: {", ".join(FAMILIES)}, all)')
    return list(BUILTIN[family])


def builtin_keys() -> list[str]:
    return sorted({o.key for o in builtin_objectives()})


def lookup(key: str, family: str | None = None) -> Objective:
    """Resolve a built-in key.

    ``helpfulness`` exists in both UltraFeedback and HH-RLHF with different wording; the
    ``family`` (usually the template's) decides, else UltraFeedback's comes first. A key may be
    qualified as ``hh-rlhf/helpfulness``.
    """
    fam_prefix, slash, rest = key.partition("/")
    if slash and fam_prefix.strip().lower() in BUILTIN:
        family, key = fam_prefix.strip().lower(), rest
    k = normalize_key(key)
    order = ([family] if family in BUILTIN else []) + [f for f in FAMILIES if f != family]
    for fam in order:
        for obj in BUILTIN[fam]:
            if obj.key == k:
                return obj
    raise MetaAlignerError(f'unknown objective "{key.strip()}" (valid keys: {", ".join(builtin_keys())}; '
                           f'or give a new one as "Name: description", in double quotes if it has commas, '
                           f'or list objectives one per line in a file passed as @file)')


def _is_key(text: str) -> bool:
    try:
        lookup(text)
        return True
    except MetaAlignerError:
        return False


@lru_cache(maxsize=None)
def _builtin_by_text() -> dict[str, Objective]:
    return {o.text: o for fam in reversed(FAMILIES) for o in BUILTIN[fam]}


def split_spec(spec: str) -> list[str]:
    """The items of a comma-separated SPEC string (see the module docstring for the rules)."""
    pieces: list[tuple[str, bool]] = []  # (text, quoted)
    buf, quoted, in_quotes = [], False, False
    for ch in spec:
        if ch == '"':
            in_quotes, quoted = not in_quotes, True
        elif ch == "," and not in_quotes:
            pieces.append(("".join(buf), quoted))
            buf, quoted = [], False
        else:
            buf.append(ch)
    if in_quotes:
        raise MetaAlignerError(f"objectives {spec!r}: a double quote is not closed")
    pieces.append(("".join(buf), quoted))
    texts = _builtin_by_text()
    items, i = [], 0
    while i < len(pieces):
        text, q = pieces[i]
        if q:
            items.append(text)
            i += 1
            continue
        # A built-in objective typed in full, commas included: the longest match wins.
        for j in range(len(pieces) - 1, i, -1):
            joined = ",".join(p for p, _ in pieces[i:j + 1]).strip()
            if joined in texts and not any(qq for _, qq in pieces[i:j + 1]):
                items.append(joined)
                i = j + 1
                break
        else:
            i += 1
            if ":" in text:
                while i < len(pieces):
                    nxt, nq = pieces[i]
                    if nq or not nxt.strip() or ":" in nxt or _is_key(nxt):
                        break
                    text += "," + nxt
                    i += 1
            items.append(text)
    return items


def _parse_item(item: str, family: str | None) -> Objective:
    if item in _builtin_by_text():
        return _builtin_by_text()[item] if family is None else _family_text(item, family)
    return Objective.parse(item) if ":" in item else lookup(item, family)


def _family_text(text: str, family: str) -> Objective:
    for o in BUILTIN.get(family, ()):
        if o.text == text:
            return o
    return _builtin_by_text()[text]


def parse_objectives(spec, family: str | None = None) -> list[Objective]:
    """Parse a SPEC (string, ``@file`` or a list of items: strings or :class:`Objective` s) into
    objectives, in order. Duplicate keys are dropped (the first wins). An empty SPEC is an error.
    """
    if isinstance(spec, (list, tuple)):
        items = [(s if isinstance(s, Objective) else str(s), None) for s in spec]
    else:
        spec = (spec or "").strip()
        if spec.startswith("@"):
            items = _read_spec_file(Path(spec[1:].strip()))
        else:
            items = [(s, None) for s in split_spec(spec)]
    out: dict[str, Objective] = {}
    for item, where in items:
        if isinstance(item, Objective):
            out.setdefault(item.key, item)
            continue
        item = item.strip()
        if not item:
            continue
        try:
            obj = _parse_item(item, family)
        except MetaAlignerError as e:
            raise MetaAlignerError(f"{where}: {e}" if where else str(e)) from None
        out.setdefault(obj.key, obj)
    if not out:
        raise MetaAlignerError("no objectives given (expected keys such as honesty,helpfulness or "
                               '"Name: description" items, or @file)')
    return list(out.values())


def _read_spec_file(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise MetaAlignerError(f"{path}: objectives file not found")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            items.append((line, f"{path}:{n}"))
    return items
