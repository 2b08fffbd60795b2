"""What went wrong in the tiny aligner's failed benchmark rows, by kind.

    python training/tiny/failure_kinds.py RUN/texts.jsonl [--aligner tiny]

Reads the file ``bench/bench_tiny_aligner.py --texts-out`` writes and prints, per row of the
benchmark's table, how many rows failed and of which kind (counts only, never texts):

* **loop**: the output used its whole token budget, or ended at a loop (``looped``: a sentence
  written a third time, ``metaaligner_core.engine.stops.loop_end``);
* **fault left**: a repair row whose output still breaks the objective asked for, with the rest of
  the draft kept (word similarity to the draft ≥ 0.9);
* **stopped early**: the output is the expected text (the clean draft) cut short: a prefix of its
  words that leaves out at least one word;
* **dropped**: every output word stands in the expected text in order, but words are missing
  inside it (a sentence left out, not at the end);
* **added**: every expected word stands in the output in order, with words added (an opener, a
  repeated clause, a sentence of its own);
* **rewrote**: anything else (changed wording; for clean rows, a change that still breaks a check
  counts here too).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tinydata  # noqa: E402

KINDS = ("loop", "fault left", "stopped early", "dropped", "added", "rewrote")


def _norm_words(text: str) -> list[str]:
    return [w.strip(".,;:!?\"'()*").lower() for w in text.split() if w.strip(".,;:!?\"'()*")]


def _is_subsequence(short: list[str], long: list[str]) -> bool:
    it = iter(long)
    return all(w in it for w in short)


def failure_kind(kind: str, objective: str, draft: str, expected: str, out: str, hit_limit: bool) -> str:
    """The kind (one of :data:`KINDS`) of one failed row: ``kind`` ``repair``/``clean``/``unrelated``,
    the ``objective`` asked for, the ``draft`` given, the ``expected`` clean text and the output."""
    if hit_limit:
        return "loop"
    if (kind == "repair" and not tinydata.CHECKS[objective](out)
            and tinydata.word_ratio(out, draft, ignore_case=True) >= 0.9):
        return "fault left"
    o, e = _norm_words(out), _norm_words(expected)
    if len(o) < len(e) and e[:len(o)] == o:
        return "stopped early"
    if len(o) < len(e) and _is_subsequence(o, e):
        return "dropped"
    if len(o) > len(e) and _is_subsequence(e, o):
        return "added"
    return "rewrote"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("texts", help="bench_tiny_aligner.py --texts-out file")
    ap.add_argument("--aligner", default="tiny", help="which aligner's outputs (default tiny)")
    args = ap.parse_args(argv)
    table: dict[str, Counter] = {}
    with open(args.texts, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                res = r[args.aligner]
                verdict = (r["kind"], r["objective"], r["draft"], r["clean"], res["out"],
                           res["hit_limit"] or res.get("looped", False), res["ok"])
            except (ValueError, KeyError, TypeError) as e:
                why = "not valid JSON" if isinstance(e, ValueError) else f"field {e} missing"
                print(f"{args.texts}:{n}: {args.aligner}: {why} (expected a bench_tiny_aligner.py --texts-out row)",
                      file=sys.stderr)
                return 2
            name = f"repaired: {r['objective']}" if r["kind"] == "repair" else f"{r['kind']} kept"
            c = table.setdefault(name, Counter())
            c["rows"] += 1
            if not verdict[-1]:
                c[failure_kind(*verdict[:-1])] += 1
    print(f"{'row':<24}{'rows':>6}{'failed':>8}" + "".join(f"{k:>15}" for k in KINDS))
    for name, c in table.items():
        failed = sum(c[k] for k in KINDS)
        print(f"{name:<24}{c['rows']:>6}{failed:>8}" + "".join(f"{c[k]:>15}" for k in KINDS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
