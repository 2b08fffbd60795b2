"""The Annotate and Export tabs keep up with the team: an idle rater's tab checks for new items by
itself (never replacing an item on screen), the Export tab computes the dashboard when an admin
opens it, and the sender of an item learns who will rate it.

Handler tests call :mod:`annotation.ui`'s functions on a real SQLite store; browser tests drive
headless Chromium against ``python -m annotation.ui`` on a free port.
"""
from __future__ import annotations

import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request

import pytest

from annotation import ui
from annotation.store import OPERATOR, Store
from conftest import ROOT, require_chromium, write_jsonl

PASSWORD = "poll-password-123"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]


@pytest.fixture(autouse=True)
def fast_passwords(monkeypatch):
    from annotation import accounts

    monkeypatch.setattr(accounts, "SCRYPT_N", 2 ** 10)


def _accounts(url: str) -> Store:
    store = Store(url)
    store.add_annotator("alice", PASSWORD, admin=True)
    store.add_annotator("bob", PASSWORD)
    store.add_annotator("carol", PASSWORD)
    return store


def _items(tmp_path, name: str, queries: list[str], source: str = "model-a"):
    return write_jsonl(tmp_path / f"{name}.jsonl", [
        {"query": q, "responses": [{"text": f"answer to {q}", "source": source},
                                   {"text": f"another answer to {q}", "source": "model-b"}]} for q in queries])


def _assignments(db) -> list[tuple[str, str, str]]:
    """(rater, item uid, status) of every assignment, in order; ``db``: a SQLite file or a database URL."""
    query = ("SELECT a.name, i.uid, s.status FROM assignments s JOIN annotators a ON a.id = s.annotator_id "
             "JOIN items i ON i.id = s.item_id ORDER BY s.id")
    if "://" in str(db):
        import sqlalchemy as sa

        eng = sa.create_engine(str(db))
        try:
            with eng.connect() as c:
                return [tuple(r) for r in c.execute(sa.text(query)).all()]
        finally:
            eng.dispose()
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


# ----------------------------------------------------------------------------- store and handlers
def _count_next_item(monkeypatch) -> list:
    """Each call of ``Store.next_item`` (the next-item query) appends its arguments to the list returned."""
    calls = []
    real_next = Store.next_item
    monkeypatch.setattr(Store, "next_item", lambda self, *a, **k: calls.append(a) or real_next(self, *a, **k))
    return calls


# On SQLite and on PostgreSQL (the ``db_url`` fixture, tests/conftest.py).

def test_the_change_marker_moves_with_items_holds_and_ratings(db_url, tmp_path):
    url = db_url
    store = _accounts(url)
    bob = store.sign_in("bob", PASSWORD)
    v0 = store.queue_version(bob)
    assert store.queue_version(bob) == v0  # nothing happened: the same marker
    store.import_items(_items(tmp_path, "one", ["q1"]))
    v1 = store.queue_version(bob)
    assert v1 != v0
    view = store.next_item(bob)  # bob takes it: a new hold
    v2 = store.queue_version(bob)
    assert v2 != v1
    store.save(bob, view.uid, {(r.id, o.key): 1 for r in view.responses for o in view.protocol.objectives},
               submit=True)
    assert store.queue_version(bob) != v2
    from annotation.store import AccessDenied

    with pytest.raises(AccessDenied):
        store.queue_version(None)
    with pytest.raises(AccessDenied):
        store.queue_version("not-a-token")


