"""The rating store on a real SQLite file: protocols, accounts, items, saving, isolation."""
from __future__ import annotations

import json
import sqlite3

import pytest

from annotation.models import SUBMITTED
from annotation.protocols import load_protocol, rubric_markdown
from annotation.store import (OPERATOR, AccessDenied, Store, enqueue_item, hash_password, normalize_db_url,
                              verify_password)
from conftest import write_jsonl
from metaaligner_core.errors import InputError, MetaAlignerError
from metaaligner_core.objectives import builtin_objectives

PASSWORD = "correct horse battery"


@pytest.fixture
def db(tmp_path):
    return tmp_path / "ann.db"


@pytest.fixture
def store(db):
    return Store(f"sqlite:///{db}")


def _items(tmp_path, n=3, responses=2):
    rows = [{"query": f"query {i}", "responses": [{"text": f"answer {i}.{j}", "source": f"m{j}"}
                                                  for j in range(responses)]} for i in range(n)]
    return write_jsonl(tmp_path / "items.jsonl", rows)


def _people(store, *names, admin=()):
    tokens = {}
    for n in names:
        store.add_annotator(n, PASSWORD, admin=n in admin)
        tokens[n] = store.sign_in(n, PASSWORD)
    return tokens


def _full(view, score=2):
    return {(r.id, o.key): score for r in view.responses for o in view.protocol.objectives}


# ----------------------------------------------------------------------------- protocols

def test_imhi_protocol_uses_the_builtin_keys_with_four_levels_each():
    proto = load_protocol("imhi")
    assert proto.keys == [o.key for o in builtin_objectives("imhi")] == ["correctness", "informative", "professional"]
    for o in proto.objectives:
        assert [lv.score for lv in o.levels] == [0, 1, 2, 3]
        assert all(lv.label and lv.description for lv in o.levels)
    prof = proto.objective("professional")
    assert prof.reference.items[:3] == ("Suicidal ideation", "Self-harm ideation", "Feelings of worthlessness and guilt")
    md = rubric_markdown(proto)
    assert "3 · Fully correct" in md and "1. Suicidal ideation" in md


def test_ultrafeedback_protocol_takes_the_builtin_wording():
    proto = load_protocol("ultrafeedback")
    by_key = {o.key: o for o in builtin_objectives("ultrafeedback")}
    assert proto.keys == list(by_key)
    for o in proto.objectives:
        assert o.description == by_key[o.key].description


