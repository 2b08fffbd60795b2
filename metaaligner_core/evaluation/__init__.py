"""LLM-judge evaluation (paper Algorithm 2 and Appendix E): win rates and 0–10 scores.

:func:`evaluate` is the library function behind ``metaaligner evaluate``. It reads rows
``{"query", "golden", "draft", "aligned"}`` (other column names through ``columns``; more
correctors through ``correctors``), asks one or more judges (any ChatBackend: ``openai:MODEL``,
``anthropic:MODEL``, an OpenAI-compatible server, or a local model) per row, objective and
response, and writes ``report.json``, ``report.md``, the plots and ``judgments.jsonl`` (the
cache) into the output directory.

- ``pairwise`` (Algorithm 2, Appendix C.1): the draft and each correction are each compared
  with the golden answer, whose position (1 or 2) is drawn from the seed per comparison.
  ``swap=True`` judges both positions and keeps a win or loss only when both agree.
  ``head_to_head=True`` also compares each correction with its own draft directly.
- ``score`` (Appendix E.1): each response gets a 0–10 score per objective.

The maths lives in :mod:`.metrics` and :mod:`.stats`, the prompts in :mod:`.prompts`, the calls
and the cache in :mod:`.judging`, the per-judge figures in :mod:`.summary`, the expert join in
:mod:`.experts`, the files in :mod:`.report`.
"""
from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ..errors import InputError, MetaAlignerError
from ..io import apply_columns, column_label, iter_records, parse_columns
from ..models import is_api_model
from ..objectives import Objective, parse_objectives
from ..templates import TEMPLATE_NAMES
from . import metrics, stats
from .judging import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, Judge, JudgmentCache, settings_key
from .prompts import JudgePrompt, judge_prompt
from .report import write_report
from .summary import judge_agreement, summarise

__all__ = ["evaluate", "load_rows", "plan_judgments", "Corrector", "resolve_correctors", "judge_name",
           "MODES", "JUDGMENTS_FILE", "STOPPED_EXIT"]

log = logging.getLogger(__name__)

MODES = ("pairwise", "score")
JUDGMENTS_FILE = "judgments.jsonl"
FIELDS = ("query", "golden", "draft", "aligned")
STOPPED_EXIT = 3  # the CLI's exit status when --max-calls stopped the run before the end
_MAX_FAILURES_LISTED = 50

# Corrector columns found without --correctors, in this order (align's output columns).
_KNOWN_CORRECTORS = (("metaaligner", "aligned"), ("self-refine", "aligned_self_refine"),
                     ("pku-aligner", "aligned_pku"))


@dataclass(frozen=True)
class Corrector:
    """One corrected response per row: its name, its input column and its position-draw id.

    The MetaAligner corrector (column ``aligned``) draws positions as side ``"aligned"``, as
    before several correctors existed, so earlier judgment caches stay valid.
    """

    name: str
    column: str

    @property
    def side(self) -> str:
        return "aligned" if self.name == "metaaligner" else self.name


def resolve_correctors(spec, first: dict) -> list[Corrector]:
    """``NAME=COLUMN[,NAME=COLUMN...]`` (or a list of pairs), else the known corrector columns
    present in the first row (``aligned``, ``aligned_self_refine``, ``aligned_pku``)."""
    if isinstance(spec, (list, tuple)):
        pairs = [tuple(p) for p in spec]
    elif spec:
        pairs = []
        for item in str(spec).split(","):
            if not item.strip():
                continue
            name, sep, column = item.partition("=")
            name, column = name.strip(), column.strip()
            if not name:
                raise MetaAlignerError(f'--correctors: "{item.strip()}" is not NAME=COLUMN '
                                       "(e.g. metaaligner=aligned,self-refine=aligned_self_refine)")
            pairs.append((name, column or name))
    else:
        # ``first`` has --columns applied: a mapped aligned column already shows as "aligned"
        pairs = [(n, c) for n, c in _KNOWN_CORRECTORS if c in first] or [("metaaligner", "aligned")]
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise MetaAlignerError(f"--correctors: a name is given twice ({', '.join(names)})")
    if "original" in names:
        raise MetaAlignerError('--correctors: "original" names the draft; choose another corrector name')
    return [Corrector(n, c) for n, c in pairs]


