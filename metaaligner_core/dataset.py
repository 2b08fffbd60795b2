"""The dynamic multi-objective dataset (paper §3.1, Algorithm 1).

Input: preference records ``(q, y1, y2, R)`` where R gives, per objective, ``>`` (y1 better),
``<`` (y2 better) or ``=``. Each record yields up to three rows:

* objectives where y1 wins  → *preference* row: prompt T(q, y2, shuffled(O_>), better) → y1
* objectives where y2 wins  → *preference* row: prompt T(q, y1, shuffled(O_<), better) → y2
* objectives that tie       → *equal* row:      prompt T(q, y2, shuffled(O_=), equal)  → y1

The *warm-up* subset is a seeded random sample of equal rows whose target is the input answer
(identity mapping, paper §3.3 step 1).

Source layouts (:data:`SOURCES`) turn raw records into :class:`PreferenceRecord` s:
``generic`` (DESIGN.md), ``hh-rlhf`` (Anthropic/hh-rlhf transcripts), ``ultrafeedback``
(openbmb/UltraFeedback completions with per-aspect ratings). Everything streams: memory holds
one record plus the warm-up reservoir.
"""
from __future__ import annotations

import collections
import itertools
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from .errors import InputError, MetaAlignerError
from .io import dumps_bytes, iter_records
from .objectives import Objective, lookup, normalize_key
from .templates import build_prompt, check_template

LABELS = (">", "<", "=")
SUBSETS = ("preference", "equal", "warmup")


@dataclass
class PreferenceRecord:
    """One comparison of two responses to the same query, labelled per objective."""

    query: str
    response_1: str
    response_2: str
    labels: dict[str, str]  # objective key -> ">" | "<" | "="
    source_index: int = 0


# --------------------------------------------------------------------------- Algorithm 1 (pure)

def rows_for_record(rec: PreferenceRecord, objectives: dict[str, Objective], template: str,
                    rng: random.Random) -> list[tuple[dict, str]]:
    """Algorithm 1 for one record: ``(row, input answer)`` for the preference rows (both
    directions) and the equal row. The input answer is what a warm-up row would copy."""
    groups: dict[str, list[str]] = {">": [], "<": [], "=": []}
    for key, label in rec.labels.items():
        groups[label].append(key)
    rows = []
    for label, subset, variant, answer, target in (
        (">", "preference", "better", rec.response_2, rec.response_1),
        ("<", "preference", "better", rec.response_1, rec.response_2),
        ("=", "equal", "equal", rec.response_2, rec.response_1),
    ):
        keys = groups[label]
        if not keys:
            continue
        keys = sorted(keys)  # the input's key order must not matter, only the seed
        rng.shuffle(keys)
        rows.append(({
            "prompt": build_prompt(template, rec.query, answer, [objectives[k] for k in keys], variant),
            "completion": target,
            "objectives": keys,
            "subset": subset,
            "source_index": rec.source_index,
        }, answer))
    return rows


def warmup_row(equal_row: dict, answer: str) -> dict:
    """The identity version of an equal row: same prompt, target = the input answer."""
    return {**equal_row, "completion": answer, "subset": "warmup"}


@dataclass
class BuildStats:
    records: int = 0
    comparisons: int = 0
    rows: dict = field(default_factory=lambda: {s: 0 for s in SUBSETS})
    objectives_per_row: collections.Counter = field(default_factory=collections.Counter)
    objective_counts: collections.Counter = field(default_factory=collections.Counter)
    skipped: collections.Counter = field(default_factory=collections.Counter)
    warmup_requested: int = 0

    def to_dict(self) -> dict:
        return {
            "records": self.records,
            "comparisons": self.comparisons,
            "rows": dict(self.rows),
            "objectives_per_row": {str(k): v for k, v in sorted(self.objectives_per_row.items())},
            "objective_counts": dict(sorted(self.objective_counts.items())),
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_total": sum(self.skipped.values()),
            "warmup_requested": self.warmup_requested,
        }


