"""The one exception of configuration."""


class ConfigError(Exception):
    """The configuration cannot be used; the message says which setting and why."""
