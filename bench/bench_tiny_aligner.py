"""The tiny MetaAligner against the untrained base model, judged by program, on held-out policies.

    python bench/bench_tiny_aligner.py [--heldout FILE] [--per-objective 12] [--clean 24] [--out FILE]

Drafts come from policy models the tiny aligner never saw in training (Vicuna-7B, llama2-chat-7B,
Mentallama-7B, Gemma-7B; ``training/tiny/build_data.py`` writes them to ``heldout.jsonl``, or this
script reads ``../shared/data`` itself). Every draft passes all four checks of
``training/tiny/tinydata.py``. Rows, drawn with a fixed seed and spread over the four models:

* **repair** (one row per objective): the draft degraded on that objective (same degradations as
  in training, different seed and drafts), the aligner asked for that objective alone. *Repaired*:
  the output passes the objective's check and keeps the clean draft's words (word-sequence
  similarity ≥ 0.9, case ignored, line breaks ignored). *Exact* : the output is the clean draft
  (up to whitespace).
* **clean kept**: an untouched draft, the aligner asked for one of the four objectives (in turn).
  *Kept*: the output equals the draft up to whitespace (exact), or is near-exact: word-sequence
  similarity ≥ 0.95 (case counted) and still passing every check.

Both aligners run in the same process on the same rows with greedy decoding through
``Aligner.align_batch``: the embedded base model (``default`` weights without the adapter) and
the tiny aligner (the same weights with ``training/tiny/adapter`` merged). Texts are never printed.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "training" / "tiny"))

import tinydata  # noqa: E402

REPAIR_SIM, KEEP_SIM = 0.9, 0.95


def load_heldout(path: str | None, data: str) -> list[dict]:
    if path:
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    import build_data

    return build_data.heldout_drafts(Path(data))


def sample_rows(drafts: list[dict], per_objective: int, n_clean: int, seed: int) -> list[dict]:
    """Benchmark rows ``{"kind", "objective", "query", "draft", "clean", "model"}``, models taken in turn."""
    rng = random.Random(seed)
    by_model = defaultdict(list)
    for d in drafts:
        by_model[d["model"]].append(d)
    for lst in by_model.values():
        rng.shuffle(lst)
    models = sorted(by_model)
    pools = {m: iter(by_model[m]) for m in models}
    turn = [0]

    def next_draft():
        for _ in range(len(models) * 50):
            m = models[turn[0] % len(models)]
            turn[0] += 1
            d = next(pools[m], None)
            if d is not None:
                return d
        raise SystemExit("not enough held-out drafts")

    rows = []
    for key in tinydata.KEYS:
        made = 0
        while made < per_objective:
            d = next_draft()
            if not tinydata.can_degrade(d["draft"], key):
                continue
            bad = tinydata.degrade(d["draft"], [key], rng)
            if bad is None:
                continue
            rows.append({"kind": "repair", "objective": key, "query": d["query"], "draft": bad,
                         "clean": d["draft"], "model": d["model"]})
            made += 1
    for i in range(n_clean):
        d = next_draft()
        rows.append({"kind": "clean", "objective": tinydata.KEYS[i % len(tinydata.KEYS)], "query": d["query"],
                     "draft": d["draft"], "clean": d["draft"], "model": d["model"]})
    return rows


def judge(row: dict, out: str) -> dict:
    clean = row["clean"]
    if row["kind"] == "repair":
        ok = tinydata.CHECKS[row["objective"]](out) and tinydata.word_ratio(out, clean, ignore_case=True) >= REPAIR_SIM
        return {"ok": ok, "exact": tinydata.same_words(out, clean)}
    exact = tinydata.same_words(out, clean)
    near = exact or (tinydata.word_ratio(out, clean) >= KEEP_SIM and tinydata.is_clean(out))
    return {"ok": near, "exact": exact}


def run_aligner(model_dir: str, rows: list[dict], batch_size: int, max_new_tokens: int) -> tuple[list[str], float]:
    from metaaligner_core.inference import Aligner

    aligner = Aligner.load(model_dir, template="ultrafeedback")
    objectives = [[tinydata.OBJECTIVES[r["objective"]]] for r in rows]
    t0 = time.perf_counter()
    outs = aligner.align_batch([r["query"] for r in rows], [r["draft"] for r in rows], objectives,
                               batch_size=batch_size, progress=True, max_new_tokens=max_new_tokens)
    return outs, time.perf_counter() - t0


def table(rows: list[dict], results: dict[str, list[dict]]) -> list[dict]:
    lines = []
    for kind, key in [("repair", k) for k in tinydata.KEYS] + [("clean", None)]:
        idx = [i for i, r in enumerate(rows) if r["kind"] == kind and (key is None or r["objective"] == key)]
        line = {"row": f"repaired: {key}" if key else "clean kept", "n": len(idx)}
        for name, res in results.items():
            line[name] = sum(res[i]["ok"] for i in idx) / len(idx)
            line[f"{name} exact"] = sum(res[i]["exact"] for i in idx) / len(idx)
        lines.append(line)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heldout", help="heldout.jsonl from training/tiny/build_data.py (default: read --data)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--per-objective", type=int, default=12, help="degraded drafts per objective")
    ap.add_argument("--clean", type=int, default=24, help="clean drafts")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--aligner", help="tiny aligner directory (default: the embedded one, adapter merged)")
    ap.add_argument("--only", choices=["base", "tiny"], help="run one of the two aligners")
    ap.add_argument("--out", help="write the table and per-row verdicts (no texts) as JSON here")
    args = ap.parse_args(argv)

    from metaaligner_core.embedded import default_aligner_dir, embedded_model_dir

    rows = sample_rows(load_heldout(args.heldout, args.data), args.per_objective, args.clean, args.seed)
    candidates = {}
    if args.only in (None, "base"):
        candidates["base"] = str(embedded_model_dir())
    if args.only in (None, "tiny"):
        candidates["tiny"] = args.aligner or str(default_aligner_dir())
    results, seconds = {}, {}
    for name, path in candidates.items():
        outs, seconds[name] = run_aligner(path, rows, args.batch_size, args.max_new_tokens)
        results[name] = [judge(r, o) for r, o in zip(rows, outs)]
    lines = table(rows, results)

    names = list(results)
    print(f"{len(rows)} held-out rows ({', '.join(sorted({r['model'] for r in rows}))}); greedy, "
          f"max_new_tokens {args.max_new_tokens}; " + ", ".join(f"{n} {seconds[n]:.0f} s" for n in names))
    head = f"{'row':<24}{'n':>4}" + "".join(f"{n:>10}{n + ' exact':>14}" for n in names)
    print(head)
    print("-" * len(head))
    for line in lines:
        print(f"{line['row']:<24}{line['n']:>4}" + "".join(
            f"{line[n]:>10.0%}{line[n + ' exact']:>14.0%}" for n in names))
    if args.out:
        Path(args.out).write_text(json.dumps({
            "table": lines, "seconds": seconds, "candidates": candidates,
            "rows": [{"kind": r["kind"], "objective": r["objective"], "model": r["model"],
                      **{n: results[n][i] for n in names}} for i, r in enumerate(rows)]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
