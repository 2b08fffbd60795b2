"""The rating store: the service functions of the annotation tool.

:class:`Store` gathers them, grouped by the role that calls them: :mod:`annotation.rater_service`
(raters), :mod:`annotation.review_service` (examiners), :mod:`annotation.item_service` (imports
and the app's hand-off) and :mod:`annotation.admin_service` (progress, agreement, dashboard,
exports, audit), on the engine of :mod:`annotation.database`; files are read by
:mod:`annotation.readers`. These modules (and :mod:`annotation.accounts`) are the only ones that
open database sessions. Every other layer (the CLI, the Gradio tabs, tests) calls these functions.

Who may do what:

* An annotator signs in with name and password and gets a random token; every rating function
  takes that token and acts only on that annotator's own ratings. No function takes an
  annotator id from the caller, so one annotator can neither read nor change another's ratings.
* The review of disagreements (final scores) needs an examiner or admin token; exports, the
  dashboard, agreement, the audit trail and progress of all annotators need an admin token, or
  :data:`OPERATOR`: the local command line, whose user can open the database file anyway.

How a study runs (k raters per item, gold items, review, final labels, audit) is in
:mod:`annotation.workflow`; the dashboard figures in :mod:`annotation.dashboard`.

SQLite (the default, ``sqlite:///data/annotations.db``) runs in WAL mode with foreign keys on;
write transactions start with ``BEGIN IMMEDIATE`` so concurrent writers queue on the busy
timeout instead of failing on a lock upgrade. PostgreSQL (``postgresql+psycopg://...``) runs the
same code; the test suite runs on both.
"""
from __future__ import annotations

from typing import Sequence

from . import DEFAULT_DB_URL, DEFAULT_TARGET_ANNOTATORS  # noqa: F401  (re-exported)
from . import accounts
# Accounts, passwords, sign-in and roles live in .accounts; these names stay importable from here.
from .accounts import (MIN_PASSWORD_LENGTH, OPERATOR, SCRYPT_N, SCRYPT_P, SCRYPT_R, SIGN_IN_TTL,  # noqa: F401
                       Account, AccessDenied, Operator, hash_password, verify_password)
from .admin_service import AdminService
from .database import Database, dispose_engine, engine_for, normalize_db_url  # noqa: F401  (re-exported)
from .item_service import ImportResult, ItemService  # noqa: F401
from .rater_service import ItemView, Progress, RaterService, ResponseView  # noqa: F401
from .review_service import ReviewService


class Store(RaterService, ReviewService, ItemService, AdminService, Database):
    """Service functions over one database, grouped by the role that calls them: raters
    (:class:`~annotation.rater_service.RaterService`), examiners
    (:class:`~annotation.review_service.ReviewService`), items and ratings coming in
    (:class:`~annotation.item_service.ItemService`) and admins
    (:class:`~annotation.admin_service.AdminService`); accounts in :mod:`annotation.accounts`.
    Cheap to construct: engines are shared per URL."""

    # --------------------------------------------------------------- accounts (see .accounts)

    def add_annotator(self, name: str, password: str | None, admin: bool = False, update: bool = False,
                      role: str | None = None) -> None:
        """Create an account (or, with ``update``, set its password and role); the operator's path.
        ``role`` (rater, examiner, admin) wins over ``admin``."""
        accounts.upsert_account(self, name, password, role or ("admin" if admin else "rater"), update=update)

    def sign_in(self, name: str, password: str, client: str | None = None) -> str:
        """A session token; AccessDenied on a wrong name or password, a disabled account, or
        while failed attempts from this account or client address are being throttled."""
        return accounts.sign_in(self, name, password, client)

    def sign_out(self, token: str | None) -> None:
        accounts.sign_out(self, token)

    def whoami(self, token: str | None) -> Account:
        return accounts.whoami(self, token)


def enqueue_item(db_url: str | None, query: str, responses: Sequence[tuple[str, str | None]],
                 protocol: str = "imhi") -> str:
    """Queue one query and its responses for rating (the app's "Send to annotation")."""
    return Store(db_url).enqueue_item(query, responses, protocol)
