"""First run in a real browser: on an empty database the app offers to create the first admin
with the one-time token from the server log; that admin then adds a rater on the Accounts tab,
who signs in. Headless Chromium through Playwright against ``webapp.launch.launch`` on a free port."""
from __future__ import annotations

import socket

import pytest

from conftest import require_chromium
from webapp.config import AppConfig
from webapp.launch import launch

pytestmark = [pytest.mark.browser, pytest.mark.slow]
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill(page, elem_id: str, text: str) -> None:
    page.locator(f"#{elem_id}").locator("input, textarea").first.fill(text)


def test_first_admin_then_a_rater_in_the_browser(tmp_path, artifacts_dir, caplog):
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    from annotation.store import Store

    expect.set_options(timeout=30_000)
    db = f"sqlite:///{tmp_path / 'fresh.db'}"
    config = AppConfig(port=free_port(), db_url=db, preload=False, max_new_tokens=8)
    caplog.set_level("WARNING", logger="metaaligner.app")
    demo = launch(config, block=False, quiet=True)
    try:
        token = demo.first_run.token
        assert f"set-up token: {token}" in caplog.text  # only the server log shows it
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1600})
                page.goto(f"http://127.0.0.1:{config.port}/")
                page.get_by_role("tab", name="Accounts").click()
                expect(page.locator("#ma-first-run").first).to_be_visible()
                fill(page, "ma-setup-token", "not-the-token")
                fill(page, "ma-setup-name", "boss")
                fill(page, "ma-setup-password", "a long admin password")
                page.locator("#ma-setup-btn").click()
                expect(page.locator("#ma-setup-status")).to_contain_text("wrong or used set-up token")
                fill(page, "ma-setup-token", token)
                fill(page, "ma-setup-password", "a long admin password")
                page.locator("#ma-setup-btn").click()
                expect(page.locator("#ma-setup-status")).to_contain_text("Admin boss created")
                expect(page.locator("#ma-first-run").first).to_be_hidden()

                # The admin signs in (Annotate tab) and adds a rater (Accounts tab).
                page.get_by_role("tab", name="Annotate").click()
                fill(page, "ma-name", "boss")
                fill(page, "ma-password", "a long admin password")
                page.locator("#ma-signin").click()
                expect(page.locator("#ma-who")).to_contain_text("boss")
                page.get_by_role("tab", name="Accounts").click()
                fill(page, "ma-acct-name", "rita")
                fill(page, "ma-acct-password", "a long rater password")
                page.locator("#ma-acct-add").click()
                expect(page.locator("#ma-accounts-status")).to_contain_text("Account rita added")
                expect(page.locator("#ma-accounts")).to_contain_text("rita")
                page.screenshot(path=str(artifacts_dir / "app_accounts_tab.png"), full_page=True)

                # A second visitor: no set-up form any more, and the rater can sign in.
                other = browser.new_page()
                other.goto(f"http://127.0.0.1:{config.port}/")
                other.get_by_role("tab", name="Accounts").click()
                other.locator("#ma-accounts-refresh").click()
                expect(other.locator("#ma-accounts-status")).to_contain_text("not signed in")
                expect(other.locator("#ma-first-run").first).to_be_hidden()
            finally:
                browser.close()
        store = Store(db)
        assert store.whoami(store.sign_in("rita", "a long rater password")).role == "rater"
    finally:
        demo.close()
