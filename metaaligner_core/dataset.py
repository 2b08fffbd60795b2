"""The dynamic multi-objective dataset (paper §3.1, Algorithm 1).

Input: preference records ``(q, y1, y2, R)`` where R gives, per objective, ``>`` (y1 better),
``<`` (y2 better) or ``=``. Each record yields up to three rows:

* objectives where y1 wins  → *preference* row: prompt T(q, y2, shuffled(O_>), better) → y1
* objectives where y2 wins  → *preference* row: prompt T(q, y1, shuffled(O_<), better) → y2
* objectives that tie       → *equal* row:      prompt T(q, y2, shuffled(O_=), equal)  → y1

The *warm-up* subset is a seeded random sample of equal rows whose target is the input answer
(identity mapping, paper §3.3 step 1: "we randomly sample a subset of the equal-preference subset
D_e ... but set an identical target response"). The paper gives no size; by default
(``warmup_size="auto"``) each equal row enters the sample with probability
:data:`WARMUP_FRACTION` (10%, seeded; at least one row when there is any equal row); an integer
asks for exactly that many rows (a reservoir sample), 0 for none.

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
WARMUP_FRACTION = 0.1  # the default warm-up rule: this share of the equal rows (the paper gives no size)
HOLDOUT_FILE = "holdout.jsonl"


@dataclass
class PreferenceRecord:
    """One comparison of two responses to the same query, labelled per objective."""

    query: str
    response_1: str
    response_2: str
    labels: dict[str, str]  # objective key -> ">" | "<" | "="
    source_index: int = 0
    label_source: str = "input"  # "subset": inferred from an hh-rlhf subset name, not from the data


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
    warmup_requested: int | str = 0
    warnings: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

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
            **self.extra,
            "warnings": list(self.warnings),
        }

    def warn(self, message: str) -> None:
        import logging

        logging.getLogger("metaaligner.dataset").warning("%s", message)
        self.warnings.append(message)


def check_warmup_size(value) -> int | str:
    """``"auto"`` or a whole number >= 0 (strings from the command line are converted)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if n < 0 or (isinstance(value, float) and value != n):
        raise MetaAlignerError(f"--warmup-size: expected auto or a number >= 0, got {value!r}")
    return n


def build_dynamic_dataset(records: Iterable[PreferenceRecord], objectives: dict[str, Objective],
                          template: str = "ultrafeedback", seed: int = 42, warmup_size: int | str = 0,
                          stats: BuildStats | None = None) -> Iterator[dict]:
    """Yield preference and equal rows, then the warm-up rows (a seeded sample of equal rows).

    ``warmup_size``: ``"auto"`` (each equal row with probability :data:`WARMUP_FRACTION`, at
    least one), a number of rows, or 0. Pure apart from the RNG it seeds: the same inputs and seed
    give the same rows in the same order. Both samples stream (a reservoir for a fixed size).
    A requested subset that comes out empty or short is reported in ``stats.warnings``.
    """
    check_template(template)
    warmup_size = check_warmup_size(warmup_size)
    stats = stats if stats is not None else BuildStats()
    shuffle_rng = random.Random(seed)
    sample_rng = random.Random(seed + 1)  # separate stream: --warmup-size never changes the shuffles
    auto = warmup_size == "auto"
    reservoir: list[tuple[dict, str]] = []
    fallback: list[tuple[dict, str]] = []  # "auto" on few equal rows: the first one, so warm-up is never empty
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
            if row["subset"] == "equal" and auto:
                seen_equal += 1
                if sample_rng.random() < WARMUP_FRACTION:
                    reservoir.append((row, answer))
                elif not fallback:
                    fallback.append((row, answer))
            elif row["subset"] == "equal" and warmup_size > 0:
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
    if auto and not reservoir:
        reservoir = fallback
    for row, answer in sorted(reservoir, key=lambda ra: (ra[0]["source_index"], ra[0]["prompt"])):
        stats.rows["warmup"] += 1
        yield warmup_row(row, answer)
    _warn_empty_subsets(stats, warmup_size)