def load_rows(path, max_rows: int | None = None, columns=None, correctors=None, sample: int | None = None,
              sample_seed: int = 0):
    """Read and check every row before any judge call.

    Returns ``[(line, row)]`` with ``row = {"query", "golden", "draft", "aligned", ...}``, where
    each corrector's text is under its name in ``row["responses"]`` (and the MetaAligner one also
    under ``"aligned"``). With ``correctors`` or ``columns`` given, returns
    ``(rows, correctors)``. ``max_rows`` keeps the first N rows of the file; ``sample`` draws N
    rows at random (seeded by ``sample_seed``; kept in file order), as the paper samples its
    test queries; every row of the file is checked either way.
    """
    mapping = parse_columns(columns, FIELDS) if isinstance(columns, (str, type(None))) else dict(columns)
    rows, resolved = [], None
    for line, raw in iter_records(path):
        rec = apply_columns(raw, mapping)
        if resolved is None:
            resolved = resolve_correctors(correctors, rec)
        needed = [("query", "query"), ("golden", "golden"), ("draft", "draft")]
        needed += [(c.column, c.name) for c in resolved]
        row = {"responses": {}}
        for field, what in needed:
            value = rec.get(field)
            label = column_label(field, mapping)
            if value is None and rec.get("error") and field in rec:
                raise InputError(path, line, label, 'null: align failed on this row (see its "error" field); '
                                 "rerun align with --resume")
            if value is None:
                need = ", ".join(column_label(f, mapping) for f, _ in needed)
                raise InputError(path, line, label, f"missing (evaluate rows need {need})")
            if not isinstance(value, str):
                raise InputError(path, line, label, f"expected a string, got {type(value).__name__}")
            if field in ("query", "golden", "draft"):
                row[field] = value
            else:
                row["responses"][what] = value
        if "metaaligner" in row["responses"]:
            row["aligned"] = row["responses"]["metaaligner"]
        rows.append((line, row))
        if max_rows is not None and len(rows) >= max_rows:
            break
    if not rows:
        raise MetaAlignerError(f"{path}: no rows to evaluate")
    if sample is not None:
        if sample > len(rows):
            raise MetaAlignerError(f"--sample {sample}: {path} has only {len(rows)} rows")
        keep = sorted(random.Random(f"sample:{sample_seed}").sample(range(len(rows)), sample))
        rows = [rows[i] for i in keep]
    if correctors is None and columns is None:
        return rows
    return rows, resolved


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.username or parts.password:
        parts = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
    return urlunsplit(parts)


def _judge_spec(spec: str, base_url: str | None) -> str:
    """``openai-compatible:NAME`` with ``--base-url URL`` means ``openai-compatible:NAME@URL``."""
    provider, _, rest = spec.partition(":")
    if provider == "openai-compatible" and base_url and "@http" not in rest:
        return f"openai-compatible:{rest}@{base_url}"
    return spec


def judge_name(spec, base_url: str | None = None) -> str:
    """The name a judge's answers are cached under (the backend's ``name``), without loading it."""
    if not isinstance(spec, str):
        return spec.name
    spec = _judge_spec(spec, base_url)
    provider, sep, rest = spec.partition(":")
    if sep and provider == "openai-compatible":
        from ..backends import parse_compatible

        name, url = parse_compatible(rest)  # the spec's own URL wins over --base-url (as in _load_judge)
        return f"openai-compatible:{name}@{url}"
    if sep and provider in ("openai", "anthropic"):
        return f"{provider}:{rest.strip()}"
    return "default" if spec in ("", "default") else spec


def _load_judge(judge, base_url, timeout, max_retries):
    if not isinstance(judge, str):
        return judge  # already a ChatBackend
    from ..backends import load_backend

    judge = _judge_spec(judge, base_url)
    if judge.startswith("openai:") and not os.environ.get("OPENAI_API_KEY"):
        # openai:NAME is OpenAI's API (at --base-url if given: a proxy); it always needs a key
        hint = (f"; for a server that needs no key use --judge openai-compatible:{judge[7:]}@{base_url}"
                if base_url else "")
        raise MetaAlignerError(f"{judge}: no API key; set the environment variable OPENAI_API_KEY{hint}")
    if not is_api_model(judge):
        log.warning("judge %s is a local model: small local models are poor judges (often answering "
                    "neither 1, 2 nor 0, or always the same); use an API judge such as openai:gpt-4o "
                    "for figures you report", judge)
    return load_backend(judge, base_url=None if judge.startswith("openai-compatible:") else base_url,
                        timeout=timeout, max_retries=max_retries)


