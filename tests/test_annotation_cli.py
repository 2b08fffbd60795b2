"""``metaaligner annotate`` as a user runs it, and the full loop into ``build-dataset``."""
from __future__ import annotations

import json
import sqlite3
from statistics import mean

import krippendorff
import numpy as np
import pytest

from annotation.store import Store
from conftest import ROOT, read_jsonl, run_cli, write_jsonl
from metaaligner_core.objectives import lookup
from metaaligner_core.templates import build_prompt

PASSWORD = "s3cret-pass-phrase"


def _db(tmp_path):
    return f"sqlite:///{tmp_path / 'db' / 'ann.db'}"


def _counts(tmp_path) -> dict:
    if not (tmp_path / "db" / "ann.db").exists():  # a rejected first import creates no database
        return dict.fromkeys(("annotators", "items", "responses", "ratings"), 0)
    con = sqlite3.connect(tmp_path / "db" / "ann.db")
    out = {t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
           for t in ("annotators", "items", "responses", "ratings")}
    con.close()
    return out


def test_add_annotator_reads_the_password_from_a_file_or_env_and_never_prints_it(tmp_path):
    db = _db(tmp_path)
    pw = tmp_path / "pw.txt"
    pw.write_text(PASSWORD + "\n")
    res = run_cli("annotate", "add-annotator", "--db", db, "alice", "--admin", "--password-file", pw)
    assert res.returncode == 0, res.stderr
    assert "alice added (admin)" in res.stdout
    res = run_cli("annotate", "add-annotator", "--db", db, "bob", env={"METAALIGNER_ANNOTATOR_PASSWORD": PASSWORD})
    assert res.returncode == 0, res.stderr
    res = run_cli("annotate", "add-annotator", "--db", db, "carol", input="",
                  env={"METAALIGNER_ANNOTATOR_PASSWORD": ""})
    assert res.returncode == 2 and "--password-file" in res.stderr
    res = run_cli("annotate", "add-annotator", "--db", db, "alice", "--password-file", pw)
    assert res.returncode == 2 and 'annotator "alice" already exists' in res.stderr
    store = Store(db)
    assert store.whoami(store.sign_in("alice", PASSWORD)).is_admin
    assert not store.whoami(store.sign_in("bob", PASSWORD)).is_admin
    # nothing the commands printed contains the password; the database holds only scrypt hashes
    assert PASSWORD not in res.stdout + res.stderr
    hashes = [h for (h,) in sqlite3.connect(tmp_path / "db" / "ann.db").execute("SELECT password_hash FROM annotators")]
    assert all(h.startswith("scrypt$") and PASSWORD not in h for h in hashes)


RATINGS = [
    {"query": "post A", "response": "first answer", "source": "m1", "annotator": "x", "objective": "correctness", "score": 3},
    {"query": "post A", "response": "second answer", "source": "m2", "annotator": "x", "objective": "correctness", "score": 1},
    {"query": "post A", "response": "first answer", "annotator": "y", "objective": "Correctness", "score": "2"},
    {"query": "post A", "response": "second answer", "annotator": "y", "objective": "correctness", "score": 1},
    {"query": "post B", "response": "only answer", "annotator": "y", "objective": "informative", "score": 0},
]


@pytest.mark.parametrize("line,change,field,message", [
    (3, {"score": 4}, "score", "expected an integer 0-3, got 4"),
    (2, {"score": 2.5}, "score", "expected an integer 0-3, got 2.5"),
    (4, {"score": None}, "score", "missing"),
    (5, {"objective": "humour"}, "objective", '"humour" is not in protocol "imhi"'),
    (1, {"annotator": ""}, "annotator", "missing or empty"),
    (2, {"response": None}, "response", "missing or empty"),
])
def test_import_ratings_rejects_a_file_with_any_bad_row_as_a_whole(tmp_path, line, change, field, message):
    db = _db(tmp_path)
    assert run_cli("annotate", "import-ratings", "--db", db, "--input",
                   write_jsonl(tmp_path / "ok.jsonl", RATINGS[:1])).returncode == 0
    before = _counts(tmp_path)
    rows = [dict(r) for r in RATINGS]
    rows[line - 1].update(change)
    src = write_jsonl(tmp_path / "ratings.jsonl", rows)
    res = run_cli("annotate", "import-ratings", "--db", db, "--input", src)
    assert res.returncode != 0
    err = res.stderr.strip().splitlines()
    assert len(err) == 1
    assert f'{src}:{line}: field "{field}": {message}' in err[0]
    assert _counts(tmp_path) == before


