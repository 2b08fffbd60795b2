"""Machine-readable output carries full precision (issue 26): ``annotate agreement --json``
against the ``krippendorff`` package to 1e-9; displays round, JSON does not."""
from __future__ import annotations

import json

import krippendorff
import numpy as np

from conftest import run_cli, write_jsonl


def _ratings(n_items: int = 23):
    rng = np.random.default_rng(7)
    rows = []
    for i in range(n_items):
        base = int(rng.integers(0, 4))
        for who in ("x", "y", "z"):
            noise = int(rng.integers(-1, 2)) if who != "x" else 0
            rows.append({"item_id": f"i{i}", "query": f"q{i}", "response": f"r{i}", "source": "m",
                         "annotator": who, "objective": "correctness", "score": int(np.clip(base + noise, 0, 3)),
                         "seconds": float(rng.uniform(3, 40))})
    return rows


def test_agreement_json_is_krippendorff_to_1e9_and_unrounded(tmp_path):
    rows = _ratings()
    db = f"sqlite:///{tmp_path / 'ann.db'}"
    res = run_cli("annotate", "import-ratings", "--db", db, "--input", write_jsonl(tmp_path / "r.jsonl", rows))
    assert res.returncode == 0, res.stderr
    res = run_cli("annotate", "agreement", "--db", db, "--json", "--bootstrap", "200")
    assert res.returncode == 0, res.stderr
    block = json.loads(res.stdout)["objectives"]["correctness"]
    matrix = np.array([[r["score"] for r in rows if r["annotator"] == a] for a in ("x", "y", "z")], dtype=float)
    expected = krippendorff.alpha(reliability_data=matrix, level_of_measurement="ordinal", value_domain=[0, 1, 2, 3])
    assert abs(block["alpha"] - expected) < 1e-9
    assert round(expected, 4) != expected  # so a 4-decimal rounding could not pass the line above
    lo, hi = block["ci95"]
    assert lo < block["alpha"] < hi and (round(lo, 4), round(hi, 4)) != (lo, hi)
    # the text output rounds for display
    text = run_cli("annotate", "agreement", "--db", db, "--bootstrap", "200").stdout
    assert f"{expected:.3f}" in text and repr(block["alpha"]) not in text


def test_progress_json_seconds_per_item_is_unrounded(tmp_path, monkeypatch):
    import sqlite3

    from annotation import accounts
    from annotation.store import Store, dispose_engine

    monkeypatch.setattr(accounts, "SCRYPT_N", 2 ** 10)
    db_path = tmp_path / "ann.db"
    db = f"sqlite:///{db_path}"
    store = Store(db)
    store.import_items(write_jsonl(tmp_path / "items.jsonl", [
        {"item_id": f"i{i}", "query": f"q{i}", "responses": [{"text": f"a{i}"}]} for i in range(3)]))
    store.add_annotator("rita", "a long rater password")
    token = store.sign_in("rita", "a long rater password")
    for secs in (10.123456, 7.654321, 3.333333):
        view = store.next_item(token)
        scores = {(r.id, o.key): 1 for r in view.responses for o in view.protocol.objectives}
        store.save(token, view.uid, scores, submit=True, seconds=secs)
    dispose_engine(db)
    res = run_cli("annotate", "progress", "--db", db, "--json")
    assert res.returncode == 0, res.stderr
    got = {p["annotator"]: p for p in json.loads(res.stdout)["annotators"]}["rita"]["seconds_per_item"]
    con = sqlite3.connect(db_path)  # the stored seconds, summed here without the store
    total = con.execute("SELECT SUM(seconds) FROM ratings").fetchone()[0]
    con.close()
    assert abs(got - total / 3) < 1e-9 and round(got, 1) != got
