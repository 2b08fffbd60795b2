"""``metaaligner evaluate``: LLM-judge win rates (Algorithm 2) or 0–10 scores over aligned outputs."""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="judge drafts and aligned answers against golden answers (win rates or 0-10 scores)",
        description="Judge each row's draft and aligned answer per objective with an LLM judge. Pairwise mode "
                    "(paper Algorithm 2) compares each with the golden answer, positions drawn with --seed; score "
                    "mode gives 0-10 scores. Writes report.json, report.md, PNG plots and judgments.jsonl (a cache: "
                    "a rerun makes no call that is already answered). Exit status 1 if any judgment failed.")
    p.add_argument("--input", required=True, help='rows {"query", "golden", "draft", "aligned"} (.jsonl/.csv/.parquet)')
    p.add_argument("--objectives", required=True, help="SPEC: built-in keys and/or \"Name: description\" items, or @file")
    p.add_argument("--judge", required=True, metavar="PROVIDER:MODEL",
                   help="openai:MODEL, anthropic:MODEL, openai-compatible:MODEL@URL, or a local model "
                        "(default/dir/.gguf/hub id; a poor judge)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--base-url", help="API base URL (an OpenAI-compatible server such as vLLM or llama.cpp, or a proxy)")
    p.add_argument("--mode", choices=("pairwise", "score"), default="pairwise")
    p.add_argument("--seed", type=int, default=0, help="draws the golden answer's position per comparison (default 0)")
    p.add_argument("--concurrency", type=int, default=8, help="parallel judge calls (batch size for a local judge; default 8)")
    p.add_argument("--swap", action="store_true",
                   help="pairwise: judge both positions; a win or loss counts only when both agree (else a tie)")
    p.add_argument("--max-rows", type=int, help="judge only the first N rows")
    p.add_argument("--max-tokens", type=int, default=32, help="longest judge reply (default 32)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per API request (default 60)")
    p.add_argument("--max-retries", type=int, default=5,
                   help="client retries with exponential back-off on 429/5xx/timeouts (default 5)")
    p.set_defaults(func=run)


def run(args) -> int:
    import logging

    from ..evaluation import evaluate

    report = evaluate(args.input, args.objectives, args.judge, args.out, mode=args.mode, base_url=args.base_url,
                      seed=args.seed, concurrency=args.concurrency, swap=args.swap, max_rows=args.max_rows,
                      max_tokens=args.max_tokens, timeout=args.timeout, max_retries=args.max_retries,
                      progress=sys.stderr.isatty() and logging.getLogger().level <= logging.INFO)
    for key, v in report["objectives"].items():
        if report["mode"] == "pairwise":
            line = (f"{v['name']}: original {_pct(v['win_rate_original'])}, aligned {_pct(v['win_rate_aligned'])}, "
                    f"advantage {_pct(v['advantage'], True)} (n={v['n']})")
        else:
            line = (f"{v['name']}: mean original {_num(v['mean_original'])}, aligned {_num(v['mean_aligned'])}, "
                    f"advantage {_num(v['advantage'], True)} (n={v['n']})")
        print(line)
    print(f"report: {args.out}/report.md")
    if report["invalid"]:
        print(f"{report['invalid']} of {report['judgments']} judgments were invalid (no 1, 2 or 0 after a retry) "
              "and are left out of n", file=sys.stderr)
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
