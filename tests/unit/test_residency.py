"""What may leave a replica's memory, and which evicted resources a measure may need back."""

from __future__ import annotations

import pytest

from kvmeter.collector.model import OwnerChange, ResourceHistory, Segment
from kvmeter.collector.residency import Evicted, evictable

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


def test_a_measure_wants_an_evicted_resource_by_uuid_always_and_by_address_only_before_it_closed() -> None:
    gone = Evicted()
    gone.add(vm("vm-1", Segment(0, 1000, account=A)))
    gone.add(
        ResourceHistory(
            "ip-1", "IpAddress", [OwnerChange(0, A)], ip=[Segment(0, 500, account=A, address="10.0.0.9")]
        )
    )
    assert gone.watermark == 1000
    assert gone.wanted("vm-1", "", "", 5000) == {"vm-1"}  # a destroyed VM's uuid names its last owner
    assert gone.wanted("", "02:00:00:00:00:01", "", 999) == {"vm-1"}
    assert gone.wanted("", "02:00:00:00:00:01".upper(), "", 999) == {"vm-1"}
    assert gone.wanted("", "02:00:00:00:00:01", "", 1000) == set()  # not alive then: never read
    assert gone.wanted("", "", "10.0.0.9", 10) == {"ip-1"}
    assert gone.wanted("", "", "10.0.0.1", 10) == {"vm-1"}
    assert gone.wanted("other", "", "", 10) == set()
    gone.discard(vm("vm-1", Segment(0, 1000, account=A)))
    assert "vm-1" not in gone
    assert gone.wanted("", "02:00:00:00:00:01", "", 10) == set()
    assert len(gone) == 1
