#!/usr/bin/env python
"""Build annotation items from IMHI policy outputs: each query with the answers of several models.

Reads ``<queries>/<task>.csv`` (column ``query``) and ``<outputs>/<model>/<task>.csv`` (column
``generated_text``, row i answers query i) and writes one item per query:
``{"item_id": "<task>-<row>", "query", "responses": [{"text", "source": <model>}]}``.

    python scripts/imhi_annotation_items.py --out data/imhi-items.jsonl --per-task 20
    metaaligner annotate import --input data/imhi-items.jsonl
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metaaligner_core.errors import InputError, MetaAlignerError  # noqa: E402
from metaaligner_core.io import iter_records, write_jsonl  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def column(path: Path, name: str) -> list[str]:
    values = []
    for line, rec in iter_records(path):
        if name not in rec:
            raise InputError(path, line, name, "missing column")
        values.append(rec[name] or "")
    return values


def build_items(queries_dir: Path, outputs_dir: Path, tasks: list[str] | None, models: list[str] | None,
                per_task: int | None, seed: int, require_all: bool = False) -> list[dict]:
    for folder in (queries_dir, outputs_dir):
        if not folder.is_dir():
            raise MetaAlignerError(f"{folder}: no such folder")
    models = models or sorted(p.name for p in outputs_dir.iterdir() if p.is_dir())
    if not models:
        raise MetaAlignerError(f"{outputs_dir}: no model folders")
    tasks = tasks or sorted(p.stem for p in queries_dir.glob("*.csv"))
    if not tasks:
        raise MetaAlignerError(f"{queries_dir}: no <task>.csv files")
    rng = random.Random(seed)
    items = []
    for task in tasks:
        queries = column(queries_dir / f"{task}.csv", "query")
        answers = {}
        for m in models:
            path = outputs_dir / m / f"{task}.csv"
            answers[m] = column(path, "generated_text")
            if len(answers[m]) != len(queries):
                raise MetaAlignerError(f"{path}: {len(answers[m])} rows, but {queries_dir / task}.csv has "
                                       f"{len(queries)}: the files must be row-aligned")
        # Some models left answers empty; an item needs two answers to compare (or all, if asked).
        needed = len(models) if require_all else 2
        rows = [i for i in range(len(queries))
                if queries[i].strip() and sum(bool(answers[m][i].strip()) for m in models) >= needed]
        if per_task is not None and per_task < len(rows):
            rows = sorted(rng.sample(rows, per_task))
        for i in rows:
            responses = [{"text": answers[m][i].strip(), "source": m} for m in models if answers[m][i].strip()]
            items.append({"item_id": f"{task}-{i:04d}", "query": queries[i].strip(), "responses": responses})
    return items


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=Path, default=SHARED / "imhi-queries", help="folder of <task>.csv with a query column")
    p.add_argument("--outputs", type=Path, default=SHARED / "policy-outputs" / "imhi",
                   help="folder of <model>/<task>.csv with a generated_text column")
    p.add_argument("--tasks", help="comma list (default: every <task>.csv in --queries)")
    p.add_argument("--models", help="comma list (default: every folder in --outputs)")
    p.add_argument("--per-task", type=int, help="a seeded random sample of N queries per task (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--require-all", action="store_true", help="only queries that every model answered")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    if args.per_task is not None and args.per_task < 1:
        p.error(f"--per-task must be at least 1 (got {args.per_task})")
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    try:
        items = build_items(args.queries, args.outputs, split(args.tasks), split(args.models), args.per_task, args.seed,
                            args.require_all)
        n = write_jsonl(args.out, items)
    except MetaAlignerError as e:
        print(f"imhi_annotation_items: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {n} items, {sum(len(it['responses']) for it in items)} responses")
    return 0


if __name__ == "__main__":
    sys.exit(main())
