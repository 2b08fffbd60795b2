"""``metaaligner align``: drafts from a policy (when missing), corrections from the aligner.

Input rows ``{"query", "draft"?, ...}``; output rows keep every input field and add ``draft`` and
``aligned`` (and ``error`` for a row whose policy call failed after its retries), in input order.

The output file is rewritten atomically after every chunk of rows, so it always holds a
complete prefix of the input; ``--resume`` keeps the rows already there (matched to the input by
position and checked by ``query``, and by ``id`` when rows have one) and redoes rows that carry
an ``error``.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import InputError, MetaAlignerError
from ..templates import TEMPLATE_NAMES

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_NEW_TOKENS = 256
CHUNK_ROWS = 128  # rows per checkpoint of the output file


def register(sub) -> None:
    p = sub.add_parser(
        "align", help="correct drafts (made by a policy model when missing) for a list of objectives",
        description="Correct each row's draft for the objectives. Rows without a draft get one from --policy. "
                    "Output rows keep every input field and add \"draft\" and \"aligned\".")
    p.add_argument("--input", required=True, help="JSONL/CSV/Parquet file or hf:<dataset id>[:split] with a query column")
    p.add_argument("--out", required=True, help="output JSONL file (written atomically)")
    p.add_argument("--objectives", required=True, help="SPEC: comma-separated keys and/or \"Name: description\" items, or @file")
    p.add_argument("--aligner", default="default",
                   help="aligner MODEL: a Hugging Face id (e.g. MetaAligner/MetaAligner-UltraFeedback-1.1B), a directory "
                        "written by `metaaligner train`, a .gguf file, or default (the embedded base model; illustrative only)")
    p.add_argument("--policy", default="default",
                   help="policy MODEL for rows without a draft: default, a local model, openai:NAME, anthropic:NAME, "
                        "openai-compatible:NAME@URL")
    p.add_argument("--policy-base-url", default=None, help="base URL for an openai:/anthropic: policy (any compatible server)")
    p.add_argument("--template", choices=TEMPLATE_NAMES, default=None,
                   help="aligner prompt template (default: from the aligner's name, else ultrafeedback)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"rows per batch (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"most tokens per correction (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--policy-max-new-tokens", type=int, default=None, help="most tokens per draft (default: --max-new-tokens)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1.0)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--max-length", type=int, default=None,
                   help="aligner context in tokens (default: the model's); longer prompts lose the end of the draft")
    p.add_argument("--resume", action="store_true", help="keep rows already in --out and do only the rest")
    p.add_argument("--concurrency", type=int, default=8, help="parallel requests to an API policy (default 8)")
    p.add_argument("--max-retries", type=int, default=5, help="retries per API request on 429/5xx/timeouts (default 5)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per API request (default 60)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: auto)")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on CUDA, else fp32)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def read_rows(path: str) -> list[tuple[int, dict]]:
    """Input rows with their line numbers; every row must have a non-empty string ``query``."""
    from ..io import iter_records

    rows = []
    for line, rec in iter_records(path):
        q = rec.get("query")
        if q is None:
            raise InputError(path, line, "query", "missing")
        if not isinstance(q, str) or not q.strip():
            raise InputError(path, line, "query", "expected a non-empty string")
        d = rec.get("draft")
        if d is not None and not isinstance(d, str):
            raise InputError(path, line, "draft", f"expected a string, got {type(d).__name__}")
        rows.append((line, rec))
    if not rows:
        raise MetaAlignerError(f"{path}: no records (empty input file)")
    return rows


def has_draft(rec: dict) -> bool:
    return isinstance(rec.get("draft"), str) and bool(rec["draft"].strip())


def resumed_rows(out: Path, rows: list[tuple[int, dict]]) -> list[dict]:
    """Finished output rows to keep: a prefix of the input, matched by position (and query / id)."""
    from ..io import iter_records

    kept = []
    for i, (line, rec) in enumerate(iter_records(out)):
        if i >= len(rows):
            raise MetaAlignerError(f"{out}: has more rows than the input; it is not this input's output "
                                   "(drop --resume to start over)")
        src_line, src = rows[i]
        for key in ("query", "id"):
            if key in src and rec.get(key) != src[key]:
                raise InputError(out, line, key, f"differs from the input's line {src_line}; the file is not this "
                                 "input's output (drop --resume to start over)")
        kept.append(rec)
    return kept


def run(args) -> int:
    from ..settings import GenerationSettings
    from ..models import is_default
    from ..objectives import parse_objectives
    from ..templates import template_for_model

    if args.batch_size < 1:
        raise MetaAlignerError(f"--batch-size must be at least 1 (got {args.batch_size})")
    if args.max_new_tokens < 1:
        raise MetaAlignerError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    for flag, value in (("--policy-max-new-tokens", args.policy_max_new_tokens), ("--max-length", args.max_length),
                        ("--concurrency", args.concurrency)):
        if value is not None and value < 1:
            raise MetaAlignerError(f"{flag} must be at least 1 (got {value})")
    template = args.template or template_for_model(None if is_default(args.aligner) else args.aligner)
    objectives = parse_objectives(args.objectives, family=template)
    rows = read_rows(args.input)
    out = Path(args.out)

    done: list[dict] = []
    if args.resume and out.exists():
        done = resumed_rows(out, rows)
        while done and done[-1].get("error"):  # failed rows at the end are redone
            done.pop()
        log.info("resuming: %d of %d rows already in %s", len(done), len(rows), out)
    redo = {i for i, rec in enumerate(done) if rec.get("error")}
    todo = [i for i in range(len(done), len(rows))]
    if not todo and not redo:
        log.info("nothing to do: all %d rows are in %s", len(rows), out)
        return 0

    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
               repetition_penalty=args.repetition_penalty, seed=args.seed)
    GenerationSettings.from_kwargs(**gen)  # bad settings fail here, before any model loads or paid API call
    aligner, policy = _load_models(args, template, any(not has_draft(rows[i][1]) for i in [*redo, *todo]))
    if aligner.is_base_model:
        log.warning("note: %s", _base_warning())
    log.info("aligner %s (template %s), objectives: %s", aligner.name, aligner.template,
             ", ".join(o.key for o in objectives))

    results: list[dict] = list(done)
    if redo:
        fixed = _process(sorted(redo), rows, aligner, policy, objectives, gen, args)
        for i, rec in zip(sorted(redo), fixed):
            results[i] = rec
    from tqdm.auto import tqdm

    bar = tqdm(total=len(rows), initial=len(done), desc="align", unit="row", disable=args.no_progress)
    try:
        for start in range(0, len(todo), CHUNK_ROWS):
            chunk = todo[start:start + CHUNK_ROWS]
            results.extend(_process(chunk, rows, aligner, policy, objectives, gen, args, bar))
            _write(out, results)
    finally:
        bar.close()
    if redo and not todo:
        _write(out, results)

    failed = [i for i, rec in enumerate(results) if rec.get("error")]
    if failed:
        lines = ", ".join(str(rows[i][0]) for i in failed[:10]) + (" …" if len(failed) > 10 else "")
        log.error("%d of %d rows failed (input lines %s); they carry an \"error\" field in %s. "
                  "Rerun with --resume to retry them.", len(failed), len(rows), lines, out)
        return 1
    log.info("wrote %d rows to %s", len(results), out)
    return 0


def _base_warning() -> str:
    from ..inference import BASE_MODEL_WARNING

    return BASE_MODEL_WARNING


def _load_models(args, template: str, need_policy: bool):
    """The aligner and, when some row lacks a draft, the policy (sharing the embedded model if both use it)."""
    from ..backends import load_backend
    from ..backends.hf import HFChatBackend, LocalGenerator
    from ..inference import Aligner
    from ..models import is_api_model, is_default

    policy = None
    if need_policy and is_api_model(args.policy):  # first: a missing API key fails before any model loads
        policy = load_backend(args.policy, base_url=args.policy_base_url, timeout=args.timeout,
                              max_retries=args.max_retries, concurrency=args.concurrency)
    aligner = Aligner.load(args.aligner, template=template, device=args.device, dtype=args.dtype,
                           max_length=args.max_length)
    if not need_policy:
        return aligner, None
    if policy is None and ((is_default(args.policy) and is_default(args.aligner)) or args.policy == args.aligner):
        # One model in memory serves both roles; the policy gets its own context length.
        g = aligner.generator
        policy = HFChatBackend(LocalGenerator(g.model, g.tokenizer, g.name), name=args.policy or "default")
    elif policy is None:
        policy = load_backend(args.policy, device=args.device, dtype=args.dtype)
    log.info("policy %s writes the missing drafts", policy.name)
    return aligner, policy


def _process(indices: list[int], rows, aligner, policy, objectives, gen: dict, args, bar=None) -> list[dict]:
    """Output records for ``rows[i]`` (i in ``indices``): drafts where missing, then corrections."""
    from ..backends.base import APIBackend, BackendError

    recs = [dict(rows[i][1]) for i in indices]
    for rec in recs:
        rec.pop("error", None)
    need = [k for k, rec in enumerate(recs) if not has_draft(rec)]
    if need:
        queries = [recs[k]["query"] for k in need]
        max_tokens = args.policy_max_new_tokens or args.max_new_tokens
        if isinstance(policy, APIBackend):  # per-row errors: a failed row is kept, marked, redone on --resume
            answers = [(None, str(r)) if isinstance(r, BackendError) else (r.text, None)
                       for r in policy.complete_each(queries, max_tokens=max_tokens, temperature=args.temperature)]
        else:
            comps = policy.complete_batch(queries, max_tokens=max_tokens, temperature=args.temperature,
                                          batch_size=args.batch_size, seed=args.seed,
                                          progress=not args.no_progress,
                                          repetition_penalty=args.repetition_penalty, top_p=args.top_p)
            answers = [(c.text, None) for c in comps]
        for k, (text, err) in zip(need, answers):
            recs[k]["draft"] = text
            if err:
                recs[k]["error"] = err
                recs[k]["aligned"] = None
    ok = [k for k, rec in enumerate(recs) if not rec.get("error")]
    if bar is not None:
        bar.update(len(recs) - len(ok))  # failed rows are finished too
    if ok:
        aligned = aligner.align_batch([recs[k]["query"] for k in ok], [recs[k]["draft"] for k in ok], objectives,
                                      batch_size=args.batch_size, progress=bar if bar is not None else False, **gen)
        for k, text in zip(ok, aligned):
            recs[k]["aligned"] = text
    return recs


def _write(out: Path, results: list[dict]) -> None:
    from ..io import write_jsonl

    write_jsonl(out, results)
