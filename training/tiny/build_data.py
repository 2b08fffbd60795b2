"""Build the tiny aligner's training pairs and held-out evaluation drafts from real policy drafts.

    python training/tiny/build_data.py --data ../shared/data --out DIR [--seed 0] [--max-train N]

Reads the policy drafts in ``DATA/policy-outputs`` (README there). Training pairs come from the
GPT-3.5 and Claude-3 drafts (with ``--imhi-references`` also GPT-3.5's explanations of the IMHI
queries); the Vicuna-7B, llama2-chat-7B, Mentallama-7B and Gemma drafts are held out whole for
``bench/bench_tiny_aligner.py``, and ``--exclude-queries`` keeps the benchmark's own queries out of
training. Only drafts that pass every check of :mod:`tinydata` and have 12-150 words are used;
queries keep their last 12 words.

Writes ``DIR/pairs.jsonl`` (generic preference records for ``metaaligner build-dataset --source
generic --objectives @training/tiny/objectives.txt``), ``DIR/heldout.jsonl`` (``{"query",
"draft", "model", "source"}``) and ``DIR/stats.json``. Nothing is printed from the drafts.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tinydata  # noqa: E402

TRAIN_SOURCES = ("hh-rlhf/Claude-3.csv", "hh-rlhf/gpt-3.5-turbo.csv", "ultrafeedback/gpt-3.5-turbo.csv")
HELDOUT_MODELS = ("Vicuna-7B", "llama2-chat-7B", "Mentallama-7B", "Gemma_instruct_7B")
TEMPLATE = "ultrafeedback"  # the template the tiny aligner is trained and run with


def _read_csv(path: Path) -> list[dict]:
    csv.field_size_limit(1 << 30)
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def train_drafts(data: Path) -> list[tuple[str, str, str]]:
    """``(query, draft, source)`` from the training policy models, usable drafts only."""
    out = []
    for rel in TRAIN_SOURCES:
        for row in _read_csv(data / "policy-outputs" / rel):
            draft = (row.get("generated_text") or "").strip()
            if tinydata.usable_draft(draft):
                out.append((tinydata.short_query(row.get("query") or ""), draft, rel))
    return out


IMHI_REFERENCES = "imhi-queries"  # GPT-3.5's explanations of the IMHI posts (the queries' own column)


def imhi_reference_drafts(data: Path) -> list[tuple[str, str, str]]:
    """``(query, draft, source)`` from the ``gpt-3.5-turbo`` column of ``DATA/imhi-queries``: GPT-3.5
    (a training policy model) answering the mental-health analysis queries the held-out models
    answer in the benchmark, usable drafts only."""
    out = []
    for path in sorted((data / IMHI_REFERENCES).glob("*.csv")):
        for row in _read_csv(path):
            draft = (row.get("gpt-3.5-turbo") or "").strip()
            if tinydata.usable_draft(draft):
                out.append((tinydata.short_query(row.get("query") or ""), draft, f"imhi-references/{path.stem}"))
    return out


def read_queries(path: Path) -> set[str]:
    """The ``query`` of every row of a JSONL file (e.g. ``bench_tiny_aligner.py --queries-out``)."""
    out = set()
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)["query"]
            except (ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"{path}:{n}: query: {e.__class__.__name__}: expected a JSON object with a \"query\" string")
            if not isinstance(q, str):
                raise SystemExit(f"{path}:{n}: query: expected a string")
            out.add(q)
    return out


def parse_weights(text: str) -> dict[str, float]:
    """``"length=2,formatting=2"`` → ``{"length": 2.0, "formatting": 2.0}`` (keys of :data:`tinydata.KEYS`)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key not in tinydata.KEYS:
            raise argparse.ArgumentTypeError(f"{key!r} is not one of {', '.join(tinydata.KEYS)}")
        try:
            out[key] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: expected KEY=NUMBER") from None
        if out[key] < 0:
            raise argparse.ArgumentTypeError(f"{part!r}: a weight cannot be negative")
    return out


def heldout_drafts(data: Path) -> list[dict]:
    """``{"query", "draft", "model", "source"}`` from the held-out policy models, usable drafts only."""
    out = []
    for row in _read_csv(data / "policy-outputs" / "ultrafeedback" / "Vicuna-7B.csv"):
        draft = (row.get("generated_text") or "").strip()
        if tinydata.usable_draft(draft):
            out.append({"query": tinydata.short_query(row.get("query") or ""), "draft": draft,
                        "model": "Vicuna-7B", "source": "ultrafeedback"})
    for model in HELDOUT_MODELS[1:]:
        for path in sorted((data / "policy-outputs" / "imhi" / model).glob("*.csv")):
            queries = _read_csv(data / "imhi-queries" / path.name)
            for i, row in enumerate(_read_csv(path)):
                draft = (row.get("generated_text") or "").strip()
                if i < len(queries) and tinydata.usable_draft(draft):
                    out.append({"query": tinydata.short_query(queries[i].get("query") or ""), "draft": draft,
                                "model": model, "source": f"imhi/{path.stem}"})
    return out


