"""Query parameters, parsed strictly and bounded: one parser for /v1 and the CLI's times, and
the page cursors of /v1 (CloudStack's /client/api parses its own forms, cloudstack_params).

Integers are ASCII digits only (str.isdigit and int() also take '²' and Arabic-Indic digits)
and within a range; times lie between 1970 and the end of year 9999, so nothing reaches the
database or datetime arithmetic that they would refuse with an error of their own. Every
refusal is a BadRequest (a ValueError) whose text names the parameter and what it accepts.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass

MAX_TIME_MS = 253_402_300_800_000  # 10000-01-01T00:00:00Z: the end of the last day datetime knows
MAX_USAGE_TYPE = 9_999
DEFAULT_PAGE = 1000  # /v1 records per page when the caller names no limit
MAX_PAGE = 10_000
CLOUDSTACK_PAGE = 500  # CloudStack's default.page.size
PAGE_SIZE_CEILING = 100_000  # the most any page size may be configured to: a page is held whole
TIME_FORMS = "yyyy-MM-dd, yyyy-MM-dd HH:mm[:ss[.SSS]] with an optional Z or ±HH:MM, or ms since the epoch"
# Every time form accepted, and no other (the OpenAPI description states the same pattern).
TIME_PATTERN = (
    r"^(?:[0-9]{1,15}|[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"(?:[ T][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,6})?)?(?:Z|[+-][0-9]{2}:?[0-9]{2})?)?)$"
)
_TIME = re.compile(TIME_PATTERN)
_DIGITS = re.compile(r"[0-9]+")
_MAX_DIGITS = 19  # int() of a longer string costs time for a value no bound admits
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


@dataclass(frozen=True)
class Paging:
    """The API's page sizes ([api] of the config): listUsageRecords' default.page.size (its page
    without `pagesize` and the largest `pagesize`, one setting as in CloudStack), and the default
    and largest `limit` of /v1's paged lists."""

    cloudstack_page_size: int = CLOUDSTACK_PAGE
    page_size: int = DEFAULT_PAGE
    max_page_size: int = MAX_PAGE


class BadRequest(ValueError):
    """A parameter the API refuses: 400 on /v1, CloudStack's 431 on /client/api."""


def integer(text: str, name: str, *, minimum: int = 0, maximum: int) -> int:
    """A non-negative decimal integer of ASCII digits within [minimum, maximum]."""
    if not _DIGITS.fullmatch(text):
        raise BadRequest(f"{name} must be an integer of digits 0-9, not {_shown(text)}")
    value = int(text) if len(text.lstrip("0")) <= _MAX_DIGITS else None
    if value is None or not minimum <= value <= maximum:
        raise BadRequest(f"{name} must be between {minimum} and {maximum}, not {_shown(text)}")
    return value


def optional_integer(text: str | None, name: str, *, default: int, minimum: int = 0, maximum: int) -> int:
    """integer(), with default when the parameter is absent (an empty one is refused)."""
    if text is None:
        return default
    return integer(text, name, minimum=minimum, maximum=maximum)


def usage_type(text: str | None, name: str = "type") -> int | None:
    """A CloudStack usage type id, or None when not given."""
    if text is None:
        return None
    return integer(text, name, minimum=0, maximum=MAX_USAGE_TYPE)


def time_ms(text: str, name: str = "time", *, end_of_day: bool = False) -> int:
    """A time -> ms since the epoch, UTC: integer ms, `yyyy-MM-dd`, `yyyy-MM-dd HH:mm:ss` or ISO
    8601 with an offset (naive times are UTC, like CloudStack's usage timezone default). A bare
    date with end_of_day means the end of that day (CloudStack's enddate)."""
    value = text
    if len(value) > 40 or not _TIME.fullmatch(value):  # the pattern admits ASCII digits only
        raise BadRequest(f"{name}: {_shown(text)} is not a time (use {TIME_FORMS})")
    if value.isdigit():
        return _bounded(integer(value, name, maximum=MAX_TIME_MS), name, text)
    try:
        if _DAY.fullmatch(value):
            day = dt.datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=dt.UTC)
            ms = _ms(day) + (86_400_000 if end_of_day else 0)
        else:
            when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            ms = _ms(when if when.tzinfo else when.replace(tzinfo=dt.UTC))
    except (ValueError, OverflowError):
        raise BadRequest(f"{name}: {_shown(text)} is not a time (use {TIME_FORMS})") from None
    return _bounded(ms, name, text)


