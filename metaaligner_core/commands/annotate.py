"""``metaaligner annotate``: the expert annotation store from the command line.

    annotate protocols      [--db URL] [--show NAME|FILE]
    annotate import         --db URL --input FILE [--protocol NAME|FILE] [--raters K]
    annotate import-ratings --db URL --input FILE [--protocol NAME|FILE] [--mapping FILE] [--overwrite]
    annotate add-annotator  --db URL NAME [--role rater|examiner|admin] [--password-file FILE] [--update]
    annotate export         --db URL --format ratings|final|pairs|hf --out FILE|DIR [--push-to-hub REPO]
    annotate agreement      --db URL [--json] [--bootstrap N]
    annotate progress       --db URL [--target N] [--json]
    annotate audit          --db URL [--item ID] [--json]
    annotate train          --db URL [--protocol P] --base MODEL --out DIR [train options]
    annotate ab             --db URL --baseline MODEL --candidate MODEL --queries N [--protocol P]

The command line acts as the database's operator (it can open the file anyway), so it may
export and read agreement without signing in; the app's Export tab needs an admin account.
"""
from __future__ import annotations

import getpass
import json
import os
import sys
from pathlib import Path

from annotation import DEFAULT_DB_URL as DEFAULT_DB, DEFAULT_TARGET_ANNOTATORS

from ..errors import MetaAlignerError
from ..templates import TEMPLATE_NAMES

DEFAULT_MIN_PAIRS = 32  # annotation.training_run.DEFAULT_MIN_PAIRS (kept here so --help imports nothing heavy)

PASSWORD_ENV = "METAALIGNER_ANNOTATOR_PASSWORD"
DB_ENV = "METAALIGNER_DB"  # the --db default, so a URL with a password need not appear in the process list