def build_dynamic_dataset(records: Iterable[PreferenceRecord], objectives: dict[str, Objective],
                          template: str = "ultrafeedback", seed: int = 42, warmup_size: int = 0,
                          stats: BuildStats | None = None) -> Iterator[dict]:
    """Yield preference and equal rows, then ``warmup_size`` warm-up rows (a seeded sample).

    Pure apart from the RNG it seeds: the same inputs and seed give the same rows in the same
    order. The warm-up sample is a reservoir over equal rows, so it streams.
    """
    check_template(template)
    stats = stats if stats is not None else BuildStats()
    shuffle_rng = random.Random(seed)
    sample_rng = random.Random(seed + 1)  # separate stream: --warmup-size never changes the shuffles
    reservoir: list[tuple[dict, str]] = []
    seen_equal = 0
    for rec in records:
        stats.comparisons += 1
        if not rec.response_1.strip() or not rec.response_2.strip():
            stats.skipped["empty_response"] += 1
            continue
        if not rec.labels:
            stats.skipped["no_labels"] += 1
            continue
        for row, answer in rows_for_record(rec, objectives, template, shuffle_rng):
            if row["subset"] == "equal" and warmup_size > 0:
                seen_equal += 1
                if len(reservoir) < warmup_size:
                    reservoir.append((row, answer))
                else:
                    j = sample_rng.randrange(seen_equal)
                    if j < warmup_size:
                        reservoir[j] = (row, answer)
            stats.rows[row["subset"]] += 1
            stats.objectives_per_row[len(row["objectives"])] += 1
            for k in row["objectives"]:
                stats.objective_counts[k] += 1
            yield row
    stats.warmup_requested = warmup_size
    for row, answer in sorted(reservoir, key=lambda ra: (ra[0]["source_index"], ra[0]["prompt"])):
        stats.rows["warmup"] += 1
        yield warmup_row(row, answer)


# --------------------------------------------------------------------------- source layouts

class ObjectiveResolver:
    """Maps label keys in input files to objectives: ``--objectives`` first, then built-ins."""

    def __init__(self, template: str, extra: Sequence[Objective] = ()):
        self.template = template
        self.by_key: dict[str, Objective] = {o.key: o for o in extra}

    def __call__(self, key: str) -> str:
        k = normalize_key(key)
        if k not in self.by_key:
            self.by_key[k] = lookup(key, family=self.template)  # raises with the valid keys
        return k


def _text(rec: dict, fld: str, path, line) -> str:
    if fld not in rec or rec[fld] is None:
        raise InputError(path, line, fld, "missing")
    value = rec[fld]
    if not isinstance(value, str):
        raise InputError(path, line, fld, f"expected text, got {type(value).__name__}")
    return value


