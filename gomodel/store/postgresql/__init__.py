"""The PostgreSQL store for several gateway hosts (C{STORAGE_TYPE=postgresql}): one module per aggregate."""

from gomodel.store.postgresql.migrations import MIGRATIONS
from gomodel.store.postgresql.service import PostgreSQLStore

__all__ = ["MIGRATIONS", "PostgreSQLStore"]