def test_protocol_file_errors_name_the_field(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("name: x\nobjectives:\n  - key: honesty\n    levels:\n"
                   "      - {score: 0, label: a, description: a}\n      - {score: 1, label: b, description: b}\n"
                   "      - {score: 2, label: c, description: c}\n      - {score: 4, label: d, description: d}\n")
    with pytest.raises(InputError, match=r'p.yaml: field "objectives\[0\].levels\[3\].score": expected an integer 0-3'):
        load_protocol(bad)
    custom = tmp_path / "c.json"
    levels = [{"score": s, "label": f"L{s}", "description": f"level {s}"} for s in range(4)]
    custom.write_text(json.dumps({"name": "c", "objectives": [{"key": "warmth", "levels": levels}]}))
    with pytest.raises(InputError, match=r'objectives\[0\].description.*not a built-in objective'):
        load_protocol(custom)
    custom.write_text(json.dumps({"name": "c", "guidelines": "g", "objectives": [
        {"key": "Warmth", "name": "Warmth", "description": "the response should be kind", "levels": levels}]}))
    assert load_protocol(custom).keys == ["warmth"]
    with pytest.raises(MetaAlignerError, match="neither a built-in protocol"):
        load_protocol("no-such-protocol")


# ----------------------------------------------------------------------------- database

def test_default_url_creates_the_data_dir_and_wal_foreign_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert normalize_db_url(None) == "sqlite:///data/annotations.db"
    store = Store(None)
    store.import_items(_items(tmp_path, n=1))
    assert (tmp_path / "data" / "annotations.db").is_file()
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    assert normalize_db_url("some/file.db") == "sqlite:///some/file.db"


def test_database_enforces_unique_rating_check_score_and_foreign_keys(tmp_path, store, db):
    store.import_items(_items(tmp_path, n=1))
    tok = _people(store, "ann")["ann"]
    view = store.next_item(tok)
    store.save(tok, view.uid, _full(view), submit=True)
    con = sqlite3.connect(db)
    con.execute("PRAGMA foreign_keys=ON")
    rid, aid = con.execute("SELECT response_id, annotator_id FROM ratings LIMIT 1").fetchone()
    insert = ("INSERT INTO ratings (response_id, annotator_id, objective, score, status, created_at, updated_at) "
              "VALUES (?, ?, ?, ?, ?, '2024-01-01', '2024-01-01')")
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        con.execute(insert, (rid, aid, "correctness", 1, "submitted"))
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        con.execute(insert, (rid, aid, "new objective", 4, "submitted"))
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        con.execute(insert, (rid, aid, "new objective", -1, "submitted"))
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        con.execute(insert, (rid, aid, "new objective", 1, "final"))
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        con.execute(insert, (99999, aid, "new objective", 1, "submitted"))
    con.close()


def test_any_sqlalchemy_url_works_in_memory():
    store = Store("sqlite://")
    store.enqueue_item("q", [("a", "m1"), ("b", "m2")])
    tok = _people(store, "ann")["ann"]
    assert [r.text for r in store.next_item(tok).responses] == ["a", "b"]


def test_bad_db_url_is_a_one_line_error():
    with pytest.raises(MetaAlignerError, match="nosuchdialect"):
        Store("nosuchdialect://x/y")


# ----------------------------------------------------------------------------- accounts

def test_passwords_are_salted_scrypt_and_never_stored_in_clear(store, db):
    h1, h2 = hash_password(PASSWORD), hash_password(PASSWORD)
    assert h1 != h2 and h1.startswith("scrypt$") and PASSWORD not in h1
    assert verify_password(PASSWORD, h1) and not verify_password(PASSWORD + "x", h1)
    assert not verify_password(PASSWORD, None) and not verify_password(PASSWORD, "garbage")
    store.add_annotator("ann", PASSWORD)
    assert PASSWORD.encode() not in db.read_bytes()
    assert PASSWORD.encode() not in (db.parent / (db.name + "-wal")).read_bytes()


def test_sign_in_rejects_wrong_password_and_unknown_name_alike(store):
    store.add_annotator("ann", PASSWORD)
    with pytest.raises(AccessDenied) as wrong:
        store.sign_in("ann", "wrong password")
    with pytest.raises(AccessDenied) as unknown:
        store.sign_in("nobody", PASSWORD)
    assert str(wrong.value) == str(unknown.value) == "wrong name or password"
    with pytest.raises(MetaAlignerError, match="at least 8 characters"):
        store.add_annotator("short", "1234567")
    with pytest.raises(MetaAlignerError, match="already exists"):
        store.add_annotator("ann", PASSWORD)
    token = store.sign_in("ann", PASSWORD)
    assert store.whoami(token).name == "ann"
    store.add_annotator("ann", "a new password", admin=True, update=True)  # also ends open sign-ins
    with pytest.raises(AccessDenied, match="not signed in"):
        store.whoami(token)
    assert store.whoami(store.sign_in("ann", "a new password")).is_admin
    store.sign_out(token)


# ----------------------------------------------------------------------------- items

def test_import_items_jsonl_and_csv_is_idempotent_and_keeps_order(tmp_path, store):
    src = _items(tmp_path, n=2, responses=2)
    res = store.import_items(src)
    assert (res.items_added, res.responses_added) == (2, 4)
    res = store.import_items(src)
    assert (res.items_added, res.items_existing, res.responses_added) == (0, 2, 0)
    csv_path = tmp_path / "items.csv"
    csv_path.write_text("query,response,source\n"
                        "query 0,answer 0.1,m1\n"           # already there
                        "query 0,a new answer,m9\n"         # appended after the existing ones
                        "\"multi\nline query\",x,m1\n"
                        "\"multi\nline query\",y,\n", encoding="utf-8")
    res = store.import_items(csv_path)
    assert (res.items_added, res.items_existing, res.responses_added) == (1, 1, 3)
    tok = _people(store, "ann")["ann"]
    seen = {}
    while (v := store.next_item(tok, target=None, exclude=list(seen))) is not None:
        seen[v.uid] = (v.query, [r.text for r in v.responses])
    assert sorted(seen.values()) == sorted([
        ("query 0", ["answer 0.0", "answer 0.1", "a new answer"]),
        ("query 1", ["answer 1.0", "answer 1.1"]),
        ("multi\nline query", ["x", "y"]),
    ])


def test_import_items_bad_rows_and_conflicting_item_ids(tmp_path, store):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "responses": [{"text": "a"}]},
                                               {"query": "q2", "responses": []}])
    with pytest.raises(InputError, match=r'bad.jsonl:2: field "responses"'):
        store.import_items(bad)
    bad = write_jsonl(tmp_path / "bad2.jsonl", [{"query": "q", "responses": [{"text": "a"}, {"source": "m"}]}])
    with pytest.raises(InputError, match=r'bad2.jsonl:1: field "responses\[1\].text"'):
        store.import_items(bad)
    store.import_items(write_jsonl(tmp_path / "a.jsonl", [{"item_id": "X1", "query": "q", "responses": ["a"]}]))
    clash = write_jsonl(tmp_path / "b.jsonl", [{"item_id": "Y", "query": "other", "responses": ["b"]},
                                               {"item_id": "X1", "query": "other", "responses": ["b"]}])
    with pytest.raises(InputError, match=r'b.jsonl:2: field "item_id": item "X1" is already stored with a different query'):
        store.import_items(clash)
    tok = _people(store, "ann")["ann"]
    assert store.progress(tok).total == 1  # the file was rejected as a whole: Y was not added


