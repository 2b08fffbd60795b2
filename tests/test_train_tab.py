"""The Train tab: a rater cannot start a job through the raw Gradio API; in a real browser an admin
starts a short job, reloads the page, finds it again, and offers the new aligner in the Align tab.

The app runs in-process (``webapp`` launch) on a free port with a study the test builds (SQLite)
and a tiny two-layer LLaMA as the operator's configured base; the job is the real
``annotate train`` child process, a few steps long.
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from pathlib import Path

import pytest

from conftest import require_chromium
from test_annotation_loop import build_study, tiny_llama_dir
from test_security_app import RawGradio, components, fn_by_inputs

pytestmark = [pytest.mark.slow]
CHROMIUM = "/usr/bin/chromium"
ADMIN_PW, RATER_PW = "a long admin password", "a long rater password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from annotation.store import Store, dispose_engine
    from webapp.config import AppConfig
    from webapp.launch import launch

    root = tmp_path_factory.mktemp("train-tab")
    db = f"sqlite:///{root / 'study.db'}"
    build_study(root, db)
    store = Store(db)
    store.add_annotator("boss", ADMIN_PW, role="admin")
    store.add_annotator("rita", RATER_PW, role="rater")
    base = tiny_llama_dir(root / "tiny-base")
    config = AppConfig(port=free_port(), db_url=db, preload=False, max_new_tokens=4, train_bases=[str(base)],
                       aligner=str(base),
                       runs_dir=str(root / "runs"), train_threads=1)
    demo = launch(config, block=False, quiet=True)
    try:
        yield {"url": f"http://127.0.0.1:{config.port}", "runs": root / "runs", "base": str(base), "demo": demo,
               "db": db}
    finally:
        demo.train_jobs.shutdown()
        demo.close()
        dispose_engine(db)


def test_a_rater_cannot_start_a_job_through_the_raw_api(served):
    raw = RawGradio(served["url"])
    try:
        cfg = raw.config()
        sign_in = fn_by_inputs(cfg, "ma-name", "ma-password")
        start = fn_by_inputs(cfg, "ma-train-protocol", "ma-train-base", "ma-train-max-steps")
        ab = fn_by_inputs(cfg, "ma-train-finished", "ma-train-baseline", "ma-train-ab-queries")
        session = uuid.uuid4().hex[:11]
        assert raw.call(sign_in, ["rita", RATER_PW], session_hash=session)["ok"]
        comps = components(cfg)
        dep = next(d for i, d in enumerate(cfg["dependencies"]) if d.get("id", i) == start)
        by_elem = {comps[i].get("props", {}).get("elem_id"): n for n, i in enumerate(dep["inputs"])}
        data = [comps[i].get("props", {}).get("value") for i in dep["inputs"]]
        data[by_elem["ma-train-protocol"]] = "imhi"
        data[by_elem["ma-train-base"]] = served["base"]
        data[by_elem["ma-train-max-steps"]] = 1
        data[by_elem["ma-train-min-pairs"]] = 1
        res = raw.call(start, data, session_hash=session)
        assert not res["ok"] and "admin" in str(res["error"]).lower(), res
        res = raw.call(ab, [None, "x", "default", 2], session_hash=session)
        assert not res["ok"] and "admin" in str(res["error"]).lower(), res
        # an unsigned session neither
        res = raw.call(start, data, session_hash=uuid.uuid4().hex[:11])
        assert not res["ok"], res
        assert not served["runs"].exists() or not any(served["runs"].iterdir())
        assert served["demo"].train_jobs.job is None
    finally:
        raw.close()


def fill(page, elem_id: str, text: str) -> None:
    page.locator(f"#{elem_id}").locator("input, textarea").first.fill(text)


def sign_in_admin(page, url: str) -> None:
    from playwright.sync_api import expect

    page.goto(url)
    page.get_by_role("tab", name="Annotate").click()
    fill(page, "ma-name", "boss")
    fill(page, "ma-password", ADMIN_PW)
    page.locator("#ma-signin").click()
    expect(page.locator("#ma-who")).to_contain_text("boss")
    page.get_by_role("tab", name="Train").click()


@pytest.mark.browser
def test_the_train_tab_starts_a_job_survives_a_reload_and_offers_the_aligner(served, artifacts_dir):
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            sign_in_admin(page, served["url"])
            fill(page, "ma-train-min-pairs", "4")
            page.locator("#ma-train-min-pairs input").press("Enter")
            expect(page.locator("#ma-train-preview")).to_contain_text("preference pairs")
            expect(page.locator("#ma-train-preview")).to_contain_text("Algorithm 1 rows")
            fill(page, "ma-train-max-steps", "3")
            fill(page, "ma-train-holdout", "2")
            page.locator("#ma-train-start").click()
            expect(page.locator("#ma-train-message")).to_contain_text("Training started")
            expect(page.locator("#ma-train-progress-text")).to_contain_text("train job")

            # a reload: the job is the server's, the page finds it again after signing in
            page.reload()
            sign_in_admin(page, served["url"])
            expect(page.locator("#ma-train-progress-text")).to_contain_text("train job")
            expect(page.locator("#ma-train-progress-text")).to_contain_text("done", timeout=600_000)
            expect(page.locator("#ma-train-log textarea")).to_have_value(re.compile("aligner written to"))
            page.screenshot(path=str(artifacts_dir / "app_train_tab.png"), full_page=True)
            run = next(served["runs"].glob("imhi-*"))
            final = str(run / "final")
            assert json.loads((run / "job.json").read_text())["status"] == "done"
            assert (run / "stats.json").is_file() and (run / "commands.sh").is_file()

            page.locator("#ma-train-offer").click()
            expect(page.locator("#ma-train-message")).to_contain_text("Visitors may now pick")
            assert served["demo"].allow_list.check("aligner", final) == final

            # one click: the blind A/B study of the new aligner
            page.locator("#ma-train-ab").click()
            expect(page.locator("#ma-train-message")).to_contain_text("A/B study")
            deadline = time.monotonic() + 600
            while served["demo"].train_jobs.job.status == "running" and time.monotonic() < deadline:
                time.sleep(1)
            assert served["demo"].train_jobs.job.status == "done", served["demo"].train_jobs.job.out

            # a fresh page (any visitor's) lists the new aligner in the Align tab's picker
            page.goto(served["url"])
            expect(page.locator("#aligner")).to_be_visible()
            page.locator("#aligner input").first.click()
            expect(page.get_by_role("option").filter(has_text=final)).to_have_count(1)
        finally:
            browser.close()
    from annotation import ab
    from annotation.store import OPERATOR, Store

    figs = ab.figures(Store(served["db"]), OPERATOR)
    assert len(figs) == 1 and next(iter(figs.values()))["candidate"] == final


def test_jobs_one_at_a_time_configured_bases_only_and_cancel(tmp_path):
    from annotation.store import OPERATOR, Store
    from metaaligner_core.errors import MetaAlignerError
    from webapp.train_jobs import TrainJobs

    db = f"sqlite:///{tmp_path / 'study.db'}"
    build_study(tmp_path, db)
    Store(db).add_annotator("rita", RATER_PW, role="rater")
    rater = Store(db).sign_in("rita", RATER_PW)
    base = str(tiny_llama_dir(tmp_path / "base"))
    jobs = TrainJobs(db, tmp_path / "runs", bases=[base], threads=1)
    with pytest.raises(MetaAlignerError, match="admin"):
        jobs.preview(rater, "imhi")
    with pytest.raises(MetaAlignerError, match="configured"):
        jobs.start_train(OPERATOR, "imhi", "default", max_steps=1, min_pairs=1)
    preview = jobs.preview(OPERATOR, "imhi", holdout=2, min_pairs=1000)
    assert "needs at least 1000" in preview["refusal"] and preview["held_out"] == 2
    with pytest.raises(MetaAlignerError, match="needs at least 1000"):
        jobs.start_train(OPERATOR, "imhi", base, max_steps=1, min_pairs=1000)
    job = jobs.start_train(OPERATOR, "imhi", base, max_steps=5000, epochs=100, min_pairs=1)
    try:
        assert "METAALIGNER_DB" not in " ".join(job.argv) and db not in " ".join(job.argv)
        env = Path(f"/proc/{job.proc.pid}/environ").read_bytes().split(b"\0")
        assert b"OMP_NUM_THREADS=1" in env and f"METAALIGNER_DB={db}".encode() in env  # bounded threads
        assert os.getpriority(os.PRIO_PROCESS, job.proc.pid) >= 10  # below the app's own priority
        with pytest.raises(MetaAlignerError, match="is running"):
            jobs.start_train(OPERATOR, "imhi", base, max_steps=1, min_pairs=1)
        time.sleep(2)
    finally:
        assert jobs.cancel(OPERATOR) == "the train job was cancelled"
    assert job.status == "cancelled" and job.proc.poll() is not None
    assert json.loads((job.out / "job.json").read_text())["status"] == "cancelled"
    assert jobs.finished_aligners() == []


def test_a_job_the_tab_shows_as_done_is_already_among_the_finished_aligners(tmp_path, monkeypatch):
    """The tab stops polling once the job reads "done": by then its aligner must be listed (job.json
    written), or the page is left with nothing to offer. The job.json write is slowed to open the gap."""
    from annotation.store import OPERATOR
    from webapp.train_jobs import TrainJobs

    db = f"sqlite:///{tmp_path / 'study.db'}"
    build_study(tmp_path, db)
    fake = tmp_path / "fake-python"  # the child: exits 0 after a moment, whatever it is asked
    fake.write_text("#!/bin/sh\nsleep 1\n")
    fake.chmod(0o755)
    jobs = TrainJobs(db, tmp_path / "runs", bases=[str(tmp_path)], threads=1, python=str(fake))
    job = jobs.start_train(OPERATOR, "imhi", str(tmp_path), max_steps=1, min_pairs=1, holdout=0)
    (job.out / "final").mkdir()
    real_write = jobs._write

    def slow_write(j):
        if j.status != "running":
            time.sleep(1.5)
        real_write(j)

    monkeypatch.setattr(jobs, "_write", slow_write)
    seen_done, deadline = False, time.monotonic() + 30
    while not seen_done and time.monotonic() < deadline:
        seen_done = jobs.state(OPERATOR)["status"] == "done"
        if seen_done:
            assert jobs.finished_aligners() == [str(job.out / "final")]
        time.sleep(0.05)
    assert seen_done
