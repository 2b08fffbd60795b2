"""Writing an evaluation's results: ``report.json``, ``report.md`` and the plots (PNG), and
``evaluate --compare`` (runs side by side).

Plots: ``win_rates.png`` (pairwise: win rate against the golden answer per objective for the
draft and every corrector, with the 95 % bootstrap intervals as error bars; one
``win_rates_<judge>.png`` per further judge), ``score_density_<objective>.png`` (score mode:
densities of the 0–10 scores, like the paper's Figure 2), ``length_change.png`` (histogram of
the words each corrector adds to or removes from the draft). Every file is written atomically.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import MetaAlignerError
from ..io import atomic_write

REPORT_JSON, REPORT_MD, WIN_RATE_PNG, LENGTH_PNG = "report.json", "report.md", "win_rates.png", "length_change.png"
_COLORS = ["#9aa5b1", "#2b6cb0", "#dd6b20", "#38a169", "#805ad5", "#d53f8c"]


def write_report(out: str | Path, report: dict, scores: dict | None = None,
                 length_changes: dict[str, list[int]] | None = None) -> dict:
    """Write the plots, then ``report.json`` and ``report.md`` (which list the plots) into ``out``.

    ``scores`` (score mode): ``{judge: {objective key: {side: [scores]}}}``;
    ``length_changes``: ``{corrector: [words added per row]}``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    if report["mode"] == "pairwise":
        for j, (judge, data) in enumerate(report["by_judge"].items()):
            if any(b["n"] for blocks in data["correctors"].values() for b in blocks.values()):
                name = WIN_RATE_PNG if j == 0 else f"win_rates_{_slug(judge)}.png"
                plot_win_rates(judge, data["correctors"], out / name)
                plots.append(name)
    for j, (judge, per_obj) in enumerate((scores or {}).items()):
        for key, sides in per_obj.items():
            if any(sides.values()):
                name = f"score_density_{_slug(key)}.png" if j == 0 else \
                    f"score_density_{_slug(key)}_{_slug(judge)}.png"
                plot_score_density(f"{report['objectives'][key]['name']} ({judge})", sides, out / name)
                plots.append(name)
    if length_changes and any(length_changes.values()):
        plot_length_change(length_changes, out / LENGTH_PNG)
        plots.append(LENGTH_PNG)
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


def _ci(iv, pct: bool = True) -> str:
    if not iv:
        return ""
    f = (lambda v: f"{v * 100:.1f}") if pct else (lambda v: f"{v:.2f}")
    return f" [{f(iv[0])}, {f(iv[1])}]"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def markdown(report: dict) -> str:
    """``report.md``: per judge and corrector, one column per objective (a row of the paper's Table 2)."""
    swap = " (both orders, FastChat swap rule)" if report.get("swap") else ""
    judges = report.get("judges", [report["judge"]])
    parts = [f"# Evaluation report ({report['mode']})\n\n",
             f"Judge{'s' if len(judges) > 1 else ''} {', '.join(f'`{j}`' for j in judges)}, seed {report['seed']}, "
             f"{report['rows']} rows of `{report['input']}`{swap}. Judge prompt: {report['prompt']}. "
             f"Objective wording: {_wording(report)}.\n"]
    by_judge = report.get("by_judge") or {report["judge"]: {"correctors": {"aligned": report["objectives"]}}}
    settings = report.get("judge_settings")
    if settings:
        parts.append(f"Judge settings: temperature {settings['temperature']}, at most {settings['max_tokens']} "
                     f"tokens a reply. ")
    if report.get("bootstrap"):
        parts.append(f"Intervals: {report['bootstrap']['resamples']} bootstrap resamples of the queries "
                     f"(seed {report['bootstrap']['seed']}), one joint resampling for every objective.\n")
    for judge, data in by_judge.items():
        for corrector, blocks in data["correctors"].items():
            average = (data.get("average") or {}).get(corrector)
            parts.append(f"\n## {corrector} — judge `{judge}`\n")
            parts.append(_pairwise_md(blocks, corrector, average) if report["mode"] == "pairwise"
                         else _score_md(blocks, average))
    if report.get("flags"):
        parts.append("\n## Flags\n\n" + "".join(f"- {f}\n" for f in report["flags"]))
    if report.get("correction"):
        parts.append("\n## Correction behaviour (all rows; lengths in words)\n\n")
        rows = []
        for name, b in report["correction"].items():
            if not b.get("rows"):
                continue
            e, ln = b["edit_size"], b["length"]
            rows.append([name, _pct(b["copy_rate"]), f"{e['median']:.2f} ({e['q1']:.2f}–{e['q3']:.2f})",
                         f"{ln['mean_draft']:.1f} → {ln['mean_aligned']:.1f}", _num(ln["mean_change"], True)])
        parts.append(_table(["corrector", "copy rate", "edit size median (IQR)", "mean length draft → corrected",
                             "mean change"], rows))
    if report.get("judge_agreement"):
        ja = report["judge_agreement"]
        parts.append(f"\n## Agreement between judges (Krippendorff's alpha, {ja['level']})\n\n")
        parts.append(_table(["objective", "alpha", "units", "pairs"], [
            [k, _num(v["alpha"]), str(v["units"]),
             "; ".join(f"{p}: {_pct(e.get('agreement')) if 'agreement' in e else _num(e.get('spearman'))}"
                       for p, e in v["pairs"].items())]
            for k, v in ja["objectives"].items()]))
    if report.get("expert_agreement"):
        ea = report["expert_agreement"]
        parts.append(f"\n## Judge–expert agreement\n\n{ea['measure']}; {ea['ratings']} expert ratings.\n\n")
        parts.append(_table(["judge", "objective", "rho", "n"], [
            [j, k, _num(v["spearman"]), str(v["n"])] for j, per in ea["judges"].items() for k, v in per.items()]))
    calls = report["calls"]
    tokens = ""
    if "prompt_tokens" in calls:
        tokens = f", {calls['prompt_tokens']} prompt + {calls['completion_tokens']} completion tokens"
    parts.append(f"\nJudge calls this run: {calls['calls']} made ({calls['retries_after_invalid']} re-asks "
                 f"after an invalid reply), {calls['cached']} answered from `judgments.jsonl`{tokens}.\n")
    if report["failed"]:
        parts.append(f"\n**{report['failed']} judgments failed** (the judge could not be reached after retries); "
                     "they are left out of every figure above. Run the same command again to retry only them.\n")
    if report.get("definitions"):
        parts.append("\n## Definitions\n\n" + "".join(f"- `{k}`: {v}\n" for k, v in report["definitions"].items()))
    for plot in report.get("plots", []):
        parts.append(f"\n![{plot}]({plot})\n")
    return "".join(parts)


