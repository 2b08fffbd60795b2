"""A study as a team runs it, on SQLite and PostgreSQL (``db_url``): the examiner's review, final
labels, the audit trail, import-ratings' overwrite rule and published file shapes, gold items,
the dashboard figures, the hf export, and the forward migration of older databases."""
from __future__ import annotations

import csv
import hashlib
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from annotation.models import Assignment
from annotation.store import OPERATOR, AccessDenied, Store
from conftest import read_jsonl, run_cli, write_jsonl
from metaaligner_core.errors import InputError, MetaAlignerError

PASSWORD = "workflow-password"
OBJ = ("correctness", "informative", "professional")


@pytest.fixture(autouse=True)
def fast_passwords(monkeypatch):
    from annotation import accounts

    monkeypatch.setattr(accounts, "SCRYPT_N", 2 ** 10)


@pytest.fixture
def store(db_url):
    return Store(db_url)


def _people(store, **roles):
    out = {}
    for name, role in roles.items():
        store.add_annotator(name, PASSWORD, role=role)
        out[name] = store.sign_in(name, PASSWORD)
    return out


def _rate(store, token, view, per_response):
    """per_response: one tuple of 3 scores per response."""
    scores = {(r.id, o): per_response[j][k] for j, r in enumerate(view.responses) for k, o in enumerate(OBJ)}
    return store.save(token, view.uid, scores, notes={view.responses[0].id: "my note"}, submit=True, seconds=20)


def _two_rated_items(tmp_path, store):
    rows = [{"item_id": f"it{i}", "query": f"post {i}", "responses": [{"text": f"a{i}", "source": "m1"},
                                                                      {"text": f"b{i}", "source": "m2"}]}
            for i in range(2)]
    store.import_items(write_jsonl(tmp_path / "items.jsonl", rows))
    t = _people(store, r1="rater", r2="rater", ex="examiner", boss="admin")
    plan = {"it0": {"r1": [(3, 3, 3), (1, 1, 1)], "r2": [(3, 3, 3), (1, 1, 1)]},   # agree
            "it1": {"r1": [(3, 2, 1), (0, 0, 0)], "r2": [(1, 2, 1), (0, 0, 2)]}}   # disagree twice
    for who in ("r1", "r2"):
        while (v := store.next_item(t[who])) is not None:
            _rate(store, t[who], v, plan[v.uid][who])
    return t


def test_examiner_reviews_disagreements_and_final_labels_say_who_decided(tmp_path, store):
    t = _two_rated_items(tmp_path, store)
    with pytest.raises(AccessDenied):
        store.review_queue(t["r1"])
    queue = store.review_queue(t["ex"])
    assert [(q["item_id"], q["flagged"], q["raters"]) for q in queue] == [("it1", 2, ["r1", "r2"])]
    it = store.review_view(t["ex"], "it1")
    a, b = it.responses
    assert a.raters["correctness"] == {"r1": 3, "r2": 1} and b.raters["professional"] == {"r1": 0, "r2": 2}
    assert a.notes == {"r1": "my note", "r2": "my note"}
    with pytest.raises(MetaAlignerError, match="reason"):
        store.finalize(t["ex"], "it1", {(a.response_id, "correctness"): 2}, "  ")
    with pytest.raises(MetaAlignerError, match="missing: response 2 / Professionalism"):
        store.finalize(t["ex"], "it1", {(a.response_id, "correctness"): 2}, "post is ambiguous")
    with pytest.raises(AccessDenied):
        store.finalize(t["r1"], "it1", {(a.response_id, "correctness"): 2, (b.response_id, "professional"): 1}, "x")
    # the examiner's scores differ from the raters' means (2 and 1), so the pairs below show which was used
    store.finalize(t["ex"], "it1", {(a.response_id, "correctness"): 0, (b.response_id, "professional"): 2},
                   "post is ambiguous")
    assert store.review_queue(t["ex"]) == []
    final = {(f["item_id"], f["response"], f["objective"]): f for f in store.final_records(t["boss"])}
    assert final[("it1", "a1", "correctness")]["final_score"] == 0
    assert final[("it1", "a1", "correctness")]["decided_by"] == "ex"
    assert final[("it1", "a1", "correctness")]["reason"] == "post is ambiguous"
    assert final[("it1", "a1", "correctness")]["ratings"] == {"r1": 3, "r2": 1}
    assert (final[("it1", "a1", "informative")]["final_score"], final[("it1", "a1", "informative")]["decided_by"]) \
        == (2, "agreement")
    assert final[("it0", "b0", "professional")]["decided_by"] == "agreement"
    # pairs compare the examiner's score where reviewed, else the mean
    pairs = {p["item_id"]: p for p in store.pair_records(t["boss"])}
    assert pairs["it1"]["labels"] == {"correctness": "=", "informative": ">", "professional": "<"}
    assert pairs["it0"]["labels"] == {"correctness": ">", "informative": ">", "professional": ">"}
    # the audit trail has the review, with the reason
    reviews = [e for e in store.audit_events(t["boss"], item_uid="it1") if e["kind"] == "review"]
    assert {(e["actor"], e["path"], e["old_score"], e["new_score"], e["reason"]) for e in reviews} == {
        ("ex", "review", None, 0, "post is ambiguous"), ("ex", "review", None, 2, "post is ambiguous")}


