"""Client addresses and shared throttling in the running app (issue 19), over Gradio's raw
protocol: two ``python app.py`` processes on one SQLite database.

* ``plain`` runs with the defaults: ``X-Forwarded-For`` is ignored, so 22 guesses with 22 forged
  addresses all count for the one real address and are throttled after 20;
* ``proxied`` lists 127.0.0.1 with ``--forwarded-allow-ips`` (a proxy on this machine): there the
  header is the client's address, so the same 22 forged addresses are 22 clients (the positive
  control: the header does reach the app);
* failures for one account in ``plain`` throttle that account's sign-in in ``proxied``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT
from test_security_app import PASSWORD, RawGradio, fn_by_inputs, free_port, seed_db

pytestmark = pytest.mark.slow  # two app processes; failed sign-ins run scrypt


class RunningApp:
    def __init__(self, tmp: Path, db_url: str, name: str, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"{name}.log"
        self.log = open(self.log_path, "w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
        env.pop("GRADIO_TEMP_DIR", None)
        env.pop("FORWARDED_ALLOW_IPS", None)
        self.proc = subprocess.Popen([sys.executable, "app.py", "--port", str(self.port), "--db", db_url,
                                      "--no-preload", "--threads", "1", *extra],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self):
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2) as r:
                    if r.status == 200:
                        raw = RawGradio(self.url)
                        self.fn = fn_by_inputs(raw.config(), "ma-name", "ma-password")
                        raw.close()
                        return self
            except OSError:
                time.sleep(0.3)
        raise AssertionError("app.py did not answer within 300 s")

    def sign_in(self, name: str, password: str, forwarded_for: str | None = None) -> str:
        raw = RawGradio(self.url)
        try:
            if forwarded_for:
                raw.http.headers["X-Forwarded-For"] = forwarded_for
            result = raw.call(self.fn, [name, password])
            return str(result["data"]) + str(result["error"] or "")
        finally:
            raw.close()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two-apps")
    db_url = seed_db(tmp / "data" / "annotations.db")
    plain = RunningApp(tmp, db_url, "plain")
    proxied = RunningApp(tmp, db_url, "proxied", "--forwarded-allow-ips", "127.0.0.1")
    try:
        yield plain.wait(), proxied.wait()
    finally:
        plain.stop()
        proxied.stop()


def test_two_app_processes_on_one_database_throttle_an_account_together(apps):
    """Failures alternate between the processes, each after the back-off the shared count asks
    for (1, 2, 4 s); then the right password in ``plain`` must wait 8 s. Had each process its own
    count, ``plain`` would hold 5 failures, the last one over 7 s old, and would let it in."""
    plain, proxied = apps
    for _ in range(4):
        assert "wrong name or password" in plain.sign_in("rita", "not-her-password")
    steps = [(proxied, 0.0), (proxied, 1.2), (plain, 2.2), (proxied, 4.2)]  # failures 5, 6, 7, 8
    for app, wait in steps:
        time.sleep(wait)
        r = app.sign_in("rita", "still-not-it", forwarded_for="10.9.9.9")
        assert "wrong name or password" in r, r
    right = plain.sign_in("rita", PASSWORD)
    assert "too many failed sign-ins" in right, right


def test_forged_forwarded_addresses_count_only_from_listed_proxies(apps):
    plain, proxied = apps
    # the listed proxy: each forged address is its own client, none is throttled per address
    trusted = [proxied.sign_in(f"nobody-{i}", "guess", forwarded_for=f"203.0.113.{i}") for i in range(22)]
    assert all("wrong name or password" in r for r in trusted), trusted
    # the defaults: the header is ignored, all 22 come from 127.0.0.1 and the address is throttled
    ignored = [plain.sign_in(f"someone-{i}", "guess", forwarded_for=f"198.51.100.{i}") for i in range(22)]
    checked = sum("wrong name or password" in r for r in ignored)
    assert any("too many failed sign-ins" in r for r in ignored), ignored
    assert checked <= 20, checked
    assert "198.51.100." not in plain.log_path.read_text()  # the forged values were never used


def test_forwarded_allow_ips_flag_is_parsed_and_checked():
    from webapp.config import parse_args

    assert parse_args([]).forwarded_allow_ips == ""
    assert parse_args(["--forwarded-allow-ips", " 127.0.0.1, 10.1.0.0/16 "]).forwarded_allow_ips == \
        "127.0.0.1,10.1.0.0/16"
    with pytest.raises(SystemExit):
        parse_args(["--forwarded-allow-ips", "proxy.local"])
