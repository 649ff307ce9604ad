"""Fields the admin API's routes and the caller's own usage share: ISO 8601 times and user paths.

Here, not in L{gomodel.api.keys}, so that a route that shows a time or takes a user path (the admin API's usage, a
caller's C{GET /v1/usage}, budgets) does not import the keys API and its Klein routes.
"""

import re
from datetime import datetime, timezone

from gomodel.errors import InvalidRequest, shown
from gomodel.limits.specs import normalize_user_path

CONTROL = re.compile("[\x00-\x1f\x7f]")  # (no store keeps a NUL; no header or log line holds a newline)


def iso(seconds):
    """ISO 8601 UTC text of Unix C{seconds}, or None."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def user_path(value) -> str:
    """A normalised user path (C{/team/alpha}), as GoModel accepts and normalises them
    (L{normalize_user_path}), of at most 256 characters, none a control character.

    @raise InvalidRequest: not a string of C{/}-separated segments (none C{.} or C{..}, no C{:}).
    """
    if not isinstance(value, str):
        raise invalid_field("user_path", "must be a string like '/team/alpha'")
    try:
        path = normalize_user_path(value)
    except ValueError:
        path = None
    if path is None or len(path) > 256 or CONTROL.search(path):
        raise invalid_field("user_path", "must be '/'-separated segments (none '.' or '..', without ':' or a control "
                                         "character) of at most 256 characters")
    return path


def invalid_field(field, what):
    """The 400 C{invalid_value} of a body's C{field} that C{what} (C{"must be ..."}) says is wrong."""
    field = shown(field)  # (an unknown field's name is the client's)
    return InvalidRequest(f"'{field}' {what}.", param=field, code="invalid_value")
