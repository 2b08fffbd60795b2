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


def summarise(rows, objectives, correctors, plan, verdicts, mode: str, swap: bool, head_to_head: bool,
              n_resamples: int, seed: int, behaviour: dict | None = None) -> dict:
    """One judge's figures: ``{"correctors": {name: {objective key: block}}, "position_consistency",
    "length_control", "failures", "invalid", "scores", "outcomes"}``. ``behaviour`` is
    :func:`metrics.correction_behaviour` per corrector (computed here when not given)."""
    n = len(rows)
    sides = ["original", *[c.name for c in correctors]]
    side_id = {"original": "original", **{c.name: c.side for c in correctors}}
    texts = {"original": [r["draft"] for _, r in rows],
             **{c.name: [r["responses"][c.name] for _, r in rows] for c in correctors}}
    golden_words = [metrics.words(r["golden"]) for _, r in rows]
    if behaviour is None:
        behaviour = {c.name: metrics.correction_behaviour(texts["original"], texts[c.name], []) for c in correctors}

    out = {"correctors": {c.name: {} for c in correctors}, "position_consistency": {}, "length_control": {},
           "failures": [], "invalid": 0, "scores": {}, "outcomes": {}}
    for obj in objectives:
        k = obj.key
        res = {s: [_outcome(verdicts, plan[("golden", i, k, s)], mode) for i in range(n)] for s in sides}
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
                out["correctors"][c.name][k] = _score_block(obj, res["original"], res[c.name], behaviour[c.name],
                                                            n_resamples, seed)
            continue

        out["outcomes"].update({(k, s): [_ORDINAL.get(x) for x in res[s]] for s in sides})
        if swap:
            pairs = [tuple(_single(verdicts, p, g, mode) for p, g in plan[("golden", i, k, s)])
                     for s in sides for i in range(n)]
            out["position_consistency"][k] = metrics.position_consistency(pairs)
        fit = stats.length_controlled_win_rates({
            s: ([float(o == WIN) for o in res[s] if o in VALID],
                [metrics.words(texts[s][i]) - golden_words[i] for i, o in enumerate(res[s]) if o in VALID])
            for s in sides})
        out["length_control"][k] = {"beta": fit["beta"], "sd_words": fit["sd"], "n": fit["n"],
                                    "win_rates": fit["win_rates"]}
        for c in correctors:
            block = _pairwise_block(obj, res["original"], res[c.name], fit, c.name, behaviour[c.name],
                                    h2h.get(c.name), out["position_consistency"].get(k), n_resamples, seed)
            out["correctors"][c.name][k] = block
    return out


def _pairwise_block(obj, original, aligned, fit, name, behaviour, h2h, consistency, n_resamples, seed) -> dict:
    block = {"name": obj.name, "text": obj.text, **metrics.win_rates(original, aligned)}
    paired = [(o, a) for o, a in zip(original, aligned) if o in VALID and a in VALID]
    block["ci95"] = stats.paired_intervals([float(o == WIN) for o, _ in paired],
                                           [float(a == WIN) for _, a in paired], n_resamples, seed)
    lo, la = fit["win_rates"].get("original"), fit["win_rates"].get(name)
    block["lc_win_rate_original"], block["lc_win_rate_aligned"] = lo, la
    block["lc_advantage"] = None if lo is None or la is None else la - lo
    block["copy_rate"] = behaviour["copy_rate"]
    block["length_change_words"] = behaviour["length"]["mean_change"]
    flags = []
    raw, lc = _sign(block["advantage"]), _sign(block["lc_advantage"])
    if raw is not None and lc is not None and raw != lc:
        flags.append(f"raw and length-controlled results disagree: advantage {block['advantage']:+.3f} raw, "
                     f"{block['lc_advantage']:+.3f} length-controlled")
    block["lc_disagrees"] = bool(flags)
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
    block["flags"] = flags
    return block


def _score_block(obj, original, aligned, behaviour, n_resamples, seed) -> dict:
    summary = metrics.score_summary(original, aligned)
    so, sa = summary.pop("scores_original"), summary.pop("scores_aligned")
    block = {"name": obj.name, "text": obj.text, **summary}
    if so:
        means = stats.bootstrap_means([so, sa], n_resamples, seed)
        block["ci95"] = {"mean_original": stats.percentile_interval(means[:, 0]),
                         "mean_aligned": stats.percentile_interval(means[:, 1]),
                         "advantage": stats.percentile_interval(means[:, 1] - means[:, 0])}
    else:
        block["ci95"] = {"mean_original": None, "mean_aligned": None, "advantage": None}
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
