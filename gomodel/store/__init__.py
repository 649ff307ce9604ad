"""Persistence behind one small interface per aggregate (L{interfaces}); SQLite by default."""

from gomodel.store.interfaces import (IBatchStore, IBlobStore, IBlobWriter, IClaims, IFileStore, IResponseStore,
                                      IStoreService, IUsageStore)
from gomodel.store.records import TERMINAL, UNFINISHED, LeaseLost, new_file_id, process_owner
from gomodel.store.sqlite import SQLiteStore

__all__ = ["IBatchStore", "IBlobStore", "IBlobWriter", "IClaims", "IFileStore", "IResponseStore", "IStoreService",
           "IUsageStore", "LeaseLost", "SQLiteStore", "TERMINAL", "UNFINISHED", "new_file_id", "process_owner"]