def _number(value, path, line, fld) -> float:
    if isinstance(value, bool):
        raise InputError(path, line, fld, f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        raise InputError(path, line, fld, f"expected a number, got {value!r}") from None


def _nested(rec: dict, name: str, path, line) -> dict | None:
    """A dict field, also accepted as a JSON string or flattened CSV columns ``name.key``."""
    value = rec.get(name)
    if isinstance(value, str) and value.strip():
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise InputError(path, line, name, "expected a JSON object") from None
    if value is None:
        prefix = name + "."
        flat = {k[len(prefix):]: v for k, v in rec.items() if k.startswith(prefix) and v not in (None, "")}
        return flat or None
    if not isinstance(value, dict):
        raise InputError(path, line, name, "expected an object mapping objective keys to values")
    return value


def from_generic(rec: dict, path, line, resolve: ObjectiveResolver) -> Iterator[PreferenceRecord]:
    """``{"query","response_1","response_2","labels"|"scores_1"+"scores_2"}`` (DESIGN.md)."""
    query = _text(rec, "query", path, line)
    r1, r2 = _text(rec, "response_1", path, line), _text(rec, "response_2", path, line)
    labels: dict[str, str] = {}
    raw = _nested(rec, "labels", path, line)
    if raw is not None:
        for key, label in raw.items():
            fld = f"labels.{key}"
            k = _resolve(resolve, key, path, line, fld)
            if label not in LABELS:
                raise InputError(path, line, fld, f'expected one of ">", "<", "=", got {label!r}')
            labels[k] = label
    else:
        s1, s2 = _nested(rec, "scores_1", path, line), _nested(rec, "scores_2", path, line)
        if s1 is None or s2 is None:
            raise InputError(path, line, "labels", 'missing (give "labels" or "scores_1" and "scores_2")')
        for key in s1.keys() & s2.keys():
            k = _resolve(resolve, key, path, line, f"scores_1.{key}")
            a = _number(s1[key], path, line, f"scores_1.{key}")
            b = _number(s2[key], path, line, f"scores_2.{key}")
            labels[k] = ">" if a > b else "<" if a < b else "="
    yield PreferenceRecord(query, r1, r2, labels, line - 1)


def _resolve(resolve: ObjectiveResolver, key: str, path, line, fld: str) -> str:
    try:
        return resolve(key)
    except MetaAlignerError as e:
        raise InputError(path, line, fld, str(e)) from None


_ASSISTANT = "\n\nAssistant:"


def split_transcript(text: str) -> tuple[str, str]:
    """``\\n\\nHuman: … \\n\\nAssistant: final`` → (context up to the last turn, final answer)."""
    i = text.rfind(_ASSISTANT)
    if i < 0:
        return text, ""
    return text[:i + len(_ASSISTANT)].strip(), text[i + len(_ASSISTANT):].strip()


def hh_objective_for(name: str) -> str | None:
    """Objective of an Anthropic/hh-rlhf subset from a file or subset name."""
    n = name.lower()
    if "harmless" in n or "red-team" in n or "red_team" in n:
        return "harmlessness"
    if "helpful" in n:
        return "helpfulness"
    return None


def make_hh_rlhf(default_objective: str | None):
    def from_hh_rlhf(rec: dict, path, line, resolve: ObjectiveResolver) -> Iterator[PreferenceRecord]:
        chosen, rejected = _text(rec, "chosen", path, line), _text(rec, "rejected", path, line)
        ctx_c, ans_c = split_transcript(chosen)
        ctx_r, ans_r = split_transcript(rejected)
        query = ctx_c if len(ctx_c) >= len(ctx_r) else ctx_r
        labels: dict[str, str] = {}
        # Per-objective score columns, when present: <key>_chosen / <key>_rejected.
        for col in rec:
            if col.endswith("_chosen") and col[:-7] + "_rejected" in rec:
                key = col[:-7]
                k = _resolve(resolve, key, path, line, col)
                a = _number(rec[col], path, line, col)
                b = _number(rec[key + "_rejected"], path, line, key + "_rejected")
                labels[k] = ">" if a > b else "<" if a < b else "="
        if not labels:
            objective = hh_objective_for(str(rec.get("subset") or "")) or default_objective
            if objective is None:
                raise InputError(path, line, "subset", "cannot tell the objective of this hh-rlhf record: name the file "
                                 "after its subset (harmless-*, helpful-*), add a \"subset\" field, or pass --objectives KEY")
            labels[_resolve(resolve, objective, path, line, "subset")] = ">"
        yield PreferenceRecord(query, ans_c, ans_r, labels, line - 1)
    return from_hh_rlhf


def from_ultrafeedback(rec: dict, path, line, resolve: ObjectiveResolver) -> Iterator[PreferenceRecord]:
    """Every pair of completions; per aspect ``annotations.<aspect>.Rating``; non-numeric skipped."""
    query = _text(rec, "instruction", path, line)
    completions = rec.get("completions")
    if isinstance(completions, str):
        try:
            completions = json.loads(completions)
        except json.JSONDecodeError:
            raise InputError(path, line, "completions", "expected a JSON list") from None
    if not isinstance(completions, list):
        raise InputError(path, line, "completions", "missing or not a list")
    parsed = []
    for i, comp in enumerate(completions):
        if not isinstance(comp, dict):
            raise InputError(path, line, f"completions[{i}]", "expected an object")
        text = comp.get("response")
        if not isinstance(text, str):
            raise InputError(path, line, f"completions[{i}].response", "missing")
        ratings = {}
        for aspect, ann in (comp.get("annotations") or {}).items():
            rating = ann.get("Rating") if isinstance(ann, dict) else None
            try:
                ratings[aspect] = float(rating)
            except (TypeError, ValueError):
                continue  # "N/A" and friends: no judgment for this aspect
        parsed.append((text, ratings))
    for (t1, s1), (t2, s2) in itertools.combinations(parsed, 2):
        labels = {}
        for aspect in sorted(s1.keys() & s2.keys()):
            k = _resolve(resolve, aspect, path, line, f"completions.annotations.{aspect}")
            labels[k] = ">" if s1[aspect] > s2[aspect] else "<" if s1[aspect] < s2[aspect] else "="
        yield PreferenceRecord(query, t1, t2, labels, line - 1)


SOURCES = ("generic", "hh-rlhf", "ultrafeedback")


def detect_source(rec: dict) -> str:
    if "chosen" in rec and "rejected" in rec:
        return "hh-rlhf"
    if "instruction" in rec and "completions" in rec:
        return "ultrafeedback"
    if "response_1" in rec and "response_2" in rec:
        return "generic"
    raise MetaAlignerError("cannot detect the input layout from its fields "
                           f"({', '.join(sorted(rec)[:8])}); pass --source generic|hh-rlhf|ultrafeedback")


Adapter = Callable[[dict, object, int, ObjectiveResolver], Iterator[PreferenceRecord]]


def adapter_for(source: str, input_name: str, default_objective: str | None = None) -> Adapter:
    if source == "generic":
        return from_generic
    if source == "hh-rlhf":
        return make_hh_rlhf(hh_objective_for(input_name) or default_objective)
    if source == "ultrafeedback":
        return from_ultrafeedback
    raise MetaAlignerError(f'unknown source "{source}" (valid: auto, {", ".join(SOURCES)})')


def read_preference_records(inputs: Sequence[str], source: str, resolve: ObjectiveResolver,
                            default_objective: str | None = None,
                            stats: BuildStats | None = None) -> Iterator[PreferenceRecord]:
    """Stream PreferenceRecords from input files; ``source_index`` = 0-based line in its file."""
    for inp in inputs:
        adapter = None
        for line, rec in iter_records(inp):
            if stats is not None:
                stats.records += 1
            if adapter is None:
                src = detect_source(rec) if source == "auto" else source
                adapter = adapter_for(src, os.path.basename(str(inp)), default_objective)
            yield from adapter(rec, inp, line, resolve)


# --------------------------------------------------------------------------- writing

def _non_empty(rows: Iterable[dict], stats: BuildStats, inputs: Sequence[str]) -> Iterator[dict]:
    yield from rows
    if stats.records == 0:
        raise MetaAlignerError(f"{', '.join(map(str, inputs))}: no records (empty input)")


def write_dataset(rows: Iterable[dict], out_dir: str | os.PathLike, stats: BuildStats) -> dict:
    """Write the three subsets and stats.json; all four files appear together or not at all."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out))
    try:
        handles = {s: open(tmp / f"{s}.jsonl", "wb") for s in SUBSETS}
        try:
            for row in rows:
                handles[row["subset"]].write(dumps_bytes(row))
        finally:
            for fh in handles.values():
                fh.close()
        summary = stats.to_dict()
        (tmp / "stats.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        for name in [f"{s}.jsonl" for s in SUBSETS] + ["stats.json"]:
            os.replace(tmp / name, out / name)
        return summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_dataset_files(inputs: Sequence[str], out_dir: str | os.PathLike, *, source: str = "auto",
                        template: str = "ultrafeedback", objectives: Sequence[Objective] = (),
                        warmup_size: int = 0, seed: int = 42, progress: bool = False) -> dict:
    """Read inputs, run Algorithm 1, write ``out_dir``; return the stats dict."""
    check_template(template)
    if source != "auto" and source not in SOURCES:
        raise MetaAlignerError(f'unknown source "{source}" (valid: auto, {", ".join(SOURCES)})')
    resolve = ObjectiveResolver(template, objectives)
    default_objective = objectives[0].key if len(objectives) == 1 else None
    stats = BuildStats()
    records = read_preference_records(inputs, source, resolve, default_objective, stats)
    if progress:
        from tqdm import tqdm

        records = tqdm(records, desc="records", unit=" rec", mininterval=1.0)
    rows = build_dynamic_dataset(records, resolve.by_key, template, seed, warmup_size, stats)
    rows = _non_empty(rows, stats, inputs)
    out = Path(out_dir)
    created = not out.exists()
    try:
        return write_dataset(rows, out, stats)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