def test_every_rating_change_is_audited_with_who_when_old_new_and_path(tmp_path, store):
    store.import_items(write_jsonl(tmp_path / "i.jsonl", [{"item_id": "x", "query": "q", "responses": ["a"]}]))
    t = _people(store, ann="rater", boss="admin")
    v = store.next_item(t["ann"])
    rid = v.responses[0].id
    store.save(t["ann"], "x", {(rid, "correctness"): 1})                       # draft
    store.save(t["ann"], "x", {(rid, o): 2 for o in OBJ}, submit=True)        # submit, 1 -> 2
    store.save(t["ann"], "x", {(rid, "correctness"): 0}, submit=True)          # change after submit
    events = [(e["actor"], e["path"], e["rater"], e["objective"], e["old_score"], e["new_score"], e["old_status"],
               e["new_status"]) for e in store.audit_events(t["boss"], item_uid="x")]
    assert events == [
        ("ann", "app", "ann", "correctness", None, 1, None, "draft"),
        ("ann", "app", "ann", "correctness", 1, 2, "draft", "submitted"),
        ("ann", "app", "ann", "informative", None, 2, None, "submitted"),
        ("ann", "app", "ann", "professional", None, 2, None, "submitted"),
        ("ann", "app", "ann", "correctness", 2, 0, "submitted", "submitted"),
    ]
    assert all(e["at"] for e in store.audit_events(t["boss"]))
    with pytest.raises(AccessDenied):
        store.audit_events(t["ann"])


def test_import_ratings_never_silently_overwrites_a_submitted_score(tmp_path, store):
    rows = [{"item_id": "x", "query": "q", "response": "a", "annotator": "ann", "objective": "correctness", "score": 2}]
    store.import_ratings(write_jsonl(tmp_path / "r1.jsonl", rows))
    store.import_ratings(write_jsonl(tmp_path / "same.jsonl", rows))  # the same score again is fine
    changed = [{**rows[0], "score": 0}, {**rows[0], "objective": "informative", "score": 1}]
    with pytest.raises(InputError, match=r'r2.jsonl:1: field "score": ann already submitted 2 .* --overwrite'):
        store.import_ratings(write_jsonl(tmp_path / "r2.jsonl", changed))
    assert {(r["objective"], r["score"]) for r in store.rating_records(OPERATOR)} == {("correctness", 2)}
    res = store.import_ratings(tmp_path / "r2.jsonl", overwrite=True)
    assert res.overwritten == 1
    assert {(r["objective"], r["score"]) for r in store.rating_records(OPERATOR)} == {("correctness", 0),
                                                                                     ("informative", 1)}
    ev = [e for e in store.audit_events(OPERATOR) if e["objective"] == "correctness"]
    assert [(e["actor"], e["path"], e["old_score"], e["new_score"]) for e in ev] == [
        ("operator", "import-ratings", None, 2), ("operator", "import-ratings --overwrite", 2, 0)]


