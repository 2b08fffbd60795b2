"""The loss curve and step rate of a ``metaaligner train`` run, from its ``metrics.jsonl``.

    python training/tiny/plot_loss.py --run RUN/out --png training/tiny/loss.png

Prints, per stage, the steps, the tokens (prompt and completion, no padding), the seconds, the
tokens per second and the mean loss of the first and last tenth of its steps; draws the loss per
step (and its 20-step moving average) with the stages one after another.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run: Path) -> list[dict]:
    rows = []
    with open(run / "metrics.jsonl", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                r = json.loads(line)
                if "loss" in r:
                    rows.append(r)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for stage in dict.fromkeys(r["stage"] for r in rows):
        s = [r for r in rows if r["stage"] == stage]
        tenth = max(1, len(s) // 10)
        tokens = s[-1].get("num_input_tokens_seen", 0)
        seconds = s[-1].get("train_runtime", 0.0)
        out.append({"stage": stage, "steps": s[-1]["step"], "tokens": tokens, "seconds": round(seconds),
                    "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
                    "seconds_per_step": round(seconds / s[-1]["step"], 1) if seconds else None,
                    "loss_first_tenth": round(sum(r["loss"] for r in s[:tenth]) / tenth, 4),
                    "loss_last_tenth": round(sum(r["loss"] for r in s[-tenth:]) / tenth, 4)})
    return out


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5), dpi=100)
    offset = 0
    for stage in dict.fromkeys(r["stage"] for r in rows):
        s = [r for r in rows if r["stage"] == stage]
        x = [offset + r["step"] for r in s]
        y = [r["loss"] for r in s]
        ax.plot(x, y, lw=0.6, alpha=0.45)
        avg = [sum(y[max(0, i - 19):i + 1]) / len(y[max(0, i - 19):i + 1]) for i in range(len(y))]
        ax.plot(x, avg, lw=1.6, label=f"{stage} (20-step mean)")
        offset = x[-1]
    ax.set_xlabel("optimizer step (stages in order)")
    ax.set_ylabel("training loss")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="the run's --out folder (holds metrics.jsonl)")
    ap.add_argument("--png", help="write the loss curve here")
    args = ap.parse_args(argv)
    run = Path(args.run)
    if not (run / "metrics.jsonl").is_file():
        print(f"{run}: no metrics.jsonl (not a metaaligner train output folder)", file=sys.stderr)
        return 2
    rows = read_metrics(run)
    for line in summary(rows):
        print(json.dumps(line))
    if args.png:
        plot(rows, Path(args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