def _wording(report: dict) -> str:
    if report.get("template"):
        return f"{report['template']} (from {report.get('template_source', '?')})"
    return "UltraFeedback first (no template given or inferred)"


_DEFINITION_ROWS = (
    ("", "valid-only: wins / valid pairs", "n"),
    ("_paper", "paper, Algorithm 2: wins / all judgments", "n_paper"),
    ("_authors", "authors' scripts: (wins + ties) / all judgments", "n_authors"),
    ("_ties_half", "ties half: (wins + ties/2) / valid pairs", "n_ties_half"),
)


def _pairwise_md(blocks: dict, corrector: str = "aligned", average: dict | None = None) -> str:
    vals = list(blocks.values())
    cols = vals + ([average] if average and len(vals) > 1 else [])
    names = [v["name"] for v in cols]
    parts = ["\nWin rate against the golden answer under each definition; advantage = aligned − original; "
             "95 % bootstrap interval in brackets. The average column is the mean over the objectives "
             "(the paper's Avg.).\n\n"]
    rows = []
    for suffix, label, n_key in _DEFINITION_ROWS:
        if f"win_rate_original{suffix}" not in vals[0]:
            continue
        rows.append([f"*{label}*", *("" for _ in cols)])
        rows += [
            ["Original", *(_pct(v[f"win_rate_original{suffix}"]) + _ci(v["ci95"].get(f"win_rate_original{suffix}"))
                           for v in cols)],
            ["Aligned", *(_pct(v[f"win_rate_aligned{suffix}"]) + _ci(v["ci95"].get(f"win_rate_aligned{suffix}"))
                          for v in cols)],
            ["**Advantage**", *(f"**{_pct(v[f'advantage{suffix}'], sign=True)}**"
                                + _ci(v["ci95"].get(f"advantage{suffix}")) for v in cols)],
            [n_key, *(str(v[n_key]) if n_key in v else "" for v in cols)],
        ]
    if "lc_win_rate_original" in vals[0]:
        rows += [
            ["*length-controlled (AlpacaEval length_controlled_v1)*", *("" for _ in cols)],
            ["Original", *(_pct(v["lc_win_rate_original"]) + _ci(v["ci95"].get("lc_win_rate_original"))
                           for v in cols)],
            ["Aligned", *(_pct(v["lc_win_rate_aligned"]) + _ci(v["ci95"].get("lc_win_rate_aligned")) for v in cols)],
            ["Advantage", *(_pct(v["lc_advantage"], sign=True) + _ci(v["ci95"].get("lc_advantage"))
                            + (" ⚠" if v.get("lc_disagrees") else "") for v in cols)],
        ]
    if any("position_consistency" in v for v in vals):
        rows.append(["Position consistency", *(_pct(v.get("position_consistency")) for v in cols)])
    if any("head_to_head" in v for v in vals):
        rows.append(["Head to head vs draft: W / T / L",
                     *(f"{v['head_to_head']['wins']} / {v['head_to_head']['ties']} / {v['head_to_head']['losses']}"
                       if "head_to_head" in v else "" for v in cols)])
        rows.append(["Loses to its own draft", *(_pct(v["loses_to_draft_rate"])
                                                 + _ci(v["head_to_head"]["ci95"]["loss_rate"])
                                                 if "head_to_head" in v else "" for v in cols)])
    if "copy_rate" in vals[0]:
        rows.append(["Copy rate", *(_pct(v["copy_rate"]) if "copy_rate" in v else "" for v in cols)])
    parts.append(_table(["", *names], rows))
    names = [v["name"] for v in vals]
    parts.append("\nOutcomes (wins / ties / losses over the valid pairs; invalid and failed over all rows)\n\n")
    rows = []
    for side, label in (("original", "original"), ("aligned", corrector)):
        rows.append([f"{label}: W / T / L", *(f"{v[side]['wins']} / {v[side]['ties']} / {v[side]['losses']}"
                                               for v in vals)])
        rows.append([f"{label}: invalid", *(str(v[side]["invalid"]) for v in vals)])
        rows.append([f"{label}: failed", *(str(v[side]["failed"]) for v in vals)])
    parts.append(_table(["", *names], rows))
    return "".join(parts)


