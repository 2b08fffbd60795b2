"""Annotation protocols as data: objectives, each with a 0–3 rubric, and guidelines.

A protocol is a YAML or JSON file::

    name: imhi
    title: ...
    guidelines: |
      ...
    objectives:
      - key: correctness              # a built-in key, or any key with name + description
        name: Correctness             # optional for built-in keys
        description: ...              # optional for built-in keys
        levels:                       # exactly the scores 0, 1, 2, 3
          - {score: 0, label: Wrong or irrelevant, description: ...}
          ...
        reference:                    # optional list shown beside the rubric
          title: ...
          items: [...]

Built-in protocols ship in ``annotation/protocols/`` (``imhi``, ``ultrafeedback``); any other
protocol is a path to such a file. Objective keys that are built-in objective keys keep the
built-in wording, so exported pairs feed ``metaaligner build-dataset`` without ``--objectives``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from metaaligner_core.errors import InputError, MetaAlignerError
from metaaligner_core.objectives import lookup, normalize_key

SCORES = (0, 1, 2, 3)
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


@dataclass(frozen=True)
class RatedObjective:
    """One objective of a protocol: what it means and what each score 0–3 means."""

    key: str
    name: str
    description: str
    levels: tuple[Level, ...]
    reference: Reference | None = None


@dataclass(frozen=True)
class Protocol:
    name: str
    title: str
    guidelines: str
    objectives: tuple[RatedObjective, ...] = field(default_factory=tuple)

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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<protocol>") -> "Protocol":
        return _parse(data, source)


def builtin_protocols() -> list[str]:
    return sorted(p.stem for p in PROTOCOL_DIR.glob("*.yaml"))


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
        if not isinstance(levels, list) or len(levels) != len(SCORES):
            raise bad(f"{where}.levels", "expected exactly four levels, for the scores 0, 1, 2 and 3")
        lv: dict[int, Level] = {}
        for j, level in enumerate(levels):
            lw = f"{where}.levels[{j}]"
            if not isinstance(level, dict):
                raise bad(lw, "expected a mapping with score, label and description")
            score = level.get("score")
            if isinstance(score, bool) or score not in SCORES:
                raise bad(f"{lw}.score", "expected an integer 0-3")
            if score in lv:
                raise bad(f"{lw}.score", f"score {score} is defined twice")
            label, ldesc = level.get("label"), level.get("description")
            if not isinstance(label, str) or not label.strip():
                raise bad(f"{lw}.label", "missing or empty")
            if not isinstance(ldesc, str) or not ldesc.strip():
                raise bad(f"{lw}.description", "missing or empty")
            lv[score] = Level(score, label.strip(), " ".join(ldesc.split()))
        ref = o.get("reference")
        reference = None
        if ref is not None:
            if not isinstance(ref, dict) or not isinstance(ref.get("items"), list) \
                    or not all(isinstance(x, str) for x in ref["items"]):
                raise bad(f"{where}.reference", "expected a mapping with title and a list of items")
            reference = Reference(str(ref.get("title", "")), tuple(ref["items"]))
        if any(p.key == key for p in parsed):
            raise bad(f"{where}.key", f'objective "{key}" appears twice')
        parsed.append(RatedObjective(key, name_o.strip(), " ".join(desc.split()),
                                     tuple(lv[s] for s in SCORES), reference))
    return Protocol(name=name.strip(), title=str(data.get("title") or name).strip(),
                    guidelines=guidelines.strip(), objectives=tuple(parsed))


def rubric_markdown(protocol: Protocol) -> str:
    """The protocol's guidelines and rubric as Markdown (for the Annotate tab and docs)."""
    out = [f"### {protocol.title}", "", protocol.guidelines, ""]
    for o in protocol.objectives:
        out += [f"#### {o.name}", f"*{o.description}*", ""]
        out += [f"- **{lv.score} · {lv.label}** — {lv.description}" for lv in o.levels]
        if o.reference:
            out += ["", f"*{o.reference.title}:*", ""]
            out += [f"{i}. {item}" for i, item in enumerate(o.reference.items, 1)]
        out.append("")
    return "\n".join(out)
