"""CSV that no cell can break, and exports only their owner can read (issue 19).

The writer (``metaaligner_core.io.write_csv``) serves every CSV the project writes. Cells carry
bare carriage returns, line feeds, quotes, leading spaces and full-width formula characters;
read back with ``csv.reader`` they give exactly the rows written, and no cell starts with a
formula character, even after its leading whitespace.
"""
from __future__ import annotations

import csv
import io
import json
import stat

import pytest

from annotation.store import Store
from conftest import read_jsonl, run_cli, write_jsonl
from metaaligner_core.io import csv_cell, write_csv

# What a spreadsheet runs as a formula: the ASCII and full-width signs (checked independently
# of the module's own list).
FORMULA = "=+-@" + "".join(chr(c) for c in (0xFF1D, 0xFF0B, 0xFF0D, 0xFF20))

HOSTILE = ["A draft\r=1+41", "line one\n=1+41", "\r=1+41", "\n@SUM(A1)", " =1+41", "\t=1+41", "\u3000=1",
           "\uff1d1+41", "\uff0bcmd", "\uff0d2", "\uff20SUM(A1)", 'quote " and, comma', "=HYPERLINK(\"http://x\")",
           "ends with CR\r", "\r\n\r\n", "-1 is negative", "plain", ""]


def _starts_with_formula(cell: str) -> bool:
    s = cell.lstrip(" \t\r\n\u3000\u00a0")
    return bool(s) and s[0] in FORMULA


@pytest.mark.parametrize("value,expected", [
    (" =1+41", "' =1+41"), ("\r=1+41", "'\r=1+41"), ("\n=1", "'\n=1"), ("\uff1d1+1", "'\uff1d1+1"),
    ("\uff20x", "'\uff20x"), ("\uff0b1", "'\uff0b1"), ("\uff0d1", "'\uff0d1"), ("\u3000=1", "'\u3000=1"),
    ("\t", "'\t"), ("a\r=1", "a\r=1"), ("plain", "plain"), ("", ""), (None, ""), (-3, "-3"), (2.5, "2.5"),
    ({"r1": 3}, '{"r1": 3}'), (["a", "b"], '["a", "b"]'),
])
def test_cell_guard_after_whitespace_and_for_full_width_signs(value, expected):
    assert csv_cell(value) == expected


def test_write_csv_rows_read_back_exactly_with_csv_reader(tmp_path):
    rows = [{"id": i, "text": t, "other": HOSTILE[-1 - i]} for i, t in enumerate(HOSTILE)]
    path = tmp_path / "x.csv"
    assert write_csv(path, ["id", "text", "other"], rows) == len(rows)
    raw = path.read_bytes().decode("utf-8")
    got = list(csv.reader(io.StringIO(raw, newline="")))
    assert len(got) == len(rows) + 1 and got[0] == ["id", "text", "other"]
    for row, line in zip(rows, got[1:]):
        assert line[0] == str(row["id"])
        for value, cell in zip((row["text"], row["other"]), line[1:]):
            assert not _starts_with_formula(cell), cell
            assert cell == value or cell == "'" + value  # only an apostrophe added, nothing else changed
    assert raw.startswith('"id","text","other"\n')  # every cell quoted, the header too


def _hostile_study(tmp_path, db):
    """A database whose items, responses and notes carry the hostile texts (as a rater could)."""
    ratings = []
    for i, text in enumerate(HOSTILE):
        for who, score in (("x", i % 4), ("y", (i + 1) % 4)):
            ratings.append({"item_id": f"it{i}", "query": f"q{i} {text}", "response": text if text.strip() else f"blank {i}\r\n",
                            "source": HOSTILE[i - 1] if HOSTILE[i - 1].strip() else "src", "annotator": who, "objective": "correctness",
                            "score": score, "note": HOSTILE[-1 - i] or None})
    res = run_cli("annotate", "import-ratings", "--db", db, "--input", write_jsonl(tmp_path / "r.jsonl", ratings))
    assert res.returncode == 0, res.stderr
    return ratings


@pytest.mark.parametrize("fmt", ["ratings", "final"])
def test_cli_csv_exports_of_hostile_texts_keep_their_rows_and_are_owner_only(tmp_path, fmt):
    db = f"sqlite:///{tmp_path / 'ann.db'}"
    _hostile_study(tmp_path, db)
    out_csv, out_jsonl = tmp_path / "out" / f"{fmt}.csv", tmp_path / "out" / f"{fmt}.jsonl"
    for out in (out_csv, out_jsonl):
        res = run_cli("annotate", "export", "--db", db, "--format", fmt, "--out", out)
        assert res.returncode == 0, res.stderr
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
    records = read_jsonl(out_jsonl)
    with open(out_csv, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    assert len(body) == len(records)  # no cell grew a row
    for rec, row in zip(records, body):
        assert len(row) == len(header)
        for key, cell in zip(header, row):
            assert not _starts_with_formula(cell), (key, cell)
            value = rec.get(key)
            if isinstance(value, str):
                assert cell in (value, "'" + value)
            elif isinstance(value, (dict, list)):
                assert json.loads(cell) == value
    res = run_cli("annotate", "export", "--db", db, "--format", "pairs", "--out", tmp_path / "out" / "pairs.jsonl")
    assert res.returncode == 0 and stat.S_IMODE((tmp_path / "out" / "pairs.jsonl").stat().st_mode) == 0o600


def test_app_export_files_are_owner_only(tmp_path):
    from annotation.ui import export_files

    db = f"sqlite:///{tmp_path / 'ann.db'}"
    _hostile_study(tmp_path, db)
    store = Store(db)
    store.add_annotator("boss", "a long admin password", role="admin")
    paths = export_files(store, store.sign_in("boss", "a long admin password"), tmp_path / "app-out")
    assert paths and {stat.S_IMODE(p.stat().st_mode) for p in paths.values()} == {0o600}
    with open(paths["ratings.csv"], encoding="utf-8", newline="") as fh:
        assert len(list(csv.reader(fh))) == len(read_jsonl(paths["ratings.jsonl"])) + 1
