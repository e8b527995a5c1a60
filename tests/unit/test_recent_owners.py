"""agent/recent_owners.py: the NICs of running domains that left (stopped, gone, read again
changed), kept `keep` seconds, looked at only for the domains that changed."""

from __future__ import annotations

from dataclasses import replace

from kvmeter.agent.model import DomainInfo, NicInfo
from kvmeter.agent.recent_owners import RecentOwners


def domain(uuid: str, *devices: str, state: str = "running") -> DomainInfo:
    nics = tuple(
        NicInfo(mac=f"02:00:00:00:00:{i:02x}", device=d, nic_type="bridge") for i, d in enumerate(devices)
    )
    return DomainInfo(uuid=uuid, name=f"i-2-{uuid}-VM", state=state, kind="user_vm", nics=nics)


def test_the_nics_of_a_running_domain_that_left_are_kept_and_an_unchanged_ones_are_not() -> None:
    """A running domain gone from the next publish leaves its NICs' names to it; one kept as the
    same object leaves nothing; a shut-off one's NICs meter nothing and are not kept."""
    a, b, c = domain("a", "vnet1", "vnet2"), domain("b", "vnet3"), domain("c", "vnet4", state="shutoff")
    recent = RecentOwners(keep=60)
    recent.left({"a": a, "b": b, "c": c}, {"b": b}, now=10)
    assert recent.get("vnet1", 11) == (a, a.nics[0])
    assert recent.get("vnet2", 11) == (a, a.nics[1])
    assert recent.get("vnet3", 11) is None
    assert recent.get("vnet4", 11) is None


def test_a_record_expires_after_keep_and_a_newer_one_of_the_name_replaces_it() -> None:
    """A name's record lasts `keep` seconds; recorded again (another domain under it) it is the
    newer's and lasts from then, while the older records expire at their own time."""
    first, second, other = domain("a", "vnet1"), domain("b", "vnet1"), domain("c", "vnet9")
    recent = RecentOwners(keep=60)
    recent.left({"a": first, "c": other}, {}, now=0)
    recent.left({"b": second}, {}, now=50)
    recent.left({}, {}, now=70)  # vnet9 (recorded at 0) expires; vnet1 (at 50) stays
    assert recent.get("vnet1", 70) == (second, second.nics[0])
    assert recent.get("vnet9", 61) is None
    assert len(recent._owners) == 1
    assert recent.get("vnet1", 111) is None


def test_a_domain_read_again_changed_leaves_its_old_record() -> None:
    """A running domain published again as another object (its XML changed) records its old
    object's NICs: a tap deleted meanwhile may be told apart from the new one by its MAC."""
    old = domain("a", "vnet1")
    new = replace(old, name="i-2-a-VM-renamed")
    recent = RecentOwners(keep=60)
    recent.left({"a": old}, {"a": new}, now=5)
    assert recent.get("vnet1", 6) == (old, old.nics[0])