def test_poll_finds_a_new_item_and_is_cheap_while_nothing_changes(db_url, tmp_path, monkeypatch):
    url = db_url
    store = _accounts(url)
    bob = store.sign_in("bob", PASSWORD)
    calls = _count_next_item(monkeypatch)

    item, skipped, status, progress, shown_at, watch, button, timer = ui.on_poll(store, None, bob, None, [], None)
    assert len(calls) == 1 and item.__class__.__name__ == "dict"  # gr.skip(): nothing to show
    assert "No items are waiting" in status and "You: 0 / 0" in progress
    assert button["visible"] is True and timer.active is True
    for _ in range(3):  # nothing changed: no next-item query, nothing sent back
        out = ui.on_poll(store, None, bob, None, [], watch)
        assert all(isinstance(o, dict) and o.get("__type__") == "update" and len(o) == 1 for o in out), out
    assert len(calls) == 1

    store.import_items(_items(tmp_path, "new", ["a later post"]))
    item, skipped, status, progress, shown_at, watch, button, timer = ui.on_poll(store, None, bob, None, [], watch)
    assert len(calls) == 2
    assert item.query == "a later post" and "A new item" in status and "You: 0 / 1" in progress
    assert button["visible"] is False and timer.active is False  # an item on screen: polling stops
    assert _assignments(url) == [("bob", item.uid, "open")]

    # A full check at least every FULL_CHECK_SECONDS, even with the marker unchanged (holds expire).
    store2 = Store(url)
    carol = store2.sign_in("carol", PASSWORD)
    first = ui.on_poll(store2, None, carol, None, [], None)
    watch = first[5]
    assert first[0].query == "a later post"  # carol is the item's second rater
    stale = {**watch, "at": watch["at"] - ui.FULL_CHECK_SECONDS - 1}
    n = len(calls)
    ui.on_poll(store2, None, carol, None, [], stale)
    assert len(calls) == n + 1


def test_the_unqueued_tick_signals_only_when_there_is_something_to_do(db_url, tmp_path, monkeypatch):
    """poll_due (the timer's tick, outside Gradio's queue): nothing while the marker stands still
    and no full check is due, and no next-item query ever; a signal when an item arrives, others'
    work moves the marker, a full check is due, the sign-in is gone or the tab is out of step."""
    url = db_url
    store = _accounts(url)
    bob = store.sign_in("bob", PASSWORD)
    calls = _count_next_item(monkeypatch)
    watch = ui.on_poll(store, None, bob, None, [], None)[5]
    n = len(calls)

    def skipped(out):
        return isinstance(out, dict) and out.get("__type__") == "update" and len(out) == 1

    for _ in range(3):
        assert skipped(ui.poll_due(store, bob, None, watch))
    assert len(calls) == n  # the tick never runs the next-item query
    assert isinstance(ui.poll_due(store, bob, None, None), float)  # no check yet on this tab
    stale = {**watch, "at": watch["at"] - ui.FULL_CHECK_SECONDS - 1}
    assert isinstance(ui.poll_due(store, bob, None, stale), float)  # a full check is due
    assert isinstance(ui.poll_due(store, None, None, watch), float)  # signed out: on_poll turns it off
    assert isinstance(ui.poll_due(store, "not-a-token", None, watch), float)
    store.import_items(_items(tmp_path, "new", ["a later post"]))
    assert isinstance(ui.poll_due(store, bob, None, watch), float)  # a new item
    assert len(calls) == n
    view = ui.on_poll(store, None, bob, None, [], watch)[0]
    assert view.query == "a later post"
    assert isinstance(ui.poll_due(store, bob, view, watch), float)  # an item on screen: controls off


def test_other_raters_work_refreshes_the_progress_bars_without_a_next_item_query(db_url, tmp_path, monkeypatch):
    url = db_url
    store = _accounts(url)
    store.import_items(_items(tmp_path, "two", ["p1", "p2"]), raters=1)
    bob, carol = store.sign_in("bob", PASSWORD), store.sign_in("carol", PASSWORD)
    mine = store.next_item(bob)
    store.save(bob, mine.uid, {(r.id, o.key): 1 for r in mine.responses for o in mine.protocol.objectives},
               submit=True)
    held = store.next_item(carol)  # p2, held by carol: bob has nothing to do
    out = ui.on_poll(store, None, bob, None, [], None)
    assert "No items are waiting" in out[2] and "Overall: 1 / 2 items" in out[3]
    watch = out[5]
    calls = _count_next_item(monkeypatch)
    store.save(carol, held.uid, {(r.id, o.key): 2 for r in held.responses for o in held.protocol.objectives},
               submit=True)
    item, _, status, progress, _, watch2, button, timer = ui.on_poll(store, None, bob, None, [], watch)
    assert calls == []  # others' work cannot free an item: no next-item query
    assert "You: 1 / 2" in progress  # the bars are sent; study-wide counts may be one interval old
    assert len(item) == 1 and len(status) == 1 and len(button) == 1  # nothing else is sent
    assert watch2["version"] != watch["version"] and watch2["at"] == watch["at"]
    out = ui.on_poll(store, None, bob, None, [], watch2)
    assert all(len(o) == 1 for o in out) and calls == []
    assert store.progress(bob).complete == 2  # exact where asked for (after a save): counted again

    from annotation import rater_service

    for key, (version, at, total, complete) in list(rater_service._SHARED_COUNTS.items()):  # an interval later
        rater_service._SHARED_COUNTS[key] = ((0, 0, 0), at - ui.POLL_SECONDS - 1, total, 1)
    progress = ui.on_poll(store, None, bob, None, [], watch)[3]
    assert "Overall: 2 / 2 items" in progress and calls == []


