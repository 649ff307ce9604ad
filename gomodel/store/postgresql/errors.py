"""Errors of the PostgreSQL store that are not the driver's."""


class NotMigrated(Exception):
    """The database cannot be used by this gateway (its schema is newer); never retried."""