def _warn_empty_subsets(stats: BuildStats, warmup_size) -> None:
    """A warning for every subset that was asked for and came out empty (or short)."""
    if stats.comparisons == 0:
        return
    if stats.rows["preference"] == 0:
        stats.warn("preference subset is empty: no comparison preferred one response on any objective")
    if stats.rows["equal"] == 0:
        stats.warn("equal subset is empty: no comparison tied on any objective (the equal stage has no data)")
    if warmup_size and stats.rows["warmup"] == 0:
        stats.warn(f"warm-up subset is empty although --warmup-size {warmup_size} was asked for: it samples the "
                   "equal subset, which has no rows (labels with ties, e.g. from --reward-models, give equal rows)")
    elif isinstance(warmup_size, int) and 0 < stats.rows["warmup"] < warmup_size:
        stats.warn(f"warm-up subset has {stats.rows['warmup']} rows, fewer than the {warmup_size} asked for "
                   f"(the equal subset has only {stats.rows['equal']})")


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
    # "objectives": {key: "Name: description"} (annotate export --format pairs) defines keys that
    # are neither --objectives nor built-ins; --objectives wins where both name a key.
    for key, described in (_nested(rec, "objectives", path, line) or {}).items():
        k = normalize_key(key)
        if k not in resolve.by_key:
            try:
                o = Objective.parse(str(described))
            except MetaAlignerError as e:
                raise InputError(path, line, f"objectives.{key}", str(e)) from None
            resolve.by_key[k] = Objective(key=k, name=o.name, description=o.description)
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


def hh_prompt(transcript: str) -> tuple[str, str]:
    """The authors' split of an hh-rlhf transcript (``prepare_dataset_with_rewards.py``): the
    context is every turn before the last ``\n\nAssistant:``, joined back, ending in
    ``' \n\nAssistant:'``; the answer is the final assistant turn, stripped. The released HH-RLHF
    checkpoints, their reward labels and the authors' sample outputs all use this context."""
    parts = transcript.split(_ASSISTANT)
    if len(parts) < 2:
        return transcript, ""
    return _ASSISTANT.join(parts[:-1]) + " " + _ASSISTANT, parts[-1].strip()


def hh_objective_for(name: str) -> str | None:
    """Objective of an Anthropic/hh-rlhf subset from a file or subset name."""
    n = name.lower()
    if "harmless" in n or "red-team" in n or "red_team" in n:
        return "harmlessness"
    if "helpful" in n:
        return "helpfulness"
    return None


def make_hh_rlhf(default_objective: str | None, labels_from_rewards: bool = False):
    def from_hh_rlhf(rec: dict, path, line, resolve: ObjectiveResolver) -> Iterator[PreferenceRecord]:
        chosen, rejected = _text(rec, "chosen", path, line), _text(rec, "rejected", path, line)
        query, ans_c = hh_prompt(chosen)  # the chosen transcript's context, as the authors take it
        _, ans_r = hh_prompt(rejected)
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
            if objective is None and labels_from_rewards:
                yield PreferenceRecord(query, ans_c, ans_r, {}, line - 1, "subset")
                return
            if objective is None:
                raise InputError(path, line, "subset", "cannot tell the objective of this hh-rlhf record: name the file "
                                 "after its subset (harmless-*, helpful-*), add a \"subset\" field, or pass --objectives KEY")
            labels[_resolve(resolve, objective, path, line, "subset")] = ">"
            yield PreferenceRecord(query, ans_c, ans_r, labels, line - 1, "subset")
            return
        yield PreferenceRecord(query, ans_c, ans_r, labels, line - 1)
    return from_hh_rlhf


NON_NUMERIC = ("skip-aspect", "drop-completion")


def ultrafeedback_completions(rec: dict, path, line) -> list[tuple[str, dict[str, str]]]:
    """``[(response, {aspect: raw rating})]`` of an UltraFeedback record (raw ratings as given)."""
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
            raise InputError(path, line, f"completions[{i}].response",
                             "missing" if text is None else f"expected a string, got {type(text).__name__}")
        parsed.append((text, {aspect: (ann.get("Rating") if isinstance(ann, dict) else None)
                               for aspect, ann in (comp.get("annotations") or {}).items()}))
    return parsed