def register(sub) -> None:
    p = sub.add_parser("annotate", help="expert annotation: import items and ratings, accounts, export, agreement",
                       description="Expert 0-3 ratings per objective (IMHI protocol by default) in a SQL database; "
                                   "export them as preference pairs for build-dataset.")
    asub = p.add_subparsers(dest="annotate_command", required=True, metavar="ACTION")

    def common(q):
        q.add_argument("--db", default=os.environ.get(DB_ENV) or DEFAULT_DB, metavar="URL",
                       help=f"SQLAlchemy URL or SQLite file path (default: ${DB_ENV}, else {DEFAULT_DB})")

    q = asub.add_parser("protocols", help="list the protocols (built-in, and those stored in --db)",
                        description="Built-in protocols, and the protocols stored in the database with their "
                                    "versions. --show prints one protocol's rubric. Any YAML/JSON protocol file "
                                    "can be passed as --protocol FILE (format: docs/annotation.md).")
    q.add_argument("--db", default=None, metavar="URL", help="also list the protocols stored in this database")
    q.add_argument("--show", metavar="NAME|FILE", help="print this protocol's guidelines and rubric")
    q.set_defaults(func=run_protocols)

    q = asub.add_parser("import", help="add items (a query and its responses) to rate",
                        description='Items from JSONL {"query", "responses": [{"text", "source"?, "gold"?}], "item_id"?} '
                                    "or CSV columns query,response,source (rows with the same query form one item). "
                                    'A response with "gold": {objective: score} makes its item a gold item (known '
                                    "answers, mixed into every rater's queue). "
                                    "Re-importing is safe: stored items and responses are kept, new responses appended.")
    common(q)
    q.add_argument("--input", required=True, metavar="FILE")
    q.add_argument("--protocol", default="imhi", help="built-in protocol name (see `annotate protocols`) or a YAML/JSON file")
    q.add_argument("--raters", type=int, default=None, metavar="K",
                   help=f"raters per item for this import (default: the protocol's, else {DEFAULT_TARGET_ANNOTATORS})")
    q.set_defaults(func=run_import)

    q = asub.add_parser("import-ratings", help="add ratings made elsewhere",
                        description='Rows {"item_id"?, "query", "response", "source"?, "annotator", "objective", '
                                    '"score"} (JSONL or CSV), score on the protocol\'s scale; or, with --mapping, a '
                                    'column per aspect holding every rater\'s scores as a list ("[3, 3, 2]") or a '
                                    "column per rater (docs/annotation.md). Imported ratings count as submitted. "
                                    "Any bad row rejects the whole file and nothing is stored. A submitted score "
                                    "is never replaced unless --overwrite (every change goes to the audit trail).")
    common(q)
    q.add_argument("--input", required=True, metavar="FILE")
    q.add_argument("--protocol", default="imhi",
                   help="protocol the objectives belong to: a built-in name or a YAML/JSON protocol file (default: imhi)")
    q.add_argument("--mapping", metavar="FILE|JSON", help="YAML/JSON file (or inline JSON) mapping the file's columns")
    q.add_argument("--overwrite", action="store_true", help="replace submitted scores that differ (logged)")
    q.add_argument("--raters", type=int, default=None, metavar="K", help="raters per item for new items")
    q.set_defaults(func=run_import_ratings)

    q = asub.add_parser("add-annotator", help="create an annotator account",
                        description=f"The password comes from --password-file (first line), else ${PASSWORD_ENV}, "
                                    "else an interactive prompt. It is stored as a salted scrypt hash.")
    common(q)
    q.add_argument("name", metavar="NAME")
    q.add_argument("--admin", action="store_true", help="same as --role admin")
    q.add_argument("--role", choices=["rater", "examiner", "admin"], default=None,
                   help="rater (rates items), examiner (also reviews disagreements and sets final scores), "
                        "admin (also the dashboard, exports and accounts); default rater")
    q.add_argument("--password-file", metavar="FILE")
    q.add_argument("--update", action="store_true", help="change the password / admin flag of an existing account")
    q.set_defaults(func=run_add_annotator)

    q = asub.add_parser("export", help="write ratings, final labels, preference pairs, or a datasets folder",
                        description="--format ratings: one row per submitted rating (.jsonl or .csv; CSV cells that "
                                    "a spreadsheet would run as formulas are prefixed with '). --format final: one row "
                                    "per response and objective with every rater's score, the final score and who "
                                    "decided it (.jsonl or .csv). --format pairs: the generic preference format "
                                    "(.jsonl): every pair of an item's responses, per objective, by the examiner's "
                                    "final score where reviewed, else the mean submitted score; each pair carries "
                                    "its objectives' texts. --format hf: a Hugging Face datasets folder (ratings, "
                                    "final, pairs) with a dataset card.")
    common(q)
    q.add_argument("--format", required=True, choices=["ratings", "final", "pairs", "hf"])
    q.add_argument("--out", required=True, metavar="FILE|DIR")
    q.add_argument("--protocol", default=None, help="only items of this protocol")
    q.add_argument("--push-to-hub", default=None, metavar="REPO", help="with --format hf: also upload to the hub")
    q.set_defaults(func=run_export)

    q = asub.add_parser("agreement", help="agreement dashboard: alpha per objective with a bootstrap interval, "
                                          "by response source, per rater, distributions, progress, time")
    common(q)
    q.add_argument("--json", action="store_true",
                   help='print every figure as JSON: {"objectives": {key: {"alpha", "ci95", "units", "annotators"}}, '
                        '"by_source", "raters", "distribution", "progress", "time"} (alpha null when undefined)')
    q.add_argument("--protocol", default=None, help="only items of this protocol")
    q.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="resamples for the 95%% interval (0: none)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--batch", type=int, default=20, metavar="N",
                   help="items per batch for alpha per batch (in order of completion; default 20)")
    q.set_defaults(func=run_agreement)

    q = asub.add_parser("train", help="train an aligner on the study's final labels (pairs → Algorithm 1 → 3 stages)",
                        description="The study's final labels (the examiner's score where an item was reviewed) → "
                                    "preference pairs → build-dataset (objective texts from the protocol, warm-up on) → "
                                    "train (LoRA unless --no-lora; every train option below passes through). DIR gets "
                                    "pairs.jsonl, dataset/, stats.json, commands.sh (the exact build-dataset and train "
                                    "commands) and study.json (protocol version, counts, items trained on and held "
                                    "out); DIR/final is the aligner. Rerunning the same command resumes.")
    common(q)
    q.add_argument("--protocol", default=None, metavar="P", help="the study (default: the database's only protocol)")
    q.add_argument("--base", required=True, metavar="MODEL", help='model to start from (HF id, directory, .gguf, "default")')
    q.add_argument("--out", required=True, metavar="DIR")
    q.add_argument("--template", default="ultrafeedback", choices=TEMPLATE_NAMES,
                   help="prompt template of the aligner (default ultrafeedback, what align uses for a local directory)")
    q.add_argument("--warmup-size", default="auto", metavar="N|auto", help="warm-up rows (default auto: 10%% of equal rows)")
    q.add_argument("--holdout", type=int, default=0, metavar="N",
                   help="hold N items out of training (recorded; annotate ab takes its queries from them first)")
    q.add_argument("--min-pairs", type=int, default=None, metavar="N",
                   help="refuse to train on fewer pairs (default %d)" % DEFAULT_MIN_PAIRS)
    from .train import add_train_options

    add_train_options(q)
    q.set_defaults(func=run_train, parser=q)

    q = asub.add_parser("ab", help="a blind A/B study: held-out queries corrected by two aligners, rated blind",
                        description="Takes N queries of the study held out from the candidate's training (recorded), "
                                    "corrects each item's first response (the draft) with both aligners, and enqueues "
                                    "one item per query with the two corrections in random order; raters do not see "
                                    "which aligner wrote which (admins do: export, dashboard). `annotate agreement` "
                                    "then reports candidate minus baseline per objective.")
    common(q)
    q.add_argument("--baseline", required=True, metavar="MODEL")
    q.add_argument("--candidate", required=True, metavar="MODEL")
    q.add_argument("--queries", required=True, type=int, metavar="N")
    q.add_argument("--protocol", default=None, metavar="P", help="the study (default: the candidate's, else the only one)")
    q.add_argument("--name", default=None, help="the A/B study's name (default ab<N>-<time>)")
    q.add_argument("--template", default=None, choices=TEMPLATE_NAMES,
                   help="aligner template (default: the one the candidate was trained with, else the usual rule)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--batch-size", type=int, default=8, metavar="N")
    q.add_argument("--max-new-tokens", type=int, default=None, metavar="N")
    q.add_argument("--device", default=None, help="auto (default), cpu, cuda")
    q.set_defaults(func=run_ab)

    q = asub.add_parser("progress", help="items rated, overall and per annotator")
    common(q)
    q.add_argument("--target", type=int, default=None,
                   help="raters wanted per item (default: each item's own k)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=run_progress)

    q = asub.add_parser("audit", help="the audit trail: every change of a rating or final score")
    common(q)
    q.add_argument("--item", default=None, metavar="ID", help="only this item")
    q.add_argument("--json", action="store_true", help="one JSON object per line")
    q.set_defaults(func=run_audit)


def _store(args):
    from annotation.store import Store

    return Store(args.db)


def run_protocols(args) -> int:
    from annotation.protocols import builtin_protocols, load_protocol, rubric_markdown

    if args.show:
        print(rubric_markdown(load_protocol(args.show)))
        return 0
    print("built-in protocols (--protocol NAME), or any protocol file (--protocol FILE):")
    for name in builtin_protocols():
        p = load_protocol(name)
        print(f"  {name:<16} version {p.version:<12} {', '.join(p.keys)}  (k={p.raters or DEFAULT_TARGET_ANNOTATORS}, "
              f"scores 0-{p.max_score})")
    if args.db:
        from annotation.store import OPERATOR

        stored = _store(args).stored_protocols(OPERATOR)
        print(f"in {args.db}:" if stored else f"in {args.db}: none yet")
        for p in stored:
            print(f"  {p['name']:<16} version {p['version']:<12} {', '.join(p['objectives'])}  ({p['items']} items)")
    return 0


def run_import(args) -> int:
    res = _store(args).import_items(args.input, args.protocol, raters=args.raters)
    print(f"{args.input}: {res.items_added} items added, {res.items_existing} already present, "
          f"{res.responses_added} new responses")
    return 0


def run_import_ratings(args) -> int:
    res = _store(args).import_ratings(args.input, args.protocol, overwrite=args.overwrite, mapping=args.mapping,
                                      raters=args.raters)
    msg = (f"{args.input}: {res.ratings} ratings stored ({res.items_added} new items, "
           f"{res.responses_added} new responses)")
    if res.overwritten:
        msg += f"; {res.overwritten} submitted scores replaced (--overwrite; see `annotate audit`)"
    if res.annotators_added:
        msg += (f"; {len(res.annotators_added)} new annotators without a password "
                f"(add-annotator NAME --update to let them sign in)")
    print(msg)
    return 0


def _read_password(args) -> str:
    if args.password_file:
        path = Path(args.password_file)
        if not path.is_file():
            raise MetaAlignerError(f"{path}: no such password file")
        lines = path.read_text(encoding="utf-8").splitlines()
        if not lines or not lines[0]:
            raise MetaAlignerError(f"{path}:1: the password file's first line is empty")
        return lines[0]
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    if not sys.stdin.isatty():
        raise MetaAlignerError(f"no password: give --password-file FILE or set ${PASSWORD_ENV} "
                               "(or run in a terminal to be prompted)")
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        raise MetaAlignerError("the two passwords differ")
    return first


def run_add_annotator(args) -> int:
    store = _store(args)
    if args.admin and args.role not in (None, "admin"):
        raise MetaAlignerError(f"--admin and --role {args.role} contradict each other")
    role = args.role or ("admin" if args.admin else "rater")
    store.add_annotator(args.name, _read_password(args), role=role, update=args.update)
    print(f"annotator {args.name} {'updated' if args.update else 'added'}{'' if role == 'rater' else f' ({role})'}")
    return 0


def run_export(args) -> int:
    from annotation.store import OPERATOR

    if args.push_to_hub and args.format != "hf":
        raise MetaAlignerError("--push-to-hub needs --format hf")
    n = _store(args).export(OPERATOR, args.format, args.out, protocol=args.protocol, push_to_hub=args.push_to_hub)
    what = {"ratings": "ratings", "final": "final labels", "pairs": "pairs", "hf": "ratings (plus final labels and pairs)"}
    print(f"{args.out}: {n} {what[args.format]}")
    return 0


def run_agreement(args) -> int:
    from annotation.store import OPERATOR

    if args.bootstrap < 0:
        raise MetaAlignerError(f"--bootstrap {args.bootstrap}: expected 0 or more resamples")
    if args.batch < 1:
        raise MetaAlignerError(f"--batch {args.batch}: expected 1 or more items")
    dash = _store(args).dashboard(OPERATOR, protocol=args.protocol, bootstrap=args.bootstrap, seed=args.seed,
                                  batch_size=args.batch)
    if args.json:
        print(json.dumps(dash, indent=2))
        return 0
    rows = [["objective", "alpha", "95% CI", "units", "annotators"]]
    for key, a in dash["objectives"].items():
        ci = a.get("ci95")
        rows.append([key, "n/a" if a["alpha"] is None else f"{a['alpha']:.3f}",
                     f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "n/a", a["units"], a["annotators"]])
    widths = [max(len(str(r[i])) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print("alpha: Krippendorff's alpha, ordinal; units: responses rated by at least two annotators "
          f"(gold items left out); CI: percentile bootstrap over responses, {args.bootstrap} resamples")
    if len(dash["by_source"]) > 1:
        print("by response source:")
        for src, block in dash["by_source"].items():
            vals = ", ".join(f"{k} {'n/a' if a['alpha'] is None else format(a['alpha'], '.3f')}" for k, a in block.items())
            print(f"  {src}: {vals}")
    batches = dash["alpha_by_batch"]["batches"]
    if len(batches) > 1:
        print(f"alpha per batch of {args.batch} items, in order of completion:")
        for b in batches:
            print(f"  batch {b['batch']} ({b['items']} items, until {b['completed_until'][:19]}): "
                  + ", ".join(f"{k} {'n/a' if a is None else format(a, '.3f')}" for k, a in b["alpha"].items()))
    for name, study in dash.get("ab", {}).items():
        print(f"A/B study {name}: candidate {study['candidate']} vs baseline {study['baseline']} "
              f"({study['items']} items; candidate minus baseline, mean score; paired bootstrap 95% CI over items)")
        for key, a in study["objectives"].items():
            if not a["n"]:
                print(f"  {key}: not rated yet")
                continue
            ci = a["ci95"]
            print(f"  {key}: {a['difference']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")
                  + f"  wins {a['wins']} / ties {a['ties']} / losses {a['losses']}  (n={a['n']})")
    p = dash["progress"]
    print(f"items: {p['items']}, complete {p['complete']}, reviewed {p['reviewed']}, "
          f"waiting for review {p['waiting_for_review']}, gold {p['gold_items']}")
    return 0


def run_progress(args) -> int:
    from annotation.store import OPERATOR

    overall, people = _store(args).progress_by_annotator(OPERATOR, target=args.target)
    if args.json:
        print(json.dumps({"items": overall.total, "complete": overall.complete, "target": overall.target,
                          "annotators": people}, indent=2))
        return 0
    print(f"{overall.complete}/{overall.total} items rated by "
          + (f"at least {args.target} annotators" if args.target else "their k raters"))
    for p in people:
        print(f"  {p['annotator']:<24} {p['items']:>6} items  {p['ratings']:>7} ratings  {p['drafts']:>5} drafts"
              f"{'  (admin)' if p['admin'] else ''}")
    return 0


def run_audit(args) -> int:
    from annotation.store import OPERATOR

    events = _store(args).audit_events(OPERATOR, item_uid=args.item)
    for e in events:
        if args.json:
            print(json.dumps(e, ensure_ascii=False))
        else:
            who = f" rating of {e['rater']}" if e["rater"] else " final score"
            print(f"{e['at']}  {e['actor']} via {e['path']}:{who} on {e['item_id']}/{e['response_id']}/{e['objective']}: "
                  f"{e['old_score']} -> {e['new_score']}"
                  + (f" ({e['old_status']} -> {e['new_status']})" if e["old_status"] != e["new_status"] else "")
                  + (f"  reason: {e['reason']}" if e["reason"] else ""))
    if not events and not args.json:
        print("no changes recorded")
    return 0


def _db_label(url: str) -> str:
    """The database URL without its password (for DIR/study.json)."""
    from sqlalchemy.engine import make_url

    from annotation.store import normalize_db_url

    return make_url(normalize_db_url(url)).render_as_string(hide_password=True)


def run_train(args) -> int:
    from annotation import training_run
    from annotation.store import OPERATOR

    from .train import train_option_argv

    final = training_run.run(_store(args), OPERATOR, protocol=args.protocol, base=args.base, out=args.out,
                             train_options=train_option_argv(args, args.parser), template=args.template,
                             warmup_size=args.warmup_size, holdout=args.holdout,
                             min_pairs=args.min_pairs or training_run.DEFAULT_MIN_PAIRS,
                             seed=42 if args.seed is None else args.seed, db_label=_db_label(args.db))
    print(final)
    return 0


def run_ab(args) -> int:
    from annotation import ab
    from annotation.store import OPERATOR
    from annotation.training_run import read_record

    from ..objectives import Objective
    from ..pipeline import ModelRegistry, Pipeline, choose_template
    from ..settings import GenerationSettings

    store = _store(args)
    record = read_record(args.candidate)
    proto, queries, how = ab.pick_queries(store, OPERATOR, args.protocol, args.queries, record, args.seed)
    template = args.template or (record or {}).get("options", {}).get("template") or choose_template(None, args.candidate)
    objectives = [Objective(o.key, o.name, o.description) for o in proto.objectives]
    settings = GenerationSettings(**({"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}))
    pipe = Pipeline(ModelRegistry(device=args.device, max_models=2), policy=None, aligner=args.baseline,
                    template=template, settings=settings)
    texts = {}
    for arm, model in (("baseline", args.baseline), ("candidate", args.candidate)):
        texts[arm] = pipe.correct_batch([q.query for q in queries], [q.draft for q in queries], objectives,
                                        aligner=model, template=template, batch_size=args.batch_size)
    res = ab.enqueue(store, OPERATOR, protocol=proto.name, baseline=args.baseline, candidate=args.candidate,
                     template=template, rows=list(zip(queries, texts["baseline"], texts["candidate"])), seed=args.seed,
                     name=args.name)
    print(f"A/B study {res['name']}: {res['items']} items enqueued under protocol {proto.name} "
          f"(version {proto.version}); queries: {how}")
    print("held-out queries (study item ids): " + ", ".join(q.item_id for q in queries))
    return 0
