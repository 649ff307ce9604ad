"""The one exception of configuration, and how its messages list keys."""


class ConfigError(Exception):
    """The configuration cannot be used; the message says which setting and why."""


def listed(keys) -> str:
    """Mapping keys for a message, whatever their YAML types (an int key beside text ones too)."""
    return ", ".join(sorted(map(str, keys)))
