"""LLM-judge evaluation (paper Algorithm 2 and Appendix E): win rates and 0–10 scores.

:func:`evaluate` is the library function behind ``metaaligner evaluate``. It reads rows
``{"query", "golden", "draft", "aligned"}``, asks a judge (any ChatBackend: ``openai:MODEL``,
``anthropic:MODEL``, an OpenAI-compatible server, or a local model) per row, objective and
response, and writes ``report.json``, ``report.md``, the plots and ``judgments.jsonl`` (the
cache) into the output directory.

- ``pairwise`` (Algorithm 2, Appendix C.1): the draft and the aligned response are each compared
  with the golden answer, whose position (1 or 2) is drawn from the seed per comparison.
  ``swap=True`` judges both positions and keeps a win or loss only when both agree.
- ``score`` (Appendix E.1): each response gets a 0–10 score per objective.

The maths lives in :mod:`.metrics`, the prompts in :mod:`.prompts`, the calls and the cache in
:mod:`.judging`, the files in :mod:`.report`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ..errors import InputError, MetaAlignerError
from ..io import iter_records
from ..models import is_api_model
from ..objectives import Objective, parse_objectives
from . import metrics
from .judging import Judge, JudgmentCache, Verdict
from .metrics import FAILED, INVALID, SIDES
from .prompts import pairwise_prompt, score_prompt
from .report import write_report

__all__ = ["evaluate", "load_rows", "plan_judgments", "MODES", "JUDGMENTS_FILE"]

log = logging.getLogger(__name__)

MODES = ("pairwise", "score")
JUDGMENTS_FILE = "judgments.jsonl"
FIELDS = ("query", "golden", "draft", "aligned")
_RESPONSE = {"original": "draft", "aligned": "aligned"}  # side -> input field
_MAX_FAILURES_LISTED = 50


def load_rows(path, max_rows: int | None = None) -> list[tuple[int, dict]]:
    """Read and check every row before any judge call: ``[(line, row)]``."""
    rows = []
    for line, rec in iter_records(path):
        for name in FIELDS:
            value = rec.get(name)
            if value is None and rec.get("error") and name in rec:
                raise InputError(path, line, name, 'null: align failed on this row (see its "error" field); '
                                 "rerun align with --resume")
            if value is None:
                raise InputError(path, line, name, "missing (evaluate rows need query, golden, draft and aligned)")
            if not isinstance(value, str):
                raise InputError(path, line, name, f"expected a string, got {type(value).__name__}")
        rows.append((line, {name: rec[name] for name in FIELDS}))
        if max_rows is not None and len(rows) >= max_rows:
            break
    if not rows:
        raise MetaAlignerError(f"{path}: no rows to evaluate")
    return rows


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.username or parts.password:
        parts = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
    return urlunsplit(parts)


def _load_judge(judge, base_url, timeout, max_retries):
    if not isinstance(judge, str):
        return judge  # already a ChatBackend
    from ..backends import load_backend

    if not is_api_model(judge):
        log.warning("judge %s is a local model: small local models are poor judges (often answering "
                    "neither 1, 2 nor 0, or always the same); use an API judge such as openai:gpt-4o "
                    "for figures you report", judge)
    return load_backend(judge, base_url=base_url, timeout=timeout, max_retries=max_retries)


def plan_judgments(rows, objectives: list[Objective], mode: str, seed: int, swap: bool) -> dict:
    """Every judge prompt to ask: ``{(row, objective key, side): [(prompt, golden position)]}``.

    One entry per comparison, two with ``swap`` (golden at 1 and at 2); the position is None in
    score mode.
    """
    plan = {}
    for i, (_, row) in enumerate(rows):
        for obj in objectives:
            for side in SIDES:
                response = row[_RESPONSE[side]]
                if mode == "score":
                    plan[(i, obj.key, side)] = [(score_prompt(row["query"], response, obj), None)]
                    continue
                positions = (1, 2) if swap else (metrics.golden_position(seed, i, obj.key, side),)
                pairs = {1: (row["golden"], response), 2: (response, row["golden"])}
                plan[(i, obj.key, side)] = [(pairwise_prompt(row["query"], *pairs[g], obj), g) for g in positions]
    return plan


def _outcome(verdicts: dict[str, Verdict], entries, mode: str):
    """One comparison's outcome (score mode: the score) from its verdicts."""
    outs = []
    for prompt, g in entries:
        v = verdicts[prompt]
        if v.status != "ok":
            outs.append(FAILED if v.status == "failed" else INVALID)
        else:
            outs.append(v.value if mode == "score" else metrics.pairwise_outcome(v.value, g))
    return metrics.swap_outcome(*outs) if len(outs) == 2 else outs[0]


