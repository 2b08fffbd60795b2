"""Reliability of the rating store on SQLite and on a real PostgreSQL server (``db_url`` runs
each test on both): concurrent writers, killed processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from sqlalchemy import text

from annotation.store import Store
from conftest import ROOT, write_jsonl

PASSWORD = "reliable-password"
OBJECTIVES = ("correctness", "informative", "professional")


def _score(annotator: int, position: int, objective: int) -> int:
    return (annotator + 2 * position + objective) % 4


@pytest.fixture(autouse=True)
def fast_passwords(monkeypatch):
    """Cheap scrypt for these tests (the production cost is tested in the security tests)."""
    from annotation import accounts

    monkeypatch.setattr(accounts, "SCRYPT_N", 2 ** 10)


def _rating_rows(url: str) -> list[tuple]:
    with Store(url).engine.connect() as conn:
        if url.startswith("sqlite"):
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
        return conn.execute(text("""
            SELECT a.name, i.query, r.position, g.objective, g.score, g.status
            FROM ratings g JOIN responses r ON r.id = g.response_id JOIN items i ON i.id = r.item_id
            JOIN annotators a ON a.id = g.annotator_id""")).all()


def test_eight_threads_two_hundred_submissions_each_lose_and_duplicate_nothing(tmp_path, db_url):
    n_threads, n_items = 8, 200
    url = db_url
    items = [{"query": f"query {i}", "responses": [{"text": f"answer {i}.{j}"} for j in range(2)]}
             for i in range(n_items)]
    store = Store(url)
    store.import_items(write_jsonl(tmp_path / "items.jsonl", items), raters=n_threads)
    for t in range(n_threads):
        store.add_annotator(f"ann{t}", PASSWORD)
    submitted = [0] * n_threads
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads)

    def work(t: int) -> None:
        try:
            s = Store(url)
            token = s.sign_in(f"ann{t}", PASSWORD)
            start.wait()
            while (view := s.next_item(token)) is not None:
                pos = int(view.query.split()[1])
                scores = {(r.id, o): _score(t, pos * 2 + j, k)
                          for j, r in enumerate(view.responses) for k, o in enumerate(OBJECTIVES)}
                s.save(token, view.uid, scores, submit=True, seconds=1.0)
                submitted[t] += 1
        except BaseException as e:  # reported below; a thread must not die silently
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=600)
    assert not errors, errors[:3]
    assert submitted == [n_items] * n_threads

    rows = _rating_rows(url)
    assert len(rows) == n_threads * n_items * 2 * len(OBJECTIVES)
    keys = {(name, query, pos, obj) for name, query, pos, obj, _, _ in rows}
    assert len(keys) == len(rows)  # no duplicates
    for name, query, pos, obj, score, status in rows:
        t, i = int(name[3:]), int(query.split()[1])
        assert status == "submitted"
        assert score == _score(t, i * 2 + pos, OBJECTIVES.index(obj))


def test_two_sessions_of_one_annotator_racing_on_the_same_items_keep_one_rating_each(tmp_path, db_url):
    url = db_url
    store = Store(url)
    store.import_items(write_jsonl(tmp_path / "items.jsonl",
                                   [{"query": f"q{i}", "responses": ["a", "b"]} for i in range(40)]))
    store.add_annotator("ann", PASSWORD)
    tokens = [store.sign_in("ann", PASSWORD) for _ in range(2)]
    uids = []
    while (v := store.next_item(tokens[0], exclude=uids)) is not None:
        uids.append(v.uid)
    errors = []

    def work(token, score):
        try:
            for uid in uids:
                view = store.item_view(token, uid)
                store.save(token, uid, {(r.id, o): score for r in view.responses for o in OBJECTIVES}, submit=True)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(tok, s)) for tok, s in zip(tokens, (1, 2))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors[:3]
    rows = _rating_rows(url)
    assert len(rows) == 40 * 2 * 3
    assert {r[4] for r in rows} <= {1, 2}


CHILD = textwrap.dedent("""
    import sys
    from annotation.store import Store
    url, name, password = sys.argv[1:4]
    store = Store(url)
    token = store.sign_in(name, password)
    objectives = ("correctness", "informative", "professional")
    while (view := store.next_item(token)) is not None:
        keys = [(r.id, o) for r in view.responses for o in objectives]
        store.save(token, view.uid, {k: 1 for k in keys[:2]}, notes={view.responses[0].id: "draft"})
        store.save(token, view.uid, {k: (i % 4) for i, k in enumerate(keys)}, submit=True, seconds=0.5)
        print("SUBMITTED", view.uid, flush=True)
    print("DONE", flush=True)
""")


@pytest.mark.parametrize("kill_after", [(7, 23, 41)])
def test_sigkill_mid_session_keeps_every_submitted_rating(tmp_path, kill_after, db_url):
    url = db_url
    store = Store(url)
    store.import_items(write_jsonl(tmp_path / "items.jsonl",
                                   [{"query": f"q{i}", "responses": ["a", "b", "c"]} for i in range(300)]))
    store.add_annotator("ann", PASSWORD)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    reported: list[str] = []
    for n in kill_after:  # several sessions, each killed while it is writing
        child = subprocess.Popen([sys.executable, str(script), url, "ann", PASSWORD], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        got = 0
        for line in child.stdout:
            assert line.startswith("SUBMITTED"), line
            reported.append(line.split()[1])
            got += 1
            if got == n:
                child.send_signal(signal.SIGKILL)
                break
        child.wait(timeout=60)
        assert child.returncode == -signal.SIGKILL, child.stderr.read()
        child.stdout.close()
        child.stderr.close()

    assert len(reported) == sum(kill_after) and len(set(reported)) == len(reported)
    assert len({(r[0], r[1], r[2], r[3]) for r in _rating_rows(url) if r[5] == "submitted"}) >= len(reported) * 9
    token = Store(url).sign_in("ann", PASSWORD)
    for uid in reported:
        view = Store(url).item_view(token, uid)
        assert view.status == "submitted"
        assert len(view.mine) == 3 * 3
        assert sorted(view.mine.values()) == sorted(i % 4 for i in range(9))
    # the store is still writable after the kills, and resumes with the interrupted draft if there is one
    nxt = Store(url).next_item(token)
    assert nxt is not None and nxt.uid not in reported
    Store(url).save(token, nxt.uid, {(r.id, o): 3 for r in nxt.responses for o in OBJECTIVES}, submit=True)
