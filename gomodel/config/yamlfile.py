"""The YAML file's loader: PyYAML's safe loader, but a key given twice in one mapping is an error.

PyYAML keeps the last of two equal keys silently (a second C{server:}, or two
providers of one name, took the first's place); YAML says keys are unique.
Imported only when a file is read.
"""

import yaml

from gomodel.config.errors import ConfigError

_MERGE = "tag:yaml.org,2002:merge"


class UniqueKeyLoader(yaml.SafeLoader):
    """L{yaml.SafeLoader} refusing a mapping that gives one key twice (C{<<} merges may still be overridden)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # (an unhashable key: the base class says so)
                    continue
                if duplicate:
                    mark = key_node.start_mark
                    raise ConfigError(f"{self.name}: a key is given twice in one mapping "
                                      f"at line {mark.line + 1}, column {mark.column + 1}")
                seen.add(key)
        return super().construct_mapping(node, deep)


def load(text, path):
    """The document of C{text} (the file at C{path}), as C{yaml.safe_load} reads it but for twice-given keys.

    @raise ConfigError: a key is given twice in one mapping (the message names its place, never its text).
    @raise yaml.YAMLError: not YAML.
    """
    loader = UniqueKeyLoader(text)
    loader.name = path
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