MONTH_PATTERN = r"^[0-9]{4}-[0-9]{2}$"
_MONTH = re.compile(MONTH_PATTERN)


def month_ms(text: str | None, now_ms: int, name: str = "month") -> int:
    """`yyyy-MM` -> the first instant of that UTC month (default: now_ms, inside now's month)."""
    if text is None:
        return now_ms
    if not _MONTH.fullmatch(text):
        raise BadRequest(f"{name} must be yyyy-MM, not {_shown(text)}")
    year, month = int(text[:4]), int(text[5:])
    # The month's end must be a time too: 9999-12 would end in the year 10000.
    if not (1 <= month <= 12 and (1970, 1) <= (year, month) <= (9999, 11)):
        raise BadRequest(f"{name} {_shown(text)} is not a month between 1970-01 and 9999-11")
    return _ms(dt.datetime(year, month, 1, tzinfo=dt.UTC))


def optional_time_ms(text: str | None, name: str, *, default: int, end_of_day: bool = False) -> int:
    if text is None:
        return default
    return time_ms(text, name, end_of_day=end_of_day)


def required_time_ms(text: str | None, name: str, *, end_of_day: bool = False) -> int:
    if text is None or text == "":
        raise BadRequest(f"{name} is required ({TIME_FORMS})")
    return time_ms(text, name, end_of_day=end_of_day)


def _ms(when: dt.datetime) -> int:
    # Exact integer arithmetic: timestamp() is a float and rounds far from the epoch.
    delta = when - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def _bounded(ms: int, name: str, text: str) -> int:
    if not 0 <= ms <= MAX_TIME_MS:
        raise BadRequest(f"{name}: {_shown(text)} is outside 1970-01-01 .. 9999-12-31")
    return ms


def _shown(text: str) -> str:
    """The refused value, quoted and cut short (error bodies never echo a megabyte)."""
    return repr(text if len(text) <= 40 else text[:40] + "…")


def name(text: str | None, param: str, *, max_len: int = 255) -> str | None:
    """An identifier filter (account, resource uuid): printable text, or None when not given.
    Control characters (NUL above all, which PostgreSQL refuses in text) never reach a query."""
    if text is None or text == "":
        return None
    if len(text) > max_len or not text.isprintable():
        raise BadRequest(f"{param} must be at most {max_len} printable characters, not {_shown(text)}")
    return text


# -- paging cursors ---------------------------------------------------------------------------
# Opaque to clients: base64url of [version, the query's fingerprint, *position]. The fingerprint
# ties a cursor to the query that gave it, so a cursor sent with other filters is refused rather
# than silently continuing a different listing.
_CURSOR_VERSION = 1
MAX_CURSOR = 200
_MAX_POSITION = 2**63 - 1


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def encode_cursor(query: str, position: tuple[int, ...]) -> str:
    raw = json.dumps([_CURSOR_VERSION, query, *position], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str | None, query: str, size: int) -> tuple[int, ...] | None:
    """The position a cursor of this query holds (size integers), None when not given."""
    if text is None or text == "":
        return None
    refused = BadRequest(f"cursor {_shown(text)} is not one this API gave for this query")
    if len(text) > MAX_CURSOR or not text.isascii():
        raise refused
    try:
        doc = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except ValueError:  # binascii.Error, UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise refused from None
    if not (isinstance(doc, list) and len(doc) == 2 + size and doc[:2] == [_CURSOR_VERSION, query]):
        raise refused
    position = doc[2:]
    if not all(type(v) is int and 0 <= v <= _MAX_POSITION for v in position):
        raise refused
    return tuple(position)
