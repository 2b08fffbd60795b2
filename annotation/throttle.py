"""Sign-in throttling shared by every process on one database.

Failed attempts per account name and per client address live in the ``sign_in_throttle`` table
(:class:`~annotation.models.SignInThrottle`), so two app processes behind one proxy (or the app
and ``metaaligner serve``) throttle together, and a restart does not clear the counts. After
``free`` failures for a key, each further attempt waits 1 s, doubling up to 15 minutes, and is
refused without running scrypt; a key with no failure for an hour starts afresh. At most one
check per account name (and :data:`CLIENT_SLOTS` per address) runs at a time across all
processes; a reservation left by a process that died is void after :data:`IN_FLIGHT_TTL_S`.

Each step is one short write transaction (``BEGIN IMMEDIATE`` on SQLite, ``SELECT … FOR
UPDATE`` on PostgreSQL), so concurrent processes see each other's counts.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from sqlalchemy import select

from metaaligner_core.errors import MetaAlignerError

from .models import SignInThrottle

if TYPE_CHECKING:
    from .database import Database

FREE_FAILURES_ACCOUNT, FREE_FAILURES_CLIENT = 5, 20
FREE_FAILURES = {"account": FREE_FAILURES_ACCOUNT, "client": FREE_FAILURES_CLIENT}
BACKOFF_FIRST_S, BACKOFF_MAX_S = 1.0, 900.0
FORGET_AFTER_S = 3600.0
IN_FLIGHT_LIMIT = {"account": 1, "client": 2}
IN_FLIGHT_TTL_S = 120.0  # a check takes seconds; older reservations belong to a process that died


class Refused(MetaAlignerError, PermissionError):
    """An attempt that has to wait (the caller turns it into its own AccessDenied)."""


def key_of(kind: str, value: str) -> str:
    return f"{kind}:{value}"[:320]


class Throttle:
    """The throttle over a store's table; ``clock`` (wall-clock seconds) is injectable for tests."""

    def __init__(self, clock=time.time):
        self.clock = clock

    @staticmethod
    def _kind(key: str) -> str:
        return key.split(":", 1)[0]

    def _wait(self, row: SignInThrottle | None, now: float) -> float:
        if row is None or not row.failures:
            return 0.0
        if now - row.last_failure > FORGET_AFTER_S:
            return 0.0
        over = row.failures - FREE_FAILURES[self._kind(row.key)]
        if over < 0:
            return 0.0
        return max(0.0, row.last_failure + min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** over) - now)

    def _rows(self, s, keys: list[str]) -> dict[str, SignInThrottle]:
        """The keys' rows, created if missing and locked for this transaction."""
        dialect = s.get_bind().dialect.name
        if dialect in ("postgresql", "sqlite"):
            if dialect == "postgresql":
                from sqlalchemy.dialects.postgresql import insert
            else:
                from sqlalchemy.dialects.sqlite import insert
            for k in keys:
                s.execute(insert(SignInThrottle).values(key=k, failures=0, last_failure=0.0, in_flight=0,
                                                        in_flight_since=0.0).on_conflict_do_nothing())
        else:  # other databases: insert what is missing (a concurrent insert is retried by the caller)
            have = set(s.scalars(select(SignInThrottle.key).where(SignInThrottle.key.in_(keys))))
            for k in keys:
                if k not in have:
                    s.add(SignInThrottle(key=k, failures=0, last_failure=0.0, in_flight=0, in_flight_since=0.0))
            s.flush()
        rows = s.scalars(select(SignInThrottle).where(SignInThrottle.key.in_(keys)).with_for_update())
        return {r.key: r for r in rows}

    def wait_s(self, store: "Database", key: str) -> float:
        """Seconds until ``key`` may try again (0: now)."""
        with store._session() as s:
            row = s.get(SignInThrottle, key)
            return self._wait(row, self.clock())

    def begin(self, store: "Database", keys: list[str]) -> None:
        """Reserve an attempt for every key, or raise :class:`Refused` (nothing reserved)."""
        with store._session(write=True) as s:
            now = self.clock()
            rows = self._rows(s, keys)
            wait = max(self._wait(rows.get(k), now) for k in keys)
            if wait > 0:
                raise Refused(f"too many failed sign-ins; try again in {wait:.0f} s" if wait >= 1
                              else "too many failed sign-ins; try again in a second")
            for k in keys:
                r = rows[k]
                if r.in_flight and now - r.in_flight_since > IN_FLIGHT_TTL_S:
                    r.in_flight = 0
                if r.in_flight >= IN_FLIGHT_LIMIT[self._kind(k)]:
                    raise Refused("a sign-in for this account is already being checked; try again in a moment")
            for k in keys:
                rows[k].in_flight += 1
                rows[k].in_flight_since = now

    def end(self, store: "Database", keys: list[str], ok: bool) -> int:
        """Release the reservation; count a failure (or clear the account's count on success).
        Returns the failure count of the first key."""
        with store._session(write=True) as s:
            now = self.clock()
            rows = self._rows(s, keys)
            for k in keys:
                r = rows[k]
                r.in_flight = max(0, r.in_flight - 1)
                if ok:
                    if self._kind(k) == "account":
                        r.failures, r.last_failure = 0, 0.0
                else:
                    if r.failures and now - r.last_failure > FORGET_AFTER_S:
                        r.failures = 0
                    r.failures += 1
                    r.last_failure = now
            return rows[keys[0]].failures

    def reset(self, store: "Database") -> None:
        with store._session(write=True) as s:
            s.execute(SignInThrottle.__table__.delete())
