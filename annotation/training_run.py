"""From a study's final labels to a trained aligner (``metaaligner annotate train``, the app's Train tab).

The paper's loop, in one step: final labels (the examiner's score where an item was reviewed)
→ preference pairs → Algorithm 1 (``build-dataset``: objective texts from the protocol, warm-up
on) → three-stage training (``train``; LoRA unless ``--no-lora``). Both steps run as the exact
``metaaligner`` commands recorded in ``DIR/commands.sh``, so a run can be repeated by hand.

``DIR`` holds, besides what ``train`` writes there (``config.json``, ``metrics.jsonl``,
``<stage>/``, ``final/``):

    pairs.jsonl     the pairs trained on (generic preference format, with the objectives' texts)
    dataset/        the build-dataset output (preference/equal/warmup.jsonl, stats.json)
    stats.json      a copy of the dataset's stats.json
    commands.sh     the build-dataset and train commands that ran
    study.json      protocol name and version, the options, counts, the items trained on and
                    the items held out (``annotate ab`` takes its queries from those)
    progress.json   stage, step and the stage's step count while training (the app's progress bar)

Rerunning the same command resumes: the pairs and dataset of the first run are kept (new
ratings since then do not change a run in progress), and ``train`` resumes its stages.

Which pairs count: items of the protocol that are not gold, not A/B items, complete (k raters
submitted), and not waiting for the examiner; per objective, both responses' final labels
(:func:`annotation.workflow.final_label`).
"""
from __future__ import annotations

import json
import logging
import random
import shlex
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path
from typing import Sequence

from sqlalchemy import select

from metaaligner_core.errors import MetaAlignerError
from metaaligner_core.io import atomic_write, write_jsonl

from . import accounts, workflow
from .models import ABResponse, ProtocolRow
from .workflow import ItemScores, final_label

log = logging.getLogger(__name__)

DEFAULT_MIN_PAIRS = 32
STUDY_FILE = "study.json"
PROGRESS_FILE = "progress.json"
DATASET_DIR = "dataset"
# Options of a run that decide what it trains on; a rerun into the same DIR must repeat them.
RUN_KEYS = ("protocol", "template", "warmup_size", "holdout", "seed")


# ----------------------------------------------------------------------------- pure: pairs from final labels

def ready(item: ItemScores) -> bool:
    """Whether an item's labels are final: complete, and reviewed wherever the rule asked for it."""
    return item.complete and not (item.needs_review and not item.reviewed)


def final_pairs(items: Sequence[ItemScores]) -> list[dict]:
    """Generic preference records from final labels: every pair of a ready item's responses (in
    import order), per objective both have a final label for; each with the objectives' texts."""
    out = []
    for it in items:
        if not ready(it):
            continue
        texts = {o.key: o.text for o in it.protocol.objectives}
        for r1, r2 in combinations(it.responses, 2):
            labels = {}
            for key in texts:
                a = final_label(r1, key, it.protocol.review)[0]
                b = final_label(r2, key, it.protocol.review)[0]
                if a is None or b is None:
                    continue
                labels[key] = ">" if a > b else "<" if a < b else "="
            if labels:
                out.append({"query": it.query, "response_1": r1.text, "response_2": r2.text, "labels": labels,
                            "objectives": {k: texts[k] for k in labels}, "item_id": it.uid})
    return out


def study_counts(items: Sequence[ItemScores], pairs: Sequence[dict]) -> dict:
    """What the refusal message and the Train tab show."""
    return {"items": len(items), "ready": sum(ready(it) for it in items),
            "short_of_raters": sum(not it.complete for it in items),
            "waiting_for_review": sum(it.complete and it.needs_review and not it.reviewed for it in items),
            "pairs": len(pairs), "pair_items": len({p["item_id"] for p in pairs})}


def hold_out(pairs: list[dict], n: int, seed: int) -> tuple[list[dict], list[str]]:
    """Set aside ``n`` items (seeded) whose pairs are not trained on; returns (pairs kept, held-out uids)."""
    uids = sorted({p["item_id"] for p in pairs})
    held = sorted(random.Random(seed).sample(uids, min(n, len(uids)))) if n > 0 else []
    gone = set(held)
    return [p for p in pairs if p["item_id"] not in gone], held


