"""The one exception of configuration, and how its messages list keys."""


class ConfigError(Exception):
    """The configuration cannot be used; the message says which setting and why."""


def listed(keys) -> str:
    """Mapping keys for a message, whatever their YAML types (an int key beside text ones too)."""
    return ", ".join(sorted(map(str, keys)))


def read_text(path, cannot: str) -> str:
    """The UTF-8 text of the file at C{path}.

    @param cannot: what the error says first (C{"cannot read config file x.yaml"}), before why.
    @raise ConfigError: it cannot be read, or is not UTF-8.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{cannot}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{cannot}: not UTF-8 text (byte {e.start})") from None
