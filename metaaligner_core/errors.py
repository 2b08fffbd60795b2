"""Errors raised at the boundary (bad files, bad flags, bad model names).

Every message is one line that names what the user has to fix: the file, the line and the
field where there is one. The CLI prints it and exits non-zero; no stack trace.
"""
from __future__ import annotations


class MetaAlignerError(Exception):
    """An error the user can fix; its message is shown as-is."""


class InputError(MetaAlignerError):
    """A bad record in an input file.

    >>> str(InputError("data.jsonl", 3, "query", "missing"))
    'data.jsonl:3: field "query": missing'
    """

    def __init__(self, path, line: int | None, field: str | None, message: str):
        self.path, self.line, self.field = str(path), line, field
        where = self.path if line is None else f"{self.path}:{line}"
        what = f' field "{field}":' if field else ""
        super().__init__(f"{where}:{what} {message}")
