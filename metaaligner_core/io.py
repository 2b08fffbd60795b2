"""Reading records from JSONL/CSV/Parquet/the Hub and writing files atomically.

Records come back with their 1-based line number (for JSONL and CSV) so that every error can
name the file and line. Output files are written to a temporary file in the same directory and
renamed into place: a crash or a bad record never leaves a half-written file behind.
"""
from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import os
import tempfile
import zlib
from pathlib import Path
from typing import Iterator

import orjson

from .errors import InputError, MetaAlignerError

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".csv.gz", ".parquet")


def _open_text(path: Path):
    # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the first column's name.
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def iter_records(source: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` pairs from a local file or ``hf:<id>[:split]``.

    Line numbers are 1-based lines of a JSONL file, 1-based data rows (+1 for the header, so
    they match what an editor shows) of a CSV file, and 1-based row numbers otherwise.
    """
    src = str(source)
    if src.startswith("hf:"):
        yield from _iter_hub(src)
        return
    path = Path(src)
    if not path.exists():
        raise MetaAlignerError(f"{path}: no such file")
    name = path.name.lower()
    try:
        yield from _iter_file(path, name)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise MetaAlignerError(f"{path}: not a readable gzip file ({e})") from None


def _iter_file(path: Path, name: str) -> Iterator[tuple[int, dict]]:
    if name.endswith((".jsonl", ".jsonl.gz", ".json")):
        # Binary lines straight into orjson: no separate UTF-8 decoding pass.
        with (gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb")) as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = orjson.loads(line)
                except orjson.JSONDecodeError as e:
                    raise InputError(path, n, None, f"not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(rec, dict):
                    raise InputError(path, n, None, "expected a JSON object")
                yield n, rec
    elif name.endswith((".csv", ".csv.gz")):
        with _open_text(path) as fh:
            reader = csv.DictReader(fh)
            n = 1
            try:
                for n, row in enumerate(reader, 2):
                    yield n, {k: v for k, v in row.items() if k is not None}
            except UnicodeDecodeError:  # raised for a read-ahead block: find the line itself
                raise InputError(path, _first_non_utf8_line(path), None, "not UTF-8 text") from None
            except csv.Error as e:
                raise InputError(path, n + 1, None, f"not valid CSV ({e})") from None
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow's ArrowInvalid / ArrowIOError
            raise MetaAlignerError(f"{path}: cannot read Parquet ({str(e).splitlines()[0]})") from None
        for n, rec in enumerate(table.to_pylist(), 1):
            yield n, rec
    else:
        raise MetaAlignerError(f"{path}: unsupported file type (expected one of {', '.join(SUFFIXES)} or hf:<dataset id>[:split])")


def _first_non_utf8_line(path: Path) -> int | None:
    with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as fh:
        for n, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return n
    return None


def _iter_hub(src: str) -> Iterator[tuple[int, dict]]:
    """``hf:<dataset id>[:split]`` or ``hf:<dataset id>/<data dir>[:split]`` through `datasets`."""
    import datasets

    spec = src[3:]
    dataset_id, _, split = spec.partition(":")
    split = split or "train"
    parts = dataset_id.split("/")
    data_dir = "/".join(parts[2:]) or None  # e.g. hf:Anthropic/hh-rlhf/harmless-base:test
    ds = datasets.load_dataset("/".join(parts[:2]), data_dir=data_dir, split=split, streaming=True)
    for n, rec in enumerate(ds, 1):
        yield n, dict(rec)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [rec for _, rec in iter_records(path)]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", private: bool = False, newline: str | None = None):
    """Open a temporary file next to ``path``; rename it over ``path`` only on success.

    private: the file keeps mode 0600 (owner only: exports of the annotation data, as the
    database itself); otherwise it gets the umask's ordinary permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8", newline=newline) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600 if private else 0o666 & ~_UMASK)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import: os.umask can only be read by setting it, which is not thread-safe later
# (a file another thread creates meanwhile would get the temporary mask).
_UMASK = _umask()


def dumps(record: dict) -> str:
    """One JSON line, UTF-8 kept readable."""
    return json.dumps(record, ensure_ascii=False)


def dumps_bytes(record: dict) -> bytes:
    """One JSON line as UTF-8 bytes, fast (orjson); for bulk writers."""
    return orjson.dumps(record) + b"\n"


def write_jsonl(path: str | os.PathLike, records, private: bool = False) -> int:
    n = 0
    with atomic_write(path, private=private) as fh:
        for rec in records:
            fh.write(dumps(rec) + "\n")
            n += 1
    return n


# --- CSV: the one writer for every CSV file the project produces ---------------------------------

# A spreadsheet runs a cell whose text starts with one of these as a formula (CSV injection);
# full-width forms count, since some spreadsheets fold them to ASCII. Leading whitespace and
# line breaks do not protect a cell: spreadsheets skip them.
FORMULA_CHARS = frozenset("=+-@\uff1d\uff0b\uff0d\uff20")
_CONTROL_START = ("\t", "\r", "\n")


def csv_cell(value) -> str:
    """Text for one CSV cell: None is empty, dicts/lists are JSON, numbers and booleans as
    written; text that a spreadsheet would run as a formula — a formula character first, after
    any leading whitespace or line breaks, ASCII or full-width — or that starts with a tab or a
    line break gets an apostrophe in front."""
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        value = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, (bool, int, float)):
        return str(value)
    text = str(value)
    stripped = text.lstrip()
    if text.startswith(_CONTROL_START) or (stripped and stripped[0] in FORMULA_CHARS):
        return "'" + text
    return text


def write_csv(path: str | os.PathLike, fields, rows, private: bool = False) -> int:
    """Write ``rows`` (dicts, or sequences in ``fields`` order) under a ``fields`` header,
    atomically; returns the row count. Every cell is quoted (a line break or quote inside a
    cell cannot start a row or a cell) and passes through :func:`csv_cell`. UTF-8, ``\\n``
    line ends between rows."""
    fields = list(fields)
    n = 0
    with atomic_write(path, private=private, newline="") as fh:
        writer = csv.writer(fh, quoting=csv.QUOTE_ALL, lineterminator="\n")
        writer.writerow([csv_cell(f) for f in fields])
        for row in rows:
            values = [row.get(f) for f in fields] if isinstance(row, dict) else list(row)
            writer.writerow([csv_cell(v) for v in values])
            n += 1
    return n


def parse_columns(spec: str | None, fields, flag: str = "--columns") -> dict[str, str]:
    """``FIELD=COLUMN[,FIELD=COLUMN...]`` -> ``{FIELD: COLUMN}``: which input column holds each field.

    ``fields`` are the field names the command knows (e.g. ``("query", "draft", "golden")``); a
    field not named keeps its own name as column. Column names may contain spaces but not ``,``
    or ``=``. One clear error naming ``flag`` for an unknown field, a repeated field, or an item
    without ``=``.

    >>> parse_columns("draft=generated_text,golden=goldens", ("query", "draft", "golden"))
    {'draft': 'generated_text', 'golden': 'goldens'}
    """
    known = tuple(fields)
    mapping: dict[str, str] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        field, sep, column = item.partition("=")
        field, column = field.strip(), column.strip()
        if not sep or not field or not column:
            raise MetaAlignerError(f'{flag}: "{item.strip()}" is not FIELD=COLUMN (e.g. {flag} draft=generated_text)')
        if field not in known:
            raise MetaAlignerError(f'{flag}: unknown field "{field}" (valid: {", ".join(known)})')
        if field in mapping:
            raise MetaAlignerError(f'{flag}: field "{field}" is mapped twice')
        mapping[field] = column
    return mapping


def apply_columns(record: dict, mapping: dict[str, str]) -> dict:
    """A copy of ``record`` with each mapped ``COLUMN`` also available under its ``FIELD`` name.

    The original columns are kept (output rows keep every input field); a mapped field overrides
    a column of the same name. A column that is absent leaves the field absent, so the caller's
    "missing" check names it (see :func:`column_label`).
    """
    if not mapping:
        return record
    out = dict(record)
    for field, column in mapping.items():
        if column in record:
            out[field] = record[column]
        else:
            out.pop(field, None)
    return out


def column_label(field: str, mapping: dict[str, str]) -> str:
    """The input column to name in an error about ``field``: its mapped column, else the field."""
    return mapping.get(field, field)