def test_enqueue_item_adds_responses_to_the_same_query(tmp_path, db):
    url = f"sqlite:///{db}"
    uid = enqueue_item(url, "what is up", [("draft text", "policy"), ("aligned text", "aligner")])
    assert enqueue_item(url, "what is up", [("aligned text", "aligner"), ("third", None)]) == uid
    store = Store(url)
    tok = _people(store, "ann")["ann"]
    assert [r.text for r in store.item_view(tok, uid).responses] == ["draft text", "aligned text", "third"]
    with pytest.raises(MetaAlignerError, match="query"):
        enqueue_item(url, "  ", [("a", None)])


# ----------------------------------------------------------------------------- next item, saving

def test_next_item_prefers_own_drafts_then_fewest_annotators_and_respects_target(tmp_path, store):
    store.import_items(_items(tmp_path, n=3, responses=1))
    t = _people(store, "a", "b", "c", "d")
    first = store.next_item(t["a"], target=2)
    assert first.query == "query 0" and first.status == "new"
    for who in ("a", "b"):
        v = store.item_view(t[who], first.uid)
        store.save(t[who], v.uid, _full(v), submit=True)
    assert store.next_item(t["a"], target=2).query == "query 1"  # a's own submission is not offered again
    # c drafts query 2: then it comes first for c, although query 1 was imported earlier
    q1 = store.next_item(t["c"], target=2)
    q2 = store.next_item(t["c"], target=2, exclude=[q1.uid])
    assert (q1.query, q2.query) == ("query 1", "query 2")
    store.save(t["c"], q2.uid, {next(iter(_full(q2))): 1})
    nxt = store.next_item(t["c"], target=2)
    assert (nxt.query, nxt.status) == ("query 2", "draft")
    # query 0 has its two annotators: d does not get it with target 2, but gets it last with no target
    order = []
    while (v := store.next_item(t["d"], target=2, exclude=order)) is not None:
        order.append(v.uid)
    assert [store.item_view(t["d"], u).query for u in order] == ["query 1", "query 2"]
    order = []
    while (v := store.next_item(t["d"], target=None, exclude=order)) is not None:
        order.append(v.uid)
    assert [store.item_view(t["d"], u).query for u in order] == ["query 1", "query 2", "query 0"]
    p = store.progress(t["a"], target=2)
    assert (p.mine, p.total, p.complete) == (1, 3, 1)