def build_dataset(pairs: list[dict], direct: list[dict], out: Path, seed: int, warmup_size: int,
                  max_tokens: int | None = None) -> dict:
    """Algorithm 1 over ``pairs`` (the project's own :func:`build_dynamic_dataset`), plus the
    better-template ``direct`` rows in the preference subset; written as a ``metaaligner train``
    data folder (warmup/equal/preference.jsonl + stats.json). The prompts come from
    :func:`build_prompt`, the function inference uses."""
    from metaaligner_core.dataset import BuildStats, PreferenceRecord, build_dynamic_dataset, write_dataset
    from metaaligner_core.objectives import Objective
    from metaaligner_core.templates import build_prompt

    objectives = {k: Objective.parse(v) for k, v in tinydata.OBJECTIVES.items()}
    objectives = {k: Objective(key=k, name=o.name, description=o.description) for k, o in objectives.items()}
    records = [PreferenceRecord(r["query"], r["response_1"], r["response_2"], r["labels"], i)
               for i, r in enumerate(pairs)]
    stats = BuildStats()
    stats.extra["template"] = TEMPLATE
    rows = list(build_dynamic_dataset(records, objectives, TEMPLATE, seed, warmup_size, stats))
    kinds = Counter()
    for i, d in enumerate(direct):
        kinds[d["kind"]] += 1
        stats.rows["preference"] += 1
        rows.append({"prompt": build_prompt(TEMPLATE, d["query"], d["draft"], [objectives[k] for k in d["objectives"]]),
                     "completion": d["target"], "objectives": d["objectives"], "subset": "preference",
                     "source_index": len(pairs) + i, "kind": d["kind"]})
    stats.extra["direct_rows"] = dict(kinds)
    random.Random(seed).shuffle(rows)  # the trainer shuffles too; this mixes fix and keep rows in the file
    if max_tokens:
        rows = _fitting(rows, max_tokens, stats)
    return write_dataset(rows, out, stats)


def _fitting(rows: list[dict], max_tokens: int, stats) -> list[dict]:
    """The rows whose prompt, completion and EOS fit in ``max_tokens`` tokens of the embedded
    tokenizer; the others are dropped and counted, never cut (a cut target loses its EOS and
    teaches the aligner not to stop)."""
    from transformers import AutoTokenizer

    from metaaligner_core.embedded import embedded_model_dir
    from metaaligner_core.training import tokenize_example

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    kept, dropped = [], Counter()
    for r in rows:
        if len(tokenize_example(tok, r["prompt"], r["completion"])["input_ids"]) <= max_tokens:
            kept.append(r)
        else:
            dropped[r["subset"]] += 1
            stats.rows[r["subset"]] -= 1
    stats.extra["dropped_over_max_tokens"] = {"max_tokens": max_tokens, **dict(dropped)}
    return kept


