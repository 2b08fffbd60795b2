"""The Annotate and Export tabs in a real browser (headless Chromium) against a real server:
the rater's flow, the examiner's review, the admins' dashboard."""
from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request

import pytest

from annotation.store import OPERATOR, Store
from annotation.ui import export_files, export_view
from conftest import ROOT, require_chromium, write_jsonl

PASSWORD = "ui-password-123"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def fast_passwords(monkeypatch):
    """Cheap scrypt for the accounts these tests create (the production cost is tested elsewhere)."""
    from annotation import accounts

    monkeypatch.setattr(accounts, "SCRYPT_N", 2 ** 10)


def _seed(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'ann.db'}"
    store = Store(url)
    store.import_items(write_jsonl(tmp_path / "items.jsonl", [
        {"query": "Consider this post: first post. Question: Does the poster suffer from depression?",
         "responses": [{"text": "Yes, the poster shows hopelessness.", "source": "model-a"},
                       {"text": "No.", "source": "model-b"}]},
        {"query": "second post", "responses": [{"text": "second answer", "source": "model-a"}]},
    ]))
    store.add_annotator("alice", PASSWORD, admin=True)
    store.add_annotator("bob", PASSWORD)
    store.add_annotator("carol", PASSWORD)
    store.add_annotator("eve", PASSWORD, role="examiner")
    return url


# The tabs as an app embeds them without sharing the sign-in: the Export tab signs in itself.
SEPARATE_TABS = """
import sys, gradio as gr
from annotation.ui import build_annotate_tab, build_export_tab
url, port = sys.argv[1], int(sys.argv[2])
with gr.Blocks(analytics_enabled=False) as demo:
    with gr.Tab("Annotate"):
        build_annotate_tab(url)
    with gr.Tab("Export"):
        build_export_tab(url)
demo.launch(server_name="127.0.0.1", server_port=port)
"""


