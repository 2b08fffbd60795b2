"""``metaaligner evaluate``: LLM-judge win rates (Algorithm 2) or 0–10 scores over aligned outputs."""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="judge drafts and corrections against golden answers (win rates or 0-10 scores)",
        description="Judge each row's draft and its corrections per objective with one or more LLM judges. "
                    "Pairwise mode (paper Algorithm 2) compares each with the golden answer, positions drawn with "
                    "--seed; score mode gives 0-10 scores (Appendix E.1). Writes report.json, report.md, PNG plots "
                    "and judgments.jsonl (a cache: a rerun makes no call that is already answered). Exit status 1 "
                    "if any judgment failed, 3 if --max-calls stopped the run (rerun to continue).")
    p.add_argument("--input", help='rows {"query", "golden", "draft", "aligned"} (.jsonl/.csv/.parquet)')
    p.add_argument("--objectives", help="SPEC: built-in keys and/or \"Name: description\" items, or @file")
    p.add_argument("--judge", action="append", metavar="PROVIDER:MODEL",
                   help="openai:MODEL (OPENAI_API_KEY; with --base-url, an OpenAI-protocol proxy), anthropic:MODEL, "
                        "openai-compatible:MODEL@URL (no key needed), or a local model (default/dir/.gguf/hub id; a "
                        "poor judge). Repeat for several judges: agreement between them is reported")
    p.add_argument("--out", help="output directory")
    p.add_argument("--base-url", help="API base URL for openai:/anthropic: judges (a proxy or gateway speaking that "
                                      "provider's protocol), or the URL of openai-compatible:MODEL")
    p.add_argument("--mode", choices=("pairwise", "score"), default="pairwise")
    p.add_argument("--template", choices=("ultrafeedback", "hh-rlhf", "imhi"),
                   help="wording of built-in objectives (hh-rlhf: its Helpfulness text) and, for imhi, the judge "
                        "prompt; default: the rows' \"template\" field, else inferred from the objectives")
    p.add_argument("--judge-prompt", default="auto",
                   help="pairwise: paper (Appendix C.1) | script (the authors' HH-RLHF_GPT4_score.py and "
                        "UltraFeedback_GPT4_score.py string) | imhi (the authors' IMHI script, psychologist system "
                        "message, typos kept); score: paper (Appendix E.1) | script (the authors' "
                        "UltraFeedback_GPT4_rate.py). Default auto: imhi for --template imhi in pairwise mode, "
                        "else paper")
    p.add_argument("--judge-temperature", type=float, default=0.0,
                   help="judge sampling temperature (default 0: repeatable verdicts; the authors' scripts send none, "
                        "i.e. OpenAI's default of 1). Recorded in report.json")
    p.add_argument("--judge-max-tokens", "--max-tokens", dest="judge_max_tokens", type=int, default=32,
                   help="longest judge reply in tokens (default 32: enough for '1', '2', '0' or a score; the "
                        "authors' scripts set no limit). Recorded in report.json. --max-tokens is the old name")
    p.add_argument("--columns", metavar="FIELD=COLUMN,...",
                   help="input columns for query/golden/draft/aligned, e.g. golden=goldens,draft=generated_text")
    p.add_argument("--correctors", metavar="NAME=COLUMN,...",
                   help="corrections to judge, e.g. metaaligner=aligned,self-refine=aligned_self_refine,"
                        "pku-aligner=aligned_pku (default: those of these columns present in the first row)")
    p.add_argument("--seed", type=int, default=0, help="draws the golden answer's position per comparison (default 0)")
    p.add_argument("--concurrency", type=int, default=8, help="parallel judge calls (batch size for a local judge; default 8)")
    p.add_argument("--swap", action="store_true",
                   help="pairwise: judge both positions; a win or loss counts only when both agree (else a tie); "
                        "reports position consistency")
    p.add_argument("--head-to-head", action="store_true",
                   help="pairwise: also judge each correction against its own draft (loses-to-draft rate)")
    p.add_argument("--bootstrap", type=int, default=10_000,
                   help="bootstrap resamples for the 95%% intervals (default 10000, at least 1000); one joint "
                        "resampling of the queries for every objective")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    p.add_argument("--ratings-db", metavar="URL",
                   help="annotation database (or a ratings export .jsonl/.csv): report judge-expert agreement")
    p.add_argument("--dry-run", action="store_true",
                   help="print the number of calls and a token estimate, make no call, write nothing")
    p.add_argument("--max-calls", type=int, help="stop cleanly after N judge calls (rerun to continue)")
    p.add_argument("--compare", nargs="+", metavar="DIR",
                   help="put the reports of finished runs side by side (prints markdown; --out DIR writes compare.md)")
    p.add_argument("--sample", type=int, metavar="N",
                   help="judge N rows drawn at random (seeded by --seed), as the paper samples its test queries")
    p.add_argument("--max-rows", type=int, help="judge only the first N rows of the file (not a random sample: "
                                                "see --sample)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per API request (default 60)")
    p.add_argument("--max-retries", type=int, default=5,
                   help="client retries with exponential back-off on 429/5xx/timeouts (default 5)")
    p.set_defaults(func=run)


_RATINGS_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".gz")


