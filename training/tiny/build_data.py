"""Build the tiny aligner's training pairs and held-out evaluation drafts from real policy drafts.

    python training/tiny/build_data.py --data ../shared/data --out DIR [--seed 0] [--max-train N]

Reads the policy drafts in ``DATA/policy-outputs`` (README there). Training pairs come from the
GPT-3.5 and Claude-3 drafts; the Vicuna-7B, llama2-chat-7B, Mentallama-7B and Gemma drafts are
held out whole for ``bench/bench_tiny_aligner.py``. Only drafts that pass every check of
:mod:`tinydata` and have 12-40 words are used; queries keep their last 12 words.

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data", help="the shared data folder (default ../shared/data)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-train", type=int, default=3000, help="training drafts used at most (seeded sample)")
    ap.add_argument("--skip-heldout", action="store_true", help="write the training pairs only")
    args = ap.parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    if not (data / "policy-outputs").is_dir():
        print(f"{data}: no policy-outputs folder (expected the shared data folder)", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    train = train_drafts(data)
    rng.shuffle(train)
    train = train[:args.max_train]
    records = tinydata.make_records([(q, d) for q, d, _ in train], seed=args.seed)
    held = [] if args.skip_heldout else heldout_drafts(data)

    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("pairs.jsonl", records), ("heldout.jsonl", held))[:1 if args.skip_heldout else 2]:
        tmp = out / f".{name}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, out / name)
    labels = Counter((k, v) for r in records for k, v in r["labels"].items())
    stats = {"train_drafts": len(train), "train_by_source": dict(Counter(s for _, _, s in train)),
             "records": len(records), "labels": {f"{k} {v}": n for (k, v), n in sorted(labels.items())},
             "heldout_drafts": len(held), "heldout_by_model": dict(Counter(r["model"] for r in held))}
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