def test_poll_never_replaces_an_item_on_screen_and_does_nothing_unsigned(db_url, tmp_path):
    url = db_url
    store = _accounts(url)
    store.import_items(_items(tmp_path, "two", ["first", "second"]))
    bob = store.sign_in("bob", PASSWORD)
    view = store.next_item(bob)
    before = _assignments(url)
    for force in (False, True):  # the timer's tick, the button or opening the tab
        out = ui.on_poll(store, None, bob, view, [], None, force=force)
        assert all(isinstance(o, dict) and o.get("__type__") == "update" for o in out[:6]), out
        assert all(len(o) == 1 for o in out[:6])  # gr.skip(): the item, its timing and the status stay
        assert out[6]["visible"] is False and out[7].active is False  # and the timer is switched off
        out = ui.on_poll(store, None, None, None, [], None, force=force)  # never signed in
        assert all(len(o) == 1 for o in out[:6]) and out[7].active is False
    assert _assignments(url) == before
    out = ui.on_poll(store, None, "forged-token", None, [], None, force=True)
    assert "not signed in" in out[2] and out[7].active is False
    assert _assignments(url) == before


def test_audience_says_who_will_rate_an_item(db_url, tmp_path):
    url = db_url
    store = Store(url)
    store.add_annotator("alice", PASSWORD, admin=True)
    uid = store.enqueue_item("Is the sky green?", [("No.", "m1"), ("Yes.", "m2")])
    a = store.audience(uid)
    assert (a.wanted, a.submitted, a.able) == (2, 0, 1)
    assert a.describe() == "queued for 2 raters; only 1 account can rate it yet: add raters on the Accounts tab"
    store.add_annotator("bob", PASSWORD)
    store.add_annotator("carol", PASSWORD)
    store.add_annotator("imported", None)  # no password: cannot sign in
    assert store.audience(uid).describe() == "queued for 2 raters"
    bob = store.sign_in("bob", PASSWORD)
    view = store.next_item(bob)
    store.save(bob, view.uid, {(r.id, o.key): 2 for r in view.responses for o in view.protocol.objectives},
               submit=True)
    a = store.audience(uid)
    assert (a.submitted, a.able) == (1, 2) and a.describe() == "queued for 1 rater"
    from annotation import accounts

    accounts.set_disabled(store, OPERATOR, "carol")
    accounts.set_disabled(store, OPERATOR, "alice", False)
    assert store.audience(uid).able == 1
    carol_done = store.audience(uid, target=1)
    assert carol_done.describe() == "already rated by its 1 rater"


