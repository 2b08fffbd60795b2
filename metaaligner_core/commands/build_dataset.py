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
    p.add_argument("--template", default=None, choices=TEMPLATE_NAMES,
                   help="prompt template (default: hh-rlhf for hh-rlhf transcripts, else ultrafeedback)")
    p.add_argument("--objectives", metavar="SPEC",
                   help="objectives the labels may use besides the built-ins (keys, 'Name: description' items "
                        "or @file); for hh-rlhf with a single objective it also names the subset's objective")
    p.add_argument("--warmup-size", default="auto", metavar="N|auto",
                   help="warm-up rows sampled from the equal subset: auto (default) = a seeded random 10%% of "
                        "the equal rows (at least one), N = exactly N rows, 0 = no warm-up stage")
    p.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("reward-model labels (the paper's HH-RLHF labelling)")
    g.add_argument("--reward-models", metavar="KEY=MODEL[,KEY=MODEL...]",
                   help="label every pair on each KEY's objective by comparing the two responses' rewards "
                        "from a Hugging Face sequence-classification model, as the authors do (rounded to one "
                        "decimal; equal when they round equal). 'hh-rlhf' = the paper's three models: "
                        "harmlessness=Ray2333/gpt2-large-harmless-reward_model,helpfulness=Ray2333/"
                        "gpt2-large-helpful-reward_model,humour=mohameddhiab/humor-no-humor. Scores are cached "
                        "in OUT/reward_scores.jsonl")
    g.add_argument("--tie-margin", type=float, default=0.0, metavar="X",
                   help="with --reward-models: rounded rewards at most X apart are a tie (default 0)")
    g.add_argument("--reward-device", default=None, metavar="DEV", help="auto (default: cuda when present), cpu, cuda")
    g.add_argument("--reward-batch-size", type=int, default=None, metavar="N",
                   help="rows per forward pass (default: 16 on a GPU, 1 on a CPU, where batching large "
                        "models measured slower: bench/bench_reward.py)")
    g = p.add_argument_group("test split and UltraFeedback ratings")
    g.add_argument("--holdout-last", type=int, default=0, metavar="N",
                   help="hold out the last N input records as OUT/holdout.jsonl ({query, golden}) instead of "
                        "training on them; the authors' UltraFeedback test split is --holdout-last 15000")
    g.add_argument("--non-numeric-ratings", default="skip-aspect", choices=["skip-aspect", "drop-completion"],
                   help="UltraFeedback ratings such as N/A: leave that aspect out (default) or drop the whole "
                        "completion (the authors' script)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..dataset import build_dataset_files
    from ..errors import MetaAlignerError
    from ..objectives import parse_objectives

    from ..dataset import check_warmup_size

    warmup = check_warmup_size(args.warmup_size)
    if args.reward_batch_size is not None and args.reward_batch_size < 1:
        raise MetaAlignerError("--reward-batch-size: expected a number >= 1")
    objectives = parse_objectives(args.objectives, family=args.template) if args.objectives else []
    stats = build_dataset_files(args.input, args.out, source=args.source, template=args.template,
                                objectives=objectives, warmup_size=warmup, seed=args.seed,
                                progress=not args.no_progress and not args.quiet,
                                reward_models=args.reward_models, tie_margin=args.tie_margin,
                                reward_device=args.reward_device, reward_batch_size=args.reward_batch_size,
                                holdout_last=args.holdout_last, non_numeric_ratings=args.non_numeric_ratings)
    rows = stats["rows"]
    log.info("%d records → %d preference, %d equal, %d warm-up rows (%d skipped) in %s",
             stats["records"], rows["preference"], rows["equal"], rows["warmup"], stats["skipped_total"], args.out)
    if not args.quiet:
        print(json.dumps(stats, indent=2))
    return 0
