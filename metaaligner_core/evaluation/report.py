"""Writing an evaluation's results: ``report.json``, ``report.md`` and the plots (PNG).

Pairwise mode draws a grouped bar chart of the win rates (original vs aligned per objective);
score mode draws one density plot per objective of the draft and aligned scores, like the
paper's Figure 2. Every file is written atomically.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..io import atomic_write

REPORT_JSON, REPORT_MD, WIN_RATE_PNG = "report.json", "report.md", "win_rates.png"


def write_report(out: str | Path, report: dict, scores: dict[str, tuple[list, list]] | None = None) -> dict:
    """Write the plots, then ``report.json`` and ``report.md`` (which list the plots) into ``out``.

    ``scores`` (score mode): ``{objective key: (original scores, aligned scores)}`` for the plots.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    if report["mode"] == "pairwise" and any(v["n"] for v in report["objectives"].values()):
        plot_win_rates(report, out / WIN_RATE_PNG)
        plots.append(WIN_RATE_PNG)
    for key, (orig, aligned) in (scores or {}).items():
        if orig or aligned:
            name = f"score_density_{_slug(key)}.png"
            plot_score_density(report["objectives"][key]["name"], orig, aligned, out / name)
            plots.append(name)
    report = {**report, "plots": plots}
    with atomic_write(out / REPORT_JSON) as fh:
        json.dump(report, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    with atomic_write(out / REPORT_MD) as fh:
        fh.write(markdown(report))
    return report


def _slug(key: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", key.lower()).strip("_") or "objective"


def _pct(x: float | None, sign: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x * 100:+.2f}%" if sign else f"{x * 100:.2f}%"


def _num(x: float | None, sign: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.2f}" if sign else f"{x:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def markdown(report: dict) -> str:
    """``report.md``: one column per objective, as a row of the paper's Table 2."""
    objs = report["objectives"]
    names = [v["name"] for v in objs.values()]
    vals = list(objs.values())
    swap = " (both orders, FastChat swap rule)" if report.get("swap") else ""
    parts = [f"# Evaluation report ({report['mode']})\n\n",
             f"Judge `{report['judge']}`, seed {report['seed']}, {report['rows']} rows of `{report['input']}`{swap}.\n"]
    if report["mode"] == "pairwise":
        parts.append("\nWin rate against the golden answer (ties are not wins); advantage = aligned − original.\n\n")
        parts.append(_table(["", *names], [
            ["Original win rate", *(_pct(v["win_rate_original"]) for v in vals)],
            ["Aligned win rate", *(_pct(v["win_rate_aligned"]) for v in vals)],
            ["**Advantage**", *(f"**{_pct(v['advantage'], sign=True)}**" for v in vals)],
            ["n", *(str(v["n"]) for v in vals)],
        ]))
        parts.append("\n## Outcomes (wins / ties / losses over n; invalid and failed over all rows)\n\n")
        rows = []
        for side in ("original", "aligned"):
            rows.append([f"{side}: W / T / L", *(f"{v[side]['wins']} / {v[side]['ties']} / {v[side]['losses']}" for v in vals)])
            rows.append([f"{side}: invalid", *(str(v[side]["invalid"]) for v in vals)])
            rows.append([f"{side}: failed", *(str(v[side]["failed"]) for v in vals)])
        parts.append(_table(["", *names], rows))
    else:
        parts.append("\nScores 0–10 per response; advantage = mean aligned − mean original.\n\n")
        parts.append(_table(["", *names], [
            ["Original mean", *(_num(v["mean_original"]) for v in vals)],
            ["Aligned mean", *(_num(v["mean_aligned"]) for v in vals)],
            ["Original median", *(_num(v["median_original"]) for v in vals)],
            ["Aligned median", *(_num(v["median_aligned"]) for v in vals)],
            ["**Advantage**", *(f"**{_num(v['advantage'], sign=True)}**" for v in vals)],
            ["n", *(str(v["n"]) for v in vals)],
            ["invalid (original / aligned)", *(f"{v['original']['invalid']} / {v['aligned']['invalid']}" for v in vals)],
            ["failed (original / aligned)", *(f"{v['original']['failed']} / {v['aligned']['failed']}" for v in vals)],
        ]))
    calls = report["calls"]
    tokens = ""
    if "prompt_tokens" in calls:
        tokens = f", {calls['prompt_tokens']} prompt + {calls['completion_tokens']} completion tokens"
    parts.append(f"\nJudge calls this run: {calls['calls']} made ({calls['retries_after_invalid']} re-asks "
                 f"after an invalid reply), {calls['cached']} answered from `judgments.jsonl`{tokens}.\n")
    if report["failed"]:
        parts.append(f"\n**{report['failed']} judgments failed** (the judge could not be reached after retries); "
                     "they are left out of every figure above. Run the same command again to retry only them.\n")
    for plot in report.get("plots", []):
        parts.append(f"\n![{plot}]({plot})\n")
    return "".join(parts)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_win_rates(report: dict, path: Path) -> None:
    """Grouped bars: original and aligned win rate per objective."""
    import numpy as np

    plt = _pyplot()
    objs = list(report["objectives"].values())
    x = np.arange(len(objs))
    orig = [100 * (v["win_rate_original"] or 0) for v in objs]
    aligned = [100 * (v["win_rate_aligned"] or 0) for v in objs]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(objs) + 2), 4))
    width = 0.38
    b1 = ax.bar(x - width / 2, orig, width, label="original (draft)", color="#9aa5b1")
    b2 = ax.bar(x + width / 2, aligned, width, label="aligned", color="#2b6cb0")
    ax.bar_label(b1, fmt="%.1f", fontsize=8)
    ax.bar_label(b2, fmt="%.1f", fontsize=8)
    ax.set_xticks(x, [v["name"] for v in objs], rotation=20, ha="right")
    ax.set_ylabel("win rate vs golden (%)")
    ax.set_ylim(0, max([100.0, *orig, *aligned]) * 1.08)
    ax.set_title(f"Win rates judged by {report['judge']}")
    ax.legend(frameon=False)
    fig.tight_layout()
    _save(fig, path)


def density(values, grid):
    """Gaussian kernel density of ``values`` on ``grid`` (Scott's bandwidth, at least 0.3).

    numpy only: SciPy is not a dependency, and integer scores with one repeated value would
    make ``scipy.stats.gaussian_kde`` singular anyway.
    """
    import numpy as np

    v = np.asarray(values, dtype=float)
    bw = max(0.3, 1.06 * float(v.std()) * len(v) ** -0.2) if len(v) else 1.0
    z = (np.asarray(grid)[:, None] - v[None, :]) / bw
    return np.exp(-0.5 * z * z).sum(axis=1) / (len(v) * bw * np.sqrt(2 * np.pi))


def plot_score_density(name: str, original: list[float], aligned: list[float], path: Path) -> None:
    """Density of the 0–10 scores before and after alignment for one objective (paper Figure 2)."""
    import numpy as np

    plt = _pyplot()
    grid = np.linspace(0, 10, 201)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for values, label, color in ((original, "original (draft)", "#9aa5b1"), (aligned, "aligned", "#2b6cb0")):
        if values:
            ax.fill_between(grid, density(values, grid), alpha=0.35, color=color,
                            label=f"{label}: mean {np.mean(values):.2f}")
            ax.axvline(float(np.mean(values)), color=color, linestyle="--", linewidth=1)
    ax.set_xlim(0, 10)
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.set_title(name)
    ax.legend(frameon=False, fontsize=8, loc="best")
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)