def _template_for(template, rows_path, objectives) -> tuple[str | None, str]:
    """The template (objective wording) and where it came from."""
    if template:
        if template not in TEMPLATE_NAMES:
            raise MetaAlignerError(f'--template "{template}": unknown (valid: {", ".join(TEMPLATE_NAMES)})')
        return template, "--template"
    for _, rec in iter_records(rows_path):
        t = rec.get("template")
        if isinstance(t, str) and t in TEMPLATE_NAMES:
            return t, 'the rows\' "template" field'
        break
    if isinstance(objectives, str) and not objectives.strip().startswith("@"):
        from ..objectives import BUILTIN, normalize_key

        keys = {normalize_key(k.split("/")[-1]) for k in objectives.split(",") if ":" not in k}
        for fam in ("hh-rlhf", "imhi"):
            own = {o.key for o in BUILTIN[fam]} - {o.key for f, objs in BUILTIN.items() if f != fam for o in objs}
            if keys & own:
                return fam, f"the objectives ({', '.join(sorted(keys & own))} are {fam} objectives)"
    return None, "default (UltraFeedback wording first)"


def plan_judgments(rows, objectives: list[Objective], mode: str, seed: int, swap: bool,
                   correctors: list[Corrector] | None = None, prompt: JudgePrompt | None = None,
                   head_to_head: bool = False) -> dict:
    """Every judge prompt to ask: ``{(kind, row, objective key, side): [(prompt, reference position)]}``.

    ``kind`` is ``"golden"`` (a response against the golden answer; score mode: the response
    alone) or ``"draft"`` (head to head: a correction against its own draft). ``side`` is
    ``"original"`` (the draft) or a corrector's name. One entry per comparison, two with
    ``swap`` (the reference at 1 and at 2); the position is None in score mode.
    """
    prompt = prompt or judge_prompt(mode)
    correctors = correctors or [Corrector("metaaligner", "aligned")]
    plan = {}
    for i, (_, row) in enumerate(rows):
        responses = {"original": row["draft"], **{c.name: _text(row, c) for c in correctors}}
        draw_side = {"original": "original", **{c.name: c.side for c in correctors}}
        for obj in objectives:
            for side, response in responses.items():
                if mode == "score":
                    plan[("golden", i, obj.key, side)] = [(prompt.fill(row["query"], obj, response=response), None)]
                    continue
                positions = (1, 2) if swap else (metrics.golden_position(seed, i, obj.key, draw_side[side]),)
                plan[("golden", i, obj.key, side)] = [
                    (_pair(prompt, row["query"], row["golden"], response, obj, g), g) for g in positions]
                if head_to_head and side != "original":
                    positions = (1, 2) if swap else (metrics.golden_position(seed, i, obj.key, f"h2h:{side}"),)
                    plan[("draft", i, obj.key, side)] = [
                        (_pair(prompt, row["query"], row["draft"], response, obj, g), g) for g in positions]
    return plan


def _text(row, c: Corrector) -> str:
    return row["responses"][c.name]


def _pair(prompt: JudgePrompt, query, reference, response, obj, reference_at: int) -> str:
    r1, r2 = (reference, response) if reference_at == 1 else (response, reference)
    return prompt.fill(query, obj, response_1=r1, response_2=r2)


def _context(plan, rows) -> dict[str, dict]:
    """prompt -> what it judges, recorded beside the answer (no texts)."""
    context: dict[str, dict] = {}
    for (kind, i, key, side), entries in plan.items():
        for prompt, g in entries:
            extra = {} if g is None else ({"golden_position": g} if kind == "golden" else
                                          {"kind": "head_to_head", "draft_position": g})
            label = "aligned" if side == "metaaligner" else side  # as in failures and the report's blocks
            context.setdefault(prompt, {"row": i, "line": rows[i][0], "objective": key, "side": label, **extra})
    return context


