"""Expert annotation: a SQLAlchemy rating store, protocols, agreement and export.

The defaults live here (not in ``store``) so that the CLI and the app can show them without
importing SQLAlchemy.
"""
DEFAULT_DB_URL = "sqlite:///data/annotations.db"
DEFAULT_TARGET_ANNOTATORS = 2  # raters wanted per item (k), unless the protocol or the import says otherwise
