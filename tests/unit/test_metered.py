"""Which host links are metered: by target dev, else by the tap's (or macvtap's) MAC."""

from __future__ import annotations

from kvmeter.agent.metered import MeteredLinks, tap_mac
from kvmeter.agent.model import CounterKey, DomainInfo, NicInfo


def dom(name: str, *nics: NicInfo, state: str = "running") -> DomainInfo:
    return DomainInfo(uuid=f"u-{name}", name=name, state=state, kind="user_vm", nics=nics)


LINKS = {"lo": 1, "vnet3": 30, "macvtap0": 31, "brvx-5001": 5}
MACS = {
    "vnet3": "fe:00:00:00:00:03",
    "macvtap0": "02:00:00:00:00:04",
    "brvx-5001": None,
    "lo": "00:00:00:00:00:00",
}


def test_tap_mac_is_the_guest_mac_with_fe_first() -> None:
    assert tap_mac("02:00:0A:01:00:10") == "fe:00:0a:01:00:10"


def test_resolution_by_device_then_mac_skipping_stopped_domains() -> None:
    reads: list[str] = []

    def read_mac(name: str) -> str | None:
        reads.append(name)
        return MACS[name]

    by_name = NicInfo(mac="02:00:00:00:00:01", device="vnet3", nic_type="bridge")
    renamed_tap = NicInfo(mac="02:00:00:00:00:03", device="testnet0", nic_type="bridge")
    macvtap = NicInfo(mac="02:00:00:00:00:04", device=None, nic_type="direct")
    vhost = NicInfo(mac="02:00:00:00:00:05", device="vhu-1", nic_type="vhostuser")
    stopped = NicInfo(mac="02:00:00:00:00:06", device="vnet9", nic_type="bridge")
    links = MeteredLinks("boot", read_mac)
    got = links.resolve(
        [dom("a", by_name), dom("b", renamed_tap, macvtap, vhost), dom("c", stopped, state="shutoff")], LINKS
    )
    assert {name: nic.mac for name, (_, nic) in got.items()} == {
        "vnet3": by_name.mac,  # the target dev wins; the renamed tap finds no other link with its MAC
        "macvtap0": macvtap.mac,  # a macvtap carries the guest MAC itself
        "vhu-1": vhost.mac,  # counted through libvirt, by its own name
    }
    links.resolve([dom("b", renamed_tap)], LINKS)
    assert sorted(reads) == sorted(LINKS)  # one sysfs read per link incarnation, then cached


def test_keys_are_stable_objects_per_name_and_ifindex() -> None:
    links = MeteredLinks("boot", lambda _: None)
    first = links.keys({"vnet0": 7})
    again = links.keys({"vnet0": 7})
    reborn = links.keys({"vnet0": 9})
    assert first["vnet0"] is again["vnet0"]
    assert (reborn["vnet0"].ifindex, reborn["vnet0"].boot_id) == (9, "boot")


def test_keys_of_events_are_the_objects_key_hands_out() -> None:
    links = MeteredLinks("boot", lambda _: None)
    known = links.keys({"vnet0": 7, "vnet1": 8})
    got = links.keys_of(["vnet0", "vnet1", "vnet0", "vnet2"], [7, 8, 9, 3])
    assert got[0] is known["vnet0"]
    assert got[1] is known["vnet1"]
    assert got[2:] == [CounterKey("boot", 9, "vnet0"), CounterKey("boot", 3, "vnet2")]
    assert got[2] is links.key("vnet0", 9)
    assert all(type(key) is CounterKey for key in got)
    twice = links.keys_of(["vnet5", "vnet5"], [11, 11])  # a new link named twice: one object
    assert twice[0] is twice[1] is links.key("vnet5", 11)
    assert (twice[0].boot_id, twice[0].ifindex, twice[0].name) == ("boot", 11, "vnet5")


def test_trimmed_keys_keep_the_current_links_objects_and_drop_the_gone() -> None:
    links = MeteredLinks("boot", lambda _: None)
    current = {f"vnet{i}": i for i in range(10)}
    kept = links.keys(current)
    gone = [links.key("vnet0", 1000 + n) for n in range(100)]  # incarnations past: over the bound
    links.trim(kept)
    assert all(links.key(name, index) is kept[name] for name, index in current.items())
    assert links.key("vnet0", 1000) is not gone[0]  # forgotten: made again