# ----------------------------------------------------------------------------- in the browser

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(request, tmp_path):
    """``python -m annotation.ui`` on a database with accounts and no items; ``request.param``:
    its polling interval (default: the shipped one)."""
    poll = getattr(request, "param", ui.POLL_SECONDS)
    url = f"sqlite:///{tmp_path / 'ann.db'}"
    _accounts(url)
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "annotation.ui", "--db", url, "--port", str(port),
                             "--poll-seconds", str(poll)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 300  # a loaded CI machine starts Gradio slowly
    try:
        while True:
            try:
                urllib.request.urlopen(base, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail("annotation UI did not start:\n" + (tmp_path / "server.log").read_text())
                time.sleep(0.5)
        yield base, url, tmp_path
    finally:  # the server stops whatever happened, also when it never answered
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
    assert PASSWORD not in (tmp_path / "server.log").read_text()


@pytest.fixture
def browser():
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        b.close()


def _sign_in(page, name):
    field = page.locator("#ma-name input, #ma-name textarea").first
    field.wait_for(timeout=120_000)  # the page renders slowly on a loaded machine
    field.fill(name)
    page.locator("#ma-password input").fill(PASSWORD)
    page.locator("#ma-signin").click()


def _status_has(page, text, timeout=60_000):
    page.wait_for_function(f"document.querySelector('#ma-status')?.innerText.includes({text!r})", timeout=timeout)


# Rendering the new item takes the browser a moment on a loaded machine; the check itself must
# come within one polling interval.
RENDER_SLACK_S = 15.0


@pytest.mark.browser
def test_an_idle_rater_sees_an_item_imported_later_without_signing_in_again(server, browser):
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    base, url, tmp_path = server
    away = browser.new_page()  # carol signs in, then looks at another tab: her timer stops
    away.goto(base)
    _sign_in_on_annotate(away, "carol")
    _status_has(away, "No items are waiting")
    away.get_by_role("tab", name="Export").click()
    page = browser.new_page()
    page.goto(base)
    _sign_in(page, "bob")
    _status_has(page, "No items are waiting")
    expect(page.locator("#ma-check")).to_be_visible()
    expect(page.locator("#ma-progress")).to_contain_text("You: 0 / 0 items submitted")
    assert page.locator(".ma-score").count() == 0
    time.sleep(ui.POLL_SECONDS)  # a few ticks with nothing new

    Store(url).import_items(_items(tmp_path, "later", ["a post imported later"]))  # the admin's import
    t0 = time.monotonic()
    page.wait_for_selector(".ma-score", timeout=int((ui.POLL_SECONDS + RENDER_SLACK_S) * 1000))
    waited = time.monotonic() - t0
    assert waited <= ui.POLL_SECONDS + RENDER_SLACK_S
    expect(page.get_by_role("textbox", name="Query")).to_have_value("a post imported later")
    expect(page.locator("#ma-progress")).to_contain_text("You: 0 / 1 items submitted")  # progress followed
    expect(page.locator("#ma-check")).to_be_hidden()
    uid = "q-" + _uid_hash("a post imported later")
    time.sleep(2 * ui.POLL_SECONDS)
    assert _assignments(tmp_path / "ann.db") == [("bob", uid, "open")]  # carol's page, on Export, did not poll

    away.get_by_role("tab", name="Annotate").click()  # coming back checks at once
    away.wait_for_selector(".ma-score", timeout=int(RENDER_SLACK_S * 1000))
    expect(away.get_by_role("textbox", name="Query")).to_have_value("a post imported later")
    assert _assignments(tmp_path / "ann.db") == [("bob", uid, "open"), ("carol", uid, "open")]


@pytest.mark.browser
@pytest.mark.parametrize("server", [3600.0], indirect=True)  # no tick during the test: only the button, the tab
def test_the_button_and_opening_the_tab_check_at_once(server, browser):
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    base, url, tmp_path = server
    other = browser.new_page()
    other.goto(base)
    _sign_in_on_annotate(other, "carol")
    _status_has(other, "No items are waiting")
    page = browser.new_page()
    page.goto(base)
    _sign_in(page, "bob")
    _status_has(page, "No items are waiting")
    Store(url).import_items(_items(tmp_path, "later", ["a post imported later"]))
    time.sleep(3)
    assert page.locator(".ma-score").count() == 0 and other.locator(".ma-score").count() == 0
    page.locator("#ma-check").click()
    page.wait_for_selector(".ma-score", timeout=int(RENDER_SLACK_S * 1000))
    _status_has(page, "A new item is here")
    assert other.locator(".ma-score").count() == 0
    other.get_by_role("tab", name="Export").click()
    other.get_by_role("tab", name="Annotate").click()
    other.wait_for_selector(".ma-score", timeout=int(RENDER_SLACK_S * 1000))
    expect(other.get_by_role("textbox", name="Query")).to_have_value("a post imported later")


def _sign_in_on_annotate(page, name):
    page.get_by_role("tab", name="Annotate").click()
    _sign_in(page, name)
    from playwright.sync_api import expect

    expect(page.locator("#ma-who")).to_contain_text("Signed in", timeout=60_000)


def _uid_hash(query: str) -> str:
    import hashlib

    return hashlib.sha256(f"imhi\n{query}".encode()).hexdigest()[:16]


@pytest.mark.browser
def test_polling_never_replaces_the_item_on_screen(server, browser):
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    base, url, tmp_path = server
    Store(url).import_items(_items(tmp_path, "first", ["the item being rated"]))
    page = browser.new_page()
    page.goto(base)
    _sign_in(page, "bob")
    page.wait_for_selector(".ma-score", timeout=60_000)
    expect(page.locator("#ma-check")).to_be_hidden()
    page.locator("body").click(position={"x": 3, "y": 3})
    page.keyboard.press("2")  # an unsaved score on the first objective
    checked = "document.querySelectorAll('.ma-score input:checked').length"
    page.wait_for_function(f"{checked} === 1", timeout=30_000)
    status_before = page.locator("#ma-status").inner_text()

    Store(url).import_items(_items(tmp_path, "more", ["a newer item", "another newer item"]))
    time.sleep(3 * ui.POLL_SECONDS)  # several intervals: a running timer would have ticked
    assert page.evaluate(checked) == 1, "the unsaved score was lost"
    assert page.locator("#ma-status").inner_text() == status_before
    expect(page.get_by_role("textbox", name="Query")).to_have_value("the item being rated")
    assert [row[1:] for row in _assignments(tmp_path / "ann.db")] == [("q-" + _uid_hash("the item being rated"), "open")]

    # Skip moves on at the rater's request, then submit; the finished queue starts polling again.
    page.locator("#ma-skip").click()
    expect(page.get_by_role("textbox", name="Query")).to_have_value(re.compile("newer item"))


@pytest.mark.browser
def test_export_tab_shows_the_dashboard_when_an_admin_opens_it(server, browser):
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)
    base, url, tmp_path = server
    page = browser.new_page()
    page.goto(base)
    _sign_in(page, "alice")
    _status_has(page, "No items are waiting")
    page.get_by_role("tab", name="Export").click()  # no ratings yet: one line, no tables
    expect(page.locator("#ma-export-status")).to_contain_text("No ratings submitted yet (0 items waiting")
    expect(page.locator("#ma-export-status")).to_contain_text("Computed at")
    for table in ("#ma-agreement", "#ma-by-source", "#ma-raters", "#ma-distribution"):
        expect(page.locator(table)).to_be_hidden()

    store = Store(url)
    store.import_items(_items(tmp_path, "rated", ["first post", "second post"]))
    for name, score in (("bob", 3), ("carol", 1)):
        token = store.sign_in(name, PASSWORD)
        while (view := store.next_item(token)) is not None:
            store.save(token, view.uid, {(r.id, o.key): score for r in view.responses
                                         for o in view.protocol.objectives}, submit=True)
    page.get_by_role("tab", name="Annotate").click()
    page.get_by_role("tab", name="Export").click()  # opened again: computed again, no button pressed
    expect(page.locator("#ma-agreement")).to_contain_text("correctness")
    expect(page.locator("#ma-by-source")).to_contain_text("model-a")
    headers = page.locator("#ma-by-source thead").inner_text()
    assert "source" in headers and "correctness" in headers
    assert "1\t2\t3" not in headers and "\n1\n" not in f"\n{headers}\n"
    expect(page.locator("#ma-raters")).to_contain_text("carol")
    expect(page.locator("#ma-export-status")).to_contain_text("2 / 2 items complete")
    first = page.locator("#ma-export-status").inner_text()
    assert "Computed at" in first
    time.sleep(1.1)
    page.locator("#ma-export-refresh").click()
    page.wait_for_function(f"document.querySelector('#ma-export-status').innerText !== {first!r}", timeout=60_000)
    assert "Computed at" in page.locator("#ma-export-status").inner_text()


