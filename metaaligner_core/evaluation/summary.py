"""From one judge's verdicts to the figures of the report: per objective and corrector.

Pure computation over the plan (:func:`metaaligner_core.evaluation.plan_judgments`) and the
verdicts; no I/O. See :mod:`.metrics` for the outcome vocabulary and :mod:`.stats` for the
bootstrap and the length-controlled fit.
"""
from __future__ import annotations

import math

import numpy as np

from . import metrics, stats
from .metrics import FAILED, INVALID, LOSS, TIE, VALID, WIN

_ORDINAL = {LOSS: 0, TIE: 1, WIN: 2}  # a response's result against the golden answer, as an ordinal


def _single(verdicts, prompt, reference_at, mode):
    v = verdicts[prompt]
    if v.status != "ok":
        return FAILED if v.status == "failed" else INVALID
    return v.value if mode == "score" else metrics.pairwise_outcome(v.value, reference_at)


def _outcome(verdicts, entries, mode):
    outs = [_single(verdicts, p, g, mode) for p, g in entries]
    return metrics.swap_outcome(*outs) if len(outs) == 2 else outs[0]


def _is_score(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _sign(x: float | None) -> int | None:
    if x is None:
        return None
    return 0 if abs(x) < 1e-9 else (1 if x > 0 else -1)


# The win-rate definitions (metrics.win_rates): key suffix -> (numerator, denominator) per row
# from the two outcomes of a pair; "" is valid-only.
DEFINITIONS = ("", "_paper", "_authors", "_ties_half")


def _indicators(o: str, a: str, suffix: str) -> tuple[float, float, float]:
    """(original's numerator, correction's numerator, denominator) of one row under a definition."""
    valid = float(o in VALID and a in VALID)
    judged = float(FAILED not in (o, a))
    if suffix == "":
        return valid * (o == WIN), valid * (a == WIN), valid
    if suffix == "_paper":
        return judged * (o == WIN), judged * (a == WIN), judged
    if suffix == "_authors":
        return judged * (o in (WIN, TIE)), judged * (a in (WIN, TIE)), judged
    half = {WIN: 1.0, TIE: 0.5}
    return valid * half.get(o, 0.0), valid * half.get(a, 0.0), valid


_PREFERENCE = {WIN: 1.0, TIE: 0.5, LOSS: 0.0}  # the length-controlled fit's target (AlpacaEval's)


class _Columns:
    """Ratio statistics to bootstrap jointly: named (numerator, denominator) columns over rows."""

    def __init__(self, n: int):
        self.n, self.num, self.den, self.index = n, [], [], {}

    def add(self, name, num, den) -> None:
        self.index[name] = len(self.num)
        self.num.append(np.asarray(num, dtype=float))
        self.den.append(np.asarray(den, dtype=float))

    def matrices(self):
        if not self.num:
            return np.zeros((self.n, 0)), np.zeros((self.n, 0))
        return np.stack(self.num, axis=1), np.stack(self.den, axis=1)


def summarise(rows, objectives, correctors, plan, verdicts, mode: str, swap: bool, head_to_head: bool,
              n_resamples: int, seed: int, behaviour: dict | None = None) -> dict:
    """One judge's figures: ``{"correctors": {name: {objective key: block}}, "average": {name: block},
    "position_consistency", "length_control", "failures", "invalid", "scores", "outcomes"}``.

    Every interval comes from one paired resampling of the queries shared by all objectives,
    correctors and definitions (:func:`stats.joint_bootstrap`), so the average over objectives
    has an interval too. ``behaviour`` is :func:`metrics.correction_behaviour` per corrector
    (computed here when not given)."""
    n = len(rows)
    sides = ["original", *[c.name for c in correctors]]
    side_id = {"original": "original", **{c.name: c.side for c in correctors}}
    texts = {"original": [r["draft"] for _, r in rows],
             **{c.name: [r["responses"][c.name] for _, r in rows] for c in correctors}}
    golden_chars = [len(r["golden"]) for _, r in rows]
    if behaviour is None:
        behaviour = {c.name: metrics.correction_behaviour(texts["original"], texts[c.name], []) for c in correctors}

    out = {"correctors": {c.name: {} for c in correctors}, "average": {}, "position_consistency": {},
           "length_control": {c.name: {} for c in correctors}, "failures": [], "invalid": 0, "scores": {},
           "outcomes": {}}
    cols = _Columns(n)
    lc_problems: list[tuple[tuple, stats.LCProblem]] = []
    results = {}
    for obj in objectives:
        k = obj.key
        res = {s: [_outcome(verdicts, plan[("golden", i, k, s)], mode) for i in range(n)] for s in sides}
        results[k] = res
        h2h = ({c.name: [_outcome(verdicts, plan[("draft", i, k, c.name)], mode) for i in range(n)]
                for c in correctors} if head_to_head else {})
        for kind, table in (("golden", res), ("draft", h2h)):
            for s, col in table.items():
                for i, o in enumerate(col):
                    if o == INVALID:
                        out["invalid"] += 1
                    elif o == FAILED:
                        error = next(verdicts[p].error for p, _ in plan[(kind, i, k, s)]
                                     if verdicts[p].status == "failed")
                        out["failures"].append({"row": i, "line": rows[i][0], "objective": k, "side": side_id[s],
                                                **({} if s == "original" else {"corrector": s}),
                                                **({"kind": "head_to_head"} if kind == "draft" else {}),
                                                "error": error})
        if mode == "score":
            out["scores"][k] = {s: [x for x in res[s] if _is_score(x)] for s in sides}
            out["outcomes"].update({(k, s): [x if _is_score(x) else None for x in res[s]] for s in sides})
            for c in correctors:
                ok = [float(_is_score(o) and _is_score(a)) for o, a in zip(res["original"], res[c.name])]
                for side, col in (("original", res["original"]), ("aligned", res[c.name])):
                    cols.add((c.name, k, f"mean_{side}"), [v * (x if _is_score(x) else 0.0)
                                                          for v, x in zip(ok, col)], ok)
                out["correctors"][c.name][k] = _score_block(obj, res["original"], res[c.name], behaviour[c.name])
            continue

        out["outcomes"].update({(k, s): [_ORDINAL.get(x) for x in res[s]] for s in sides})
        if swap:
            pairs = [tuple(_single(verdicts, p, g, mode) for p, g in plan[("golden", i, k, s)])
                     for s in sides for i in range(n)]
            out["position_consistency"][k] = metrics.position_consistency(pairs)
        for c in correctors:
            o_col, a_col = res["original"], res[c.name]
            for suffix in DEFINITIONS:
                ind = [_indicators(o, a, suffix) for o, a in zip(o_col, a_col)]
                cols.add((c.name, k, f"win_rate_original{suffix}"), [x[0] for x in ind], [x[2] for x in ind])
                cols.add((c.name, k, f"win_rate_aligned{suffix}"), [x[1] for x in ind], [x[2] for x in ind])
            paired = [i for i, (o, a) in enumerate(zip(o_col, a_col)) if o in VALID and a in VALID]
            for side, col, name in (("original", o_col, "original"), ("aligned", a_col, c.name)):
                problem = stats.LCProblem(paired, [_PREFERENCE[col[i]] for i in paired],
                                          [len(texts[name][i]) - golden_chars[i] for i in paired])
                lc_problems.append(((c.name, k, side), problem))
            out["correctors"][c.name][k] = _pairwise_block(obj, o_col, a_col, behaviour[c.name], h2h.get(c.name),
                                                            out["position_consistency"].get(k), n_resamples, seed)

    num, den = cols.matrices()
    ratios, lc = stats.joint_bootstrap(num, den, n_resamples, seed, [p for _, p in lc_problems])
    draws = {name: ratios[:, j] for name, j in cols.index.items()}
    draws.update({("lc",) + key: lc[:, j] for j, (key, _) in enumerate(lc_problems)})
    fits = {key: p for key, p in lc_problems}
    for c in correctors:
        blocks = out["correctors"][c.name]
        for k, block in blocks.items():
            if mode == "score":
                block["ci95"] = _intervals({"mean_original": draws[(c.name, k, "mean_original")],
                                            "mean_aligned": draws[(c.name, k, "mean_aligned")]},
                                           {"advantage": ("mean_aligned", "mean_original")})
                continue
            lo, la = fits[(c.name, k, "original")], fits[(c.name, k, "aligned")]
            _add_lc(block, lo.rate, la.rate)
            for side, fit in (("original", lo), ("aligned", la)):
                if fit.coef == [0.0, 0.0]:
                    block["flags"].append(f"the length-controlled fit of the {side} side is 50 %: the cross-validated "
                                          f"L1 penalty removed both coefficients ({fit.n} rows carry too little "
                                          f"information)")
            out["length_control"][c.name][k] = {"original": lo.as_dict(), "aligned": la.as_dict()}
            series = {f"win_rate_{side}{suffix}": draws[(c.name, k, f"win_rate_{side}{suffix}")]
                      for suffix in DEFINITIONS for side in ("original", "aligned")}
            series["lc_win_rate_original"] = draws[("lc", c.name, k, "original")]
            series["lc_win_rate_aligned"] = draws[("lc", c.name, k, "aligned")]
            block["ci95"] = _intervals(series, _differences())
        if blocks:
            out["average"][c.name] = _average(blocks, draws, c.name, mode, n)
    return out


def _differences() -> dict:
    diffs = {f"advantage{suffix}": (f"win_rate_aligned{suffix}", f"win_rate_original{suffix}")
             for suffix in DEFINITIONS}
    diffs["lc_advantage"] = ("lc_win_rate_aligned", "lc_win_rate_original")
    return diffs


def _intervals(series: dict, differences: dict) -> dict:
    ci = {name: stats.percentile_interval(x) for name, x in series.items()}
    for name, (a, b) in differences.items():
        ci[name] = stats.percentile_interval(series[a] - series[b])
    return ci


def _add_lc(block: dict, lo, la) -> None:
    block["lc_win_rate_original"], block["lc_win_rate_aligned"] = lo, la
    block["lc_advantage"] = None if lo is None or la is None else la - lo
    raw, lc = _sign(block["advantage"]), _sign(block["lc_advantage"])
    disagree = raw is not None and lc is not None and raw * lc < 0  # opposite signs
    if disagree:
        block["flags"].append(f"raw and length-controlled results disagree: advantage {block['advantage']:+.3f} "
                              f"raw, {block['lc_advantage']:+.3f} length-controlled")
    block["lc_disagrees"] = disagree


def _average(blocks: dict, draws: dict, corrector: str, mode: str, n: int) -> dict:
    """The paper's "Avg.": every rate averaged over the objectives; its interval from the same
    joint resampling (the average of the objectives' rates in each resample)."""
    keys = list(blocks)
    if mode == "score":
        rates = ["mean_original", "mean_aligned"]
        diffs = {"advantage": ("mean_aligned", "mean_original")}
        draw_key = lambda k, r: (corrector, k, r)  # noqa: E731
    else:
        rates = [f"win_rate_{side}{suffix}" for suffix in DEFINITIONS for side in ("original", "aligned")]
        rates += ["lc_win_rate_original", "lc_win_rate_aligned"]
        diffs = _differences()
        draw_key = lambda k, r: (("lc", corrector, k, r[3:].replace("win_rate_", "")) if r.startswith("lc_")  # noqa: E731
                                 else (corrector, k, r))
    avg = {"name": "Average", "objectives": keys, "rows": n}
    for r in rates:
        vals = [blocks[k].get(r) for k in keys]
        avg[r] = None if any(v is None for v in vals) else float(np.mean(vals))
    for d, (a, b) in diffs.items():
        avg[d] = None if avg[a] is None or avg[b] is None else avg[a] - avg[b]
    series = {r: np.mean(np.stack([draws[draw_key(k, r)] for k in keys]), axis=0) for r in rates}
    avg["ci95"] = _intervals(series, diffs)
    return avg


def _pairwise_block(obj, original, aligned, behaviour, h2h, consistency, n_resamples, seed) -> dict:
    block = {"name": obj.name, "text": obj.text, **metrics.win_rates(original, aligned)}
    block["copy_rate"] = behaviour["copy_rate"]
    block["length_change_words"] = behaviour["length"]["mean_change"]
    block["flags"] = []
    if consistency is not None:
        block["position_consistency"] = consistency["rate"]
    if h2h is not None:
        hh = metrics.outcome_rates(h2h)
        valid = [o for o in h2h if o in VALID]
        means = stats.bootstrap_means([[float(o == WIN) for o in valid], [float(o == LOSS) for o in valid]],
                                      n_resamples, seed) if valid else None
        hh["ci95"] = ({"win_rate": stats.percentile_interval(means[:, 0]),
                       "loss_rate": stats.percentile_interval(means[:, 1])} if valid else
                      {"win_rate": None, "loss_rate": None})
        block["head_to_head"] = hh
        block["loses_to_draft_rate"] = hh["loss_rate"]
    return block


def _score_block(obj, original, aligned, behaviour) -> dict:
    summary = metrics.score_summary(original, aligned)
    summary.pop("scores_original"), summary.pop("scores_aligned")
    block = {"name": obj.name, "text": obj.text, **summary}
    block["copy_rate"] = behaviour["copy_rate"]
    block["length_change_words"] = behaviour["length"]["mean_change"]
    block["flags"] = []
    return block


def judge_agreement(per_judge: dict, objectives, mode: str) -> dict:
    """Agreement between judges per objective: Krippendorff's alpha over all judges (ordinal on
    loss < tie < win against the golden answer; interval on 0–10 scores) and, per pair of judges,
    the share of identical verdicts (scores: Spearman's rho)."""
    names = list(per_judge)
    level = "interval" if mode == "score" else "ordinal"
    result = {"level": level, "units": "each response (draft and corrections) of each row, per objective",
              "objectives": {}}
    for obj in objectives:
        k = obj.key
        keys = sorted({key for key in per_judge[names[0]]["outcomes"] if key[0] == k}, key=str)
        series = {name: [v for key in keys for v in per_judge[name]["outcomes"][key]] for name in names}
        matrix = np.array([[np.nan if v is None else float(v) for v in series[name]] for name in names])
        units = int((np.sum(~np.isnan(matrix), axis=0) >= 2).sum()) if matrix.size else 0
        pairs = {}
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                x, y = series[names[a]], series[names[b]]
                both = [(p, q) for p, q in zip(x, y) if p is not None and q is not None]
                entry = {"n": len(both)}
                if mode == "score":
                    entry["spearman"] = stats.spearman([p for p, _ in both], [q for _, q in both])
                else:
                    entry["agreement"] = stats.percent_agreement(x, y)
                pairs[f"{names[a]} | {names[b]}"] = entry
        alpha = stats.krippendorff_alpha(matrix, level)
        result["objectives"][k] = {"alpha": None if alpha is None or math.isnan(alpha) else alpha,
                                   "units": units, "pairs": pairs}
    return result