def _rating(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None  # "N/A" and friends: no judgment


def ultrafeedback_golden(rec: dict, path, line) -> str | None:
    """The authors' test-set reference answer: the completion with the highest sum of its
    whole-number ratings (non-numeric ratings count 0; the first of equal sums)."""
    best, best_score = None, None
    for text, raw in ultrafeedback_completions(rec, path, line):
        score = sum(int(v) for v in raw.values() if str(v).isdigit())
        if best_score is None or score > best_score:
            best, best_score = text, score
    return best


def make_ultrafeedback(non_numeric: str = "skip-aspect"):
    """Every pair of completions, labelled per aspect from ``annotations.<aspect>.Rating``.

    ``non_numeric``: ``skip-aspect`` leaves an aspect without a number out of that completion's
    comparisons; ``drop-completion`` (the authors' ``UltraFeedback_make_aligner_data.py``) drops
    a completion with any rating that is not a whole number.
    """
    if non_numeric not in NON_NUMERIC:
        raise MetaAlignerError(f'--non-numeric-ratings: "{non_numeric}" (valid: {", ".join(NON_NUMERIC)})')

    def from_ultrafeedback(rec: dict, path, line, resolve: ObjectiveResolver) -> Iterator[PreferenceRecord]:
        query = _text(rec, "instruction", path, line)
        parsed = []
        for text, raw in ultrafeedback_completions(rec, path, line):
            if non_numeric == "drop-completion":
                if not all(str(v).isdigit() for v in raw.values()):
                    continue
            ratings = {a: r for a, r in ((a, _rating(v)) for a, v in raw.items()) if r is not None}
            parsed.append((text, ratings))
        yield from _uf_pairs(query, parsed, path, line, resolve)
    return from_ultrafeedback


def _uf_pairs(query, parsed, path, line, resolve) -> Iterator[PreferenceRecord]:
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


def adapter_for(source: str, input_name: str, default_objective: str | None = None, *,
                labels_from_rewards: bool = False, non_numeric: str = "skip-aspect") -> Adapter:
    if source == "generic":
        return from_generic
    if source == "hh-rlhf":
        return make_hh_rlhf(hh_objective_for(input_name) or default_objective, labels_from_rewards)
    if source == "ultrafeedback":
        return make_ultrafeedback(non_numeric)
    raise MetaAlignerError(f'unknown source "{source}" (valid: auto, {", ".join(SOURCES)})')


# The default adapter of the ultrafeedback layout (non-numeric ratings leave their aspect out).
from_ultrafeedback = make_ultrafeedback()


def holdout_row(src: str, rec: dict, path, line) -> dict:
    """A held-out record as an ``align``/``evaluate`` input row: its query and reference answer
    (UltraFeedback: the authors' test-set golden answer; hh-rlhf: the chosen answer)."""
    if src == "ultrafeedback":
        return {"query": _text(rec, "instruction", path, line), "golden": ultrafeedback_golden(rec, path, line),
                "source_index": line - 1}
    if src == "hh-rlhf":
        query, golden = hh_prompt(_text(rec, "chosen", path, line))
        return {"query": query, "golden": golden, "source_index": line - 1}
    return {**rec, "source_index": line - 1}


def read_preference_records(inputs: Sequence[str], source: str, resolve: ObjectiveResolver,
                            default_objective: str | None = None,
                            stats: BuildStats | None = None, *, holdout_last: int = 0,
                            holdout: list | None = None, **adapter_options) -> Iterator[PreferenceRecord]:
    """Stream PreferenceRecords from input files; ``source_index`` = 0-based line in its file.

    ``holdout_last``: the last N records of the inputs (taken together) are not turned into
    pairs but appended to ``holdout`` as :func:`holdout_row` s — the authors' UltraFeedback test
    split is ``train[-15000:]``. ``adapter_options`` go to :func:`adapter_for`.
    """
    pending: collections.deque = collections.deque()
    for inp in inputs:
        adapter, src = None, None
        for line, rec in iter_records(inp):
            if stats is not None:
                stats.records += 1
            if adapter is None:
                src = detect_source(rec) if source == "auto" else source
                adapter = adapter_for(src, os.path.basename(str(inp)), default_objective, **adapter_options)
            if holdout_last <= 0:
                yield from adapter(rec, inp, line, resolve)
                continue
            pending.append((adapter, src, rec, inp, line))
            if len(pending) > holdout_last:
                a, _, r, i, n = pending.popleft()
                yield from a(r, i, n, resolve)
    for _, src, rec, inp, line in pending:
        if holdout is not None:
            holdout.append(holdout_row(src, rec, inp, line))
    if stats is not None and holdout_last > 0:
        stats.records -= len(pending)
        stats.extra["holdout_records"] = len(pending)
        if len(pending) < holdout_last:
            stats.warn(f"hold-out: {holdout_last} records asked for, the input has only {len(pending)}; "
                       "all of them are held out and nothing is left for training")


def detect_template(inputs: Sequence[str], source: str) -> str:
    """The template that fits the data: ``hh-rlhf`` for hh-rlhf transcripts, else ``ultrafeedback``."""
    src = source
    if source == "auto":
        src = "generic"
        for _, rec in iter_records(inputs[0]):
            try:
                src = detect_source(rec)
            except MetaAlignerError:
                pass
            break
    return "hh-rlhf" if src == "hh-rlhf" else "ultrafeedback"


# --------------------------------------------------------------------------- writing

def _non_empty(rows: Iterable[dict], stats: BuildStats, inputs: Sequence[str]) -> Iterator[dict]:
    yield from rows
    if stats.records == 0:
        raise MetaAlignerError(f"{', '.join(map(str, inputs))}: no records (empty input)")


def write_dataset(rows: Iterable[dict], out_dir: str | os.PathLike, stats: BuildStats,
                  holdout: list | None = None) -> dict:
    """Write the three subsets and stats.json (and the hold-out when one is given); the files
    appear together or not at all."""
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
        names = [f"{s}.jsonl" for s in SUBSETS] + ["stats.json"]
        if holdout is not None:
            with open(tmp / HOLDOUT_FILE, "wb") as fh:
                for row in holdout:
                    fh.write(dumps_bytes(row))
            names.append(HOLDOUT_FILE)
        summary = stats.to_dict()
        (tmp / "stats.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        for name in names:
            os.replace(tmp / name, out / name)
        return summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_dataset_files(inputs: Sequence[str], out_dir: str | os.PathLike, *, source: str = "auto",
                        template: str | None = "ultrafeedback", objectives: Sequence[Objective] = (),
                        warmup_size: int | str = 0, seed: int = 42, progress: bool = False,
                        reward_models=None, tie_margin: float = 0.0, reward_device: str | None = None,
                        reward_batch_size: int | None = None, holdout_last: int = 0,
                        non_numeric_ratings: str = "skip-aspect") -> dict:
    """Read inputs, run Algorithm 1, write ``out_dir``; return the stats dict.

    ``template=None`` follows the data (hh-rlhf transcripts: ``hh-rlhf``, else ``ultrafeedback``).
    ``reward_models`` (a SPEC string or :class:`~metaaligner_core.rewards.RewardModelSpec` list):
    label every pair on each model's objective from its rewards (:mod:`metaaligner_core.rewards`;
    raw scores cached in ``out_dir/reward_scores.jsonl``); labels an hh-rlhf record would take
    from its subset name are replaced, labels present in the data are kept for other objectives.
    ``holdout_last``: the last N records become ``holdout.jsonl`` instead of training pairs.
    """
    if source != "auto" and source not in SOURCES:
        raise MetaAlignerError(f'unknown source "{source}" (valid: auto, {", ".join(SOURCES)})')
    if holdout_last < 0:
        raise MetaAlignerError("--holdout-last: expected a number >= 0")
    if tie_margin < 0:
        raise MetaAlignerError("--tie-margin: expected a number >= 0")
    if tie_margin and not reward_models:
        raise MetaAlignerError("--tie-margin applies to reward-model labels: give --reward-models too")
    warmup_size = check_warmup_size(warmup_size)
    template = check_template(template) if template else detect_template(inputs, source)
    resolve = ObjectiveResolver(template, objectives)
    specs = []
    if reward_models:
        from .rewards import parse_reward_models

        specs = (parse_reward_models(reward_models, lambda k: _resolve_reward_key(resolve, k))
                 if isinstance(reward_models, str) else list(reward_models))
    default_objective = objectives[0].key if len(objectives) == 1 else None
    stats = BuildStats()
    stats.extra["template"] = template
    holdout: list | None = [] if holdout_last else None
    records = read_preference_records(inputs, source, resolve, default_objective, stats, holdout_last=holdout_last,
                                      holdout=holdout, labels_from_rewards=bool(specs),
                                      non_numeric=non_numeric_ratings)
    if progress:
        from tqdm import tqdm

        records = tqdm(records, desc="records", unit=" rec", mininterval=1.0)
    out = Path(out_dir)
    created = not out.exists()
    try:
        if specs:
            from .rewards import CACHE_FILE, label_records

            records = list(records)
            for rec in records:
                if rec.label_source == "subset":
                    rec.labels = {}  # the reward models label these pairs, not the subset's name
            reward_stats: dict = {}
            label_records(records, specs, cache_path=out / CACHE_FILE, tie_margin=tie_margin, device=reward_device,
                          batch_size=reward_batch_size, progress=progress, stats=reward_stats)
            stats.extra["reward_models"] = reward_stats
            stats.extra["tie_margin"] = tie_margin
        rows = build_dynamic_dataset(records, resolve.by_key, template, seed, warmup_size, stats)
        rows = _non_empty(rows, stats, inputs)
        return write_dataset(rows, out, stats, holdout)
    except BaseException:
        # A new directory goes again, unless it holds reward scores worth keeping for the rerun.
        if created and not (out / "reward_scores.jsonl").is_file():
            shutil.rmtree(out, ignore_errors=True)
        raise


def _resolve_reward_key(resolve: ObjectiveResolver, key: str) -> str:
    try:
        return resolve(key)
    except MetaAlignerError as e:
        raise MetaAlignerError(f"--reward-models: {e}") from None
