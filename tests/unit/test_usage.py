"""Usage values: time per window from lifecycle, bytes per window from measures, rawusage text."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmeter.collector import errors
from kvmeter.collector.errors import BadInput
from kvmeter.collector.lifecycle import build_history
from kvmeter.collector.model import (
    ALLOCATED_VM,
    IP_ADDRESS,
    NETWORK_BYTES_RECEIVED,
    NETWORK_BYTES_SENT,
    RUNNING_VM,
    UNATTRIBUTED,
    ByteIncrement,
    Measure,
    ResourceHistory,
    UsageKey,
)
from kvmeter.collector.usage import byte_increments, covered_range, rawusage, time_usage
from kvmeter.collector.windows import DAY_MS
from tests.unit.cs_events import T0, VM, A, B, H, state, usage, vm_events

M = 60_000
BILLABLE = frozenset({"public", "guest"})


def ms(*parts: int) -> int:
    return int(dt.datetime(*parts, tzinfo=dt.UTC).timestamp()) * 1000


def values(history: ResourceHistory, now: int, window: int = H) -> dict[tuple[int, str, str, int], int]:
    """{(type, account, offering, window start - T0): quantity ms} for compact expectations."""
    out = {}
    for v in time_usage(history, now, window):
        assert v.key.resource == history.resource_uuid
        assert v.key.detail == ""
        assert v.key.window_end_ms - v.key.window_start_ms == window
        out[(v.key.usage_type, v.key.account, v.key.offering, v.key.window_start_ms - T0)] = v.quantity_ms
    return out


def hist(*events: object, uuid: str = VM) -> ResourceHistory:
    return build_history(events)[uuid]  # type: ignore[arg-type]


def test_create_start_stop_up_to_now() -> None:
    h = hist(usage("VM.CREATE", 0), usage("VM.START", 0.5), usage("VM.STOP", 2.25))
    assert values(h, now=T0 + 3 * H + 10 * M) == {
        (RUNNING_VM, A, "", 0): 30 * M,
        (RUNNING_VM, A, "", H): 60 * M,
        (RUNNING_VM, A, "", 2 * H): 15 * M,
        (ALLOCATED_VM, A, "", 0): 60 * M,
        (ALLOCATED_VM, A, "", H): 60 * M,
        (ALLOCATED_VM, A, "", 2 * H): 60 * M,
        (ALLOCATED_VM, A, "", 3 * H): 10 * M,  # open: up to now, and no window after now's
    }


def test_open_segment_counts_only_up_to_now() -> None:
    h = hist(usage("VM.START", 1))
    assert values(h, now=T0 + H + 5 * M) == {(RUNNING_VM, A, "", H): 5 * M}
    assert values(h, now=T0 + H) == {}  # nothing has run yet
    assert values(h, now=T0) == {}  # now before the segment


def test_closed_segment_after_now_is_clipped() -> None:
    # a replay at an earlier `now` than the events (e.g. ingest of a file from the future)
    h = hist(usage("VM.START", 1), usage("VM.STOP", 4))
    assert values(h, now=T0 + 2 * H) == {(RUNNING_VM, A, "", H): 60 * M}


def test_started_in_an_earlier_month_and_never_stopped() -> None:
    start = ms(2024, 4, 30, 22, 30)
    h = build_history([usage("VM.START", (start - T0) / H)])[VM]
    now = ms(2024, 5, 1, 1, 20)
    got = {(v.key.window_start_ms, v.key.window_end_ms): v.quantity_ms for v in time_usage(h, now, DAY_MS)}
    assert got == {
        (ms(2024, 4, 30), ms(2024, 5, 1)): 90 * M,
        (ms(2024, 5, 1), ms(2024, 5, 2)): 80 * M,
    }
    hourly = {v.key.window_start_ms: v.quantity_ms for v in time_usage(h, now, H)}
    assert hourly == {
        ms(2024, 4, 30, 22): 30 * M,
        ms(2024, 4, 30, 23): 60 * M,
        ms(2024, 5, 1, 0): 60 * M,
        ms(2024, 5, 1, 1): 20 * M,
    }


def test_scaling_splits_by_offering_within_a_window() -> None:
    h = hist(
        usage("VM.START", 0, offering="small"),
        usage("VM.START", 1 / 3, offering="large"),
        usage("VM.STOP", 1),
    )
    assert values(h, now=T0 + 2 * H) == {
        (RUNNING_VM, A, "small", 0): 20 * M,
        (RUNNING_VM, A, "large", 0): 40 * M,
    }


def test_restarts_in_one_window_add_up_in_one_record() -> None:
    h = hist(
        usage("VM.START", 0),
        usage("VM.STOP", 0.25),
        usage("VM.START", 0.5),
        state("Running", "Stopped", 0.75),
    )
    assert values(h, now=T0 + 2 * H) == {(RUNNING_VM, A, "", 0): 30 * M}


def test_ownership_move_gives_each_owner_its_share() -> None:
    h = hist(usage("VM.CREATE", 0, A), usage("VM.DESTROY", 1.5, A), usage("VM.CREATE", 1.5, B))
    assert values(h, now=T0 + 2 * H) == {
        (ALLOCATED_VM, A, "", 0): 60 * M,
        (ALLOCATED_VM, A, "", H): 30 * M,
        (ALLOCATED_VM, B, "", H): 30 * M,
    }


def test_ip_address_time() -> None:
    h = hist(usage("NET.IPASSIGN", 0.5, uuid="ip-1"), usage("NET.IPRELEASE", 1.25, uuid="ip-1"), uuid="ip-1")
    assert values(h, now=T0 + 3 * H) == {(IP_ADDRESS, A, "", 0): 30 * M, (IP_ADDRESS, A, "", H): 15 * M}


def test_unknown_owner_is_not_billed() -> None:
    h = hist(state("Starting", "Running", 0))
    assert h.running
    assert time_usage(h, T0 + 2 * H, H) == []


def test_covered_range() -> None:
    h = hist(usage("VM.CREATE", 0.5), usage("VM.START", 1.5), usage("VM.STOP", 2))
    assert covered_range(h, T0 + 4 * H + 1, H) == (T0, T0 + 5 * H)
    assert covered_range(ResourceHistory("nothing"), T0, H) is None


def test_since_limits_the_windows_and_keeps_their_values() -> None:
    h = hist(usage("VM.CREATE", 0.5), usage("VM.START", 1.5))
    now = T0 + 30 * 24 * H + 20 * M  # a month later, still running
    everything = time_usage(h, now, H)
    recent = time_usage(h, now, H, since_ms=now - 2 * H)
    assert recent == [v for v in everything if v.key.window_start_ms >= now - 2 * H - 20 * M]
    assert len(recent) == 6  # 3 windows x (running, allocated)
    assert covered_range(h, now, H, since_ms=now - 2 * H) == (now - 2 * H - 20 * M, now - 20 * M + H)
    assert time_usage(h, now, H, since_ms=now + H) == []


def test_bad_window_is_rejected() -> None:
    with pytest.raises(BadInput) as info:
        time_usage(hist(usage("VM.START", 0)), T0 + H, 7 * H)
    assert info.value.reason == errors.BAD_WINDOW


@settings(deadline=None, max_examples=200)
@given(events=vm_events(), now_hours=st.integers(0, 14), window=st.sampled_from([15 * M, H, 3 * H, DAY_MS]))
def test_time_is_conserved(events: list, now_hours: int, window: int) -> None:
    now = T0 + now_hours * H + 7 * M
    for history in build_history(events).values():
        got = time_usage(history, now, window)
        for kind, segments in (
            (RUNNING_VM, history.running),
            (ALLOCATED_VM, history.allocated),
            (IP_ADDRESS, history.ip),
        ):
            expected = sum(
                max(0, min(now, s.end_ms if s.end_ms is not None else now) - s.start_ms)
                for s in segments
                if s.account
            )
            assert sum(v.quantity_ms for v in got if v.key.usage_type == kind) == expected
        for v in got:
            assert 0 < v.quantity_ms <= window
            assert v.key.window_start_ms % window == 0
            assert v.key.window_start_ms <= now
        assert len({v.key for v in got}) == len(got)


def measure(**fields: object) -> Measure:
    base = Measure(
        stream_id="s", seq=1, index=0, host_id="h", start_ms=T0 + 10 * M, end_ms=T0 + 10 * M + 30_000,
        direction="sent", bytes=1000, packets=9, traffic_type="public", instance_uuid="vm-1",
        mac="02:00:00:00:00:01", address="203.0.113.5", domain_name="i-2-10-VM", device="vnet0",
    )  # fmt: skip
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


def key(
    usage_type: int, resource: str = "vm-1", detail: str = "public", ws: int = T0, account: str = A
) -> UsageKey:
    return UsageKey(account, usage_type, resource, "", detail, ws, ws + H)


BYTE_CASES = [
    ("sent", measure(), [ByteIncrement(key(NETWORK_BYTES_SENT), 1000)]),
    ("received", measure(direction="received"), [ByteIncrement(key(NETWORK_BYTES_RECEIVED), 1000)]),
    ("guest", measure(traffic_type="guest"), [ByteIncrement(key(NETWORK_BYTES_SENT, detail="guest"), 1000)]),
    ("not billable", measure(traffic_type="control"), []),
    ("unknown traffic type", measure(traffic_type=""), []),
    ("quarantined", measure(quarantine_reason="jump"), []),
    ("zero bytes", measure(bytes=0), []),
    ("no uuid: domain name", measure(instance_uuid=""),
     [ByteIncrement(key(NETWORK_BYTES_SENT, "i-2-10-VM"), 1000)]),
    ("legacy: address", measure(instance_uuid="", domain_name=""),
     [ByteIncrement(key(NETWORK_BYTES_SENT, "203.0.113.5"), 1000)]),
    ("across an hour", measure(start_ms=T0 + H - 10_000, end_ms=T0 + H + 30_000, bytes=1001),
     [ByteIncrement(key(NETWORK_BYTES_SENT), 250), ByteIncrement(key(NETWORK_BYTES_SENT, ws=T0 + H), 751)]),
    ("zero-length final counters", measure(start_ms=T0 + H, end_ms=T0 + H, bytes=77),
     [ByteIncrement(key(NETWORK_BYTES_SENT, ws=T0 + H), 77)]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "m", "expected"), BYTE_CASES, ids=[c[0] for c in BYTE_CASES])
def test_byte_increments(name: str, m: Measure, expected: list[ByteIncrement]) -> None:
    assert byte_increments(m, A, H, BILLABLE) == expected


def test_unattributed_bytes_keep_their_place() -> None:
    (inc,) = byte_increments(measure(), UNATTRIBUTED, H, BILLABLE)
    assert inc.key == key(NETWORK_BYTES_SENT, account=UNATTRIBUTED)


def test_bad_direction_is_rejected() -> None:
    with pytest.raises(BadInput) as info:
        byte_increments(measure(direction="sideways"), A, H, BILLABLE)
    assert info.value.reason == errors.BAD_DIRECTION


@settings(deadline=None)
@given(
    total=st.integers(0, 2**63),
    start=st.integers(T0, T0 + DAY_MS),
    length=st.integers(0, 6 * H),
    window=st.sampled_from([M, 15 * M, H, DAY_MS]),
)
def test_bytes_are_conserved(total: int, start: int, length: int, window: int) -> None:
    incs = byte_increments(measure(bytes=total, start_ms=start, end_ms=start + length), A, window, BILLABLE)
    assert sum(i.bytes for i in incs) == total
    assert len({i.key for i in incs}) == len(incs)


RAW = [
    (RUNNING_VM, H, "1"),
    (RUNNING_VM, 30 * M, "0.5"),
    (ALLOCATED_VM, 1000, "0.000278"),
    (ALLOCATED_VM, M, "0.016667"),
    (IP_ADDRESS, 0, "0"),
    (IP_ADDRESS, 744 * H, "744"),
    (RUNNING_VM, 9, "0.000002"),  # 0.0000025: half-even, like Java's DecimalFormat
    (RUNNING_VM, 27, "0.000008"),  # 0.0000075
    (RUNNING_VM, 1, "0"),
    (RUNNING_VM, -30 * M, "-0.5"),  # a negative adjustment
    (RUNNING_VM, -1, "0"),
    (NETWORK_BYTES_SENT, -512, "-512"),
    (NETWORK_BYTES_SENT, 77776, "77776"),
    (NETWORK_BYTES_RECEIVED, 0, "0"),
    (NETWORK_BYTES_RECEIVED, 2**63, str(2**63)),
]


@pytest.mark.parametrize(("usage_type", "quantity", "text"), RAW)
def test_rawusage(usage_type: int, quantity: int, text: str) -> None:
    assert rawusage(usage_type, quantity) == text


def test_rawusage_of_other_types_is_rejected() -> None:
    with pytest.raises(BadInput) as info:
        rawusage(6, 1)
    assert info.value.reason == errors.UNKNOWN_USAGE_TYPE
