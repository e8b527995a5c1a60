"""listUsageRecords' parameters as CloudStack reads them: ListUsageRecordsCmd's fields, BaseListCmd's
paging, ParamProcessWorker's parsing, and the errors CloudStack answers for each.

Pure: a mapping of lower-cased names to values in, a UsageRecordsRequest or a CloudStackError out.
Who may see which accounts is decided later (api_cloudstack), once the caller is known.

Why no parsing library (jsonschema, already a dependency; pydantic, marshmallow, webargs): the
parameters are few and flat, and what matters is CloudStack's exact answer to each bad one (its
code, cserrorcode, text, and which check comes first), which such a library replaces with its own
messages, to be mapped back one by one. The standard parsers are too lenient for answers that
must never widen: datetime.strptime takes "2024-5-1" and Arabic-Indic digits, int() takes "٣",
" 7 " and "1_000". Flask already gives the raw values; the rest is the rules below.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass

from kvmeter.collector.api_params import CLOUDSTACK_PAGE
from kvmeter.collector.cloudstack_render import CS_INVALID_PARAMETER, CS_SERVER_API

COMMAND = "listusagerecords"  # getCommandName() without its "response" suffix
DEFAULT_PAGE_SIZE = CLOUDSTACK_PAGE  # default.page.size, also the largest pagesize allowed
UNLIMITED = -1  # BaseListCmd.s_pageSizeUnlimited
PARAM_ERROR = 431  # ApiErrorCode.PARAM_ERROR
UNSUPPORTED_ACTION = 432  # ApiErrorCode.UNSUPPORTED_ACTION_ERROR
ACCOUNT_ERROR = 531  # ApiErrorCode.ACCOUNT_ERROR: what a PermissionDeniedException becomes

_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")
_DATE_TIME = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2}) ([0-9]{2}):([0-9]{2}):([0-9]{2})")
_INTEGER = re.compile(r"[-+]?[0-9]{1,19}")
_ID = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII: uuids, and nothing that needs escaping
_INT_MAX, _LONG_MAX = 2**31 - 1, 2**63 - 1
MAX_STRING = 255  # @Parameter(length) default: ParamProcessWorker refuses a longer STRING


class CloudStackError(Exception):
    """An error CloudStack would answer: its ApiErrorCode (also the HTTP status), its
    CSExceptionErrorCode and its text."""

    def __init__(self, code: int, text: str, cs_code: int = CS_SERVER_API) -> None:
        super().__init__(text)
        self.code, self.text, self.cs_code = code, text, cs_code


@dataclass(frozen=True)
class UsageRecordsRequest:
    """What a listUsageRecords call asks for. Times are ms since the epoch, UTC; records are
    those whose whole window lies in [start_ms, end_ms) (CloudStack: start and end date both
    BETWEEN startdate AND enddate, to the second). limit None: no page size (pagesize=-1)."""

    start_ms: int
    end_ms: int
    account_name: str | None = None
    account_id: str | None = None
    domain_id: str | None = None
    project_id: str | None = None
    recursive: bool = False
    usage_type: int | None = None
    usage_id: str | None = None
    keyword: str | None = None
    include_tags: bool = False
    old_format: bool = False
    offset: int = 0
    limit: int | None = DEFAULT_PAGE_SIZE

    @property
    def empty_range(self) -> bool:
        """CloudStack answers nothing unless startdate is before enddate."""
        return self.start_ms >= self.end_ms - 1000


def parse_list_usage_records(
    args: Mapping[str, str], page_size: int = DEFAULT_PAGE_SIZE
) -> UsageRecordsRequest:
    """page_size: default.page.size, the page without `pagesize` and the largest `pagesize`."""
    start = _date(args, "startdate", end_of_day=False)
    end = _date(args, "enddate", end_of_day=True)
    if start > end:
        raise _invalid(f"Incorrect Date Range. Start date: {_show(start)} is after end date:{_show(end)}")
    account_id, project_id = _id(args, "accountid"), _id(args, "projectid")
    if project_id is not None and account_id is not None:
        raise _invalid("Projectid and accountId can't be specified together")
    usage_type = _integer(args, "type", _LONG_MAX)
    usage_id = _text(args, "usageid")
    if usage_id is not None and usage_type is None:
        raise _invalid("Usageid must be specified together with usageType")
    offset, limit = _paging(args, page_size)
    return UsageRecordsRequest(
        start_ms=start,
        end_ms=end + 1000,  # the end date names the last second included
        account_name=_text(args, "account"),
        account_id=account_id,
        domain_id=_id(args, "domainid"),
        project_id=project_id,
        recursive=_boolean(args, "isrecursive"),
        usage_type=usage_type,
        usage_id=usage_id,
        keyword=_text(args, "keyword"),
        include_tags=_boolean(args, "includetags"),
        old_format=_boolean(args, "oldformat"),
        offset=offset,
        limit=limit,
    )


def _paging(args: Mapping[str, str], page_size: int) -> tuple[int, int | None]:
    """BaseListCmd: page and pagesize come together (except pagesize=-1, which takes no page);
    pagesize at most default.page.size; no pagesize: one page of default.page.size; a page below
    1 is the first."""
    page, size = _integer(args, "page", _INT_MAX), _integer(args, "pagesize", _INT_MAX)
    if page is None and size is not None and size != UNLIMITED:
        raise CloudStackError(PARAM_ERROR, '"page" parameter is required when "pagesize" is specified')
    if size is None and page is not None:
        raise CloudStackError(PARAM_ERROR, '"pagesize" parameter is required when "page" is specified')
    if size is None:
        return 0, page_size
    if size > page_size:
        raise _invalid(f"Page size can't exceed max allowed page size value: {page_size}")
    if size == UNLIMITED:
        if page is not None:
            raise _invalid("Can't specify page parameter when pagesize is -1 (Unlimited)")
        return 0, None
    if size < 0:  # CloudStack would hand the database a negative LIMIT
        raise _bad_value(str(size), "pagesize")
    return size * (max(page or 1, 1) - 1), size


def _date(args: Mapping[str, str], name: str, *, end_of_day: bool) -> int:
    """ParamProcessWorker's two date forms; a bare enddate means 23:59:59 of that day."""
    text = args.get(name)
    if text is None or text == "":
        raise CloudStackError(
            PARAM_ERROR, f"Unable to execute API command {COMMAND} due to missing parameter {name}"
        )
    full, day = _DATE_TIME.fullmatch(text), _DATE.fullmatch(text)
    try:
        if full:
            y, mo, d, h, mi, s = (int(g) for g in full.groups())
            when = dt.datetime(y, mo, d, h, mi, s, tzinfo=dt.UTC)
        elif day:
            y, mo, d = (int(g) for g in day.groups())
            when = (
                dt.datetime(y, mo, d, 23, 59, 59, tzinfo=dt.UTC)
                if end_of_day
                else dt.datetime(y, mo, d, tzinfo=dt.UTC)
            )
        else:
            raise ValueError(text)
        if when.year < 1970:
            raise ValueError(text)
    except ValueError:
        raise CloudStackError(
            PARAM_ERROR,
            f"Unable to parse date {_cut(text)} for command {COMMAND}, please pass dates in the format "
            "mentioned in the api documentation",
        ) from None
    return int(when.timestamp()) * 1000