# ----------------------------------------------------------------------------- the study, from the store

@dataclass
class Study:
    protocol: str
    version: str
    items: list[ItemScores]
    pairs: list[dict]  # every final-label pair (held-out items included)
    counts: dict = field(default_factory=dict)


def stored_protocol_names(store) -> list[str]:
    with store._session() as s:
        return list(s.scalars(select(ProtocolRow.name).order_by(ProtocolRow.id)))


def pick_protocol(store, protocol: str | None) -> str:
    """``protocol``, or the database's only protocol; a clear error otherwise."""
    names = stored_protocol_names(store)
    if protocol:
        if protocol not in names:
            raise MetaAlignerError(f'--protocol "{protocol}": not in the database (stored: {", ".join(names) or "none"})')
        return protocol
    if len(names) == 1:
        return names[0]
    if not names:
        raise MetaAlignerError("the database holds no study yet (annotate import first)")
    raise MetaAlignerError(f"the database holds several protocols ({', '.join(names)}): say which with --protocol")


def ab_item_ids(s) -> set[int]:
    return set(s.scalars(select(ABResponse.item_id).distinct()))


def load_study(store, actor, protocol: str | None) -> Study:
    """The study's regular items (no gold, no A/B items) and its final-label pairs (admins only)."""
    name = pick_protocol(store, protocol)
    with store._session() as s:
        accounts.require_role(s, actor, "admin")
        skip = ab_item_ids(s)
        items = [it for it in workflow.load_scores(s, name) if not it.is_gold and it.item_id not in skip]
        version = s.scalar(select(ProtocolRow.version).where(ProtocolRow.name == name)) or "unversioned"
    pairs = final_pairs(items)
    return Study(name, version, items, pairs, study_counts(items, pairs))


def refusal(study: Study, min_pairs: int, holdout: int = 0, seed: int = 42) -> str | None:
    """The one-line refusal when the study has too few pairs to train on, else None."""
    c = study.counts
    usable = len(hold_out(study.pairs, holdout, seed)[0])
    if usable >= min_pairs:
        return None
    return (f'study "{study.protocol}" has {usable} preference pairs with final labels'
            + (f" after holding out {holdout} items" if holdout else "")
            + f" (from {c['pair_items']} of {c['items']} items: {c['short_of_raters']} short of their raters, "
              f"{c['waiting_for_review']} waiting for the examiner's review); training needs at least {min_pairs} "
              "(--min-pairs)")


def preview(study: Study, template: str = "ultrafeedback", warmup_size="auto", holdout: int = 0,
            seed: int = 42) -> dict:
    """Algorithm 1's row counts for this study, computed in memory (the Train tab's preview)."""
    from metaaligner_core.dataset import BuildStats, ObjectiveResolver, build_dynamic_dataset, from_generic

    pairs, held = hold_out(study.pairs, holdout, seed)
    resolve = ObjectiveResolver(template)
    records = [rec for i, p in enumerate(pairs) for rec in from_generic(p, "<study>", i + 1, resolve)]
    stats = BuildStats()
    for _ in build_dynamic_dataset(records, resolve.by_key, template, seed, warmup_size, stats):
        pass
    return {"pairs": len(pairs), "held_out": len(held), "rows": dict(stats.rows), **{
        k: v for k, v in study.counts.items() if k != "pairs"}}


# ----------------------------------------------------------------------------- the run

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _progress_callback(out: Path):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """``DIR/progress.json``: the stage's step and step count, after every optimizer step."""

        def __init__(self):
            self.stage = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.stage = Path(args.output_dir).parent.name  # DIR/<stage>/checkpoints
            self._write(state)

        def on_step_end(self, args, state, control, **kwargs):
            self._write(state)

        def _write(self, state):
            if not state.is_world_process_zero:
                return
            with atomic_write(out / PROGRESS_FILE) as fh:
                json.dump({"stage": self.stage, "step": state.global_step, "max_steps": state.max_steps,
                           "at": _now()}, fh)

    return Progress()


def _cli(argv: list[str]):
    from metaaligner_core.cli import build_parser

    return build_parser().parse_args(argv)


