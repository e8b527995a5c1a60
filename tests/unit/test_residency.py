"""What may leave a replica's memory, and which evicted resources a measure may need back."""

from __future__ import annotations

import pytest

from kvmeter.collector.model import OwnerChange, ResourceHistory, Segment
from kvmeter.collector.residency import Evicted, evictable, holders_wanted

A = "acct-a"


def vm(
    uuid: str = "vm-1", *segments: Segment, macs: tuple[str, ...] = ("02:00:00:00:00:01",)
) -> ResourceHistory:
    return ResourceHistory(
        uuid, "VirtualMachine", [OwnerChange(0, A)], allocated=list(segments), macs=list(macs),
        addresses=["10.0.0.1"],
    )  # fmt: skip


@pytest.mark.parametrize(
    ("history", "last_event", "cutoff", "leaves"),
    [
        (vm("v", Segment(0, 100, account=A)), 100, 100, True),  # closed at the cutoff
        (vm("v", Segment(0, 101, account=A)), 100, 100, False),  # closed after it
        (vm("v", Segment(0, 50, account=A)), 150, 100, False),  # an event after the cutoff
        (vm("v", Segment(0, 50, account=A), Segment(60, None, account=A)), 60, 100, False),  # open
        (vm("v"), 10, 100, False),  # no segment, but a MAC: alive for attribution, no end
        (ResourceHistory("vol", owners=[OwnerChange(0, A)]), 10, 100, True),  # by uuid alone
        (ResourceHistory("vol", owners=[OwnerChange(0, A)]), 110, 100, False),
    ],
)
def test_what_may_leave(history: ResourceHistory, last_event: int, cutoff: int, leaves: bool) -> None:
    assert evictable(history, last_event, cutoff) is leaves


def test_an_evicted_resource_is_found_by_address_only_by_measures_from_before_it_closed() -> None:
    gone = Evicted()
    rows = gone.add(vm("vm-1", Segment(0, 1000, account=A)))
    rows += gone.add(
        ResourceHistory(
            "ip-1", "IpAddress", [OwnerChange(0, A)], ip=[Segment(0, 500, account=A, address="10.0.0.9")]
        )
    )
    assert gone.watermark == 1000
    assert len(gone) == 2
    assert ("02:00:00:00:00:01", "vm-1", 1000) in rows
    assert ("10.0.0.9", "ip-1", 500) in rows
    mac = "02:00:00:00:00:01"
    assert holders_wanted(rows, {mac: 999}) == {"vm-1"}
    assert holders_wanted(rows, {mac: 1000}) == set()  # not alive then: never read
    assert holders_wanted(rows, {"10.0.0.9": 10}) == {"ip-1"}
    assert holders_wanted(rows, {"10.0.0.9": 600}) == set()
    assert holders_wanted(rows, {"10.0.0.1": 10}) == {"vm-1"}
    assert holders_wanted(rows, {"10.9.9.9": 10}) == set()
    gone.discard()
    assert len(gone) == 1
    gone.discard()
    gone.discard()
    assert len(gone) == 0


def test_a_resource_without_segments_leaves_no_keys() -> None:
    assert Evicted().add(ResourceHistory("vol", owners=[OwnerChange(0, A)])) == []