def test_save_draft_submit_and_validation(tmp_path, store):
    store.import_items(_items(tmp_path, n=2, responses=2))
    tok = _people(store, "ann")["ann"]
    view = store.next_item(tok)
    other = store.next_item(tok, exclude=[view.uid])
    keys = list(_full(view))
    with pytest.raises(MetaAlignerError, match="rate every response on every objective before submitting"):
        store.save(tok, view.uid, {keys[0]: 3}, submit=True)
    assert store.item_view(tok, view.uid).mine == {}  # nothing stored
    with pytest.raises(MetaAlignerError, match="expected an integer 0-3"):
        store.save(tok, view.uid, {keys[0]: 4})
    with pytest.raises(MetaAlignerError, match="is not in protocol"):
        store.save(tok, view.uid, {(keys[0][0], "humour"): 1})
    with pytest.raises(MetaAlignerError, match="does not belong"):
        store.save(tok, view.uid, {(other.responses[0].id, "correctness"): 1})
    rid0 = view.responses[0].id
    v = store.save(tok, view.uid, {k: 1 for k in keys[:3]}, notes={rid0: "unsure"}, seconds=30)
    assert v.status == "draft" and v.notes == {rid0: "unsure"} and len(v.mine) == 3
    v = store.save(tok, view.uid, {k: 2 for k in keys[3:]}, submit=True, seconds=12)
    assert v.status == SUBMITTED and v.mine == {**{k: 1 for k in keys[:3]}, **{k: 2 for k in keys[3:]}}
    with pytest.raises(MetaAlignerError, match="already submitted"):
        store.save(tok, view.uid, {keys[0]: 0})
    v = store.save(tok, view.uid, {keys[0]: 0}, submit=True)  # resubmitting changes a submitted rating
    assert v.mine[keys[0]] == 0
    records = store.rating_records(OPERATOR)
    assert len(records) == len(keys)
    assert sum(r["seconds"] for r in records) == pytest.approx(42, abs=0.5)
    assert {r["note"] for r in records if r["response"] == view.responses[0].text} == {"unsure"}


# ----------------------------------------------------------------------------- isolation and roles

def test_annotators_see_and_change_only_their_own_ratings(tmp_path, store):
    store.import_items(_items(tmp_path, n=1, responses=2))
    t = _people(store, "alice", "bob", "root", admin=("root",))
    view = store.next_item(t["alice"])
    store.save(t["alice"], view.uid, _full(view, 3), notes={view.responses[0].id: "alice's note"}, submit=True)
    bob_view = store.next_item(t["bob"])
    assert bob_view.uid == view.uid
    assert bob_view.mine == {} and bob_view.notes == {} and bob_view.status == "new"
    store.save(t["bob"], view.uid, _full(view, 0), submit=True)
    assert set(store.item_view(t["alice"], view.uid).mine.values()) == {3}
    assert store.item_view(t["alice"], view.uid).notes == {view.responses[0].id: "alice's note"}
    by_person = {}
    for r in store.rating_records(t["root"]):
        by_person.setdefault(r["annotator"], set()).add(r["score"])
    assert by_person == {"alice": {3}, "bob": {0}}
    for action in (lambda tok: store.rating_records(tok), lambda tok: store.pair_records(tok),
                   lambda tok: store.agreement(tok), lambda tok: store.progress_by_annotator(tok),
                   lambda tok: store.export(tok, "ratings", tmp_path / "x.jsonl")):
        with pytest.raises(AccessDenied, match="admins only") as err:
            action(t["bob"])
        assert isinstance(err.value, PermissionError) and isinstance(err.value, MetaAlignerError)
        with pytest.raises(AccessDenied, match="not signed in"):
            action("forged-token")
        with pytest.raises(AccessDenied, match="not signed in"):
            action(None)
    assert not (tmp_path / "x.jsonl").exists()
    store.sign_out(t["bob"])
    with pytest.raises(AccessDenied, match="not signed in"):
        store.next_item(t["bob"])
    assert store.export(t["root"], "pairs", tmp_path / "pairs.jsonl") == 1


def test_expired_sign_ins_are_refused_and_cleaned_up(store, db):
    store.add_annotator("ann", PASSWORD)
    old = store.sign_in("ann", PASSWORD)
    con = sqlite3.connect(db)
    con.execute("UPDATE sign_ins SET created_at = '2000-01-01 00:00:00.000000'")
    con.commit()
    with pytest.raises(AccessDenied, match="expired"):
        store.whoami(old)
    fresh = store.sign_in("ann", PASSWORD)
    assert con.execute("SELECT COUNT(*) FROM sign_ins").fetchone()[0] == 1
    con.close()
    assert store.whoami(fresh).name == "ann"
