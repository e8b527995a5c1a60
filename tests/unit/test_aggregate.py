"""The collector's in-memory aggregation (its hot loop) equals summing the core's
usage.byte_increments measure by measure, for any measures."""

from __future__ import annotations

from collections import defaultdict
from typing import cast

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmeter.collector import usage
from kvmeter.collector.model import Measure, UsageKey
from kvmeter.collector.service import Collector, Outcome, Settings
from kvmeter.collector.store import Store

T0 = 1_715_677_200_000
WINDOWS = [60_000, 900_000, 3_600_000, 86_400_000]
OWNERS = {"i-2-10-VM": "acct-a", "r-5-VM": "acct-b", "uuid-3": "acct-c"}


@st.composite
def measures(draw: st.DrawFn) -> Measure:
    aligned = st.integers(0, 3 * 24 * 60).map(lambda n: n * 60_000)  # on window boundaries, often
    start = T0 + draw(st.one_of(aligned, st.integers(0, 3 * 86_400_000)))
    end = start + draw(st.one_of(st.just(0), aligned, st.integers(1, 3_000), st.integers(1, 2 * 86_400_000)))
    name = draw(st.sampled_from(["i-2-10-VM", "r-5-VM", ""]))
    return Measure(
        stream_id="s",
        seq=1,
        index=draw(st.integers(0, 10**6)),
        host_id="h",
        start_ms=start,
        end_ms=end,
        direction=draw(st.sampled_from(["sent", "received"])),
        bytes=draw(st.integers(0, 10**12)),
        packets=0,
        traffic_type=draw(st.sampled_from(["public", "guest", "control", ""])),
        instance_uuid=draw(st.sampled_from(["", "uuid-3"])) if name else "uuid-3",
        mac="",
        address=draw(st.sampled_from(["", "203.0.113.7"])),
        domain_name=name,
        device="vnet0",
    )


@settings(max_examples=300, deadline=None)
@given(batch=st.lists(measures(), max_size=40), window=st.sampled_from(WINDOWS))
def test_aggregation_equals_the_core_split_summed(batch: list[Measure], window: int) -> None:
    collector = Collector(cast(Store, None), Settings(window_ms=window, routers=OWNERS), lambda: T0)
    out = Outcome()
    done = collector._attribute(batch, out)
    increments, names = done.billed, done.names

    expected: dict[UsageKey, int] = defaultdict(int)
    unbilled: dict[UsageKey, int] = defaultdict(int)
    for m in batch:
        owner = OWNERS.get(m.domain_name) or OWNERS[m.instance_uuid]
        for inc in usage.byte_increments(m, owner, window, frozenset({"public"})):
            expected[inc.key] += inc.bytes
        if m.traffic_type != "public":  # the same split, kept apart
            for inc in usage.byte_increments(m, owner, window, frozenset({m.traffic_type})):
                unbilled[inc.key] += inc.bytes
    assert {k: v for k, v in increments.items() if v} == {k: v for k, v in expected.items() if v}
    assert {k: v for k, v in done.unbilled.items() if v} == {k: v for k, v in unbilled.items() if v}
    assert out.billed_bytes == sum(expected.values())
    assert sum(done.billed.values()) + sum(done.unbilled.values()) == sum(
        m.bytes for m in batch
    )  # every byte
    assert (done.parked, done.quarantined, out.measures) == ([], [], len(batch))
    for key in increments:
        assert names[key][1] == ("DomainRouter" if names[key][0] == "r-5-VM" else "UserVm")