def parse_share(text: str) -> float:
    """A command-line share: a number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1, got {text!r}")
    return value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data", help="the shared data folder (default ../shared/data)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-train", type=int, default=100000, help="training drafts used at most (seeded sample)")
    ap.add_argument("--max-apology-share", type=float, default=0.2,
                    help="drafts that open with an apology make at most this share of the training drafts")
    ap.add_argument("--warmup-size", type=int, default=150, help="warm-up (identity) rows (default 150)")
    ap.add_argument("--max-tokens", type=int, default=768,
                    help="drop rows longer than this many tokens (prompt + target + EOS; default 768, 0 keeps all)")
    ap.add_argument("--skip-heldout", action="store_true", help="write the training data only")
    ap.add_argument("--imhi-references", action="store_true",
                    help="also train on GPT-3.5's explanations in DATA/imhi-queries (in-domain drafts of a training model)")
    ap.add_argument("--exclude-queries", type=Path, metavar="JSONL",
                    help="drop training drafts whose query is in this file (bench_tiny_aligner.py --queries-out)")
    ap.add_argument("--weights", type=parse_weights, metavar="KEY=W,...",
                    help="break some objectives more often than others, e.g. length=2,formatting=2 (default: equally)")
    ap.add_argument("--second-keep", type=parse_share, default=0.3, metavar="P",
                    help="share of drafts that give a second keep row, asking other objectives (default 0.3)")
    ap.add_argument("--cut-keep", type=parse_share, default=0.0, metavar="P",
                    help="share of drafts that also give a keep row cut off mid-sentence, as a policy's token "
                         "limit leaves a draft (default 0)")
    ap.add_argument("--layout", type=parse_share, default=0.0, metavar="P",
                    help="share of drafts that also give a keep row in another layout (lettered options, label "
                         "lines), and of those a row that fixes one fault in it (default 0)")
    ap.add_argument("--short", type=parse_share, default=0.0, metavar="P",
                    help="share of drafts that also give a keep row of their first 2-3 sentences, and a row "
                         "that fixes one fault in it (default 0)")
    ap.add_argument("--parallel", type=parse_share, default=0.0, metavar="P",
                    help="share of drafts that also give a keep row whose first 3-5 sentences open alike "
                         "(\"You can assume that ...\"), and a row that fixes one fault in it (default 0)")
    ap.add_argument("--first", type=parse_share, default=0.0, metavar="P",
                    help="share of drafts that also give a row whose first sentence is stated again (after "
                         "itself or at the end), fixed back when Repetition is asked (default 0)")
    args = ap.parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    if not (data / "policy-outputs").is_dir():
        print(f"{data}: no policy-outputs folder (expected the shared data folder)", file=sys.stderr)
        return 2
    excluded = read_queries(args.exclude_queries) if args.exclude_queries else set()
    rng = random.Random(args.seed)
    train = train_drafts(data) + (imhi_reference_drafts(data) if args.imhi_references else [])
    n_excluded = sum(q in excluded for q, _, _ in train)
    train = [t for t in train if t[0] not in excluded]
    rng.shuffle(train)
    train = cap_apologies(train, args.max_apology_share)[:args.max_train]
    items = [(q, d) for q, d, _ in train]
    records = tinydata.make_records(items, seed=args.seed, weights=args.weights)
    direct = tinydata.direct_examples(items, seed=args.seed + 1, weights=args.weights,
                                      p_second_keep=args.second_keep, p_cut_keep=args.cut_keep,
                                      p_layout=args.layout, p_short=args.short,
                                      p_parallel=args.parallel, p_first=args.first)
    held = [] if args.skip_heldout else heldout_drafts(data)

    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("pairs.jsonl", records), ("heldout.jsonl", held))[:1 if args.skip_heldout else 2]:
        tmp = out / f".{name}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, out / name)
    summary = build_dataset(records, direct, out / "dataset", args.seed, args.warmup_size, args.max_tokens or None)
    labels = Counter((k, v) for r in records for k, v in r["labels"].items())
    words = sorted(len(d.split()) for _, d, _ in train)
    stats = {"train_drafts": len(train), "train_by_source": dict(Counter(s for _, _, s in train)),
             "excluded_by_query": n_excluded, "weights": args.weights,
             "second_keep": args.second_keep, "cut_keep": args.cut_keep, "layout": args.layout,
             "short": args.short, "parallel": args.parallel, "first": args.first,
             "draft_words": {"min": words[0], "median": words[len(words) // 2], "max": words[-1]} if words else {},
             "apology_openers": sum(tinydata.apology_opener(d) for _, d, _ in train),
             "records": len(records), "labels": {f"{k} {v}": n for (k, v), n in sorted(labels.items())},
             "dataset_rows": summary["rows"], "direct_rows": summary.get("direct_rows"),
             "dropped_over_max_tokens": summary.get("dropped_over_max_tokens"),
             "heldout_drafts": len(held), "heldout_by_model": dict(Counter(r["model"] for r in held))}
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(stats, indent=2))
    return 0


def cap_apologies(train: list, share: float) -> list:
    """``train`` (shuffled) with drafts opening in an apology cut to ``share`` of the
    result, order kept: half the short HH-RLHF drafts open with "I'm sorry", which taught the first
    tiny aligner to prefix it to drafts that needed no change."""
    other = [t for t in train if not tinydata.apology_opener(t[1])]
    limit = int(share * len(other) / (1 - share)) if share < 1 else len(train)
    kept, n = [], 0
    for t in train:
        if tinydata.apology_opener(t[1]):
            if n >= limit:
                continue
            n += 1
        kept.append(t)
    return kept


if __name__ == "__main__":
    sys.exit(main())
