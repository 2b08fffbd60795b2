"""The admins' dashboard figures (the app's Dashboard and ``annotate agreement --json``).

Pure functions over :class:`annotation.workflow.ItemScores`:

* ``objectives``: Krippendorff's ordinal alpha per objective with a 95% bootstrap interval
  (units, i.e. responses, resampled with replacement), over non-gold items;
* ``by_source``: the same alpha within each response source (model). Pooled alpha can hide
  that raters agree on *which model* is better but not within one model's responses;
* ``raters``: per rater, ratings made, agreement with the final labels (the consensus) and the
  mean absolute difference from the other raters' mean on the same response, gold accuracy;
* ``distribution``: how often each score was given, per objective;
* ``progress``: items, complete (k raters submitted), reviewed, waiting for review, gold;
* ``time``: median seconds per item, overall and per rater;
* ``alpha_by_batch``: alpha per objective within consecutive batches of items in the order they
  were completed (their last submission), so a change of serving order (a protocol's
  ``order: disagreement``) or of guidelines shows in the figures of later batches.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Sequence

from . import agreement as agreement_mod
from .workflow import ItemScores, final_label, gold_accuracy


DEFAULT_BATCH = 20  # items per batch of alpha_by_batch


def alpha_by_batch(items: list[ItemScores], keys: Sequence[str], domain: Sequence[int], completed_at: dict,
                   batch_size: int = DEFAULT_BATCH) -> dict:
    """Alpha per objective in batches of ``batch_size`` complete items, in order of completion."""
    done = sorted((it for it in items if it.complete and it.item_id in completed_at),
                  key=lambda it: (completed_at[it.item_id], it.item_id))
    batches = []
    for start in range(0, len(done), batch_size):
        chunk = done[start:start + batch_size]
        alphas = {}
        for key in keys:
            counts = agreement_mod.unit_counts([r.raters[key] for it in chunk for r in it.responses if key in r.raters],
                                               domain)
            a = agreement_mod.ordinal_alpha(counts)
            alphas[key] = a  # full precision: displays round
        batches.append({"batch": len(batches) + 1, "items": len(chunk),
                        "completed_until": completed_at[chunk[-1].item_id].isoformat(), "alpha": alphas})
    return {"batch_size": batch_size, "batches": batches}


def figures(items: list[ItemScores], order: Sequence[str], max_score: int, seconds, bootstrap: int = 1000,
            seed: int = 0, completed_at: dict | None = None, batch_size: int = DEFAULT_BATCH) -> dict:
    domain = list(range(max_score + 1))
    regular = [it for it in items if not it.is_gold]
    keys = list(dict.fromkeys([*order, *(o.key for it in items for o in it.protocol.objectives)]))

    def alpha_block(responses_by_key: dict[str, list[dict]], with_ci: bool) -> dict:
        out = {}
        for key in keys:
            units = responses_by_key.get(key, [])
            counts = agreement_mod.unit_counts(units, domain)
            annotators = {a for u in units for a in u}
            entry = {"alpha": agreement_mod.ordinal_alpha(counts), "units": int(counts.shape[0]),
                     "annotators": len(annotators)}
            if with_ci:
                entry["ci95"] = agreement_mod.bootstrap_interval(counts, bootstrap, seed) if entry["alpha"] is not None else None
            out[key] = entry
        return out

    pooled: dict[str, list[dict]] = defaultdict(list)
    by_source: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for it in regular:
        for r in it.responses:
            for key, scores in r.raters.items():
                pooled[key].append(scores)
                by_source[r.source or "(unknown)"][key].append(scores)

    # each rater against the consensus
    raters: dict[str, dict] = defaultdict(lambda: {"ratings": 0, "items": set(), "final_checked": 0, "final_equal": 0,
                                                   "diff_n": 0, "diff_sum": 0.0})
    distribution = {k: {str(s): 0 for s in domain} for k in keys}
    for it in regular:
        for r in it.responses:
            for key, scores in r.raters.items():
                final, decided, _ = final_label(r, key, it.protocol.review)
                for who, score in scores.items():
                    d = raters[who]
                    d["ratings"] += 1
                    d["items"].add(it.uid)
                    distribution.setdefault(key, {str(s): 0 for s in domain})
                    distribution[key][str(score)] = distribution[key].get(str(score), 0) + 1
                    if decided not in ("pending review", "unrated", "mean") and isinstance(final, int):
                        d["final_checked"] += 1
                        d["final_equal"] += int(score == final)
                    others = [s for a, s in scores.items() if a != who]
                    if others:
                        d["diff_n"] += 1
                        d["diff_sum"] += abs(score - sum(others) / len(others))
    gold = gold_accuracy(items)
    per_item_seconds: dict[str, list[float]] = defaultdict(list)
    for _item, who, secs in seconds:
        if secs:
            per_item_seconds[who].append(float(secs))
    rater_out = {}
    for who in sorted(set(raters) | set(gold) | set(per_item_seconds)):
        d = raters.get(who)
        rater_out[who] = {
            "ratings": d["ratings"] if d else 0,
            "items": len(d["items"]) if d else 0,
            "agreement_with_final": d["final_equal"] / d["final_checked"] if d and d["final_checked"] else None,
            "mean_abs_diff_from_others": d["diff_sum"] / d["diff_n"] if d and d["diff_n"] else None,
            "gold": gold.get(who),
            "median_seconds_per_item": statistics.median(per_item_seconds[who]) if per_item_seconds.get(who) else None,
        }
    all_seconds = [s for v in per_item_seconds.values() for s in v]
    progress = {
        "items": len(regular),
        "complete": sum(it.complete for it in regular),
        "reviewed": sum(it.reviewed for it in regular),
        "waiting_for_review": sum(it.needs_review and not it.reviewed for it in regular),
        "gold_items": len(items) - len(regular),
    }
    return {
        "objectives": alpha_block(pooled, True),
        "by_source": {src: alpha_block(block, False) for src, block in sorted(by_source.items())},
        "raters": rater_out,
        "distribution": distribution,
        "progress": progress,
        "time": {"median_seconds_per_item": statistics.median(all_seconds) if all_seconds else None},
        "bootstrap": {"resamples": bootstrap, "seed": seed, "unit": "response"},
        "alpha_by_batch": alpha_by_batch(regular, keys, domain, completed_at or {}, batch_size),
    }


def distribution_plot(distribution: dict, path) -> str:
    """A bar chart of the score distribution per objective, written as PNG; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(distribution)
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(3.2 * max(len(keys), 1), 2.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        scores = distribution[key]
        ax.bar(list(scores), list(scores.values()), color="#f97316")
        ax.set_title(key)
        ax.set_xlabel("score")
    axes[0][0].set_ylabel("ratings")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return str(path)
