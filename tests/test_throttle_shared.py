"""Sign-in throttling is shared by every process on one database (issue 19): failed attempts
made in one process count in another, on SQLite and on PostgreSQL. Real processes, each with its
own ``Store`` on the same URL, take turns; nothing is shared but the database."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from annotation.store import Store, dispose_engine
from conftest import ROOT

PASSWORD = "correct horse battery"

# One process: sign in as NAME with each password in turn; print one result per attempt.
SCRIPT = """
import json, sys
from annotation.store import Store
from annotation.accounts import AccessDenied
url, name, passwords = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
store = Store(url)
out = []
for pw in passwords:
    try:
        store.sign_in(name, pw, client="10.0.0.7")
        out.append("ok")
    except AccessDenied as e:
        out.append(str(e))
print(json.dumps(out))
"""


def attempts(url: str, name: str, passwords: list[str]) -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", SCRIPT, url, name, json.dumps(passwords)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture
def url(db_url, monkeypatch):
    from annotation import accounts

    monkeypatch.setattr(accounts, "SCRYPT_N", 2 ** 10)  # the hashes made here are cheap to check anywhere
    store = Store(db_url)
    store.add_annotator("rita", PASSWORD)
    store.add_annotator("sam", PASSWORD)
    dispose_engine(db_url)
    return db_url


def test_failures_in_one_process_throttle_the_account_in_another(url):
    from annotation import accounts

    free = accounts.FREE_FAILURES_ACCOUNT
    first = attempts(url, "rita", ["wrong-1"] * (free - 1))
    assert first == ["wrong name or password"] * (free - 1)  # every one checked, none throttled yet
    # a second process: its first failure is the account's last free one, so its next attempt,
    # right after, must wait (alone, this process would have failed once and checked again)
    second = attempts(url, "rita", ["wrong-2", PASSWORD])
    assert second[0] == "wrong name or password" and "too many failed sign-ins" in second[1], second
    # another account from the same address is not held up (its own count is zero)
    assert attempts(url, "sam", [PASSWORD]) == ["ok"]


def test_a_reservation_of_a_dead_process_expires(url, monkeypatch):
    """A process killed mid-check leaves an in-flight mark; it stops blocking after its TTL."""
    from annotation import throttle
    from annotation.models import SignInThrottle

    store = Store(url)
    clock = [1_000_000.0]
    t = throttle.Throttle(clock=lambda: clock[0])
    t.begin(store, [throttle.key_of("account", "rita")])  # never ended: the process "died"
    with pytest.raises(throttle.Refused, match="already being checked"):
        t.begin(store, [throttle.key_of("account", "rita")])
    clock[0] += throttle.IN_FLIGHT_TTL_S + 1
    t.begin(store, [throttle.key_of("account", "rita")])
    t.end(store, [throttle.key_of("account", "rita")], ok=True)
    with store._session() as s:
        row = s.get(SignInThrottle, "account:rita")
        assert (row.failures, row.in_flight) == (0, 0)