@pytest.fixture(params=["shared sign-in"])
def server(request, tmp_path):
    url = _seed(tmp_path)
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if request.param == "shared sign-in":
        cmd = [sys.executable, "-m", "annotation.ui", "--db", url, "--port", str(port)]
    else:
        cmd = [sys.executable, "-c", SEPARATE_TABS, url, str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(base, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                log.close()
                pytest.fail("annotation UI did not start:\n" + (tmp_path / "server.log").read_text())
            time.sleep(0.5)
    yield base, url, tmp_path / "ann.db"
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
    assert PASSWORD not in (tmp_path / "server.log").read_text()


@pytest.fixture
def page():
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser.new_page()
        browser.close()


def _sign_in(page, name, password):
    page.locator("#ma-name input, #ma-name textarea").first.fill(name)
    page.locator("#ma-password input").fill(password)
    page.locator("#ma-signin").click()


def _status(page, text, timeout=60000):
    page.wait_for_function(f"document.querySelector('#ma-status').innerText.includes({text!r})", timeout=timeout)


@pytest.mark.browser
def test_sign_in_rate_with_the_keyboard_and_submit(server, page):
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)  # a loaded CI machine renders slowly
    base, url, db = server
    page.goto(base)
    _sign_in(page, "bob", "wrong password")
    _status(page, "wrong name or password")
    assert page.locator(".ma-score").count() == 0
    _sign_in(page, "bob", PASSWORD)
    page.wait_for_selector(".ma-score", timeout=60000)
    expect(page.locator("#ma-who")).to_contain_text("Signed in as bob", timeout=60000)
    assert page.locator(".ma-score").count() == 2 * 3
    assert "model-a" not in page.content()  # blind: model names are not shown
    rubric = page.locator("#ma-rubric").inner_text()
    assert "Completely reliable information." in rubric and "Suicide ideation" in rubric
    assert "version 2-paper-c3" in rubric
    assert not page.locator("#ma-review").is_visible()  # raters get no review section

    page.locator("#ma-note-0 textarea, #ma-note-0 input").first.fill("clear case")
    page.locator("body").click(position={"x": 3, "y": 3})
    for key in "312":  # response 1: correctness 3, informative 1, professional 2
        page.keyboard.press(key)
    page.keyboard.press("Control+s")
    _status(page, "Draft saved")
    con = sqlite3.connect(db)
    drafts = con.execute("SELECT objective, score, status, note FROM ratings ORDER BY id").fetchall()
    assert drafts == [("correctness", 3, "draft", "clear case"), ("informative", 1, "draft", "clear case"),
                      ("professional", 2, "draft", "clear case")]
    page.keyboard.press("Control+Enter")  # incomplete: refused, nothing changes
    _status(page, "rate every response on every objective")
    for key in "001":  # response 2
        page.keyboard.press(key)
    page.keyboard.press("Control+Enter")
    _status(page, "Submitted")
    rows = con.execute("SELECT r.position, g.objective, g.score, g.status FROM ratings g "
                       "JOIN responses r ON r.id = g.response_id ORDER BY r.position, g.id").fetchall()
    con.close()
    assert rows == [(0, "correctness", 3, "submitted"), (0, "informative", 1, "submitted"),
                    (0, "professional", 2, "submitted"), (1, "correctness", 0, "submitted"),
                    (1, "informative", 0, "submitted"), (1, "professional", 1, "submitted")]
    page.wait_for_function("document.querySelectorAll('.ma-score').length === 3", timeout=60000)  # next item
    expect(page.locator("#ma-progress")).to_contain_text("1 / 2 items submitted", timeout=60000)

    page.get_by_role("tab", name="Export").click()
    page.locator("#ma-export-refresh").click()
    page.wait_for_function("document.querySelector('#ma-export-status').innerText.includes('admins only')",
                           timeout=60000)
    page.get_by_role("tab", name="Annotate").click()
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_selector("#ma-password input", timeout=60000)
    assert page.locator("#ma-password input").input_value() == ""  # the password was cleared after use
    # the item view empties in the same update; on a loaded machine it can render a moment later
    page.wait_for_function("document.querySelectorAll('.ma-score').length === 0", timeout=60000)


@pytest.mark.browser
@pytest.mark.parametrize("server", ["shared sign-in", "separate sign-in"], indirect=True)
def test_admin_export_tab_shows_agreement_and_offers_downloads(server, page, request):
    base, url, _ = server
    store = Store(url)
    for name in ("alice", "bob"):
        token = store.sign_in(name, PASSWORD)
        while (view := store.next_item(token)) is not None:
            store.save(token, view.uid, {(r.id, o.key): 2 for r in view.responses for o in view.protocol.objectives},
                       submit=True)
    page.goto(base)
    if "separate" in request.node.callspec.id:
        page.get_by_role("tab", name="Export").click()
        page.locator("#ma-export-name input, #ma-export-name textarea").first.fill("bob")
        page.locator("#ma-export-password input").fill(PASSWORD)
        page.locator("#ma-export-signin").click()
        page.wait_for_function("document.querySelector('#ma-export-status').innerText.includes('admins only')",
                               timeout=60000)
        page.locator("#ma-export-name input, #ma-export-name textarea").first.fill("alice")
        page.locator("#ma-export-password input").fill(PASSWORD)
        page.locator("#ma-export-signin").click()
    else:
        _sign_in(page, "alice", PASSWORD)
        _status(page, "No items are waiting")
        page.get_by_role("tab", name="Export").click()
        page.locator("#ma-export-refresh").click()
    page.wait_for_function("document.querySelector('#ma-agreement').innerText.includes('correctness')", timeout=60000)
    page.locator("#ma-export-prepare").click()
    page.wait_for_selector("#ma-download-3", state="visible", timeout=60000)
    with page.expect_download() as dl:
        page.locator("#ma-download-3").click()
    text = open(dl.value.path(), encoding="utf-8").read()
    assert '"response_1": "Yes, the poster shows hopelessness."' in text and '"labels"' in text


def test_export_handlers_need_an_admin(tmp_path):
    url = _seed(tmp_path)
    store = Store(url)
    bob, alice = store.sign_in("bob", PASSWORD), store.sign_in("alice", PASSWORD)
    from annotation.store import AccessDenied

    with pytest.raises(AccessDenied):
        export_view(store, bob)
    with pytest.raises(AccessDenied):
        export_files(store, bob, tmp_path / "out")
    assert not (tmp_path / "out" / "ratings.jsonl").exists()
    eve = store.sign_in("eve", PASSWORD)
    with pytest.raises(AccessDenied):
        export_view(store, eve)  # examiners review; the dashboard is for admins
    view = export_view(store, alice)
    assert [r[0] for r in view.agreement] == ["correctness", "informative", "professional"]
    assert {r[0] for r in view.raters} == {"alice", "bob", "carol", "eve"}
    paths = export_files(store, alice, tmp_path / "out")
    assert sorted(p.name for p in paths.values()) == ["final.jsonl", "pairs.jsonl", "ratings.csv", "ratings.jsonl"]
    assert store.export(OPERATOR, "ratings", tmp_path / "op.jsonl") == 0


@pytest.mark.browser
def test_examiner_reviews_a_disagreement_and_the_admin_dashboard_shows_it(server, page):
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    base, url, db = server
    store = Store(url)
    for name, score in (("bob", 3), ("carol", 1)):  # they disagree on every objective of the first item
        token = store.sign_in(name, PASSWORD)
        while (view := store.next_item(token)) is not None:
            first = view.query.startswith("Consider")
            store.save(token, view.uid, {(r.id, o.key): score if first else 2 for r in view.responses
                                         for o in view.protocol.objectives},
                       notes={view.responses[0].id: f"{name} thinks so"}, submit=True, seconds=5)
    page.goto(base)
    _sign_in(page, "eve", PASSWORD)
    expect(page.locator("#ma-who")).to_contain_text("(examiner)", timeout=60000)
    page.locator("#ma-review-next").click()
    page.wait_for_selector("#ma-review-table-0", timeout=60000)
    table = page.locator("#ma-review-table-0").inner_text()
    assert "bob" in table and "carol" in table and "bob thinks so" in table and "carol thinks so" in table
    assert page.locator("[id^=ma-final-]").count() == 2 * 3
    for i in range(2):
        for key in ("correctness", "informative", "professional"):
            page.locator(f"#ma-final-{i}-{key} label").filter(has_text="2 ·").first.click()
    page.locator("#ma-review-save").click()
    page.wait_for_function("document.querySelector('#ma-review-status').innerText.includes('reason')",
                           timeout=60000)  # a reason is required
    page.locator("#ma-review-reason textarea").fill("both readings are defensible; 2 fits the rubric")
    page.locator("#ma-review-save").click()
    page.wait_for_function("document.querySelector('#ma-review-status').innerText.includes('Final scores saved')",
                           timeout=60000)
    con = sqlite3.connect(db)
    reviews = con.execute("SELECT score, reason FROM reviews").fetchall()
    con.close()
    assert reviews == [(2, "both readings are defensible; 2 fits the rubric")] * 6
    finals = {(f["response"], f["objective"]): (f["final_score"], f["decided_by"])
              for f in store.final_records(OPERATOR)}
    assert finals[("No.", "correctness")] == (2, "eve")
    # the examiner has no dashboard; the admin has
    page.get_by_role("tab", name="Export").click()
    page.locator("#ma-export-refresh").click()
    page.wait_for_function("document.querySelector('#ma-export-status').innerText.includes('admins only')",
                           timeout=60000)
    page.get_by_role("tab", name="Annotate").click()
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_selector("#ma-password input", timeout=60000)
    _sign_in(page, "alice", PASSWORD)
    expect(page.locator("#ma-who")).to_contain_text("(admin)", timeout=60000)
    page.get_by_role("tab", name="Export").click()
    page.locator("#ma-export-refresh").click()
    page.wait_for_function("document.querySelector('#ma-export-status').innerText.includes('1 reviewed')",
                           timeout=60000)
    assert "model-a" in page.locator("#ma-by-source").inner_text()
    raters = page.locator("#ma-raters").inner_text()
    assert "bob" in raters and "carol" in raters
    page.wait_for_selector("#ma-distribution img", timeout=60000)
