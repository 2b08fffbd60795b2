"""The tiny MetaAligner against the untrained base model, judged by program, on held-out policies.

    python bench/bench_tiny_aligner.py [--heldout FILE] [--per-objective 50] [--clean 100] [--unrelated 50]
        [--aligner DIR] [--out FILE]

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
* **unrelated kept**: an untouched draft, the aligner asked for an objective it never trained on
  (UltraFeedback's Honesty); judged as *clean kept*.

Rows are decoded in batches of similar draft length; a batch may write at most 1.3 × its longest
draft + 24 tokens (an edit is never much longer than its draft), capped by ``--max-new-tokens``
but never below its longest draft + 24 (a faithful copy always fits). *Hit the limit*: the output
used all of them (a loop, or a runaway answer); the table counts those rows per aligner. *Ended at
a template marker*: rows whose output ended because the aligner wrote one of its prompt's markers
(``| Edit``, ``| Answer:``, ``| Query:``) to start again; the text before it is the output judged.

Both aligners run in the same process on the same rows with greedy decoding through
``Aligner.align_batch``: the embedded base model (``default`` weights without the adapter) and
the tiny aligner (the same weights with ``training/tiny/adapter`` merged). Texts are never printed;
``--texts-out FILE`` writes each row's draft, clean draft and outputs to a JSONL file for failure
analysis (the held-out drafts answer real mental-health posts: keep that file private).
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


def sample_rows(drafts: list[dict], per_objective: int, n_clean: int, seed: int, n_unrelated: int = 0) -> list[dict]:
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
    for _ in range(n_unrelated):
        d = next_draft()
        rows.append({"kind": "unrelated", "objective": "honesty", "query": d["query"],
                     "draft": d["draft"], "clean": d["draft"], "model": d["model"]})
    return rows


def objective_text(key: str) -> str:
    if key in tinydata.OBJECTIVES:
        return tinydata.OBJECTIVES[key]
    from metaaligner_core.objectives import lookup

    return lookup(key, family="ultrafeedback").text


def judge(row: dict, out: str) -> dict:
    clean = row["clean"]
    if row["kind"] == "repair":
        ok = tinydata.CHECKS[row["objective"]](out) and tinydata.word_ratio(out, clean, ignore_case=True) >= REPAIR_SIM
        return {"ok": ok, "exact": tinydata.same_words(out, clean)}
    exact = tinydata.same_words(out, clean)
    near = exact or (tinydata.word_ratio(out, clean) >= KEEP_SIM and tinydata.is_clean(out))
    return {"ok": near, "exact": exact}


def batch_budget(longest: int, max_new_tokens: int) -> int:
    """New tokens a batch whose longest draft has ``longest`` tokens may write: 1.3 × it + 24, at
    most ``max_new_tokens`` unless that would cut a faithful copy of the draft (then draft + 24)."""
    return max(min(max_new_tokens, int(1.3 * longest) + 24), longest + 24)


def run_aligner(model_dir: str, rows: list[dict], batch_size: int, max_new_tokens: int
                ) -> tuple[list[str], list[bool], float, int, list[bool]]:
    """Outputs, whether each used its whole token budget, the seconds spent, how many rows ended
    where the aligner wrote a template marker (``| Edit``: ``Aligner.stops``), and whether each
    ended at a loop (a sentence written a third time: ``metaaligner_core.engine.stops.loop_end``)."""
    from tqdm import tqdm

    from metaaligner_core.engine.stops import loop_end
    from metaaligner_core.inference import Aligner

    aligner = Aligner.load(model_dir, template="ultrafeedback")
    tok = aligner.generator.tokenizer
    lengths = [len(tok(r["draft"], add_special_tokens=False)["input_ids"]) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: lengths[i])
    outs, limited, looped = [""] * len(rows), [False] * len(rows), [False] * len(rows)
    t0 = time.perf_counter()
    bar = tqdm(total=len(rows), desc="aligning", unit=" rows")
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        budget = batch_budget(max(lengths[i] for i in idx), max_new_tokens)
        texts = aligner.align_batch([rows[i]["query"] for i in idx], [rows[i]["draft"] for i in idx],
                                    [[objective_text(rows[i]["objective"])] for i in idx],
                                    batch_size=batch_size, max_new_tokens=budget)
        for i, text in zip(idx, texts):
            outs[i] = text
            limited[i] = len(tok(text, add_special_tokens=False)["input_ids"]) >= budget - 1
            looped[i] = loop_end(text, rows[i]["draft"]) is not None
        bar.update(len(idx))
    bar.close()
    return outs, limited, time.perf_counter() - t0, aligner.stopped_at_marker, looped


def table(rows: list[dict], results: dict[str, list[dict]]) -> list[dict]:
    lines = []
    for kind, key in [("repair", k) for k in tinydata.KEYS] + [("clean", None), ("unrelated", None)]:
        idx = [i for i, r in enumerate(rows) if r["kind"] == kind and (key is None or r["objective"] == key)]
        if not idx:
            continue
        line = {"row": f"repaired: {key}" if key else f"{kind} kept", "n": len(idx)}
        for name, res in results.items():
            line[name] = sum(res[i]["ok"] for i in idx) / len(idx)
            line[f"{name} exact"] = sum(res[i]["exact"] for i in idx) / len(idx)
        lines.append(line)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heldout", help="heldout.jsonl from training/tiny/build_data.py (default: read --data)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--per-objective", type=int, default=50, help="degraded drafts per objective")
    ap.add_argument("--clean", type=int, default=100, help="clean drafts")
    ap.add_argument("--unrelated", type=int, default=50, help="clean drafts asked for Honesty (never trained on)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=320,
                    help="the most any batch may write, unless its longest draft + 24 is more (default 320)")
    ap.add_argument("--aligner", help="tiny aligner directory (default: the embedded one, adapter merged)")
    ap.add_argument("--only", choices=["base", "tiny"], help="run one of the two aligners")
    ap.add_argument("--out", help="write the table and per-row verdicts (no texts) as JSON here")
    ap.add_argument("--texts-out", metavar="JSONL",
                    help="also write every row's texts (query, draft, clean draft, each aligner's output) here")
    ap.add_argument("--queries-out", metavar="JSONL",
                    help="write the sampled rows' queries (for build_data.py --exclude-queries) and stop")
    args = ap.parse_args(argv)

    from metaaligner_core.embedded import default_aligner_dir, embedded_model_dir
    from metaaligner_core.io import atomic_write

    rows = sample_rows(load_heldout(args.heldout, args.data), args.per_objective, args.clean, args.seed,
                       args.unrelated)
    if args.queries_out:
        with atomic_write(args.queries_out) as fh:
            fh.writelines(json.dumps({"query": q}) + "\n" for q in sorted({r["query"] for r in rows}))
        print(f"{len(rows)} rows, {len({r['query'] for r in rows})} queries → {args.queries_out}")
        return 0
    candidates = {}
    if args.only in (None, "tiny"):  # first: the aligner under test
        candidates["tiny"] = args.aligner or str(default_aligner_dir())
    if args.only in (None, "base"):
        candidates["base"] = str(embedded_model_dir())
    results, seconds, limited, texts, stopped, loops = {}, {}, {}, {}, {}, {}
    for name, path in candidates.items():
        outs, hit, seconds[name], stopped[name], looped = run_aligner(path, rows, args.batch_size, args.max_new_tokens)
        texts[name] = outs
        # a correction that ended at a loop fails, however close its words (it holds one sentence three times)
        results[name] = [{**judge(r, o), "hit_limit": h, "looped": lo, **({"ok": False, "exact": False} if lo else {})}
                         for r, o, h, lo in zip(rows, outs, hit, looped)]
        limited[name], loops[name] = sum(hit), sum(looped)
        if args.out:  # each aligner's verdicts as soon as it is done (no texts)
            Path(args.out).with_suffix(f".{name}.json").write_text(json.dumps(results[name]) + "\n")
    lines = table(rows, results)
    if args.texts_out:  # owner-only: the drafts answer real mental-health posts
        with atomic_write(args.texts_out, private=True) as fh:
            for i, r in enumerate(rows):
                fh.write(json.dumps({**r, **{n: {"out": texts[n][i], **results[n][i]} for n in results}},
                                    ensure_ascii=False) + "\n")

    names = list(results)
    print(f"{len(rows)} held-out rows ({', '.join(sorted({r['model'] for r in rows}))}); greedy, "
          f"at most {args.max_new_tokens} new tokens a batch (or its longest draft + 24); " + ", ".join(f"{n} {seconds[n]:.0f} s" for n in names))
    head = f"{'row':<24}{'n':>4}" + "".join(f"{n:>10}{n + ' exact':>14}" for n in names)
    print(head)
    print("-" * len(head))
    for line in lines:
        print(f"{line['row']:<24}{line['n']:>4}" + "".join(
            f"{line[n]:>10.0%}{line[n + ' exact']:>14.0%}" for n in names))
    print(f"{'hit the token limit':<28}" + "".join(f"{limited[n]:>10}{'':>14}" for n in names))
    print(f"{'ended at a template marker':<28}" + "".join(f"{stopped[n]:>10}{'':>14}" for n in names))
    print(f"{'ended at a loop':<28}" + "".join(f"{loops[n]:>10}{'':>14}" for n in names))
    if args.out:
        Path(args.out).write_text(json.dumps({
            "table": lines, "seconds": seconds, "candidates": candidates, "hit_limit": limited,
            "stopped_at_marker": stopped, "stopped_at_loop": loops,
            "rows": [{"kind": r["kind"], "objective": r["objective"], "model": r["model"],
                      **{n: results[n][i] for n in names}} for i, r in enumerate(rows)]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
