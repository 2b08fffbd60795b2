"""``metaaligner annotate``: the expert annotation store from the command line.

    annotate import         --db URL --input FILE [--protocol imhi|FILE]
    annotate import-ratings --db URL --input FILE [--protocol imhi|FILE]
    annotate add-annotator  --db URL NAME [--admin] [--password-file FILE] [--update]
    annotate export         --db URL --format ratings|pairs --out FILE
    annotate agreement      --db URL [--json]
    annotate progress       --db URL [--target N] [--json]

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

PASSWORD_ENV = "METAALIGNER_ANNOTATOR_PASSWORD"


def register(sub) -> None:
    p = sub.add_parser("annotate", help="expert annotation: import items and ratings, accounts, export, agreement",
                       description="Expert 0-3 ratings per objective (IMHI protocol by default) in a SQL database; "
                                   "export them as preference pairs for build-dataset.")
    asub = p.add_subparsers(dest="annotate_command", required=True, metavar="ACTION")

    def common(q):
        q.add_argument("--db", default=DEFAULT_DB, metavar="URL",
                       help=f"SQLAlchemy URL or SQLite file path (default: {DEFAULT_DB})")

    q = asub.add_parser("import", help="add items (a query and its responses) to rate",
                        description='Items from JSONL {"query", "responses": [{"text", "source"?}], "item_id"?} '
                                    "or CSV columns query,response,source (rows with the same query form one item). "
                                    "Re-importing is safe: stored items and responses are kept, new responses appended.")
    common(q)
    q.add_argument("--input", required=True, metavar="FILE")
    q.add_argument("--protocol", default="imhi", help="built-in protocol (imhi, ultrafeedback) or a YAML/JSON file")
    q.set_defaults(func=run_import)

    q = asub.add_parser("import-ratings", help="add ratings made elsewhere (one rating per row)",
                        description='Rows {"item_id"?, "query", "response", "source"?, "annotator", "objective", '
                                    '"score"} (JSONL or CSV), score an integer 0-3; imported ratings count as submitted. '
                                    "Any bad row rejects the whole file and nothing is stored.")
    common(q)
    q.add_argument("--input", required=True, metavar="FILE")
    q.add_argument("--protocol", default="imhi", help="protocol the objectives belong to (default: imhi)")
    q.set_defaults(func=run_import_ratings)

    q = asub.add_parser("add-annotator", help="create an annotator account",
                        description=f"The password comes from --password-file (first line), else ${PASSWORD_ENV}, "
                                    "else an interactive prompt. It is stored as a salted scrypt hash.")
    common(q)
    q.add_argument("name", metavar="NAME")
    q.add_argument("--admin", action="store_true", help="may export, see agreement and everyone's progress")
    q.add_argument("--password-file", metavar="FILE")
    q.add_argument("--update", action="store_true", help="change the password / admin flag of an existing account")
    q.set_defaults(func=run_add_annotator)

    q = asub.add_parser("export", help="write submitted ratings, or preference pairs for build-dataset",
                        description="--format ratings: one row per rating (.jsonl or .csv; CSV cells that a "
                                    "spreadsheet would run as formulas are prefixed with '). --format pairs: the "
                                    "generic preference format (.jsonl): every pair of an item's responses, per "
                                    "objective, by mean submitted score.")
    common(q)
    q.add_argument("--format", required=True, choices=["ratings", "pairs"])
    q.add_argument("--out", required=True, metavar="FILE")
    q.add_argument("--protocol", default=None, help="only items of this protocol")
    q.set_defaults(func=run_export)

    q = asub.add_parser("agreement", help="Krippendorff's alpha per objective (ordinal, 0-3)")
    common(q)
    q.add_argument("--json", action="store_true",
                   help='print {"objectives": {key: {"alpha", "units", "annotators"}}} (alpha null when undefined)')
    q.add_argument("--protocol", default=None, help="only items of this protocol")
    q.set_defaults(func=run_agreement)

    q = asub.add_parser("progress", help="items rated, overall and per annotator")
    common(q)
    q.add_argument("--target", type=int, default=DEFAULT_TARGET_ANNOTATORS,
                   help="annotators wanted per item (default: %(default)s)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=run_progress)


def _store(args):
    from annotation.store import Store

    return Store(args.db)


def run_import(args) -> int:
    res = _store(args).import_items(args.input, args.protocol)
    print(f"{args.input}: {res.items_added} items added, {res.items_existing} already present, "
          f"{res.responses_added} new responses")
    return 0


def run_import_ratings(args) -> int:
    res = _store(args).import_ratings(args.input, args.protocol)
    msg = (f"{args.input}: {res.ratings} ratings stored ({res.items_added} new items, "
           f"{res.responses_added} new responses)")
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
    store.add_annotator(args.name, _read_password(args), admin=args.admin, update=args.update)
    print(f"annotator {args.name} {'updated' if args.update else 'added'}{' (admin)' if args.admin else ''}")
    return 0


def run_export(args) -> int:
    from annotation.store import OPERATOR

    n = _store(args).export(OPERATOR, args.format, args.out, protocol=args.protocol)
    print(f"{args.out}: {n} {'ratings' if args.format == 'ratings' else 'pairs'}")
    return 0


def run_agreement(args) -> int:
    from annotation.agreement import agreement_table
    from annotation.store import OPERATOR

    results = _store(args).agreement(OPERATOR, protocol=args.protocol)
    if args.json:
        print(json.dumps({"objectives": {k: a.to_dict() for k, a in results.items()}}, indent=2))
        return 0
    rows = [["objective", "alpha", "units", "annotators"], *agreement_table(results)]
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print("alpha: Krippendorff's alpha, ordinal, over 0-3; units: responses rated by at least two annotators")
    return 0


def run_progress(args) -> int:
    from annotation.store import OPERATOR

    overall, people = _store(args).progress_by_annotator(OPERATOR, target=args.target)
    if args.json:
        print(json.dumps({"items": overall.total, "complete": overall.complete, "target": overall.target,
                          "annotators": people}, indent=2))
        return 0
    print(f"{overall.complete}/{overall.total} items rated by at least {args.target} annotators")
    for p in people:
        print(f"  {p['annotator']:<24} {p['items']:>6} items  {p['ratings']:>7} ratings  {p['drafts']:>5} drafts"
              f"{'  (admin)' if p['admin'] else ''}")
    return 0
