"""``metaaligner build-dataset``: the dynamic multi-objective dataset (Algorithm 1)."""
from __future__ import annotations

import json
import logging

from ..dataset import SOURCES
from ..templates import TEMPLATE_NAMES

log = logging.getLogger("metaaligner.build_dataset")


def register(sub) -> None:
    p = sub.add_parser(
        "build-dataset", help="build preference/equal/warm-up training rows (Algorithm 1)",
        description="Turn pairwise preference data into the dynamic multi-objective dataset: "
                    "preference rows in both directions, equal rows for ties, and a warm-up "
                    "(identity) sample. Writes preference.jsonl, equal.jsonl, warmup.jsonl, stats.json.")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help=".jsonl, .jsonl.gz, .csv, .parquet, or hf:<dataset id>[/<data dir>][:split]")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--source", default="auto", choices=["auto", *SOURCES],
                   help="input layout (default: detected from each input file's first record)")
    p.add_argument("--template", default="ultrafeedback", choices=TEMPLATE_NAMES)
    p.add_argument("--objectives", metavar="SPEC",
                   help="objectives the labels may use besides the built-ins (keys, 'Name: description' items "
                        "or @file); for hh-rlhf with a single objective it also names the subset's objective")
    p.add_argument("--warmup-size", type=int, default=0, metavar="N",
                   help="rows sampled from the equal subset for the warm-up stage (default 0)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..dataset import build_dataset_files
    from ..errors import MetaAlignerError
    from ..objectives import parse_objectives

    if args.warmup_size < 0:
        raise MetaAlignerError("--warmup-size: expected a number >= 0")
    objectives = parse_objectives(args.objectives, family=args.template) if args.objectives else []
    stats = build_dataset_files(args.input, args.out, source=args.source, template=args.template,
                                objectives=objectives, warmup_size=args.warmup_size, seed=args.seed,
                                progress=not args.no_progress and not args.quiet)
    rows = stats["rows"]
    log.info("%d records → %d preference, %d equal, %d warm-up rows (%d skipped) in %s",
             stats["records"], rows["preference"], rows["equal"], rows["warmup"], stats["skipped_total"], args.out)
    if not args.quiet:
        print(json.dumps(stats, indent=2))
    return 0