# The shape of the MentalLLaMA human-evaluation files (github.com/SteveKGYang/MentalLLaMA,
# human_evaluation/): one row per post, the model's explanation, and a column per aspect holding
# the three experts' scores as a list. The texts here are made up; the header and cell format
# are the published ones.
PUBLISHED_HEADER = "text,label,gpt-3.5-turbo,fluency,completeness,reliability,overall"
PROTOCOL = """\
name: mentalllama-human-eval
version: "1"
raters: 3
title: MentalLLaMA human evaluation (fluency, completeness, reliability, overall; 0-3)
guidelines: Rate the explanation of the prediction.
objectives:
  - {key: fluency, name: Fluency, description: the explanation should be fluent and readable,
     levels: [{score: 0, description: unreadable}, {score: 1, description: poor}, {score: 2, description: good},
              {score: 3, description: fluent}]}
  - {key: completeness, name: Completeness, description: the explanation should cover the evidence in the post,
     levels: [{score: 0, description: none}, {score: 1, description: little}, {score: 2, description: most},
              {score: 3, description: complete}]}
  - {key: reliability, name: Reliability, description: the explanation should be trustworthy,
     levels: [{score: 0, description: unreliable}, {score: 1, description: partly}, {score: 2, description: mostly},
              {score: 3, description: reliable}]}
  - {key: overall, name: Overall, description: the explanation should be good overall,
     levels: [{score: 0, description: bad}, {score: 1, description: weak}, {score: 2, description: good},
              {score: 3, description: excellent}]}
"""


def _published(tmp_path, model: str, rows) -> Path:
    path = tmp_path / f"{model}_data.csv"
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(PUBLISHED_HEADER.replace("gpt-3.5-turbo", "explanation").split(","))
        for post, label, expl, *lists in rows:
            w.writerow([post, label, expl, *(str(list(x)) for x in lists)])
    return path


def test_a_published_list_per_aspect_file_imports_end_to_end(tmp_path, db_url):
    proto = tmp_path / "mentalllama.yaml"
    proto.write_text(PROTOCOL, encoding="utf-8")
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("query: text\nresponse: explanation\nsource: '=chatgpt'\nraters: [e1, e2, e3]\n"
                       "aspects: {fluency: fluency, completeness: completeness, reliability: reliability, "
                       "overall: overall}\n", encoding="utf-8")
    rows = [("I feel so tired of everything.", 1, "Yes. The poster shows hopelessness.",
             [3, 3, 2], [2, 3, 2], [3, 3, 2], [2, 3, 2]),
            ("Going for drinks on Tuesday!", 0, "No.\n\nNothing in the post suggests depression.",
             [3, 2, 3], [3, 3, 2], [3, 3, 3], [3, 2, 2]),
            ("Nobody would notice if I was gone.", 1, "Yes, suicidal ideation.",
             [3, 3, 3], [2, 3, 3], [3, 2, 3], [2, 3, 3])]
    src = _published(tmp_path, "chatgpt", rows)
    res = run_cli("annotate", "import-ratings", "--db", db_url, "--input", src, "--protocol", proto,
                  "--mapping", mapping)
    assert res.returncode == 0, res.stderr
    assert "36 ratings stored (3 new items, 3 new responses); 3 new annotators" in res.stdout
    out = tmp_path / "ratings.jsonl"
    assert run_cli("annotate", "export", "--db", db_url, "--format", "ratings", "--out", out).returncode == 0
    got = {(r["query"], r["annotator"], r["objective"]): (r["score"], r["source"], r["protocol_version"])
           for r in read_jsonl(out)}
    assert got[("Going for drinks on Tuesday!", "e2", "overall")] == (2, "chatgpt", "1")
    assert got[("I feel so tired of everything.", "e3", "fluency")] == (2, "chatgpt", "1")
    assert len(got) == 36
    # agreement: alpha per aspect equals the krippendorff package on the three experts' matrix
    import krippendorff

    report = json.loads(run_cli("annotate", "agreement", "--db", db_url, "--json").stdout)
    for k, aspect in enumerate(("fluency", "completeness", "reliability", "overall")):
        matrix = np.array([[row[3 + k][e] for row in rows] for e in range(3)], dtype=float)
        expected = krippendorff.alpha(reliability_data=matrix, level_of_measurement="ordinal", value_domain=[0, 1, 2, 3])
        assert report["objectives"][aspect]["alpha"] == pytest.approx(expected, abs=1e-4)
    # pairs need no --objectives: they carry the protocol's objective texts
    pairs = tmp_path / "pairs.jsonl"
    assert run_cli("annotate", "export", "--db", db_url, "--format", "pairs", "--out", pairs).returncode == 0
    assert read_jsonl(pairs) == []  # one response per post: nothing to compare
    # a bad cell names the file, the line and the column; nothing is stored
    bad = _published(tmp_path, "bad", [rows[0], ("p", 0, "e", [3, 3], [3, 9, 1], [1], [1])])
    res = run_cli("annotate", "import-ratings", "--db", db_url, "--input", bad, "--protocol", proto,
                  "--mapping", mapping)
    assert res.returncode == 2 and f'{bad}:3: field "completeness[1]": expected an integer 0-3, got 9' in res.stderr
    # an aspect not in the protocol says how to pass a protocol file
    res = run_cli("annotate", "import-ratings", "--db", db_url, "--input", src, "--mapping", mapping)
    assert res.returncode == 2 and '"fluency" is not in protocol "imhi"' in res.stderr
    assert "--protocol FILE" in res.stderr


