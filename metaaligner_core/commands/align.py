"""``metaaligner align``: corrections of given drafts (or of drafts a named policy writes).

Input rows ``{"query", "draft"?, ...}`` (other column names through ``--columns``, queries from
another file through ``--queries``); output rows keep every input field and add ``draft``,
``draft_source`` (``"input"`` or the policy's MODEL string), ``template``, ``correctors`` and one
column per corrector (``aligned``; ``aligned_self_refine``, ``aligned_pku`` for the baselines),
plus ``error`` for a row whose API call failed after its retries, in input order.

A draft is never invented silently: a row without one is an error naming the file, line and
column, unless ``--policy`` is given, which then writes drafts for exactly those rows.

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
CHUNK_ROWS = 128  # rows per checkpoint of the output file
FIELDS = ("query", "draft", "golden", "id")  # what --columns can map
INPUT_SOURCE = "input"


def register(sub) -> None:
    from ..baselines import CORRECTORS
    from ..settings import DEFAULT_MAX_NEW_TOKENS

    p = sub.add_parser(
        "align", help="correct drafts for a list of objectives (drafts come with the input, or from --policy)",
        description="Correct each row's draft for the objectives. Rows without a draft are an error unless "
                    "--policy names a model to write them. Output rows keep every input field and add "
                    "\"draft\", \"draft_source\", \"template\", \"correctors\" and \"aligned\" (plus one column per "
                    "baseline corrector).")
    p.add_argument("--input", required=True, help="JSONL/CSV/Parquet file or hf:<dataset id>[:split]")
    p.add_argument("--out", required=True, help="output JSONL file (written atomically)")
    p.add_argument("--objectives", required=True,
                   help="SPEC: keys and/or \"Name: description\" items separated by commas, or @file")
    p.add_argument("--columns", default=None, metavar="FIELD=COLUMN[,...]",
                   help=f"input columns holding the fields {', '.join(FIELDS)} when named otherwise, e.g. "
                        "draft=generated_text,golden=goldens (the authors' released outputs)")
    p.add_argument("--queries", default=None, metavar="FILE",
                   help="take each row's query from row i of FILE (its query column): for outputs without a query "
                        "column such as the IMHI ones; an input covering only the first rows is allowed, with a warning")
    p.add_argument("--aligner", default="default",
                   help="aligner MODEL: a Hugging Face id (e.g. MetaAligner/MetaAligner-UltraFeedback-1.1B), a directory "
                        "written by `metaaligner train`, a .gguf file, openai-compatible:NAME@URL (a /v1/completions "
                        "server such as vLLM serving a released checkpoint), or default (the embedded base model; "
                        "illustrative only)")
    p.add_argument("--policy", default=None,
                   help="policy MODEL that writes drafts for rows without one (and revises them for self-refine): "
                        "default, a local model, openai:NAME, anthropic:NAME, openai-compatible:NAME@URL. "
                        "Without it every row must carry a draft")
    p.add_argument("--policy-base-url", default=None, help="base URL for an openai:/anthropic: policy (any compatible server)")
    p.add_argument("--correctors", default="metaaligner", metavar="LIST",
                   help=f"comma-separated correctors to run: {', '.join(CORRECTORS)} (default metaaligner); "
                        "self-refine asks --policy to revise its draft, pku-aligner runs --pku-aligner")
    p.add_argument("--pku-aligner", default=None, metavar="MODEL",
                   help="model for the pku-aligner corrector (e.g. aligner/aligner-7b-v1.0, or openai-compatible:NAME@URL)")
    p.add_argument("--template", choices=TEMPLATE_NAMES, default=None,
                   help="aligner prompt template (default: from the aligner's name, else from the input's name, "
                        "else ultrafeedback); objective keys take this template's wording")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"rows per batch (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"most tokens per correction (default {DEFAULT_MAX_NEW_TOKENS}, as the authors' inference)")
    p.add_argument("--policy-max-new-tokens", type=int, default=None, help="most tokens per draft (default: --max-new-tokens)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1.0)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--max-length", type=int, default=None,
                   help="context of local models in tokens (default: the model's); longer prompts lose the end of the draft")
    p.add_argument("--resume", action="store_true", help="keep rows already in --out and do only the rest")
    p.add_argument("--concurrency", type=int, default=8,
                   help="requests in flight to an API policy or a remote aligner (default 8)")
    p.add_argument("--max-retries", type=int, default=5, help="retries per API request on 429/5xx/timeouts (default 5)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per API request (default 60)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: auto)")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on CUDA, else fp32)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def read_rows(path: str, columns: dict[str, str] | None = None, queries: str | None = None) -> list[tuple[int, dict]]:
    """Input rows with their line numbers, the ``--columns`` mapping applied and, with ``queries``,
    each row's query taken from that file's row of the same index. Every row must end up with
    a non-empty string ``query``; a ``draft`` must be a string when present."""
    from ..io import apply_columns, column_label, iter_records

    columns = columns or {}
    qs = _read_queries(queries, columns) if queries else None
    rows = []
    for i, (line, rec) in enumerate(iter_records(path)):
        rec = apply_columns(rec, columns)
        if qs is not None:
            if i >= len(qs):
                raise InputError(path, line, None, f"row {i + 1} has no query: {queries} has only {len(qs)} rows "
                                 "(the input must be row-aligned with --queries)")
            rec["query"] = qs[i]
        q = rec.get("query")
        if q is None:
            raise InputError(path, line, column_label("query", columns),
                             "missing (map another column with --columns query=COLUMN, or give --queries FILE)")
        if not isinstance(q, str) or not q.strip():
            raise InputError(path, line, column_label("query", columns), "expected a non-empty string")
        d = rec.get("draft")
        if d is not None and not isinstance(d, str):
            raise InputError(path, line, column_label("draft", columns), f"expected a string, got {type(d).__name__}")
        rows.append((line, rec))
    if not rows:
        raise MetaAlignerError(f"{path}: no records (empty input file)")
    if qs is not None and len(rows) < len(qs):
        log.warning("%s has %d rows, %s has %d queries: only the first %d queries are aligned", path, len(rows),
                    queries, len(qs), len(rows))
    return rows


def _read_queries(path: str, columns: dict[str, str]) -> list[str]:
    from ..io import iter_records

    column = columns.get("query", "query")
    out = []
    for line, rec in iter_records(path):
        q = rec.get(column)
        if not isinstance(q, str) or not q.strip():
            raise InputError(path, line, column, "missing or empty (the --queries file needs a query column)")
        out.append(q)
    return out


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


def _check_args(args) -> None:
    if args.batch_size < 1:
        raise MetaAlignerError(f"--batch-size must be at least 1 (got {args.batch_size})")
    if args.max_new_tokens < 1:
        raise MetaAlignerError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    for flag, value in (("--policy-max-new-tokens", args.policy_max_new_tokens), ("--max-length", args.max_length),
                        ("--concurrency", args.concurrency)):
        if value is not None and value < 1:
            raise MetaAlignerError(f"{flag} must be at least 1 (got {value})")


def parse_correctors(spec: str) -> list[str]:
    from ..baselines import check_corrector

    names = []
    for item in (spec or "").split(","):
        if item.strip():
            name = check_corrector(item.strip())
            if name not in names:
                names.append(name)
    if not names:
        raise MetaAlignerError("--correctors: empty (valid: metaaligner, self-refine, pku-aligner)")
    return names


def run(args) -> int:
    from ..io import column_label, parse_columns
    from ..objectives import parse_objectives
    from ..pipeline import choose_template
    from ..settings import GenerationSettings

    _check_args(args)
    columns = parse_columns(args.columns, FIELDS)
    correctors = parse_correctors(args.correctors)
    template = choose_template(args.template, args.aligner, args.input)
    objectives = parse_objectives(args.objectives, family=template)
    settings = GenerationSettings.from_kwargs(  # bad settings fail here, before any model loads or paid call
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed)
    if "pku-aligner" in correctors and not args.pku_aligner:
        raise MetaAlignerError("--correctors pku-aligner needs --pku-aligner MODEL (e.g. aligner/aligner-7b-v1.0)")
    if "self-refine" in correctors and not args.policy:
        raise MetaAlignerError("--correctors self-refine needs --policy: the model that revises its own draft")
    rows = read_rows(args.input, columns, args.queries)
    out = Path(args.out)

    done: list[dict] = []
    if args.resume and out.exists():
        done = resumed_rows(out, rows)
        while done and done[-1].get("error"):  # failed rows at the end are redone
            done.pop()
        log.info("resuming: %d of %d rows already in %s", len(done), len(rows), out)
    redo = sorted(i for i, rec in enumerate(done) if rec.get("error"))
    todo = list(range(len(done), len(rows)))
    work = [*redo, *todo]
    need_draft = [i for i in work if not has_draft(rows[i][1])]
    if need_draft and not args.policy:
        line, _ = rows[need_draft[0]]
        raise InputError(args.input, line, column_label("draft", columns),
                         f"missing or empty ({len(need_draft)} of {len(rows)} rows); drafts are never invented: "
                         "map the draft column with --columns draft=COLUMN, or name --policy MODEL to write drafts "
                         "for these rows")
    if args.policy and not need_draft and "self-refine" not in correctors and work:
        log.warning("--policy %s: no row lacks a draft, so the policy writes none", args.policy)
    if not work:
        log.info("nothing to do: all %d rows are in %s", len(rows), out)
        return 0

    pipe = _pipeline(args, template, settings)
    if "metaaligner" in correctors:
        aligner = pipe.aligner(args.aligner, template)
        if aligner.is_base_model:
            log.warning("note: %s", _base_warning())
        log.info("aligner %s (template %s), objectives: %s", aligner.name, template,
                 ", ".join(o.key for o in objectives))
    if need_draft:
        log.info("policy %s writes the drafts of %d rows", args.policy, len(need_draft))

    job = _Job(args, pipe, template, objectives, correctors)
    results: list[dict] = list(done)
    if redo:
        for i, rec in zip(redo, job.process(redo, rows)):
            results[i] = rec
    from tqdm.auto import tqdm

    bar = tqdm(total=len(rows), initial=len(done), desc="align", unit="row", disable=args.no_progress)
    try:
        for start in range(0, len(todo), CHUNK_ROWS):
            chunk = todo[start:start + CHUNK_ROWS]
            results.extend(job.process(chunk, rows, bar))
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


def _pipeline(args, template: str, settings):
    """The shared pipeline: API keys are checked before any local model loads."""
    from ..models import missing_api_key, parse_model
    from ..pipeline import ModelRegistry, Pipeline

    if args.policy:
        parse_model(args.policy)  # a malformed MODEL string fails before any load
        missing = missing_api_key(args.policy)
        if missing:
            raise MetaAlignerError(missing.replace(" on the server", "").replace("; set it and restart", "; set it"))
    registry = ModelRegistry(
        device=args.device, max_models=3,
        policy_options={"base_url": args.policy_base_url, "timeout": args.timeout, "max_retries": args.max_retries,
                        "concurrency": args.concurrency},
        local_options={"dtype": args.dtype, "max_length": args.max_length})
    return Pipeline(registry, policy=args.policy, aligner=args.aligner, template=template, settings=settings)


class _Job:
    """Drafts where missing, then every corrector, for chunks of rows."""

    def __init__(self, args, pipe, template, objectives, correctors):
        from ..baselines import output_column

        self.args, self.pipe, self.template, self.objectives = args, pipe, template, objectives
        self.correctors = correctors
        self.columns = {c: output_column(c) for c in correctors}
        self.draft_settings = pipe.settings.replace(max_new_tokens=args.policy_max_new_tokens or args.max_new_tokens)

    def process(self, indices: list[int], rows, bar=None) -> list[dict]:
        """Output records for ``rows[i]`` (i in ``indices``)."""
        from ..baselines import pku_aligner_prompt, self_refine_prompt

        args = self.args
        recs = [dict(rows[i][1]) for i in indices]
        for rec in recs:
            rec.pop("error", None)
            rec["draft_source"] = INPUT_SOURCE if has_draft(rec) else args.policy
            rec["template"] = self.template
            rec["correctors"] = list(self.correctors)
        need = [k for k, rec in enumerate(recs) if not has_draft(rec)]
        if need:
            answers = self.pipe.draft_batch([recs[k]["query"] for k in need], policy=args.policy,
                                            settings=self.draft_settings, batch_size=args.batch_size,
                                            progress=not args.no_progress)
            for k, (text, err) in zip(need, answers):
                recs[k]["draft"] = text
                if err:
                    recs[k]["error"] = err
        ok = [k for k, rec in enumerate(recs) if not rec.get("error")]
        advanced = 0  # rows the last corrector's progress already counted
        for name in self.correctors:
            column = self.columns[name]
            for rec in recs:
                rec.setdefault(column, None)
            ok = [k for k in ok if not recs[k].get("error")]
            if not ok:
                log.warning("corrector %s: no row of this chunk to correct (all %d failed before it)", name, len(recs))
                continue
            queries, drafts = [recs[k]["query"] for k in ok], [recs[k]["draft"] for k in ok]
            progress = bar if (bar is not None and name == self.correctors[-1] and name != "self-refine") else False
            if progress is not False:
                advanced = len(ok)
            if name == "metaaligner":
                outs = [(t, None) for t in self.pipe.correct_batch(
                    queries, drafts, self.objectives, aligner=args.aligner, template=self.template,
                    batch_size=args.batch_size, progress=progress)]
            elif name == "self-refine":
                prompts = [self_refine_prompt(q, d, self.objectives) for q, d in zip(queries, drafts)]
                outs = self.pipe.ask_batch(prompts, policy=args.policy, settings=self.pipe.settings,
                                           batch_size=args.batch_size)
            else:  # pku-aligner: a causal LM reading its own raw prompt
                model = self.pipe.registry.aligner(args.pku_aligner)
                outs = [(t, None) for t in model.complete_raw(
                    [pku_aligner_prompt(q, d) for q, d in zip(queries, drafts)], batch_size=args.batch_size,
                    progress=progress, **self.pipe.settings.aligner_kwargs())]
            for k, (text, err) in zip(ok, outs):
                recs[k][column] = text
                if err:
                    recs[k]["error"] = err
        if bar is not None:
            bar.update(len(recs) - advanced)
        return recs


def _write(out: Path, results: list[dict]) -> None:
    from ..io import write_jsonl

    write_jsonl(out, results)
