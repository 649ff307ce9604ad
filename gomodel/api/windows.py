"""The date windows of the usage routes: whole days, from C{start_date}/C{end_date} or C{days}.

Shared by the admin API's usage routes (L{gomodel.api.admin}: days of the zone GoModel's
C{X-GoModel-Timezone} names, UTC without it) and the caller's own C{GET /v1/usage}
(L{gomodel.api.self_usage}: UTC days).
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
# GoModel's header naming the time zone (IANA, "Asia/Kolkata") whose days its usage views count.
TIME_ZONE_HEADER = b"x-gomodel-timezone"
_EPOCH = 719163  # date(1970, 1, 1).toordinal()
_FIRST, _LAST = -62135596800, 253402300799  # 0001-01-01T00:00:00Z, 9999-12-31T23:59:59Z


def time_zone(request):
    """The zone C{X-GoModel-Timezone} names (an IANA name, as GoModel takes it), or UTC without it.

    @raise InvalidRequest: a name the time zone database does not hold (GoModel counted UTC days then).
    """
    value = request.getHeader(TIME_ZONE_HEADER)
    name = value.decode("latin-1").strip() if value else ""
    if not name or name.upper() == "UTC":
        return timezone.utc
    from zoneinfo import ZoneInfo  # (here: with the database's paths and sysconfig, 0.3 MiB a process that names none)

    try:
        if len(name) <= 64:
            return ZoneInfo(name)
    except (ValueError, LookupError, OSError):  # (not a name, not in the database, a folder of it)
        pass
    raise InvalidRequest("X-GoModel-Timezone must be an IANA time zone name, such as Europe/Paris or UTC.",
                         param="X-GoModel-Timezone", code="invalid_value")


def window(request, clock, most=DAYS_MAX, span_limited=False, zone=timezone.utc):
    """C{(start, end)} in seconds of the request's window: whole days of C{zone}, the end day included.

    C{end_date} (default: today on C{clock}) and C{start_date}, or C{days} (1 to C{most}, default 30)
    counted back from the end.

    @param span_limited: True: a C{start_date} more than C{most} days before C{end_date} is refused too.
    @raise InvalidRequest: a malformed date or C{days}, both C{start_date} and C{days}, an inverted or
        (C{span_limited}) too long range; C{code} C{invalid_window}, naming the parameter.
    """
    end = _date(request, b"end_date") or datetime.fromtimestamp(clock.seconds(), zone).date()
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
    return seconds_of(start, zone), seconds_of(end, zone, following=True)


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


def seconds_of(date, zone=timezone.utc, following=False) -> float:
    """Unix seconds of the start of day C{date} in C{zone} (C{following}: of the day after it, so the end of
    C{date}, however long a day daylight saving time made it). Counted from the date's ordinal: the first
    and last days of the calendar east and west of UTC have no datetime."""
    ordinal = date.toordinal() + following
    wall = datetime.fromordinal(min(ordinal, 3652059))  # (9999-12-31: the day after it has its offset)
    return (ordinal - _EPOCH) * DAY - zone.utcoffset(wall).total_seconds()


def day(seconds, zone=timezone.utc) -> str:
    """The day of Unix C{seconds} in C{zone} (UTC) as YYYY-MM-DD."""
    return local(seconds, zone).date().isoformat()  # (strftime: "999-01-01")


def local(seconds, zone=timezone.utc):
    """The datetime of Unix C{seconds} in C{zone}; the first and last days of the calendar too (an offset
    past them is taken at the calendar's end)."""
    try:
        return datetime.fromtimestamp(seconds, zone)
    except (OverflowError, ValueError, OSError):  # (its wall time: the calendar's first or last second)
        return datetime.fromtimestamp(min(max(seconds, _FIRST), _LAST), timezone.utc).replace(tzinfo=zone)