def _integer(args: Mapping[str, str], name: str, bound: int) -> int | None:
    """CommandType INTEGER / LONG: ASCII digits with an optional sign, within the Java type."""
    text = args.get(name)
    if text is None or text == "":
        return None
    if not _INTEGER.fullmatch(text) or not -bound - 1 <= int(text) <= bound:
        raise _bad_value(text, name)
    return int(text)


def _boolean(args: Mapping[str, str], name: str) -> bool:
    """CommandType BOOLEAN. CloudStack reads anything but "true" as false; kvmeter refuses what
    is neither, so a typo never turns into a different answer."""
    text = args.get(name)
    if text is None or text == "":
        return False
    if text.lower() not in ("true", "false"):
        raise _bad_value(text, name)
    return text.lower() == "true"


def _text(args: Mapping[str, str], name: str) -> str | None:
    """CommandType STRING: at most MAX_STRING characters (CloudStack's check), and printable:
    control characters (NUL above all, which PostgreSQL refuses in text) never reach a query."""
    text = args.get(name)
    if text is None or text == "":
        return None
    if len(text) > MAX_STRING:
        raise _invalid(f"Value greater than max allowed length {MAX_STRING} for param: {name}")
    if not text.isprintable():
        raise CloudStackError(
            PARAM_ERROR,
            f"Unable to execute API command {COMMAND} due to invalid value for parameter {name}: "
            "control characters",
        )
    return text


def _id(args: Mapping[str, str], name: str) -> str | None:
    text = args.get(name)
    if text is None or text == "":
        return None
    if not _ID.fullmatch(text):
        raise unknown_entity(name, text)
    return text


def unknown_entity(name: str, value: str) -> CloudStackError:
    """ParamProcessWorker's answer to a uuid parameter naming nothing: the
    InvalidParameterValueException it raises, rethrown as a ServerApiException (hence 9999)."""
    return CloudStackError(
        PARAM_ERROR,
        f"Unable to execute API command {COMMAND} due to invalid value. Invalid parameter {name} "
        f"value={_cut(value)} due to incorrect long value format, or entity does not exist or due to "
        "incorrect parameter annotation for the field in api cmd class.",
    )


def unknown_account(name: str, domain_id: str | None) -> CloudStackError:
    """UsageServiceImpl.getAccountIdFromDomainPlusName's InvalidParameterValueException (without a
    domain, kvmeter's own: CloudStack ignores `account` then)."""
    where = f" in domain {_cut(domain_id)}" if domain_id is not None else ""
    return _invalid(f"Unable to find account {_cut(name)}{where}")


def _bad_value(text: str, name: str) -> CloudStackError:
    text = f"Unable to execute API command {COMMAND} due to invalid value {_cut(text)} for parameter {name}"
    return CloudStackError(PARAM_ERROR, text)


def _invalid(text: str) -> CloudStackError:
    """An InvalidParameterValueException."""
    return CloudStackError(PARAM_ERROR, text, CS_INVALID_PARAMETER)


def _cut(text: str) -> str:
    """A refused value as the error text shows it: cut short (an error never echoes a megabyte)."""
    return text if len(text) <= 40 else text[:40] + "…"


def _show(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
