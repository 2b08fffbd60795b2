"""The rating store on SQLite and on a real PostgreSQL server (``db_url`` runs each test on
both): items, k raters per item, saving, isolation; accounts and constraints on SQLite; the
PostgreSQL fixture's CI rule."""
from __future__ import annotations

import sqlite3

import pytest

from annotation.models import SUBMITTED
from annotation.accounts import OPERATOR, AccessDenied, hash_password, verify_password
from annotation.database import normalize_db_url
from annotation.store import Store, enqueue_item
from conftest import write_jsonl
from metaaligner_core.errors import InputError, MetaAlignerError

PASSWORD = "correct horse battery"


@pytest.fixture(autouse=True)
def fast_passwords(monkeypatch):
    """Cheap scrypt for these tests (the production cost is tested in the security tests)."""
    from annotation import accounts

    monkeypatch.setattr(accounts, "SCRYPT_N", 2 ** 10)


@pytest.fixture
def db(tmp_path):
    return tmp_path / "ann.db"


@pytest.fixture
def sqlite_store(db):
    """SQLite-only tests (they open the file with sqlite3)."""
    return Store(f"sqlite:///{db}")


@pytest.fixture
def store(db_url):
    return Store(db_url)


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


def test_database_enforces_unique_rating_check_score_and_foreign_keys(tmp_path, sqlite_store, db):
    store = sqlite_store
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
        con.execute(insert, (rid, aid, "new objective", 11, "submitted"))
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

def test_passwords_are_salted_scrypt_and_never_stored_in_clear(sqlite_store, db):
    store = sqlite_store
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
    while (v := store.next_item(tok, exclude=list(seen))) is not None:
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


def test_enqueue_item_adds_responses_to_the_same_query(tmp_path, db_url):
    url = db_url
    uid = enqueue_item(url, "what is up", [("draft text", "policy"), ("aligned text", "aligner")])
    assert enqueue_item(url, "what is up", [("aligned text", "aligner"), ("third", None)]) == uid
    store = Store(url)
    tok = _people(store, "ann")["ann"]
    assert [r.text for r in store.item_view(tok, uid).responses] == ["draft text", "aligned text", "third"]
    with pytest.raises(MetaAlignerError, match="query"):
        enqueue_item(url, "  ", [("a", None)])


# ----------------------------------------------------------------------------- next item, saving

def test_each_item_goes_to_k_raters_least_assigned_first(tmp_path, store):
    store.import_items(_items(tmp_path, n=3, responses=1))  # imhi: k = 2
    t = _people(store, *"abcdefg")
    got = {who: store.next_item(t[who]).query for who in "abcdef"}
    # each new rater takes the least-assigned item: every item reaches its 2 raters, none gets 3
    assert got == {"a": "query 0", "b": "query 1", "c": "query 2", "d": "query 0", "e": "query 1", "f": "query 2"}
    assert store.next_item(t["g"]) is None
    # asking again resumes the rater's own open item instead of taking another
    assert store.next_item(t["a"]).query == "query 0"
    v = store.next_item(t["a"])
    store.save(t["a"], v.uid, _full(v), submit=True)
    assert store.next_item(t["a"]) is None  # query 1 and 2 have their two raters already
    # a draft keeps its item for the rater and comes back first
    v = store.next_item(t["c"])
    store.save(t["c"], v.uid, {next(iter(_full(v))): 1})
    again = store.next_item(t["c"])
    assert (again.query, again.status) == ("query 2", "draft")
    # an assignment nobody worked on for ASSIGNMENT_TTL frees its place
    from annotation import workflow
    from annotation.models import Annotator, Assignment
    from sqlalchemy import select, update

    with store._session(write=True) as s:
        eid = s.scalar(select(Annotator.id).where(Annotator.name == "e"))
        s.execute(update(Assignment).where(Assignment.annotator_id == eid)
                  .values(created_at=Assignment.created_at - workflow.ASSIGNMENT_TTL * 2))
    assert store.next_item(t["g"]).query == "query 1"
    # target overrides every item's k; progress counts submissions against each item's k
    assert store.next_item(t["g"], target=3, exclude=["q-unused"]).query == "query 1"
    p = store.progress(t["a"])
    assert (p.mine, p.total, p.complete) == (1, 3, 0)


def test_a_skip_frees_the_place_at_once_and_the_item_comes_back(tmp_path, store):
    store.import_items(_items(tmp_path, n=2, responses=1), raters=1)
    t = _people(store, "a", "b", "c", "d")
    first = store.next_item(t["a"])
    second = store.next_item(t["b"])
    assert first.uid != second.uid and store.next_item(t["c"]) is None  # both items have their 1 rater
    assert store.release(t["a"], first.uid)
    assert not store.release(t["a"], first.uid) and not store.release(t["c"], first.uid)  # nothing left to end
    assert not store.release(t["a"], "q-no-such-item")
    taken = store.next_item(t["c"])  # a's place is free at once, not after ASSIGNMENT_TTL
    assert taken.uid == first.uid
    assert store.next_item(t["c"]).uid == first.uid  # and c holds it now
    # a gets it back (their own open item), with a fresh hold: nobody else can take it from them now
    assert store.next_item(t["a"], exclude=[]).uid == first.uid
    assert store.release(t["c"], first.uid)
    assert store.next_item(t["d"]) is None  # a's renewed hold counts: first has its 1 rater again
    v = store.next_item(t["a"])
    store.save(t["a"], v.uid, _full(v), submit=True)
    assert not store.release(t["a"], v.uid)  # a submitted item is never released
    assert store.progress(t["a"]).mine == 1


def test_k_per_import_and_per_protocol(tmp_path, store):
    store.import_items(_items(tmp_path, n=1, responses=1), raters=3)
    t = _people(store, "a", "b", "c", "d")
    uids = {store.next_item(t[w]).uid for w in "abc"}
    assert len(uids) == 1 and store.next_item(t["d"]) is None
    with pytest.raises(MetaAlignerError, match="--raters 0"):
        store.import_items(_items(tmp_path, n=1, responses=1), raters=0)


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


def test_expired_sign_ins_are_refused_and_cleaned_up(sqlite_store, db):
    store = sqlite_store
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


def test_a_missing_postgresql_skips_locally_and_fails_under_ci(tmp_path):
    """The PostgreSQL half of the suite must not pass silently in CI when the server is absent."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    probe = tmp_path / "test_probe.py"
    probe.write_text("def test_needs_postgres(pg_url):\n    assert pg_url\n", encoding="utf-8")
    base = {k: v for k, v in os.environ.items() if k != "CI"}
    base["METAALIGNER_PG_BINDIR"] = str(tmp_path / "no-postgres")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
           "--confcutdir", str(ROOT / "tests"), "-c", str(ROOT / "pyproject.toml"), str(probe)]
    env = {**base, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    # the probe lives outside tests/, so the suite's conftest is loaded as a plugin
    local = subprocess.run([*cmd, "-p", "conftest"], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout + local.stderr
    assert "PostgreSQL not installed" in local.stdout  # the skip says why (-ra)
    ci = subprocess.run([*cmd, "-p", "conftest"], env={**env, "CI": "true"}, capture_output=True, text=True,
                        timeout=300, cwd=ROOT)
    assert ci.returncode != 0 and "CI: PostgreSQL not installed" in ci.stdout, ci.stdout + ci.stderr
