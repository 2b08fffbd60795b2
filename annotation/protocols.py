"""Annotation protocols as data: objectives, each with a 0–N rubric, and guidelines.

A protocol is a YAML or JSON file::

    name: mentalllama-human-eval
    version: "1"                      # stamped on every rating made under it
    title: ...
    source: ...                       # optional citation
    raters: 2                         # optional: raters per item (k); default 2
    review: any                       # optional: which items the examiner reviews (see below)
    order: disagreement               # optional: which items raters get first (see below)
    procedure: ...                    # optional: the study's procedure, shown above the rubric
    guidelines: |
      ...
    objectives:
      - key: fluency                  # a built-in key, or any key with name + description
        name: Fluency                 # optional for built-in keys
        description: ...              # optional for built-in keys (the objective's text for the aligner)
        definition: ...               # optional: the longer definition raters read
        levels:                       # the scores 0..N (N from 1 to 10), each once
          - {score: 0, label: Poor, description: ...}     # label optional
          ...
        reference:                    # optional list shown beside the rubric
          title: ...
          items: [...]
          high_criticality: 4         # optional: the first 4 items are the high-criticality ones
          split: ...                  # optional: the text shown at that split

``review`` is ``any`` (an item goes to the examiner when any two of its raters' scores differ on
any response and objective), ``range:N`` (when they differ by N or more), ``all`` or ``none``.

``order`` is ``default`` (items short of their k raters, least-assigned first) or
``disagreement``: among the items still short of raters, those whose submitted scores disagree
most come first (disagreement: the mean, over responses and objectives rated by two or more,
of the highest minus the lowest score); items with no disagreement yet follow, least-rated
first. A team's hours then go where agreement is low; the dashboard's alpha per batch shows the
effect.

Built-in protocols ship in ``annotation/protocols/`` (``imhi``, ``ultrafeedback``); any other
protocol is a path to such a file. Objective keys that are built-in objective keys keep the
built-in wording unless a description is given; every exported pair carries each objective's
text (``Name: description``), so ``metaaligner build-dataset`` needs no ``--objectives``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from metaaligner_core.errors import InputError, MetaAlignerError
from metaaligner_core.objectives import lookup, normalize_key

SCORES = (0, 1, 2, 3)  # the IMHI scale, and the default
MAX_LEVEL = 10
DEFAULT_VERSION = "1"
REVIEW_RULES = ("any", "all", "none")  # and "range:N"
ORDERS = ("default", "disagreement")
PROTOCOL_DIR = Path(__file__).resolve().parent / "protocols"


@dataclass(frozen=True)
class Level:
    score: int
    label: str
    description: str


@dataclass(frozen=True)
class Reference:
    title: str
    items: tuple[str, ...]
    high_criticality: int | None = None  # the first N items are the high-criticality ones
    split: str | None = None  # the text shown between the two groups
    after: str | None = None  # text shown after the list


@dataclass(frozen=True)
class RatedObjective:
    """One objective of a protocol: what it means and what each score 0–N means."""

    key: str
    name: str
    description: str
    levels: tuple[Level, ...]
    reference: Reference | None = None
    definition: str | None = None  # the longer text raters read (e.g. the paper's aspect definition)
    text: str = ""  # "Name: description" as the aligner reads it (the built-in string for built-ins)

    @property
    def scores(self) -> tuple[int, ...]:
        return tuple(lv.score for lv in self.levels)

    @property
    def max_score(self) -> int:
        return self.levels[-1].score


@dataclass(frozen=True)
class Protocol:
    name: str
    title: str
    guidelines: str
    objectives: tuple[RatedObjective, ...] = field(default_factory=tuple)
    version: str = DEFAULT_VERSION
    source: str | None = None
    procedure: str | None = None
    raters: int | None = None  # raters per item (k); None: the store's default
    review: str = "any"
    order: str = "default"

    @property
    def max_score(self) -> int:
        return max(o.max_score for o in self.objectives)

    @property
    def keys(self) -> list[str]:
        return [o.key for o in self.objectives]

    def objective(self, key: str) -> RatedObjective:
        k = normalize_key(key)
        for o in self.objectives:
            if o.key == k:
                return o
        raise MetaAlignerError(f'objective "{key}" is not in protocol "{self.name}" '
                               f'(valid: {", ".join(self.keys)})')

    def has(self, key: str) -> bool:
        return normalize_key(key) in self.keys

    def check_score(self, key: str, value: int) -> bool:
        return value in self.objective(key).scores

    def to_dict(self) -> dict:
        """Plain JSON-able data that :meth:`from_dict` reads back (the database stores it)."""
        data = _plain(asdict(self))
        if data["order"] == "default":  # absent, as in databases written before the option existed
            del data["order"]
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "<protocol>") -> "Protocol":
        return _parse(data, source)


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def builtin_protocols() -> list[str]:
    return sorted(p.stem for p in PROTOCOL_DIR.glob("*.yaml"))


def protocol_help() -> str:
    """What --protocol accepts, for help texts and errors."""
    return (f"a built-in protocol ({', '.join(builtin_protocols())}) or a protocol file (.yaml/.json; "
            "see `metaaligner annotate protocols` and docs/annotation.md)")


def review_needed(rule: str, scores: list[int]) -> bool:
    """Whether the submitted ``scores`` of one response on one objective call for the examiner."""
    if len(scores) < 2 or rule == "none":
        return rule == "all" and len(scores) >= 1
    if rule == "all":
        return True
    spread = max(scores) - min(scores)
    if rule == "any":
        return spread > 0
    return spread >= int(rule.split(":", 1)[1])


def load_protocol(spec: str | Path = "imhi") -> Protocol:
    """A built-in protocol by name (``imhi``) or a protocol file (``.yaml``/``.yml``/``.json``)."""
    spec_s = str(spec)
    path = Path(spec_s)
    if not path.suffix and (PROTOCOL_DIR / f"{spec_s}.yaml").is_file():
        path = PROTOCOL_DIR / f"{spec_s}.yaml"
    if not path.is_file():
        raise MetaAlignerError(f'protocol "{spec_s}": neither a built-in protocol '
                               f'({", ".join(builtin_protocols())}) nor an existing file')
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(path, e.lineno, None, f"not valid JSON ({e.msg})") from None
    elif path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise InputError(path, mark.line + 1 if mark else None, None, "not valid YAML") from None
    else:
        raise MetaAlignerError(f"{path}: a protocol file must end in .yaml, .yml or .json")
    return _parse(data, str(path))


def _parse(data, source: str) -> Protocol:
    def bad(fld: str, msg: str):
        return InputError(source, None, fld, msg)

    if not isinstance(data, dict):
        raise bad(None, "expected a mapping with name, guidelines and objectives")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise bad("name", "missing or empty")
    guidelines = data.get("guidelines", "")
    if not isinstance(guidelines, str):
        raise bad("guidelines", "expected text")
    version = data.get("version", DEFAULT_VERSION)
    if isinstance(version, (int, float)) and not isinstance(version, bool):
        version = str(version)
    if not isinstance(version, str) or not version.strip() or len(version.strip()) > 40:
        raise bad("version", "expected a short text such as \"1\" or \"2024-05\"")
    for fld in ("source", "procedure", "title"):
        if data.get(fld) is not None and not isinstance(data.get(fld), str):
            raise bad(fld, "expected text")
    raters = data.get("raters")
    if raters is not None and (isinstance(raters, bool) or not isinstance(raters, int) or not 1 <= raters <= 50):
        raise bad("raters", "expected an integer 1-50 (raters per item)")
    review = data.get("review", "any")
    if not isinstance(review, str) or not (review in REVIEW_RULES or _range_rule(review)):
        raise bad("review", 'expected "any", "all", "none" or "range:N"')
    order = data.get("order", "default")
    if order not in ORDERS:
        raise bad("order", f'expected {" or ".join(repr(o) for o in ORDERS)}')
    objs = data.get("objectives")
    if not isinstance(objs, list) or not objs:
        raise bad("objectives", "expected a non-empty list")
    parsed: list[RatedObjective] = []
    for i, o in enumerate(objs):
        where = f"objectives[{i}]"
        if not isinstance(o, dict):
            raise bad(where, "expected a mapping with key and levels")
        key = o.get("key")
        if not isinstance(key, str) or not key.strip():
            raise bad(f"{where}.key", "missing or empty")
        key = normalize_key(key)
        name_o, desc = o.get("name"), o.get("description")
        if not (isinstance(name_o, str) and name_o.strip() and isinstance(desc, str) and desc.strip()):
            try:
                builtin = lookup(key, name.strip())
            except MetaAlignerError:
                raise bad(f"{where}.description", f'"{key}" is not a built-in objective: give name and description') from None
            name_o = name_o if isinstance(name_o, str) and name_o.strip() else builtin.name
            desc = desc if isinstance(desc, str) and desc.strip() else builtin.description
        levels = o.get("levels")
        if not isinstance(levels, list) or not 2 <= len(levels) <= MAX_LEVEL + 1:
            raise bad(f"{where}.levels", f"expected a list of 2 to {MAX_LEVEL + 1} levels, for the scores 0..N")
        n_levels = len(levels)
        lv: dict[int, Level] = {}
        for j, level in enumerate(levels):
            lw = f"{where}.levels[{j}]"
            if not isinstance(level, dict):
                raise bad(lw, "expected a mapping with score, label and description")
            score = level.get("score")
            if isinstance(score, bool) or not isinstance(score, int) or not 0 <= score < n_levels:
                raise bad(f"{lw}.score", f"expected an integer 0-{n_levels - 1} ({n_levels} levels: scores 0..{n_levels - 1})")
            if score in lv:
                raise bad(f"{lw}.score", f"score {score} is defined twice")
            label, ldesc = level.get("label", ""), level.get("description")
            if label is None:
                label = ""
            if not isinstance(label, str):
                raise bad(f"{lw}.label", "expected text")
            if not isinstance(ldesc, str) or not ldesc.strip():
                raise bad(f"{lw}.description", "missing or empty")
            lv[score] = Level(score, label.strip(), " ".join(ldesc.split()))
        definition = o.get("definition")
        if definition is not None and (not isinstance(definition, str) or not definition.strip()):
            raise bad(f"{where}.definition", "expected text")
        ref = o.get("reference")
        reference = None
        if ref is not None:
            if not isinstance(ref, dict) or not isinstance(ref.get("items"), list) \
                    or not all(isinstance(x, str) for x in ref["items"]):
                raise bad(f"{where}.reference", "expected a mapping with title and a list of items")
            high = ref.get("high_criticality")
            if high is not None and (isinstance(high, bool) or not isinstance(high, int)
                                     or not 0 <= high <= len(ref["items"])):
                raise bad(f"{where}.reference.high_criticality", "expected how many of the first items are high-criticality")
            reference = Reference(str(ref.get("title", "")), tuple(ref["items"]), high,
                                  ref.get("split") or None, ref.get("after") or None)
        if any(p.key == key for p in parsed):
            raise bad(f"{where}.key", f'objective "{key}" appears twice')
        desc = " ".join(desc.split())
        text = f"{name_o.strip()}: {desc}"
        try:  # a built-in objective keeps its exact released string (name included)
            builtin = lookup(key, name.strip())
            if builtin.description == desc:
                text = builtin.text
        except MetaAlignerError:
            pass
        parsed.append(RatedObjective(key, name_o.strip(), desc, tuple(lv[s] for s in range(n_levels)), reference,
                                     definition.strip() if definition else None, text))
    return Protocol(name=name.strip(), title=str(data.get("title") or name).strip(),
                    guidelines=guidelines.strip(), objectives=tuple(parsed), version=version.strip(),
                    source=(data.get("source") or "").strip() or None,
                    procedure=(data.get("procedure") or "").strip() or None, raters=raters, review=review,
                    order=order)


def _range_rule(rule: str) -> bool:
    head, _, n = rule.partition(":")
    return head == "range" and n.isdigit() and int(n) >= 1


def level_text(lv: Level) -> str:
    """``2 · Label`` or, for a level with no label, ``2 · its description``."""
    return f"{lv.score} · {lv.label or lv.description}"


def rubric_markdown(protocol: Protocol) -> str:
    """The protocol's guidelines and rubric as Markdown (for the Annotate tab and docs)."""
    out = [f"### {protocol.title}", f"*Protocol {protocol.name}, version {protocol.version}*", ""]
    if protocol.procedure:
        out += [protocol.procedure, ""]
    if protocol.guidelines:
        out += [protocol.guidelines, ""]
    for o in protocol.objectives:
        out += [f"#### {o.name}", o.definition or f"*{o.description}*", ""]
        ref = o.reference
        if ref:
            out += [ref.title if ref.title.endswith(":") else f"*{ref.title}:*", ""]
            for i, item in enumerate(ref.items, 1):
                out.append(f"{i}. {item}")
                if ref.high_criticality == i and ref.split:
                    out += ["", f"*{ref.split}*", ""]
            if ref.after:
                out += ["", ref.after]
            out.append("")
        out += [f"- **{lv.score}{' · ' + lv.label if lv.label else ''}** — {lv.description}" for lv in o.levels]
        out.append("")
    if protocol.source:
        out += [f"Source: {protocol.source}", ""]
    return "\n".join(out)