def test_wide_file_with_a_column_per_rater(tmp_path, store):
    path = tmp_path / "wide.csv"
    path.write_text("post,answer,model,correct_A,correct_B\np1,x,m1,3,2\np1,y,m2,1,\n", encoding="utf-8")
    mapping = {"query": "post", "response": "answer", "source": "model",
               "scores": {"correct_A": {"annotator": "A", "objective": "correctness"},
                          "correct_B": {"annotator": "B", "objective": "correctness"}}}
    res = store.import_ratings(path, mapping=mapping)
    assert res.ratings == 3
    assert sorted((r["response"], r["annotator"], r["score"]) for r in store.rating_records(OPERATOR)) == [
        ("x", "A", 3), ("x", "B", 2), ("y", "A", 1)]
    with pytest.raises(InputError, match=r'wide.csv:2: field "nope": no such column'):
        store.import_ratings(path, mapping={"query": "post", "response": "answer",
                                            "scores": {"nope": {"annotator": "A", "objective": "correctness"}}})


def test_gold_items_reach_every_rater_and_measure_accuracy(tmp_path, store, monkeypatch):
    from annotation import workflow

    monkeypatch.setattr(workflow, "GOLD_EVERY", 2)
    rows = [{"item_id": f"r{i}", "query": f"q{i}", "responses": ["a"]} for i in range(3)]
    rows.append({"item_id": "g", "query": "gold q", "responses": [
        {"text": "gold a", "gold": {"correctness": 3, "informative": 2, "professional": 0}}]})
    store.import_items(write_jsonl(tmp_path / "i.jsonl", rows))
    t = _people(store, u="rater", w="rater", boss="admin")
    seen = {}
    for who, score in (("u", 3), ("w", 2)):
        order = []
        while (v := store.next_item(t[who])) is not None:
            order.append(v.uid)
            store.save(t[who], v.uid, {(v.responses[0].id, o): score for o in OBJ}, submit=True)
        seen[who] = order
    assert seen["u"][1] == "g" and seen["w"][1] == "g"   # the second item of each rater is the gold one
    dash = store.dashboard(t["boss"], bootstrap=0)
    assert dash["raters"]["u"]["gold"] == {"ratings": 3, "accuracy": pytest.approx(1 / 3),
                                           "mean_abs_error": pytest.approx((0 + 1 + 3) / 3)}
    assert dash["raters"]["w"]["gold"]["accuracy"] == pytest.approx(1 / 3)
    assert dash["progress"]["gold_items"] == 1
    assert all(p["item_id"] != "g" for p in store.pair_records(t["boss"]))


def test_dashboard_alpha_by_source_and_per_rater(tmp_path, store):
    rng = np.random.default_rng(0)
    items, ratings = [], []
    for i in range(30):
        items.append({"item_id": f"i{i}", "query": f"q{i}", "responses": [{"text": f"A{i}", "source": "good"},
                                                                          {"text": f"B{i}", "source": "bad"}]})
        base = int(rng.integers(0, 4))
        for who in ("x", "y"):
            noise = int(rng.integers(-1, 2)) if who == "y" else 0
            ratings.append({"item_id": f"i{i}", "query": f"q{i}", "response": f"A{i}", "source": "good",
                            "annotator": who, "objective": "correctness", "score": min(3, max(0, base + noise))})
            ratings.append({"item_id": f"i{i}", "query": f"q{i}", "response": f"B{i}", "source": "bad",
                            "annotator": who, "objective": "correctness", "score": 0})
    store.import_ratings(write_jsonl(tmp_path / "r.jsonl", ratings))
    dash = store.dashboard(OPERATOR, bootstrap=200, seed=1)
    import krippendorff

    def alpha(rows):
        m = np.array([[r["score"] for r in rows if r["annotator"] == a] for a in ("x", "y")], dtype=float)
        return krippendorff.alpha(reliability_data=m, level_of_measurement="ordinal", value_domain=[0, 1, 2, 3])

    pooled = dash["objectives"]["correctness"]
    assert pooled["alpha"] == pytest.approx(alpha(ratings), abs=1e-4)
    assert pooled["units"] == 60 and pooled["ci95"][0] < pooled["alpha"] < pooled["ci95"][1]
    good = [r for r in ratings if r["source"] == "good"]
    assert dash["by_source"]["good"]["correctness"]["alpha"] == pytest.approx(alpha(good), abs=1e-4)
    assert dash["by_source"]["bad"]["correctness"]["alpha"] is None  # every score 0: undefined
    assert dash["distribution"]["correctness"]["0"] == sum(r["score"] == 0 for r in ratings)
    diffs = [abs(a["score"] - b["score"]) for a, b in zip(ratings[0::2][0::2], ratings[0::2][1::2])]
    x = dash["raters"]["x"]
    assert x["ratings"] == 60 and x["mean_abs_diff_from_others"] == pytest.approx((sum(diffs)) / 60, abs=1e-4)


