"""The date windows of the usage routes: whole UTC days, from C{start_date}/C{end_date} or C{days}.

Shared by the admin API's usage routes (L{gomodel.api.admin}) and the caller's own C{GET /v1/usage}
(L{gomodel.api.self_usage}).
"""

import re
from datetime import datetime, timedelta, timezone

from gomodel.errors import InvalidRequest
from gomodel.http.bodies import query_arg, query_int

DAY = 86400.0
# The longest C{days} window: the longest usage retention (USAGE_RETENTION_DAYS).
DAYS_MAX = 36500
# A window's dates: YYYY-MM-DD in ASCII digits.
_DATE = re.compile("[0-9]{4}-[0-9]{2}-[0-9]{2}")


def window(request, clock, most=DAYS_MAX, span_limited=False):
    """C{(start, end)} in seconds of the request's window: whole UTC days, the end day included.

    C{end_date} (default: today on C{clock}) and C{start_date}, or C{days} (1 to C{most}, default 30)
    counted back from the end.

    @param span_limited: True: a C{start_date} more than C{most} days before C{end_date} is refused too.
    @raise InvalidRequest: a malformed date or C{days}, both C{start_date} and C{days}, an inverted or
        (C{span_limited}) too long range; C{code} C{invalid_window}, naming the parameter.
    """
    end = _date(request, b"end_date") or datetime.fromtimestamp(clock.seconds(), timezone.utc).date()
    start = _date(request, b"start_date")
    if start is not None and query_arg(request, b"days") is not None:  # (days was ignored)
        raise InvalidRequest("Give start_date or days, not both.", param="days", code="invalid_window")
    if start is None:
        days = query_int(request, b"days", 1, most, 30, code="invalid_window",
                         message=f"days must be a whole number from 1 to {most}.")
        try:
            start = end - timedelta(days=days - 1)
        except OverflowError:
            raise InvalidRequest("days reaches before the year 1.", param="days", code="invalid_window") from None
    if start > end:
        raise InvalidRequest("start_date is after end_date.", param="start_date", code="invalid_window")
    if span_limited and (end - start).days + 1 > most:
        raise InvalidRequest(f"The window from start_date to end_date is longer than {most} days.",
                             param="start_date", code="invalid_window")
    return seconds_of(start), seconds_of(end) + DAY


def _date(request, name: bytes):
    """The date of query parameter C{name} (C{YYYY-MM-DD}, ASCII digits), or None."""
    text = query_arg(request, name)
    if text is None:
        return None
    try:
        if _DATE.fullmatch(text):  # (strptime reads "2025-1-1", and other digits in some places: "2025-01-1０")
            return datetime.strptime(text, "%Y-%m-%d").date()
    except ValueError:
        pass
    param = name.decode()
    raise InvalidRequest(f"{param} must be a date as YYYY-MM-DD.", param=param, code="invalid_window")


def seconds_of(date) -> float:
    """Unix seconds of the start of UTC day C{date}."""
    return datetime(date.year, date.month, date.day, tzinfo=timezone.utc).timestamp()


def day(seconds) -> str:
    """The UTC day of Unix C{seconds} as YYYY-MM-DD."""
    return datetime.fromtimestamp(seconds, timezone.utc).date().isoformat()  # (strftime: "999-01-01")
