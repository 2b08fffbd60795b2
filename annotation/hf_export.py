"""``annotate export --format hf``: a Hugging Face ``datasets`` folder with a dataset card.

The folder is ``DatasetDict.save_to_disk`` output (splits ``ratings``, ``final``, ``pairs``; a
split with no rows is left out) plus ``README.md``, a dataset card stating the protocol and its
version, the raters, agreement per objective and the counts. ``datasets.load_from_disk(DIR)``
reads it back. ``--push-to-hub REPO`` uploads the same splits and card; without a network (or
with ``HF_HUB_OFFLINE=1``) it fails with one line and leaves the folder in place.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from metaaligner_core.errors import MetaAlignerError


def _card(protocols: list[dict], ratings: list[dict], final: list[dict], pairs: list[dict], dash: dict) -> str:
    raters = sorted({r["annotator"] for r in ratings})
    lines = ["---", "license: other", "task_categories:", "- text-classification", "tags:", "- human-annotation",
             "- metaaligner", "---", "", "# Expert ratings exported from MetaAligner's annotation store", ""]
    for p in protocols:
        lines.append(f"- **Protocol** `{p['name']}`, version `{p['version']}`: {p['title']}"
                     + (f" (source: {p['source']})" if p.get("source") else ""))
    lines += ["", f"- **Raters** ({len(raters)}): {', '.join(raters) if raters else 'none'}",
              f"- **Counts**: {len(ratings)} ratings, {len({r['item_id'] for r in ratings})} items, "
              f"{len(final)} final labels ({sum(1 for f in final if f['decided_by'] not in ('agreement', 'mean', 'pending review', 'unrated'))} set by an examiner), "
              f"{len(pairs)} preference pairs", "", "## Agreement (Krippendorff's alpha, ordinal)", "",
              "| objective | alpha | 95% bootstrap interval | units (responses) | raters |", "|---|---|---|---|---|"]
    for key, a in dash["objectives"].items():
        ci, alpha = a.get("ci95"), a["alpha"]
        alpha_s = "n/a" if alpha is None else f"{alpha:.3f}"
        ci_s = "n/a" if not ci else f"{ci[0]:.3f} – {ci[1]:.3f}"
        lines.append(f"| {key} | {alpha_s} | {ci_s} | {a['units']} | {a['annotators']} |")
    lines += ["", "## Splits", "",
              "- `ratings`: one row per submitted rating (`annotator`, `objective`, `score`, `protocol_version`, ...).",
              "- `final`: one row per response and objective: every rater's score (`ratings`, JSON), the "
              "final score and who decided it (`decided_by`: an examiner's name, `agreement`, `mean` or "
              "`pending review`), with the examiner's `reason`.",
              "- `pairs`: preference pairs in MetaAligner's generic format (`labels` per objective, "
              "`objectives` with each objective's text), input to `metaaligner build-dataset --source generic`.",
              "", "Load with `datasets.load_from_disk(DIR)`.", ""]
    return "\n".join(lines)


def export_hf(store, actor, out, protocol: str | None = None, push_to_hub: str | None = None) -> int:
    from datasets import Dataset, DatasetDict

    from .models import ProtocolRow
    from sqlalchemy import select

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MetaAlignerError(f"--out {out}: exists and is not an empty folder (hf export writes a new folder)")
    ratings = store.rating_records(actor, protocol)
    final = store.final_records(actor, protocol)
    pairs = store.pair_records(actor, protocol)
    dash = store.dashboard(actor, protocol, bootstrap=1000)
    with store._session() as s:
        q = select(ProtocolRow.name, ProtocolRow.version, ProtocolRow.title, ProtocolRow.spec)
        if protocol:
            q = q.where(ProtocolRow.name == protocol)
        protocols = [{"name": n, "version": v or "unversioned", "title": t, "source": (sp or {}).get("source")}
                     for n, v, t, sp in s.execute(q)]
    for row in final:
        row["ratings"] = json.dumps(row["ratings"], ensure_ascii=False)
        row["notes"] = json.dumps(row["notes"], ensure_ascii=False)
        if row["final_score"] is not None:
            row["final_score"] = float(row["final_score"])
    splits = {name: Dataset.from_list(rows) for name, rows in (("ratings", ratings), ("final", final), ("pairs", pairs))
              if rows}
    if not splits:
        raise MetaAlignerError("nothing to export: no submitted ratings" + (f" for protocol {protocol}" if protocol else ""))
    dd = DatasetDict(splits)
    card = _card(protocols, ratings, final, pairs, dash)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    dd.save_to_disk(str(tmp))
    (tmp / "README.md").write_text(card, encoding="utf-8")
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    if push_to_hub:
        _push(dd, card, push_to_hub, out)
    return len(ratings)


def _push(dd, card: str, repo: str, out: Path) -> None:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise MetaAlignerError(f"--push-to-hub {repo}: HF_HUB_OFFLINE is set; the dataset is saved in {out} "
                               "(push it later from a machine online)")
    try:
        from huggingface_hub import DatasetCard

        dd.push_to_hub(repo)
        DatasetCard(card).push_to_hub(repo)
    except Exception as e:  # offline, no token, no permission: one line, the folder stays
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise MetaAlignerError(f"--push-to-hub {repo}: could not upload ({type(e).__name__}: {reason}); "
                               f"the dataset is saved in {out}; check the network and `huggingface-cli login`") from None