def evaluate(input, objectives, judge, out, *, mode: str = "pairwise", base_url: str | None = None,
             seed: int = 0, concurrency: int = 8, swap: bool = False, max_rows: int | None = None,
             sample: int | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
             temperature: float = DEFAULT_TEMPERATURE, timeout: float = 60.0, max_retries: int = 5,
             progress: bool = False, columns=None, correctors=None, template: str | None = None,
             judge_prompt_name: str | None = None, head_to_head: bool = False,
             bootstrap: int = stats.DEFAULT_RESAMPLES, bootstrap_seed: int = 0,
             expert_ratings: list[dict] | None = None, ratings_source: str = "expert ratings",
             dry_run: bool = False, max_calls: int | None = None) -> dict:
    """Judge ``input`` and write the report into ``out``; return the report (``report.json``).

    ``objectives`` is a SPEC or a list of :class:`~metaaligner_core.objectives.Objective`;
    ``judge`` a PROVIDER:MODEL string (see :func:`metaaligner_core.backends.load_backend`), a
    ChatBackend, or a list of them (several judges: agreement between them is reported).
    ``columns`` maps fields to input columns (``"golden=goldens,draft=generated_text"``);
    ``correctors`` names the corrections to judge (``"metaaligner=aligned,self-refine=aligned_self_refine"``;
    default: the known corrector columns present). ``template`` (``ultrafeedback``, ``hh-rlhf``,
    ``imhi``) decides the wording of built-in objectives and, for ``imhi``, the judge prompt.
    ``expert_ratings``: rating records (the annotation store's ratings export format) to report
    judge-expert agreement against; ``ratings_source`` names where they came from.

    ``max_rows`` judges the first N rows, ``sample`` N rows drawn at random with ``seed``.
    ``temperature`` and ``max_tokens`` are the judge's sampling settings (recorded in
    ``report["judge_settings"]``; settings other than the defaults get their own cache entries).
    ``bootstrap`` resamples (default 10,000) of the queries, jointly for every objective,
    give every interval.

    Judgments that fail are counted in ``report["failed"]`` (and listed in
    ``report["failures"]``), never filled in; a rerun retries only them. ``dry_run`` makes no
    call and writes nothing: it returns ``{"dry_run": True, "calls", ...}``. ``max_calls`` stops
    cleanly after that many calls, returning ``{"stopped": True, ...}`` without a report; a
    rerun continues from the cache.
    """
    if mode not in MODES:
        raise MetaAlignerError(f'unknown mode "{mode}" (valid: {", ".join(MODES)})')
    for flag, value, least in (("--concurrency", concurrency, 1), ("--judge-max-tokens", max_tokens, 1),
                               ("--max-rows", max_rows, 1), ("--sample", sample, 1),
                               ("--max-retries", max_retries, 0),
                               ("--bootstrap", bootstrap, 1000), ("--max-calls", max_calls, 0)):
        if value is not None and value < least:
            raise MetaAlignerError(f"{flag} must be at least {least} (got {value})")
    if max_rows is not None and sample is not None:
        raise MetaAlignerError("--max-rows (the first N rows) and --sample (N rows at random) exclude each other")
    if not (isinstance(temperature, (int, float)) and 0 <= temperature <= 2):
        raise MetaAlignerError(f"--judge-temperature must be between 0 and 2 (got {temperature})")
    settings = {"temperature": float(temperature), "max_tokens": int(max_tokens)}
    if timeout <= 0:
        raise MetaAlignerError(f"--timeout must be positive (got {timeout})")
    if head_to_head and mode != "pairwise":
        raise MetaAlignerError("--head-to-head needs --mode pairwise (score mode compares the scores directly)")
    judges = list(judge) if isinstance(judge, (list, tuple)) else [judge]
    if not judges:
        raise MetaAlignerError("no judge given (--judge PROVIDER:MODEL)")
    names = [judge_name(j, base_url) for j in judges]
    if len(set(names)) != len(names):
        raise MetaAlignerError(f"--judge: the same judge is given twice ({', '.join(names)})")
    template, template_source = _template_for(template, input, objectives)
    objs: list[Objective] = (list(objectives) if isinstance(objectives, (list, tuple))
                             and all(isinstance(o, Objective) for o in objectives)
                             else parse_objectives(objectives, family=template))
    jp = judge_prompt(mode, judge_prompt_name, template)
    rows, corr = load_rows(input, max_rows, columns=columns or "", correctors=correctors, sample=sample,
                           sample_seed=seed)
    if expert_ratings is not None:
        from .experts import expert_scores

        experts = expert_scores(expert_ratings, ratings_source)  # fail on a bad record before any call
    out = Path(out)

    plan = plan_judgments(rows, objs, mode, seed, swap, corr, jp, head_to_head)
    context = _context(plan, rows)
    log.info("evaluate: %d rows x %d objectives x %d responses%s = %d judgments (%d distinct prompts) per judge, "
             "prompt %s, %d judge(s)", len(rows), len(objs), 1 + len(corr),
             " (+ head to head)" if head_to_head else "", len(plan), len(context), jp.name, len(judges))

    if dry_run:
        return _dry_run(out, names, context, jp, max_tokens, len(plan), settings)

    behaviour = {c.name: metrics.correction_behaviour([r["draft"] for _, r in rows], [_text(r, c) for _, r in rows],
                                                      [r["golden"] for _, r in rows]) for c in corr}
    parse = metrics.parse_score if mode == "score" else metrics.parse_choice
    per_judge, usages, budget, stopped = {}, [], max_calls, False
    for spec, name in zip(judges, names):
        backend = _load_judge(spec, base_url, timeout, max_retries)
        with JudgmentCache(out / JUDGMENTS_FILE, backend.name, jp.system, settings) as cache:
            j = Judge(backend, cache, parse, max_tokens=max_tokens, concurrency=concurrency, progress=progress,
                      system=jp.system, max_calls=budget, temperature=float(temperature))
            verdicts = j.judge_all(context)
            pending = len(j.pending(context))
        usages.append((backend.name, j.usage))
        if budget is not None:
            budget -= j.usage.calls
        if j.stopped:
            stopped = True
            break
        per_judge[backend.name] = summarise(rows, objs, corr, plan, verdicts, mode, swap, head_to_head,
                                            bootstrap, bootstrap_seed, behaviour)
    if stopped:
        made = sum(u.calls for _, u in usages)
        log.warning("evaluate: stopped after %d calls (--max-calls %d); rerun the same command to continue "
                    "(answers so far are in %s)", made, max_calls, out / JUDGMENTS_FILE)
        return {"stopped": True, "calls": made, "max_calls": max_calls, "judge": usages[-1][0],
                "pending_first_asks": pending}

    first = next(iter(per_judge.values()))
    primary = corr[0].name
    failures = [f for s in per_judge.values() for f in s["failures"]]
    n_invalid = sum(s["invalid"] for s in per_judge.values())
    total_calls = _sum_usage([u for _, u in usages])
    report = {
        "mode": mode,
        "judge": next(iter(per_judge)),
        "judges": list(per_judge),
        **({"base_url": _without_credentials(base_url)} if base_url else {}),
        "seed": seed,
        "sample": {"rows": sample, "seed": seed} if sample is not None else None,
        "max_rows": max_rows,
        "swap": bool(swap) if mode == "pairwise" else False,
        "head_to_head": bool(head_to_head),
        "input": str(input),
        "rows": len(rows),
        "template": template,
        "template_source": template_source,
        "correctors": {c.name: {"column": c.column} for c in corr},
        "primary_corrector": primary,
        "objectives": first["correctors"][primary],
        "average": first["average"].get(primary),
        "by_judge": {name: {"correctors": s["correctors"], "average": s["average"],
                            "position_consistency": s["position_consistency"],
                            "length_control": s["length_control"], "calls": u.as_dict()}
                     for (name, s), (_, u) in zip(per_judge.items(), usages)},
        "correction": {name: {k: v for k, v in b.items() if k != "length_changes"} for name, b in behaviour.items()},
        "judgments": len(plan) * len(per_judge),
        "invalid": n_invalid,
        "failed": len(failures),
        "calls": total_calls,
        "failures": failures[:_MAX_FAILURES_LISTED],
        "prompt": jp.source,
        "judge_prompt": {"name": jp.name, "source": jp.source, "system": jp.system},
        "judge_settings": {**settings, "prompt": jp.name},
        "bootstrap": {"resamples": bootstrap, "seed": bootstrap_seed,
                      "method": "paired percentile bootstrap over queries, one joint resampling for every "
                                "objective, corrector and definition"},
        "definitions": _definitions(mode, bootstrap, bootstrap_seed),
        "flags": [f"{name} / {c} / {k}: {flag}" for name, s in per_judge.items()
                  for c, blocks in s["correctors"].items() for k, b in blocks.items() for flag in b.get("flags", [])],
    }
    if len(per_judge) > 1:
        report["judge_agreement"] = judge_agreement(per_judge, objs, mode)
    if expert_ratings is not None:
        from .experts import expert_agreement

        report["expert_agreement"] = expert_agreement(experts, rows, objs, corr, per_judge, mode, ratings_source)
    length_changes = {name: b["length_changes"] for name, b in behaviour.items()}
    report = write_report(out, report, {name: s["scores"] for name, s in per_judge.items()}, length_changes)
    log.info("evaluate: %d judge calls made, %d answered from the cache, %d invalid, %d failed; report in %s",
             total_calls["calls"], total_calls["cached"], n_invalid, len(failures), out)
    return report