@pytest.mark.browser
def test_export_tab_opened_by_a_rater_shows_no_dashboard(server, browser):
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)
    base, url, tmp_path = server
    page = browser.new_page()
    page.goto(base)
    page.get_by_role("tab", name="Export").click()
    expect(page.locator("#ma-export-status")).to_contain_text("Sign in with an admin account")
    page.get_by_role("tab", name="Annotate").click()
    _sign_in(page, "bob")
    _status_has(page, "No items are waiting")
    page.get_by_role("tab", name="Export").click()
    expect(page.locator("#ma-export-status")).to_contain_text("admins only")
    expect(page.locator("#ma-agreement")).to_be_hidden()


# ----------------------------------------------------------------------------- the raw API

def test_the_polling_handlers_over_the_raw_api_serve_only_the_callers_own_queue(server):
    """Every event handler is a public endpoint: a client calling the polling handlers (timer
    tick, button, opening the tab) with any session hash and any input values acts, at most, on
    the queue of the account signed in on that session; an unsigned session gets nothing."""
    import json
    import uuid

    from test_security_app import RawGradio, backend_fns, components, fn_by_inputs

    base, url, tmp_path = server
    raw = RawGradio(base)
    try:
        cfg = raw.config()
        comps = components(cfg)
        check = next(i for i, c in comps.items() if c.get("props", {}).get("elem_id") == "ma-check")
        poll_fns = [fn for fn, dep in backend_fns(cfg) if check in dep["outputs"] and len(dep["inputs"]) == 4
                    and all(comps[i]["type"] == "state" for i in dep["inputs"])]
        triggers = {comps[t[0]]["type"] + "." + t[1] for fn, dep in backend_fns(cfg) if fn in poll_fns
                    for t in dep["targets"]}
        assert triggers == {"number.change", "button.click", "tabitem.select"}, triggers
        # The timer's tick runs outside the queue and only says whether to check (poll_due).
        timers = {i for i, c in comps.items() if c["type"] == "timer"}
        tick_fn = next(fn for fn, dep in backend_fns(cfg) if any(t[0] in timers and t[1] == "tick"
                                                                 for t in dep["targets"]))

        def tick(session: str, data: list) -> str:
            r = raw.http.post(f"{base.rstrip('/')}/gradio_api/run/predict",
                              json={"data": data, "fn_index": tick_fn, "session_hash": session,
                                    "event_data": None, "trigger_id": None})
            assert r.status_code == 200, r.text
            return r.text
        sign_in = fn_by_inputs(cfg, "ma-name", "ma-password")
        db = tmp_path / "ann.db"

        bob, carol = uuid.uuid4().hex[:11], uuid.uuid4().hex[:11]
        for session, name in ((bob, "bob"), (carol, "carol")):
            res = raw.call(sign_in, [name, PASSWORD], session_hash=session)
            assert res["ok"] and PASSWORD not in json.dumps(res), res
        assert _assignments(db) == []  # nothing to do yet
        store = Store(url)
        store.import_items(_items(tmp_path, "secret", ["a post only raters may read"]))
        carol_token = store.sign_in("carol", PASSWORD)  # a real token, as a thief might hold
        uid = "q-" + _uid_hash("a post only raters may read")

        # Unsigned sessions: nothing, whatever they send in place of the server-side state.
        hostile = [[None, None, None, None], [carol_token, None, [], None],
                   [carol_token, None, [], {"version": [0, 0, 0], "at": 0.0}]]
        for fn in poll_fns:
            for data in hostile:
                res = raw.call(fn, data, session_hash=uuid.uuid4().hex[:11])
                reply = json.dumps(res)
                assert "You:" not in reply and "Overall" not in reply and "only raters" not in reply, reply
        for data in [[None, None, None], [carol_token, None, None], [carol_token, None, {"version": [0, 0, 0]}]]:
            reply = tick(uuid.uuid4().hex[:11], data)
            assert "You:" not in reply and "only raters" not in reply and carol_token not in reply, reply
        reply = tick(bob, [carol_token, None, None])  # bob's session: a signal at most, never data
        assert "You:" not in reply and "only raters" not in reply and carol_token not in reply, reply
        assert _assignments(db) == []

        # Bob's own session, even with carol's token in the request, acts on bob's queue only.
        res = raw.call(poll_fns[0], [carol_token, None, [], None], session_hash=bob)
        assert res["ok"], res
        reply = json.dumps(res)
        assert "You: 0 / 1 items submitted" in reply and carol_token not in reply
        assert _assignments(db) == [("bob", uid, "open")]
        for fn in poll_fns:  # bob has an item on screen now: further checks change nothing
            res = raw.call(fn, [None, None, [], None], session_hash=bob)
            assert res["ok"] and "You:" not in json.dumps(res), res
        assert _assignments(db) == [("bob", uid, "open")]

        res = raw.call(poll_fns[1], [None, None, [], None], session_hash=carol)  # carol's own session
        assert res["ok"] and "You: 0 / 1 items submitted" in json.dumps(res), res
        assert _assignments(db) == [("bob", uid, "open"), ("carol", uid, "open")]
    finally:
        raw.close()
