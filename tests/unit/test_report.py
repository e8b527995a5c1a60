"""Rendering of usage records: one code path for the API and the CLI."""

from __future__ import annotations

import csv
import io
import json

import pytest

from kvmeter.collector import billable, report
from kvmeter.collector.model import UsageKey
from kvmeter.collector.store import UsageRow

T = 1_689_879_600_000  # 2023-07-20T19:00:00Z
H = 3_600_000


def row(
    usage_type: int, quantity: int, *, account: str = "acct-1", adjustment: int = 0, **kw: object
) -> UsageRow:
    key = UsageKey(
        account, usage_type, "vm-uuid", str(kw.pop("offering", "")), str(kw.pop("detail", "")), T, T + H
    )
    return UsageRow(
        key=key,
        quantity=quantity,
        recorded=quantity - adjustment,
        adjustment=adjustment,
        final=bool(kw.pop("final", True)),
        resource_name=str(kw.pop("resource_name", "")),
        device_type=str(kw.pop("device_type", "")),
        updated_ms=T + 2 * H,
    )


def test_cloudstack_records_use_its_field_names_date_form_and_end_minus_one_second() -> None:
    rows = [
        row(4, 77776, detail="public", device_type="DomainRouter", resource_name="r-7-VM"),
        row(1, H // 2, offering="so-small", resource_name="i-2-10-VM"),
        row(3, H),
    ]
    doc = json.loads(report.render(rows, "cloudstack"))
    body = doc["listusagerecordsresponse"]
    assert body["count"] == 3
    net, running, ip = body["usagerecord"]
    assert net["startdate"] == "2023-07-20T19:00:00+0000"
    assert net["enddate"] == "2023-07-20T19:59:59+0000"
    assert (net["usagetype"], net["rawusage"], net["usage"]) == (4, "77776", "77776 bytes sent")
    assert (net["type"], net["usageid"], net["accountid"]) == ("DomainRouter", "vm-uuid", "acct-1")
    assert "virtualmachineid" not in net  # a router's bytes are not a user VM's
    assert (running["rawusage"], running["usage"], running["offeringid"]) == ("0.5", "0.5 Hrs", "so-small")
    assert running["virtualmachineid"] == "vm-uuid"
    assert running["name"] == "i-2-10-VM"
    assert (ip["rawusage"], ip["usagetype"]) == ("1", 3)
    assert isinstance(net["rawusage"], str)


def test_received_bytes_say_received() -> None:
    (rec,) = report.cloudstack_response([row(5, 12, detail="public", device_type="UserVm")])[
        "listusagerecordsresponse"
    ]["usagerecord"]
    assert rec["usage"] == "12 bytes received"
    assert rec["virtualmachineid"] == "vm-uuid"


def test_json_and_csv_carry_net_recorded_and_adjustment() -> None:
    rows = [row(4, 150, adjustment=-50, detail="public"), row(2, H, final=False)]
    records = json.loads(report.render(rows, "json"))
    assert records[0]["quantity"] == 150
    assert (records[0]["recorded"], records[0]["adjustment"]) == (200, -50)
    assert records[0]["start"] == "2023-07-20T19:00:00Z"
    assert records[0]["end"] == "2023-07-20T20:00:00Z"
    assert (records[1]["unit"], records[1]["rawusage"], records[1]["final"]) == ("ms", "1", False)
    assert records[0]["transaction_id"] == billable.transaction_id(rows[0].key, 0)  # final: its item's
    assert records[1]["transaction_id"] is None  # open: not an item yet
    parsed = list(csv.DictReader(io.StringIO(report.render(rows, "csv"))))
    assert list(parsed[0]) == report.CSV_FIELDS
    assert (parsed[0]["quantity"], parsed[0]["adjustment"], parsed[0]["traffic_type"]) == (
        "150",
        "-50",
        "public",
    )


def test_table_marks_adjustments_open_windows_and_unattributed_bytes() -> None:
    text = report.render([row(4, 10, account="", adjustment=3, detail="public", final=False)], "table")
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["START", "(UTC)", "END"]
    assert "(unattributed)" in lines[1]
    assert "10 B (adj +3)" in lines[1]
    assert lines[1].rstrip().endswith("open")
    assert lines[-1] == "1 record(s)"


def test_unknown_format_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        report.render([], "xml")


@pytest.mark.parametrize(
    ("text", "end_of_day", "expected"),
    [
        ("2023-07-20", False, T - 19 * H),
        ("2023-07-20", True, T + 5 * H),
        ("2023-07-20 19:00:00", False, T),
        ("2023-07-20T19:00:00Z", False, T),
        ("2023-07-20T21:00:00+02:00", False, T),
        (str(T), False, T),
    ],
)
def test_time_arguments(text: str, end_of_day: bool, expected: int) -> None:
    assert report.parse_when(text, end_of_day=end_of_day) == expected


def test_a_bad_time_argument_says_what_is_accepted() -> None:
    with pytest.raises(ValueError, match="yyyy-MM-dd"):
        report.parse_when("last tuesday")


def test_unattributed_bytes_are_not_a_cloudstack_accounts_usage() -> None:
    rows = [row(4, 10, account="", detail="public"), row(4, 20, detail="public")]
    body = report.cloudstack_response(rows)["listusagerecordsresponse"]
    assert body["count"] == 1
    assert body["usagerecord"][0]["rawusage"] == "20"
    assert [r["account"] for r in json.loads(report.render(rows, "json"))] == ["", "acct-1"]


def test_a_table_shows_a_tenants_control_characters_escaped_never_sends_them_to_the_terminal() -> None:
    """A VM's name is the tenant's: an escape sequence in it (clear the screen, set the title)
    is shown as `\\x1b...` in `kvmeter usage`'s table, and a newline or tab in it never breaks the
    columns."""
    text = report.render([row(1, H, resource_name="web\x1b]0;owned\x07\n\tx\x9b2J")], "table")
    assert "web\\x1b]0;owned\\x07\\x0a\\x09x\\x9b2J" in text
    assert not any(ch in text for ch in "\x1b\x07\t\x9b")
    assert len(text.splitlines()) == 3  # header, the row, the count