def test_hf_export_writes_a_datasets_folder_with_a_card_and_push_fails_clearly_offline(tmp_path, db_url):
    store = Store(db_url)
    t = _two_rated_items(tmp_path, store)
    out = tmp_path / "hf"
    res = run_cli("annotate", "export", "--db", db_url, "--format", "hf", "--out", out)
    assert res.returncode == 0, res.stderr
    from datasets import load_from_disk

    dd = load_from_disk(str(out))
    assert set(dd) == {"ratings", "final", "pairs"}
    assert dd["ratings"].num_rows == 2 * 2 * 2 * 3
    assert dd["pairs"].num_rows == 2
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "`imhi`, version `2-paper-c3`" in card and "r1, r2" in card and "24 ratings" in card
    assert "| correctness |" in card
    res = run_cli("annotate", "export", "--db", db_url, "--format", "hf", "--out", out)
    assert res.returncode == 2 and "not an empty folder" in res.stderr
    res = run_cli("annotate", "export", "--db", db_url, "--format", "hf", "--out", tmp_path / "hf2",
                  "--push-to-hub", "someone/ratings", env={"HF_HUB_OFFLINE": "1"})
    errors = [ln for ln in res.stderr.splitlines() if "error" in ln]
    assert res.returncode == 2 and len(errors) == 1 and "--push-to-hub someone/ratings" in errors[0]
    assert (tmp_path / "hf2" / "README.md").is_file()  # the folder stays for a later push
    # no hub reachable (a closed local port stands in for an offline machine): one line too
    res = run_cli("annotate", "export", "--db", db_url, "--format", "hf", "--out", tmp_path / "hf3",
                  "--push-to-hub", "someone/ratings", env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "x",
                                                           # online for this case, whatever the user's shell says
                                                           "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
                                                           "HF_DATASETS_OFFLINE": "0"},
                  timeout=300)
    errors = [ln for ln in res.stderr.splitlines() if "error" in ln]
    assert res.returncode == 2 and len(errors) == 1 and "could not upload" in errors[0], res.stderr
    del t


