"""The ``metaaligner`` command line.

Each sub-command lives in its own module under :mod:`metaaligner_core.commands` and exposes
``register(subparsers)``; the module's parser sets ``func(args) -> int``. Heavy imports
(torch, transformers, gradio) happen inside ``func`` so ``--help`` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from . import commands
from .errors import MetaAlignerError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metaaligner",
        description="MetaAligner: correct any model's drafts for any list of objectives (arXiv 2403.17141).")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s")
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except MetaAlignerError as e:
        print(f"metaaligner: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metaaligner: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