def _score_md(blocks: dict, average: dict | None = None) -> str:
    vals = list(blocks.values())
    names = [v["name"] for v in vals]
    ci = lambda v, k: _ci((v.get("ci95") or {}).get(k), pct=False)  # noqa: E731
    avg = ""
    if average and len(vals) > 1:
        avg = (f"\nAverage over the objectives: original {_num(average['mean_original'])}"
               f"{ci(average, 'mean_original')}, aligned {_num(average['mean_aligned'])}"
               f"{ci(average, 'mean_aligned')}, advantage {_num(average['advantage'], True)}"
               f"{ci(average, 'advantage')}.\n")
    return avg + ("\nScores 0–10 per response; advantage = mean aligned − mean original (95 % bootstrap interval).\n\n"
            + _table(["", *names], [
                ["Original mean", *(_num(v["mean_original"]) + ci(v, "mean_original") for v in vals)],
                ["Aligned mean", *(_num(v["mean_aligned"]) + ci(v, "mean_aligned") for v in vals)],
                ["Original median", *(_num(v["median_original"]) for v in vals)],
                ["Aligned median", *(_num(v["median_aligned"]) for v in vals)],
                ["**Advantage**", *(f"**{_num(v['advantage'], sign=True)}**" + ci(v, "advantage") for v in vals)],
                ["n", *(str(v["n"]) for v in vals)],
                ["invalid (original / aligned)", *(f"{v['original']['invalid']} / {v['aligned']['invalid']}"
                                                   for v in vals)],
                ["failed (original / aligned)", *(f"{v['original']['failed']} / {v['aligned']['failed']}"
                                                  for v in vals)],
            ]))


# ----------------------------------------------------------------------------- compare