def evaluate(input, objectives, judge, out, *, mode: str = "pairwise", base_url: str | None = None,
             seed: int = 0, concurrency: int = 8, swap: bool = False, max_rows: int | None = None,
             max_tokens: int = 32, timeout: float = 60.0, max_retries: int = 5,
             progress: bool = False) -> dict:
    """Judge ``input`` and write the report into ``out``; return the report (``report.json``).

    ``objectives`` is a SPEC or a list of :class:`~metaaligner_core.objectives.Objective`;
    ``judge`` a PROVIDER:MODEL string (see :func:`metaaligner_core.backends.load_backend`) or a
    ChatBackend. Judgments that fail are counted in ``report["failed"]`` (and listed in
    ``report["failures"]``), never filled in; a rerun retries only them.
    """
    if mode not in MODES:
        raise MetaAlignerError(f'unknown mode "{mode}" (valid: {", ".join(MODES)})')
    for flag, value, least in (("--concurrency", concurrency, 1), ("--max-tokens", max_tokens, 1),
                               ("--max-rows", max_rows, 1), ("--max-retries", max_retries, 0)):
        if value is not None and value < least:
            raise MetaAlignerError(f"{flag} must be at least {least} (got {value})")
    if timeout <= 0:
        raise MetaAlignerError(f"--timeout must be positive (got {timeout})")
    objs: list[Objective] = (list(objectives) if isinstance(objectives, (list, tuple))
                             and all(isinstance(o, Objective) for o in objectives)
                             else parse_objectives(objectives))
    rows = load_rows(input, max_rows)
    backend = _load_judge(judge, base_url, timeout, max_retries)
    out = Path(out)

    plan = plan_judgments(rows, objs, mode, seed, swap)
    context: dict[str, dict] = {}  # prompt -> what it judges, recorded beside the answer (no texts)
    for (i, key, side), entries in plan.items():
        for prompt, g in entries:
            context.setdefault(prompt, {"row": i, "line": rows[i][0], "objective": key, "side": side,
                                        **({"golden_position": g} if g else {})})
    log.info("evaluate: %d rows x %d objectives x 2 responses = %d judgments (%d distinct prompts), judge %s",
             len(rows), len(objs), len(plan), len(context), backend.name)
    parse = metrics.parse_score if mode == "score" else metrics.parse_choice
    with JudgmentCache(out / JUDGMENTS_FILE, backend.name) as cache:
        judge_ = Judge(backend, cache, parse, max_tokens=max_tokens, concurrency=concurrency, progress=progress)
        verdicts = judge_.judge_all(context)

    results, scores, failures = {}, {}, []
    for obj in objs:
        per_side = {side: [_outcome(verdicts, plan[(i, obj.key, side)], mode) for i in range(len(rows))]
                    for side in SIDES}
        for side, col in per_side.items():
            for i, o in enumerate(col):
                if o == FAILED:
                    error = next(verdicts[p].error for p, _ in plan[(i, obj.key, side)]
                                 if verdicts[p].status == "failed")
                    failures.append({"row": i, "line": rows[i][0], "objective": obj.key, "side": side,
                                     "error": error})
        if mode == "score":
            summary = metrics.score_summary(per_side["original"], per_side["aligned"])
            scores[obj.key] = (summary.pop("scores_original"), summary.pop("scores_aligned"))
        else:
            summary = metrics.win_rates(per_side["original"], per_side["aligned"])
        results[obj.key] = {"name": obj.name, "text": obj.text, **summary}

    n_invalid = sum(r[side]["invalid"] for r in results.values() for side in SIDES)
    report = {
        "mode": mode,
        "judge": backend.name,
        **({"base_url": _without_credentials(base_url)} if base_url else {}),
        "seed": seed,
        "swap": bool(swap) if mode == "pairwise" else False,
        "input": str(input),
        "rows": len(rows),
        "objectives": results,
        "judgments": len(plan),
        "invalid": n_invalid,
        "failed": len(failures),
        "calls": judge_.usage.as_dict(),
        "failures": failures[:_MAX_FAILURES_LISTED],
        "prompt": "paper Appendix E.1 (0-10 score)" if mode == "score" else "paper Appendix C.1 (pairwise vs golden)",
    }
    report = write_report(out, report, scores if mode == "score" else None)
    log.info("evaluate: %d judge calls made, %d answered from the cache, %d invalid, %d failed; report in %s",
             judge_.usage.calls, judge_.usage.cached, n_invalid, len(failures), out)
    return report