def test_a_database_from_the_previous_version_is_upgraded_in_place(tmp_path):
    """The previous schema (no protocol versions, roles, assignments...) gains the new columns;
    its ratings keep working and count as assignments."""
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.executescript("""
        CREATE TABLE annotators (id INTEGER PRIMARY KEY, name VARCHAR(200) UNIQUE, password_hash VARCHAR(400),
            is_admin BOOLEAN, created_at DATETIME);
        CREATE TABLE sign_ins (token_hash VARCHAR(64) PRIMARY KEY, annotator_id INTEGER, created_at DATETIME);
        CREATE TABLE protocols (id INTEGER PRIMARY KEY, name VARCHAR(200) UNIQUE, title TEXT, guidelines TEXT,
            spec JSON, created_at DATETIME);
        CREATE TABLE protocol_objectives (id INTEGER PRIMARY KEY, protocol_id INTEGER, key VARCHAR(200),
            name VARCHAR(200), description TEXT, position INTEGER, levels JSON, UNIQUE (protocol_id, key));
        CREATE TABLE items (id INTEGER PRIMARY KEY, uid VARCHAR(200) UNIQUE, protocol_id INTEGER, query TEXT,
            query_hash VARCHAR(64), created_at DATETIME);
        CREATE TABLE responses (id INTEGER PRIMARY KEY, item_id INTEGER, text TEXT, text_hash VARCHAR(64),
            source VARCHAR(400), position INTEGER);
        CREATE TABLE ratings (id INTEGER PRIMARY KEY, response_id INTEGER, annotator_id INTEGER,
            objective VARCHAR(200), score INTEGER, note TEXT, seconds FLOAT, status VARCHAR(16),
            created_at DATETIME, updated_at DATETIME, submitted_at DATETIME,
            CONSTRAINT ck_rating_score_0_3 CHECK (score BETWEEN 0 AND 3));
    """)
    from annotation.protocols import load_protocol

    old_spec = load_protocol("imhi").to_dict()
    old_spec["objectives"][0]["description"] = "an older wording"
    con.execute("INSERT INTO annotators VALUES (1, 'old', NULL, 1, '2024-01-01 00:00:00')")
    con.execute("INSERT INTO protocols VALUES (1, 'imhi', 't', 'g', ?, '2024-01-01 00:00:00')", (json.dumps(old_spec),))
    sha = lambda t: hashlib.sha256(t.encode()).hexdigest()  # noqa: E731
    con.execute("INSERT INTO items VALUES (1, 'it', 1, 'q', ?, '2024-01-01 00:00:00')", (sha("q"),))
    con.execute("INSERT INTO responses VALUES (1, 1, 'a', ?, NULL, 0)", (sha("a"),))
    con.execute("INSERT INTO ratings VALUES (1, 1, 1, 'correctness', 2, NULL, NULL, 'submitted', "
                "'2024-01-01 00:00:00', '2024-01-01 00:00:00', '2024-01-01 00:00:00')")
    con.commit()
    con.close()
    store = Store(f"sqlite:///{db}")
    recs = store.rating_records(OPERATOR)
    assert [(r["annotator"], r["score"], r["protocol_version"]) for r in recs] == [("old", 2, None)]
    with store._session() as s:
        assert [(a.item_id, a.annotator_id, a.status) for a in s.query(Assignment)] == [(1, 1, "submitted")]
    # the new imhi version replaces the stored definition; new ratings carry the new version
    store.import_ratings(write_jsonl(tmp_path / "r.jsonl", [
        {"item_id": "it", "query": "q", "response": "a", "annotator": "new", "objective": "correctness", "score": 1}]))
    versions = sorted((r["annotator"], r["protocol_version"] or "") for r in store.rating_records(OPERATOR))
    assert versions == [("new", "2-paper-c3"), ("old", "")]
    assert [p["version"] for p in store.stored_protocols(OPERATOR)] == ["2-paper-c3"]


def test_pairs_of_a_custom_protocol_build_a_dataset_without_retyped_objectives(tmp_path):
    db = f"sqlite:///{tmp_path / 'ann.db'}"
    proto = tmp_path / "mentalllama.yaml"
    proto.write_text(PROTOCOL, encoding="utf-8")
    rows = [{"query": "post", "response": text, "annotator": who, "objective": obj, "score": score}
            for text, base in (("first", 3), ("second", 1)) for who in ("e1", "e2")
            for obj, score in (("fluency", base), ("overall", 2))]
    res = run_cli("annotate", "import-ratings", "--db", db, "--input", write_jsonl(tmp_path / "r.jsonl", rows),
                  "--protocol", proto)
    assert res.returncode == 0, res.stderr
    pairs = tmp_path / "pairs.jsonl"
    assert run_cli("annotate", "export", "--db", db, "--format", "pairs", "--out", pairs).returncode == 0
    (pair,) = read_jsonl(pairs)
    assert pair["labels"] == {"fluency": ">", "overall": "="}
    assert pair["objectives"] == {"fluency": "Fluency: the explanation should be fluent and readable",
                                  "overall": "Overall: the explanation should be good overall"}
    out = tmp_path / "ds"
    res = run_cli("-q", "build-dataset", "--source", "generic", "--template", "imhi", "--input", pairs, "--out", out,
                  "--warmup-size", "0")
    assert res.returncode == 0, res.stderr
    preference = read_jsonl(out / "preference.jsonl")
    assert [r["objectives"] for r in preference] == [["fluency"]]
    assert "Fluency: the explanation should be fluent and readable" in preference[0]["prompt"]
    assert "Overall: the explanation should be good overall" in read_jsonl(out / "equal.jsonl")[0]["prompt"]
