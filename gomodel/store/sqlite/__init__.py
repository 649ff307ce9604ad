"""The default store: SQLite for one host, one module per aggregate (see L{service.SQLiteStore})."""

from gomodel.store.sqlite.migrations import MIGRATIONS
from gomodel.store.sqlite.service import DB_NAME, SQLiteStore

__all__ = ["DB_NAME", "MIGRATIONS", "SQLiteStore"]
