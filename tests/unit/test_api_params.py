"""The API's parameter parser: ASCII digits only, bounded integers and times, clear refusals."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmeter.collector import api_params
from kvmeter.collector.api_params import MAX_TIME_MS, BadRequest

T = 1_689_879_600_000  # 2023-07-20T19:00:00Z


@pytest.mark.parametrize(
    ("text", "end_of_day", "expected"),
    [
        ("2023-07-20", False, T - 19 * 3_600_000),
        ("2023-07-20", True, T + 5 * 3_600_000),
        ("2023-07-20 19:00:00", False, T),
        ("2023-07-20T19:00:00.123Z", False, T + 123),
        ("2023-07-20T21:00:00+02:00", False, T),
        (str(T), False, T),
        ("0", False, 0),
        (str(MAX_TIME_MS), False, MAX_TIME_MS),
        ("9999-12-31", True, MAX_TIME_MS),
        ("1970-01-01T00:00:00Z", False, 0),
    ],
)
def test_times_in_every_accepted_form(text: str, end_of_day: bool, expected: int) -> None:
    assert api_params.time_ms(text, "start", end_of_day=end_of_day) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("9" * 30, "not a time"),  # larger than any database integer
        ("9" * 15, "between"),
        ("9" * 5000, "not a time"),  # longer than int() converts
        (str(MAX_TIME_MS + 1), "between"),
        ("-1", "not a time"),
        ("١٧٠٠٠٠٠٠٠٠", "not a time"),  # Arabic-Indic digits: str.isdigit() says yes
        ("２０２３-０７-２０", "not a time"),  # full-width digits, which strptime's \d takes
        ("²³", "not a time"),
        ("1969-12-31T23:59:59Z", "outside"),
        ("0001-01-01T00:00:00+01:00", "outside|not a time"),
        ("9999-12-31T23:00:00-05:00", "outside"),
        ("2023-02-30", "not a time"),
        ("2023-07-20'; DROP TABLE usage_records; --", "not a time"),
        ("../../etc/passwd", "not a time"),
        ("last tuesday", "yyyy-MM-dd"),
        ("", "not a time"),
    ],
)
def test_refused_times_name_the_parameter_and_the_reason(text: str, says: str) -> None:
    with pytest.raises(BadRequest, match=f"start.*({says})") as caught:
        api_params.time_ms(text, "start")
    assert len(str(caught.value)) < 200  # the value is shown cut short


def test_integers_are_ascii_digits_within_bounds() -> None:
    assert api_params.integer("0042", "page", maximum=100) == 42
    for text in ("-1", "+1", "1.0", "1e3", " 1", "٣", "³", "0x10", ""):
        with pytest.raises(BadRequest, match="digits 0-9"):
            api_params.integer(text, "page", maximum=100)
    for text in ("101", "9" * 20, "1" + "0" * 4400):
        with pytest.raises(BadRequest, match="between 0 and 100"):
            api_params.integer(text, "page", maximum=100)
    with pytest.raises(BadRequest, match="between 1 and 100"):
        api_params.integer("0", "page", minimum=1, maximum=100)
    assert api_params.optional_integer(None, "page", default=7, maximum=100) == 7
    with pytest.raises(BadRequest, match="page must be an integer"):  # given, but empty
        api_params.optional_integer("", "page", default=7, maximum=100)


def test_usage_types_and_names() -> None:
    assert api_params.usage_type(None) is None
    assert api_params.usage_type("4") == 4
    with pytest.raises(BadRequest, match="type"):
        api_params.usage_type("99999999999999999999999")
    assert api_params.name("", "account") is None
    assert api_params.name("a1b2-ç", "account") == "a1b2-ç"
    for bad in ("a\x00b", "a\nb", "x" * 256):
        with pytest.raises(BadRequest, match="account"):
            api_params.name(bad, "account")


def test_required_and_optional_times() -> None:
    with pytest.raises(BadRequest, match="since is required"):
        api_params.required_time_ms(None, "since")
    assert api_params.optional_time_ms(None, "until", default=5) == 5
    with pytest.raises(BadRequest, match="until"):
        api_params.optional_time_ms("", "until", default=5)


@given(st.text(max_size=80))
def test_any_text_is_a_bounded_time_or_a_bad_request(text: str) -> None:
    try:
        ms = api_params.time_ms(text, "start", end_of_day=True)
    except BadRequest:
        return
    assert 0 <= ms <= MAX_TIME_MS


@given(st.text(max_size=30))
def test_any_text_is_a_bounded_integer_or_a_bad_request(text: str) -> None:
    try:
        value = api_params.integer(text, "n", maximum=500)
    except BadRequest:
        return
    assert 0 <= value <= 500
    assert text.isascii()


def test_a_cursor_holds_its_position_for_its_query_only() -> None:
    query = api_params.fingerprint("usage", 0, 10, ["acct-a"], None, None)
    cursor = api_params.encode_cursor(query, (1_715_677_200_000, 42))
    assert cursor.isascii()
    assert len(cursor) <= api_params.MAX_CURSOR
    assert api_params.decode_cursor(cursor, query, 2) == (1_715_677_200_000, 42)
    assert api_params.decode_cursor(None, query, 2) is None
    other = api_params.fingerprint("usage", 0, 11, ["acct-a"], None, None)
    for text, q, size in [(cursor, other, 2), (cursor, query, 1), (cursor[:-2], query, 2), ("@@", query, 2)]:
        with pytest.raises(BadRequest, match="not one this API gave"):
            api_params.decode_cursor(text, q, size)
    forged = api_params.encode_cursor(query, (-1, 2))  # positions are never negative
    with pytest.raises(BadRequest, match="not one this API gave"):
        api_params.decode_cursor(forged, query, 2)


@given(st.text(max_size=250))
def test_any_text_is_a_cursor_of_this_query_or_a_bad_request(text: str) -> None:
    query = api_params.fingerprint("usage")
    try:
        position = api_params.decode_cursor(text, query, 2)
    except BadRequest:
        return
    assert position is None or len(position) == 2