def compare(dirs, out: str | Path | None = None) -> str:
    """``evaluate --compare DIR DIR ...``: the runs' headline figures side by side (markdown).

    One table per objective: per run, judge and corrector, the two win rates, the advantage with
    its interval, the paper's advantage and the length-controlled one (score mode: means).
    Written to ``out/compare.md`` when ``out`` is given.
    """
    if len(dirs) < 2:
        raise MetaAlignerError("--compare needs at least two output directories")
    runs = []
    for d in dirs:
        path = Path(d) / REPORT_JSON
        if not path.is_file():
            raise MetaAlignerError(f"{path}: not found (--compare reads the report.json of finished evaluate runs)")
        try:
            runs.append((str(d), json.loads(path.read_text(encoding="utf-8"))))
        except json.JSONDecodeError as e:
            raise MetaAlignerError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    keys = list(dict.fromkeys(k for _, r in runs for k in r["objectives"]))
    parts = ["# Evaluation runs compared\n\n",
             "".join(f"- `{d}`: {r['mode']}, judges {', '.join(r.get('judges', [r['judge']]))}, {r['rows']} rows, "
                     f"seed {r['seed']}{', swap' if r.get('swap') else ''}\n" for d, r in runs)]
    for key in keys:
        name = next(r["objectives"][key]["name"] for _, r in runs if key in r["objectives"])
        parts.append(f"\n## {name}\n\n")
        rows = []
        for d, r in runs:
            by_judge = r.get("by_judge") or {r["judge"]: {"correctors": {"aligned": r["objectives"]}}}
            for judge, data in by_judge.items():
                for corrector, blocks in data["correctors"].items():
                    b = blocks.get(key)
                    if b is None:
                        continue
                    if r["mode"] == "score":
                        rows.append([d, judge, corrector, _num(b["mean_original"]), _num(b["mean_aligned"]),
                                     _num(b["advantage"], True) + _ci((b.get("ci95") or {}).get("advantage"), False),
                                     "–", "–", str(b["n"])])
                    else:
                        rows.append([d, judge, corrector, _pct(b["win_rate_original"]), _pct(b["win_rate_aligned"]),
                                     _pct(b["advantage"], True) + _ci((b.get("ci95") or {}).get("advantage")),
                                     _pct(b.get("advantage_paper"), True), _pct(b.get("advantage_authors"), True),
                                     _pct(b.get("lc_advantage"), True), str(b["n"])])
        parts.append(_table(["run", "judge", "corrector", "original", "aligned", "advantage [95% CI]",
                             "advantage (paper)", "advantage (authors)", "advantage (LC)", "n"], rows))
    text = "".join(parts)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        with atomic_write(Path(out) / "compare.md") as fh:
            fh.write(text)
    return text


# ----------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_win_rates(judge: str, correctors: dict, path: Path) -> None:
    """Grouped bars per objective: the draft's and each corrector's win rate, 95 % intervals."""
    import numpy as np

    plt = _pyplot()
    names = list(correctors)
    keys = list(next(iter(correctors.values())))
    first = correctors[names[0]]
    series = [("original (draft)", [first[k]["win_rate_original"] for k in keys],
               [first[k].get("ci95", {}).get("win_rate_original") for k in keys])]
    for name in names:
        blocks = correctors[name]
        series.append((name, [blocks[k]["win_rate_aligned"] for k in keys],
                       [blocks[k].get("ci95", {}).get("win_rate_aligned") for k in keys]))
    x = np.arange(len(keys))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(keys) * len(series) / 2 + 2.5), 4))
    top = 100.0
    for j, (label, rates, cis) in enumerate(series):
        vals = [100 * (r or 0) for r in rates]
        lo = [max(0.0, v - 100 * c[0]) if c else 0 for v, c in zip(vals, cis)]
        hi = [max(0.0, 100 * c[1] - v) if c else 0 for v, c in zip(vals, cis)]
        bars = ax.bar(x - 0.4 + width * (j + 0.5), vals, width, yerr=[lo, hi], capsize=3, label=label,
                      color=_COLORS[j % len(_COLORS)])
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        top = max(top, *(v + h for v, h in zip(vals, hi)))
    ax.set_xticks(x, [first[k]["name"] for k in keys], rotation=20, ha="right")
    ax.set_ylabel("win rate vs golden (%), 95% CI")
    ax.set_ylim(0, top * 1.1)
    ax.set_title(f"Win rates judged by {judge}")
    ax.legend(frameon=False, fontsize=8)
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


def plot_score_density(title: str, sides: dict[str, list[float]], path: Path) -> None:
    """Density of the 0–10 scores of the draft and each corrector for one objective (paper Figure 2)."""
    import numpy as np

    plt = _pyplot()
    grid = np.linspace(0, 10, 201)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for j, (side, values) in enumerate(sides.items()):
        if values:
            color = _COLORS[j % len(_COLORS)]
            label = "original (draft)" if side == "original" else side
            ax.fill_between(grid, density(values, grid), alpha=0.35, color=color,
                            label=f"{label}: mean {np.mean(values):.2f}")
            ax.axvline(float(np.mean(values)), color=color, linestyle="--", linewidth=1)
    ax.set_xlim(0, 10)
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8, loc="best")
    fig.tight_layout()
    _save(fig, path)


def plot_length_change(changes: dict[str, list[int]], path: Path) -> None:
    """Histogram of the length change (corrected − draft, words) per corrector."""
    import numpy as np

    plt = _pyplot()
    allv = [v for vs in changes.values() for v in vs]
    lo, hi = min(allv), max(allv)
    bins = np.linspace(lo - 0.5, hi + 0.5, min(40, hi - lo + 2))
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for j, (name, values) in enumerate(changes.items()):
        ax.hist(values, bins=bins, alpha=0.5, color=_COLORS[(j + 1) % len(_COLORS)],
                label=f"{name}: mean {np.mean(values):+.1f}")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("length change, corrected − draft (words)")
    ax.set_ylabel("rows")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)