def run(store, actor, *, protocol: str | None, base: str, out, train_options: Sequence[str] = (),
        template: str = "ultrafeedback", warmup_size="auto", holdout: int = 0,
        min_pairs: int = DEFAULT_MIN_PAIRS, seed: int = 42, db_label: str | None = None) -> Path:
    """Export → build-dataset → train into ``out``; returns ``out/final``. ``train_options`` are
    ``train`` command-line words (``--lora`` is added unless ``--lora``/``--no-lora`` is there)."""
    from metaaligner_core.commands.train import config_from_args
    from metaaligner_core.dataset import check_warmup_size
    from metaaligner_core.templates import check_template
    from metaaligner_core.training import train

    out = Path(out)
    template = check_template(template)
    warmup_size = check_warmup_size(warmup_size)
    if warmup_size == 0:
        raise MetaAlignerError("--warmup-size 0: annotate train always runs the warm-up stage (auto or a number)")
    if holdout < 0 or min_pairs < 1:
        raise MetaAlignerError("--holdout must be 0 or more and --min-pairs at least 1")
    options = list(train_options)
    if "--lora" not in options and "--no-lora" not in options:
        options.insert(0, "--lora")
    run_opts = {"protocol": protocol, "template": template, "warmup_size": warmup_size, "holdout": holdout,
                "seed": seed}
    pairs_path, data_dir = out / "pairs.jsonl", out / DATASET_DIR
    study_path = out / STUDY_FILE
    if study_path.is_file():  # a rerun: resume on the first run's pairs
        record = json.loads(study_path.read_text(encoding="utf-8"))
        run_opts["protocol"] = protocol or record["protocol"]
        old = {k: record["options"].get(k) for k in RUN_KEYS}
        for key in RUN_KEYS:
            if old[key] != run_opts[key]:
                raise MetaAlignerError(f"{out} holds a run with {key}={old[key]!r}, not {run_opts[key]!r}: rerun with "
                                       "the same settings to resume, or use a new --out")
        if not pairs_path.is_file():
            raise MetaAlignerError(f"{pairs_path}: missing; use a new --out")
        log.info("%s: resuming the run of %s (%d pairs)", out, record["started"], record["counts"]["pairs_trained"])
    else:
        study = load_study(store, actor, protocol)
        run_opts["protocol"] = study.protocol
        why = refusal(study, min_pairs, holdout, seed)
        if why:
            raise MetaAlignerError(why)
        pairs, held = hold_out(study.pairs, holdout, seed)
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(pairs_path, pairs)
        record = {"protocol": study.protocol, "protocol_version": study.version, "database": db_label,
                  "started": _now(), "options": {**run_opts, "min_pairs": min_pairs},
                  "counts": {**study.counts, "pairs_trained": len(pairs)},
                  "trained_items": sorted({p["item_id"] for p in pairs}), "held_out_items": held}
        with atomic_write(study_path) as fh:
            json.dump(record, fh, indent=2)

    build_argv = ["build-dataset", "--input", str(pairs_path), "--out", str(data_dir), "--source", "generic",
                  "--template", template, "--warmup-size", str(warmup_size), "--seed", str(seed), "--no-progress"]
    seed_opts = [] if "--seed" in options else ["--seed", str(seed)]
    train_argv = ["train", "--data", str(data_dir), "--base", base, "--out", str(out), *options, *seed_opts]
    with atomic_write(out / "commands.sh") as fh:
        fh.write("#!/bin/sh\n# written by metaaligner annotate train: the commands it ran\nset -e\n")
        fh.write(shlex.join(["metaaligner", *build_argv]) + "\n")
        fh.write(shlex.join(["metaaligner", *train_argv]) + "\n")

    if not (data_dir / "stats.json").is_file():
        args = _cli(["-q", *build_argv])
        args.func(args)
    shutil.copyfile(data_dir / "stats.json", out / "stats.json")
    log.info("dataset: %s", json.dumps(json.loads((out / "stats.json").read_text())["rows"]))
    config = config_from_args(_cli(train_argv))
    return train(config, callbacks=[_progress_callback(out)])


def read_record(aligner_dir) -> dict | None:
    """``study.json`` of an ``annotate train`` run, given its DIR or DIR/final (None otherwise)."""
    p = Path(str(aligner_dir))
    for d in (p, p.parent):
        f = d / STUDY_FILE
        if f.is_file():
            try:
                return json.loads(f.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                return None
    return None
