"""How records map to table rows, the same for every backend: JSON-valued columns as text."""

import json


def encode_record(record: dict, columns, json_columns) -> dict:
    """The column values of C{record} (a dict of some of C{columns}), JSON columns as text.

    @raise KeyError: a key of C{record} is not one of C{columns}.
    """
    values = {}
    for key, value in record.items():
        if key not in columns:
            raise KeyError(f"unknown column {key!r}")
        if key in json_columns and value is not None:
            value = json.dumps(value, ensure_ascii=False)
        values[key] = value
    return values


def decode_json(record: dict, json_columns) -> dict:
    """C{record} with its JSON columns parsed (in place); returns it."""
    for key in json_columns:
        if record[key] is not None:
            record[key] = json.loads(record[key])
    return record
