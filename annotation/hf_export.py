"""``annotate export --format hf``: a Hugging Face ``datasets`` folder with a dataset card.

The folder is ``DatasetDict.save_to_disk`` output (splits ``ratings``, ``final``, ``pairs``, each
present even when empty) plus ``README.md``, a dataset card stating the protocol and its version,
the raters, agreement per objective and the counts. The card's YAML lists the splits'
files under ``configs:``, so both ``datasets.load_dataset(DIR)`` and
``datasets.load_from_disk(DIR)`` read every split back.

Every split has the same explicit schema (:data:`FEATURES`), fixed in code and independent of
the data: a column whose values are all empty is still typed (no ``Value("null")``), so two
exports of one study always concatenate, and one config can hold all three splits. The columns
a split does not use are null in it (:data:`SPLIT_COLUMNS` says which are used). Per-objective
maps (raters' scores and notes, pair labels, objective texts) are JSON strings, as
``build-dataset`` reads them.

``--push-to-hub REPO`` uploads the same splits and card; without a network (or with
``HF_HUB_OFFLINE=1``) it fails with one line and leaves the folder in place. The folder is
owner-only (0700, files 0600), as the database is.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from metaaligner_core.errors import MetaAlignerError


MIN_UNITS_FOR_INTERVAL = 10  # fewer responses: the bootstrap interval is shown as too few to read

# Columns of each split, in order; the stored schema is their union (FEATURES).
SPLIT_COLUMNS = {
    "ratings": ("item_id", "query", "response", "source", "annotator", "objective", "score", "note", "seconds",
                "protocol", "protocol_version", "gold"),
    "final": ("item_id", "query", "response", "source", "objective", "ratings", "notes", "final_score",
              "decided_by", "reason", "protocol", "protocol_version", "gold"),
    "pairs": ("item_id", "query", "response_1", "response_2", "labels", "objectives"),
}
_TYPES = {"score": "int32", "seconds": "float64", "final_score": "float64", "gold": "bool"}
_JSON = ("ratings", "notes", "labels", "objectives")  # per-objective maps, as JSON text
COLUMNS = tuple(dict.fromkeys(c for cols in SPLIT_COLUMNS.values() for c in cols))
NOT_REVIEWED = ("agreement", "mean", "pending review", "unrated")


def features():
    """The one schema of every split (``datasets.Features``)."""
    from datasets import Features, Value

    return Features({c: Value(_TYPES.get(c, "string")) for c in COLUMNS})


def _row(rec: dict, split: str) -> dict:
    used = SPLIT_COLUMNS[split]
    out = dict.fromkeys(COLUMNS)
    for c in used:
        v = rec.get(c)
        if c in _JSON and v is not None and not isinstance(v, str):
            v = json.dumps(v, ensure_ascii=False, sort_keys=False)
        elif c in ("seconds", "final_score") and v is not None:
            v = float(v)
        out[c] = v
    return out


def _yaml_configs() -> list[str]:
    lines = ["configs:", "- config_name: default", "  data_files:"]
    for split in SPLIT_COLUMNS:
        lines += [f"  - split: {split}", f"    path: {split}/data-*.arrow"]
    return lines


def _card(protocols: list[dict], ratings: list[dict], final: list[dict], pairs: list[dict], dash: dict) -> str:
    raters = sorted({r["annotator"] for r in ratings})
    pending = sum(1 for f in final if f["decided_by"] == "pending review")
    examined = sum(1 for f in final if f["decided_by"] not in NOT_REVIEWED)
    lines = ["---", "license: other", "task_categories:", "- text-classification", "tags:", "- human-annotation",
             "- metaaligner", *_yaml_configs(), "---", "",
             "# Expert ratings exported from MetaAligner's annotation store", ""]
    for p in protocols:
        lines.append(f"- **Protocol** `{p['name']}`, version `{p['version']}`: {p['title']}"
                     + (f" (source: {p['source']})" if p.get("source") else ""))
    lines += ["", f"- **Raters** ({len(raters)}): {', '.join(raters) if raters else 'none'}",
              f"- **Counts**: {len(ratings)} ratings, {len({r['item_id'] for r in ratings})} items, "
              f"{len(final)} final-label rows ({examined} set by an examiner, {pending} awaiting review), "
              f"{len(pairs)} preference pairs",
              f"- **Awaiting review**: {pending} rows of `final` have `decided_by` = `pending review`: the "
              "raters disagreed and no examiner has decided yet, so `final_score` is null there. They are not "
              "final labels; filter them out (or wait for the review) before training on `final`.",
              "", "## Agreement (Krippendorff's alpha, ordinal)", "",
              "| objective | alpha | 95% bootstrap interval | units (responses) | raters |", "|---|---|---|---|---|"]
    for key, a in dash["objectives"].items():
        ci, alpha, units = a.get("ci95"), a["alpha"], a["units"]
        alpha_s = "n/a" if alpha is None else f"{alpha:.3f}"
        if units < MIN_UNITS_FOR_INTERVAL:
            ci_s = f"too few responses to read ({units} < {MIN_UNITS_FOR_INTERVAL})"
        else:
            ci_s = "n/a" if not ci else f"{ci[0]:.3f} – {ci[1]:.3f}"
        lines.append(f"| {key} | {alpha_s} | {ci_s} | {units} | {a['annotators']} |")
    lines += ["", "## Splits", "",
              "All three splits share one schema, so that `datasets.load_dataset(DIR)` loads them together; "
              "in each split the columns it does not use are null.", "",
              "- `ratings`: one row per submitted rating (" + _cols("ratings") + ").",
              "- `final`: one row per response and objective (" + _cols("final") + "): every rater's score "
              "(`ratings`, JSON), the final score and who decided it (`decided_by`: an examiner's name, "
              "`agreement`, `mean` or `pending review`), with the examiner's `reason`.",
              "- `pairs`: preference pairs in MetaAligner's generic format (" + _cols("pairs") + "; `labels` per "
              "objective and `objectives` with each objective's text, both JSON), input to "
              "`metaaligner build-dataset --source generic`.",
              "", "Load with `datasets.load_dataset(DIR)` (or `datasets.load_from_disk(DIR)`).", ""]
    return "\n".join(lines)


def _cols(split: str) -> str:
    return ", ".join(f"`{c}`" for c in SPLIT_COLUMNS[split])


def _owner_only(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        os.chmod(path, 0o700 if path.is_dir() else 0o600)


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
    if not ratings:
        raise MetaAlignerError("nothing to export: no submitted ratings" + (f" for protocol {protocol}" if protocol else ""))
    schema = features()
    dd = DatasetDict({name: Dataset.from_list([_row(r, name) for r in rows], features=schema)
                      for name, rows in (("ratings", ratings), ("final", final), ("pairs", pairs))})
    card = _card(protocols, ratings, final, pairs, dash)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    dd.save_to_disk(str(tmp))
    (tmp / "README.md").write_text(card, encoding="utf-8")
    _owner_only(tmp)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    if push_to_hub:
        _push(dd, card, push_to_hub, out)
    return len(ratings)


def _push(dd, card: str, repo: str, out: Path) -> None:
    from huggingface_hub import constants

    if constants.is_offline_mode():  # HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), as the hub client reads it
        raise MetaAlignerError(f"--push-to-hub {repo}: HF_HUB_OFFLINE is set (offline mode); the dataset is saved in {out} "
                               "(push it later from a machine online)")
    try:
        from huggingface_hub import DatasetCard

        dd.push_to_hub(repo)
        DatasetCard(card).push_to_hub(repo)
    except Exception as e:  # offline, no token, no permission: one line, the folder stays
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise MetaAlignerError(f"--push-to-hub {repo}: could not upload ({type(e).__name__}: {reason}); "
                               f"the dataset is saved in {out}; check the network and `huggingface-cli login`") from None