def _sum_usage(usages) -> dict:
    out = {"calls": 0, "cached": 0, "retries_after_invalid": 0}
    reported = False
    pt = ct = 0
    for u in usages:
        d = u.as_dict()
        for k in out:
            out[k] += d[k]
        if "prompt_tokens" in d:
            reported = True
            pt += d["prompt_tokens"]
            ct += d["completion_tokens"]
    if reported:
        out.update(prompt_tokens=pt, completion_tokens=ct)
    return out


def _definitions(mode: str, bootstrap: int, bootstrap_seed: int) -> dict:
    ci = (f"paired percentile bootstrap over queries, {bootstrap} resamples, seed {bootstrap_seed}; one joint "
          "resampling of the queries for every objective, so the average over objectives has an interval")
    if mode == "score":
        return {"advantage": "mean aligned score - mean original score, over rows scored validly on both sides",
                "average": "each figure averaged over the objectives",
                "ci95": ci,
                "length_unit": "words (whitespace-separated)"}
    return {
        "win_rate_original / win_rate_aligned / advantage / n":
            "valid-only: wins / n, n = rows whose draft and correction judgments are both valid (ties are not wins)",
        "*_paper (n_paper)":
            "the paper's Algorithm 2: wins / all judgments (invalid replies count as non-wins); "
            "n_paper = rows where no call failed",
        "*_authors (n_authors)":
            "the authors' evaluation scripts: (wins + ties) / all judgments, as they print it "
            "(float(win+tied)/(win+lose+tied)); n_authors = n_paper",
        "*_ties_half (n_ties_half)": "(wins + ties / 2) / n over the valid pairs (AlpacaEval's convention)",
        "average": "each rate and advantage averaged over the objectives (the paper's Avg.)",
        "ci95": ci + "; every rate, advantage and length-controlled rate has one",
        "lc_win_rate_*": "length-controlled, AlpacaEval's length_controlled_v1 GLM per side against the golden "
                         "answer: P(preferred) = sigmoid(theta_0 + theta_1 * tanh(delta / sd(delta))), delta = "
                         "response minus golden length in characters, outcome 1 / 0.5 (tie) / 0, L1 penalty with "
                         "C chosen by 5-fold grouped cross-validation on the log loss; sigmoid(theta_0); fitted on "
                         "the same valid pairs as the valid-only rates and refitted on every bootstrap resample",
        "copy_rate": "share of rows whose correction equals the draft after whitespace normalisation",
        "head_to_head": "the correction judged against its own draft; loses_to_draft_rate = losses / valid",
        "position_consistency": "--swap: share of comparisons whose two orders gave the same verdict",
        "length_unit": "characters in the length-controlled fit; words in the correction-behaviour figures",
    }


