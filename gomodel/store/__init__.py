"""Persistence for files and batches, behind one interface (L{IStore}); SQLite by default."""

from gomodel.store.interfaces import TERMINAL, UNFINISHED, IStore
from gomodel.store.sqlite import SQLiteStore

__all__ = ["IStore", "SQLiteStore", "TERMINAL", "UNFINISHED"]