def rating_records(source: str) -> list[dict]:
    """Expert ratings for ``--ratings-db``: the submitted ratings of an annotation database (any
    SQLAlchemy URL), or the records of a ratings export file (.jsonl/.csv) in the same format."""
    from pathlib import Path

    if Path(source).suffix.lower() in _RATINGS_FILE_SUFFIXES and "://" not in source:
        from ..io import iter_records

        return [rec for _, rec in iter_records(source)]
    from annotation.accounts import OPERATOR
    from annotation.store import Store

    return Store(source).rating_records(OPERATOR)


def run(args) -> int:
    import logging

    from ..errors import MetaAlignerError
    from ..evaluation import STOPPED_EXIT, evaluate

    if args.compare:
        from ..evaluation.report import compare

        print(compare(args.compare, args.out), end="")
        return 0
    missing = [f"--{n.replace('_', '-')}" for n in ("input", "objectives", "judge", "out") if not getattr(args, n)]
    if missing:
        raise MetaAlignerError(f"evaluate needs {', '.join(missing)} (or --compare DIR DIR ...)")
    ratings = rating_records(args.ratings_db) if args.ratings_db else None  # a bad database fails before any call
    report = evaluate(args.input, args.objectives, args.judge, args.out, mode=args.mode, base_url=args.base_url,
                      seed=args.seed, concurrency=args.concurrency, swap=args.swap, max_rows=args.max_rows,
                      sample=args.sample, max_tokens=args.judge_max_tokens, temperature=args.judge_temperature,
                      timeout=args.timeout, max_retries=args.max_retries,
                      progress=sys.stderr.isatty() and logging.getLogger().level <= logging.INFO,
                      columns=args.columns, correctors=args.correctors, template=args.template,
                      judge_prompt_name=args.judge_prompt, head_to_head=args.head_to_head,
                      bootstrap=args.bootstrap, bootstrap_seed=args.bootstrap_seed, expert_ratings=ratings,
                      ratings_source=args.ratings_db, dry_run=args.dry_run, max_calls=args.max_calls)
    if report.get("dry_run"):
        print(f"dry run: {report['calls']} judge calls to make ({report['cached']} already answered in the cache), "
              f"about {report['prompt_tokens_estimate']} prompt tokens and at most {report['completion_tokens_max']} "
              f"completion tokens; nothing was called or written")
        for name, v in report["judges"].items():
            print(f"  {name}: {v['calls']} calls, ~{v['prompt_tokens_estimate']} prompt tokens")
        return 0
    if report.get("stopped"):
        print(f"metaaligner: stopped after {report['calls']} judge calls (--max-calls {report['max_calls']}); "
              f"the answers are cached in {args.out}/judgments.jsonl; rerun the same command to continue",
              file=sys.stderr)
        return STOPPED_EXIT
    multi = len(report["by_judge"]) > 1 or len(report["correctors"]) > 1
    for judge, data in report["by_judge"].items():
        for corrector, blocks in data["correctors"].items():
            prefix = f"[{judge} / {corrector}] " if multi else ""
            average = (data.get("average") or {}).get(corrector)
            for v in [*blocks.values(), *([average] if average and len(blocks) > 1 else [])]:
                if report["mode"] == "pairwise":
                    n = f"n={v['n']}" if "n" in v else f"{len(v['objectives'])} objectives"
                    line = (f"{prefix}{v['name']}: original {_pct(v['win_rate_original'])}, aligned "
                            f"{_pct(v['win_rate_aligned'])}, advantage {_pct(v['advantage'], True)}"
                            f"{_ci(v['ci95']['advantage'])} ({n}); advantage by the paper's definition "
                            f"{_pct(v['advantage_paper'], True)}, by the authors' scripts "
                            f"{_pct(v['advantage_authors'], True)}{_ci(v['ci95']['advantage_authors'])}; "
                            f"length-controlled {_pct(v['lc_advantage'], True)}{_ci(v['ci95']['lc_advantage'])}")
                else:
                    n = f"n={v['n']}" if "n" in v else f"{len(v['objectives'])} objectives"
                    line = (f"{prefix}{v['name']}: mean original {_num(v['mean_original'])}, aligned "
                            f"{_num(v['mean_aligned'])}, advantage {_num(v['advantage'], True)} ({n})")
                print(line)
    for flag in report.get("flags", []):
        print(f"flag: {flag}")
    print(f"report: {args.out}/report.md")
    if report["invalid"]:
        print(f"{report['invalid']} of {report['judgments']} judgments were invalid (no 1, 2 or 0 after a retry): "
              "left out of n, counted as non-wins in the paper's rates", file=sys.stderr)
    if report["failed"]:
        errors: dict[str, int] = {}
        for f in report["failures"]:
            errors[f["error"]] = errors.get(f["error"], 0) + 1
        print(f"metaaligner: {report['failed']} of {report['judgments']} judgments failed; they are left out of "
              f"every figure. Rerun the same command to retry only them. Errors:", file=sys.stderr)
        for error, k in sorted(errors.items(), key=lambda kv: -kv[1])[:5]:
            print(f"  {k} x {error}", file=sys.stderr)
        return 1
    return 0


def _pct(x, sign=False) -> str:
    return "–" if x is None else (f"{x * 100:+.2f}%" if sign else f"{x * 100:.2f}%")


def _num(x, sign=False) -> str:
    return "–" if x is None else (f"{x:+.2f}" if sign else f"{x:.2f}")


def _ci(iv) -> str:
    return "" if not iv else f" [95% CI {iv[0] * 100:+.1f}, {iv[1] * 100:+.1f}]"

