"""Forward schema migration for annotation databases made by earlier versions.

``create_all`` adds missing *tables* but never missing *columns*. :func:`upgrade` compares every
table of the models with the database and adds each missing column (nullable, with the model's
scalar default as the SQL default, so existing rows get it), then fills the new tables that
earlier versions did not have (assignments from existing ratings). It is idempotent and cheap
when nothing is missing, and runs on SQLite and PostgreSQL alike.

Older SQLite files keep their original CHECK constraint on scores (0-3): protocols with a wider
scale need a database created by this version (the error says so).
"""
from __future__ import annotations

import logging

from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine

from .models import Base

log = logging.getLogger(__name__)


def _default_sql(column, dialect) -> str | None:
    default = column.default
    if default is None or not getattr(default, "is_scalar", False):
        return None
    value = default.arg
    if isinstance(value, bool):
        return ("TRUE" if value else "FALSE") if dialect.name == "postgresql" else str(int(value))
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return None


def upgrade(engine: Engine) -> list[str]:
    """Add missing columns and backfill new tables; returns ``table.column`` names added."""
    added: list[str] = []
    with engine.begin() as conn:
        insp = inspect(conn)  # on this connection: an in-memory database has only one
        tables = set(insp.get_table_names())
        prep = engine.dialect.identifier_preparer
        for table in Base.metadata.sorted_tables:
            if table.name not in tables:
                continue
            have = {c["name"] for c in insp.get_columns(table.name)}
            for col in table.columns:
                if col.name in have:
                    continue
                ddl = (f"ALTER TABLE {prep.quote(table.name)} ADD COLUMN {prep.quote(col.name)} "
                       f"{col.type.compile(engine.dialect)}")
                default = _default_sql(col, engine.dialect)
                if default is not None:
                    ddl += f" DEFAULT {default}"
                conn.execute(text(ddl))
                added.append(f"{table.name}.{col.name}")
        if "annotators.role" in added:
            conn.execute(text("UPDATE annotators SET role = CASE WHEN is_admin THEN 'admin' ELSE 'rater' END"))
        # Assignments arrived with k raters per item: every existing rating means its rater
        # was assigned the item (submitted if any of their ratings there is).
        if conn.execute(text("SELECT 1 FROM assignments LIMIT 1")).first() is None \
                and conn.execute(text("SELECT 1 FROM ratings LIMIT 1")).first() is not None:
            conn.execute(text(
                "INSERT INTO assignments (item_id, annotator_id, status, created_at, submitted_at) "
                "SELECT r2.item_id, ra.annotator_id, "
                "CASE WHEN SUM(CASE WHEN ra.status = 'submitted' THEN 1 ELSE 0 END) > 0 "
                "THEN 'submitted' ELSE 'open' END, MIN(ra.created_at), MAX(ra.submitted_at) "
                "FROM ratings ra JOIN responses r2 ON r2.id = ra.response_id "
                "GROUP BY r2.item_id, ra.annotator_id"))
            added.append("assignments (backfilled)")
        if "items.submitted_count" in added or "assignments (backfilled)" in added:
            conn.execute(text(
                "UPDATE items SET submitted_count = (SELECT COUNT(*) FROM assignments a "
                "WHERE a.item_id = items.id AND a.status = 'submitted')"))
    if added:
        log.info("annotation database upgraded: %s", ", ".join(added))
    return added
