"""The collector's in-memory aggregation (its hot loop) equals summing the core's
usage.byte_increments measure by measure, for any measures; and its path over a decoded batch's
columns equals the measure-by-measure one."""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from typing import cast

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmeter.collector import usage
from kvmeter.collector.aggregate import Tally
from kvmeter.collector.decode import DecodedBatch, decode_batch
from kvmeter.collector.model import (
    Measure,
    Outcome,
    OwnerChange,
    ResourceHistory,
    Segment,
    Settings,
    UsageKey,
)
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from kvmeter.proto import pb
from tests.unit import cs_events as cs

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


# -- the batch path (decoded columns) equals the measure-by-measure path ------------------------
UUIDS = ["", "uuid-steady", "uuid-moved", "uuid-stopped", "uuid-unknown"]
NAMES = ["i-2-10-VM", "i-2-11-VM", "r-5-VM", ""]


def _index_collector(window: int) -> Collector:
    collector = Collector(
        cast(Store, None), Settings(window_ms=window, routers={"r-5-VM": "acct-r"}), lambda: T0
    )
    collector.index.update(ResourceHistory("uuid-steady", owners=[OwnerChange(T0, "acct-a")]))
    # Stopped between T0 + 30 min and T0 + 100 min: its bytes of T0 + 1 h are doubted (parked)
    running = [Segment(T0 - 7_200_000, T0 + 1_800_000), Segment(T0 + 6_000_000, None)]
    collector.index.update(
        ResourceHistory("uuid-stopped", owners=[OwnerChange(T0, "acct-a")], running=running)
    )
    moved = [OwnerChange(T0, "acct-a"), OwnerChange(T0 + 3_600_000, "acct-b")]
    collector.index.update(ResourceHistory("uuid-moved", owners=moved))
    return collector


@st.composite
def wire_batches(draw: st.DrawFn) -> list[bytes]:
    out = []
    for seq in range(1, draw(st.integers(1, 3)) + 1):
        b = pb.MeasureBatch(schema=2, host_id="h", boot_id="b", stream_id="s", seq=seq)
        if draw(st.booleans()):
            b.inventory.add(name="r-5-VM").owner["ownerAccountUuid"] = "acct-hint"
        one_poll = draw(st.booleans())  # every measure of one interval: the batch's own path
        for i in range(draw(st.integers(0, 12))):
            if i == 0 or not one_poll:
                start = T0 + draw(st.integers(-1, 2).map(lambda n: n * 3_600_000 - 5_000 * (n % 2)))
                end = start + draw(st.sampled_from([0, 10_000, 4_000_000]))
            m = b.measures.add(header=2, saddr=0, bytes=draw(st.integers(0, 10**12)), start=start)
            m.end = end
            if draw(st.booleans()):  # else a measure with only the original five fields
                m.direction = draw(st.sampled_from([pb.VM_RX, pb.VM_TX]))  # else bad_direction
                m.traffic_type = draw(st.sampled_from([pb.PUBLIC, pb.GUEST, pb.CONTROL]))
                m.instance_uuid = draw(st.sampled_from(UUIDS))
                m.domain_name = draw(st.sampled_from(NAMES))
                m.mac = draw(st.sampled_from(["", "02:00:00:00:00:0A"]))
                m.device = "vnet1"
                m.packets = draw(st.integers(0, 10))
                m.final_at_delete = draw(st.booleans())
                if draw(st.integers(0, 9)) == 0:
                    m.quarantined = True
            m.saddr = draw(st.sampled_from([0, 3405803783]))
            address = draw(st.sampled_from([None, bytes(4), bytes([203, 0, 113, 7])]))
            if address is not None:
                m.address = address
        out.append(b.SerializeToString())
    return out


@settings(max_examples=300, deadline=None)
@given(values=wire_batches(), window=st.sampled_from([900_000, 3_600_000]))
def test_batch_columns_give_the_same_result_as_measure_by_measure(values: list[bytes], window: int) -> None:
    """Same sums, names, parked and quarantined measures and counts, whichever path a measure takes
    (steady owner in one window, or the core's rules: owner changes, hints, splits, quarantine, a
    stopped VM's bytes in a window still open)."""
    batches = [decode_batch(v) for v in values]
    collector = _index_collector(window)
    index, billable = collector.index, frozenset({"public", "guest"})
    owner_at = partial(index.owner_at, open_from=T0)
    by_columns = Tally(window, billable, owner_at, index.history)
    one_by_one = Tally(window, billable, owner_at, index.history)
    for b in batches:
        by_columns.add_batch(b)
        for m in b.measures:
            one_by_one.add(m)
    assert by_columns.result() == one_by_one.result()


def test_a_record_is_named_after_its_first_measure_on_either_path() -> None:
    """Two domain names for one instance: the record takes the first one's, as measure by measure."""
    b = pb.MeasureBatch(schema=2, host_id="h", boot_id="b", stream_id="s", seq=1)
    for name, start in (("i-2-10-VM", T0 + 4_000_000), ("r-5-VM", T0 + 10_000), ("i-2-11-VM", T0)):
        b.measures.add(
            header=2, saddr=0, bytes=7, start=start, end=start + (4_000_000 if name == "r-5-VM" else 10),
            direction=pb.VM_TX, traffic_type=pb.PUBLIC, instance_uuid="uuid-steady", domain_name=name,
        )  # fmt: skip
    tally = Tally(3_600_000, frozenset({"public"}), lambda m: None, _index_collector(3_600_000).index.history)
    tally.add_batch(decode_batch(b.SerializeToString()))
    done = tally.result()
    # measure 1 spans two windows (the core's split: 6 and 1 bytes), measure 2 lies in the first
    assert {k.window_start_ms: v for k, v in done.billed.items()} == {T0: 7 + 6, T0 + 3_600_000: 7 + 1}
    assert {k.window_start_ms: n[0] for k, n in done.names.items()} == {
        T0: "r-5-VM",
        T0 + 3_600_000: "i-2-10-VM",
    }
    assert done.names[next(iter(done.names))][1] in ("DomainRouter", "UserVm")


def test_an_owner_learned_between_chunks_takes_the_next_chunk() -> None:
    """Routes kept from chunk to chunk are dropped when lifecycle knowledge changes."""

    def chunk(seq: int, hours: int) -> list[DecodedBatch]:
        b = pb.MeasureBatch(schema=2, host_id="h", boot_id="b", stream_id="s", seq=seq)
        start = cs.T0 + hours * cs.H
        b.measures.add(
            header=2, saddr=0, bytes=100, start=start, end=start + 10_000, direction=pb.VM_TX,
            traffic_type=pb.PUBLIC, instance_uuid=cs.VM, domain_name="i-2-10-VM",
        )  # fmt: skip
        return [decode_batch(b.SerializeToString())]

    collector = Collector(cast(Store, None), Settings(), lambda: cs.T0)
    collector._learn([cs.usage("VM.CREATE", 0, account=cs.A)])
    first = collector._attribute((), Outcome(), batches=chunk(1, 1))
    collector._learn([cs.usage("VM.START", 2, account=cs.B)])  # a usage event names a new owner
    second = collector._attribute((), Outcome(), batches=chunk(2, 3))
    assert [k.account for k in first.billed] == [cs.A]
    assert [k.account for k in second.billed] == [cs.B]