def test_import_ratings_csv_bad_row_names_the_csv_line(tmp_path):
    src = tmp_path / "r.csv"
    src.write_text("query,response,annotator,objective,score\n"
                   "q,a,x,correctness,2\n"
                   "q,b,x,correctness,7\n", encoding="utf-8")
    res = run_cli("annotate", "import-ratings", "--db", _db(tmp_path), "--input", src)
    assert res.returncode == 2
    assert f'{src}:3: field "score": expected an integer 0-3' in res.stderr
    assert _counts(tmp_path)["ratings"] == 0


def test_import_ratings_creates_items_in_order_and_counts_as_submitted(tmp_path):
    db = _db(tmp_path)
    res = run_cli("annotate", "import-ratings", "--db", db, "--input", write_jsonl(tmp_path / "r.jsonl", RATINGS))
    assert res.returncode == 0, res.stderr
    assert "5 ratings stored (2 new items, 3 new responses); 2 new annotators without a password" in res.stdout
    # importing again updates in place: no duplicates
    assert run_cli("annotate", "import-ratings", "--db", db, "--input", tmp_path / "r.jsonl").returncode == 0
    assert _counts(tmp_path) == {"annotators": 2, "items": 2, "responses": 3, "ratings": 5}
    out = tmp_path / "ratings.jsonl"
    assert run_cli("annotate", "export", "--db", db, "--format", "ratings", "--out", out).returncode == 0
    got = read_jsonl(out)
    assert [(r["query"], r["response"], r["annotator"], r["objective"], r["score"]) for r in got] == [
        ("post A", "first answer", "x", "correctness", 3), ("post A", "first answer", "y", "correctness", 2),
        ("post A", "second answer", "x", "correctness", 1), ("post A", "second answer", "y", "correctness", 1),
        ("post B", "only answer", "y", "informative", 0)]
    res = run_cli("annotate", "agreement", "--db", db, "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert list(report["objectives"]) == ["correctness", "informative", "professional"]
    assert report["objectives"]["correctness"]["units"] == 2
    assert report["objectives"]["correctness"]["annotators"] == 2
    assert report["objectives"]["informative"] == {"alpha": None, "units": 0, "annotators": 1, "ci95": None}
    res = run_cli("annotate", "agreement", "--db", db)
    assert res.returncode == 0 and "correctness" in res.stdout and "n/a" in res.stdout


def test_export_refuses_unknown_formats_and_bad_file_names(tmp_path):
    db = _db(tmp_path)
    run_cli("annotate", "import-ratings", "--db", db, "--input", write_jsonl(tmp_path / "r.jsonl", RATINGS))
    res = run_cli("annotate", "export", "--db", db, "--format", "pairs", "--out", tmp_path / "p.csv")
    assert res.returncode == 2 and "JSON Lines" in res.stderr
    assert not (tmp_path / "p.csv").exists()
    res = run_cli("annotate", "import", "--db", db, "--input", tmp_path / "missing.jsonl")
    assert res.returncode == 2 and "no such file" in res.stderr
    # A protocol name that is not in the database (a typo) is an error, not an empty export.
    res = run_cli("annotate", "export", "--db", db, "--format", "ratings", "--out", tmp_path / "out.jsonl",
                  "--protocol", "imhl")
    assert res.returncode == 2 and '--protocol "imhl": not in the database (stored: imhi)' in res.stderr
    assert not (tmp_path / "out.jsonl").exists()
    res = run_cli("annotate", "agreement", "--db", db, "--protocol", "imhl")
    assert res.returncode == 2 and "not in the database" in res.stderr


OBJECTIVES = ("correctness", "informative", "professional")
# SCORES[annotator][item][response] = (correctness, informative, professional)
SCORES = {
    "ann1": [[(3, 2, 2), (1, 1, 0), (2, 2, 3)], [(0, 1, 1), (3, 3, 2), (2, 1, 1)], [(2, 2, 2), (2, 2, 2), (1, 0, 0)]],
    "ann2": [[(3, 3, 2), (0, 1, 1), (2, 1, 3)], [(1, 1, 0), (3, 2, 2), (2, 2, 1)], [(2, 3, 2), (2, 1, 2), (0, 0, 1)]],
    "ann3": [[(2, 2, 1), (1, 0, 0), (3, 2, 3)], [(0, 0, 1), (3, 3, 3), (1, 1, 1)], [(2, 2, 2), (2, 2, 2), (1, 1, 0)]],
}


def test_full_loop_items_ratings_agreement_pairs_build_dataset(tmp_path):
    """import items -> three annotators rate -> agreement -> pairs -> build-dataset rows."""
    db = _db(tmp_path)
    items = [{"query": f"Consider this post: post {i}. Question: Does the poster suffer from depression?",
              "responses": [{"text": f"item {i} response {j}", "source": f"model{j}"} for j in range(3)]}
             for i in range(3)]
    res = run_cli("annotate", "import", "--db", db, "--input", write_jsonl(tmp_path / "items.jsonl", items),
                  "--raters", "3")
    assert res.returncode == 0 and "3 items added" in res.stdout, res.stderr
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD)
    for name in SCORES:
        extra = ["--admin"] if name == "ann1" else []
        assert run_cli("annotate", "add-annotator", "--db", db, name, "--password-file", pw, *extra).returncode == 0

    # the annotators rate through the service layer, as the Annotate tab does
    store = Store(db)
    for name, per_item in SCORES.items():
        token = store.sign_in(name, PASSWORD)
        while (view := store.next_item(token)) is not None:
            i = int(view.query.split("post ")[1].split(".")[0])
            scores = {(r.id, o): per_item[i][j][k] for j, r in enumerate(view.responses) for k, o in enumerate(OBJECTIVES)}
            store.save(token, view.uid, scores, submit=True, seconds=10)
    progress = run_cli("annotate", "progress", "--db", db, "--json")
    assert json.loads(progress.stdout)["complete"] == 3

    # agreement: alpha per objective over the 9 responses x 3 annotators matrix
    res = run_cli("annotate", "agreement", "--db", db, "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)["objectives"]
    for k, obj in enumerate(OBJECTIVES):
        matrix = np.array([[SCORES[a][i][j][k] for i in range(3) for j in range(3)] for a in SCORES], dtype=float)
        expected = krippendorff.alpha(reliability_data=matrix, level_of_measurement="ordinal", value_domain=[0, 1, 2, 3])
        assert {k: report[obj][k] for k in ("alpha", "units", "annotators")} == {
            "alpha": pytest.approx(expected, abs=1e-4), "units": 9, "annotators": 3}
        lo, hi = report[obj]["ci95"]
        assert lo <= report[obj]["alpha"] <= hi

    # pairs by the mean-score rule, response_1 the earlier response
    pairs_path = tmp_path / "pairs.jsonl"
    res = run_cli("annotate", "export", "--db", db, "--format", "pairs", "--out", pairs_path)
    assert res.returncode == 0 and "9 pairs" in res.stdout, res.stderr
    pairs = read_jsonl(pairs_path)
    expected_pairs = []
    for i in range(3):
        for j1, j2 in ((0, 1), (0, 2), (1, 2)):
            labels = {}
            for k, obj in enumerate(OBJECTIVES):
                m1 = mean(SCORES[a][i][j1][k] for a in SCORES)
                m2 = mean(SCORES[a][i][j2][k] for a in SCORES)
                labels[obj] = ">" if m1 > m2 else "<" if m1 < m2 else "="
            expected_pairs.append((items[i]["query"], f"item {i} response {j1}", f"item {i} response {j2}", labels))
    assert [(p["query"], p["response_1"], p["response_2"], p["labels"]) for p in pairs] == expected_pairs
    assert all(p["objectives"] == {k: lookup(k, "imhi").text for k in p["labels"]} for p in pairs)
    assert any("=" in p["labels"].values() for p in pairs) and any("<" in p["labels"].values() for p in pairs)

    # build-dataset turns the pairs into training rows (Algorithm 1)
    out = tmp_path / "dataset"
    res = run_cli("-q", "build-dataset", "--source", "generic", "--template", "imhi", "--input", pairs_path,
                  "--out", out)
    assert res.returncode == 0, res.stderr
    rows = read_jsonl(out / "preference.jsonl") + read_jsonl(out / "equal.jsonl")
    expected_rows = []
    for idx, (query, r1, r2, labels) in enumerate(expected_pairs):
        for label, answer, target, subset in ((">", r2, r1, "preference"), ("<", r1, r2, "preference"),
                                              ("=", r2, r1, "equal")):
            keys = {k for k, v in labels.items() if v == label}
            if keys:
                expected_rows.append((idx, subset, answer, target, frozenset(keys)))
    got_rows = [(r["source_index"], r["subset"], r["prompt"], r["completion"], frozenset(r["objectives"])) for r in rows]
    assert len(got_rows) == len(expected_rows)
    for idx, subset, answer, target, keys in expected_rows:
        match = [g for g in got_rows if g[0] == idx and g[1] == subset and g[4] == keys]
        assert len(match) == 1, (idx, subset, keys)
        _, _, prompt, completion, _ = match[0]
        assert completion == target
        order = next(r["objectives"] for r in rows if r["source_index"] == idx and r["subset"] == subset
                     and set(r["objectives"]) == keys)
        variant = "equal" if subset == "equal" else "better"
        assert prompt == build_prompt("imhi", expected_pairs[idx][0], answer, [lookup(k, "imhi") for k in order], variant)


def test_imhi_items_script_builds_items_and_refuses_missing_folders(tmp_path):
    import subprocess
    import sys

    queries, outputs = tmp_path / "queries", tmp_path / "outputs"
    for d in (queries, outputs / "model-a", outputs / "model-b"):
        d.mkdir(parents=True)
    (queries / "dr.csv").write_text("query\nAm I depressed?\nIs this stress?\n")
    (outputs / "model-a" / "dr.csv").write_text('generated_text\nYes.\n""\n')
    (outputs / "model-b" / "dr.csv").write_text("generated_text\nNo.\nMaybe.\n")
    script = [sys.executable, str(ROOT / "scripts" / "imhi_annotation_items.py"), "--queries", str(queries),
              "--outputs", str(outputs)]
    out = tmp_path / "items.jsonl"
    res = subprocess.run([*script, "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    # The second query has one answer only: an item needs two to compare.
    assert [json.loads(x) for x in out.read_text().splitlines()] == [
        {"item_id": "dr-0000", "query": "Am I depressed?",
         "responses": [{"text": "Yes.", "source": "model-a"}, {"text": "No.", "source": "model-b"}]}]
    res = subprocess.run([*script[:3], str(tmp_path / "nope"), "--out", str(tmp_path / "x.jsonl")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().endswith("nope: no such folder")
    assert not (tmp_path / "x.jsonl").exists()


def test_protocols_listing_and_the_audit_trail_from_the_command_line(tmp_path):
    db = _db(tmp_path)
    res = run_cli("annotate", "protocols")
    assert res.returncode == 0 and "imhi" in res.stdout and "version 2-paper-c3" in res.stdout
    assert "ultrafeedback" in res.stdout and "--protocol FILE" in res.stdout
    res = run_cli("annotate", "protocols", "--show", "imhi")
    assert res.returncode == 0 and "Suicide ideation: Thoughts that you would be better off dead." in res.stdout
    rows = [{"item_id": "x", "query": "q", "response": "a", "annotator": "ann", "objective": "correctness", "score": 2}]
    assert run_cli("annotate", "import-ratings", "--db", db, "--input",
                   write_jsonl(tmp_path / "r.jsonl", rows)).returncode == 0
    res = run_cli("annotate", "import-ratings", "--db", db, "--input",
                  write_jsonl(tmp_path / "r2.jsonl", [{**rows[0], "score": 3}]), "--overwrite")
    assert res.returncode == 0 and "1 submitted scores replaced" in res.stdout, res.stderr
    res = run_cli("annotate", "protocols", "--db", db)
    assert f"in {db}:" in res.stdout and "(1 items)" in res.stdout
    res = run_cli("annotate", "audit", "--db", db, "--json")
    events = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(e["actor"], e["path"], e["old_score"], e["new_score"]) for e in events] == [
        ("operator", "import-ratings", None, 2), ("operator", "import-ratings --overwrite", 2, 3)]
    res = run_cli("annotate", "audit", "--db", db, "--item", "x")
    assert "import-ratings --overwrite" in res.stdout and "2 -> 3" in res.stdout