def _dry_run(out: Path, names, context, jp: JudgePrompt, max_tokens: int, comparisons: int,
             settings: dict | None = None) -> dict:
    """Count the calls a run would make (first asks not in the cache) and estimate the tokens."""
    per = {}
    path = out / JUDGMENTS_FILE
    for name in names:
        cache = _ReadOnlyCache(path, name, jp.system, settings)
        todo = [p for p in context if cache.get(p, 0) is None]
        chars = sum(len(p) + len(jp.system or "") for p in todo)
        per[name] = {"calls": len(todo), "cached": len(context) - len(todo),
                     "prompt_tokens_estimate": math.ceil(chars / 4),
                     "completion_tokens_max": len(todo) * max_tokens}
    total = {k: sum(v[k] for v in per.values()) for k in ("calls", "cached", "prompt_tokens_estimate",
                                                          "completion_tokens_max")}
    return {"dry_run": True, "comparisons_per_judge": comparisons, "distinct_prompts": len(context),
            "judges": per, **total,
            "note": "prompt tokens estimated at 4 characters a token; completion at most --max-tokens a call; "
                    "re-asks after an invalid reply come on top"}


class _ReadOnlyCache(JudgmentCache):
    """The cache's keys and answers without opening the file for writing (dry runs write nothing)."""

    def __init__(self, path, judge, system=None, settings=None):
        self.path, self.judge, self.system = Path(path), judge, system
        self.settings = settings_key(settings)
        self._answers = {}
        if self.path.exists():
            import json

            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "reply" in rec and isinstance(rec.get("key"), str):
                    self._answers[rec["key"]] = rec
