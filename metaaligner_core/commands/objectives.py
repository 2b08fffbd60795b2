"""``metaaligner objectives``: list the built-in objectives."""
from __future__ import annotations

import json

from ..objectives import FAMILIES, builtin_objectives


def register(sub) -> None:
    p = sub.add_parser("objectives", help="list the built-in objectives",
                       description="List the built-in objectives (the exact strings of the released checkpoints).")
    p.add_argument("--family", default="all", choices=[*FAMILIES, "all"])
    p.add_argument("--json", action="store_true", help="print a JSON list of {key, name, description, family, text}")
    p.set_defaults(func=run)


def run(args) -> int:
    objs = builtin_objectives(args.family)
    if args.json:
        print(json.dumps([{"key": o.key, "name": o.name, "description": o.description,
                           "family": o.family, "text": o.text} for o in objs], indent=2, ensure_ascii=False))
        return 0
    family = None
    for o in objs:
        if o.family != family:
            family = o.family
            print(f"[{family}]")
        print(f"  {o.key:<22} {o.text}")
    return 0
