"""Domain XML parsing: captured CloudStack-style domains, every NIC type, generic metadata."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kvmeter.agent.domxml import DomainXmlError, flatten_metadata, parse_domain_xml
from kvmeter.agent.model import NicInfo

DATA = Path(__file__).parent / "data" / "domains"


def load(name: str) -> str:
    return (DATA / name).read_text()


def test_user_vm_identity_nics_and_sysinfo() -> None:
    parsed = parse_domain_xml(load("i-2-10-VM.xml"))
    assert parsed.name == "i-2-10-VM"
    assert parsed.uuid == "8e3c3b1a-5d0f-4c4b-9e5a-1b2c3d4e5f60"  # lower-cased
    assert parsed.nics == (
        NicInfo("02:00:4c:5f:00:01", "vnet0", "bridge", bridge="brvx-1001", model="virtio"),
        NicInfo("02:00:4c:5f:00:02", "vnet1", "bridge", bridge="cloudbr0", model="virtio"),
    )
    assert parsed.sysinfo == {
        "manufacturer": "Apache Software Foundation",
        "product": "CloudStack KVM Hypervisor",
        "uuid": "8e3c3b1a-5d0f-4c4b-9e5a-1b2c3d4e5f60",
    }


def test_cloudstack_metadata_is_flat_and_ignores_other_tools() -> None:
    metadata = parse_domain_xml(load("i-2-10-VM.xml")).metadata
    assert metadata["ownerAccountUuid"] == "a1a1a1a1-0000-4000-8000-000000000002"
    assert metadata["ownerAccountName"] == "alice"
    assert metadata["ownerDomainUuid"] == "d0d0d0d0-0000-4000-8000-000000000001"
    assert metadata["ownerProjectUuid"] == "unknown"
    assert metadata["instanceUuid"] == "8e3c3b1a-5d0f-4c4b-9e5a-1b2c3d4e5f60"
    assert metadata["internalName"] == "i-2-10-VM"
    assert metadata["zoneName"] == "zone1"
    # repeated siblings are numbered, attributes keep their element's name
    assert metadata["tag[0].key"] == "env"
    assert metadata["tag[0].value"] == "prod"
    assert metadata["tag[1].key"] == "team"
    # libosinfo's entry sits next to CloudStack's and is left out
    assert not any("os" == key.split(".")[0] for key in metadata)
    assert "http://ubuntu.com/ubuntu/22.04" not in metadata.values()


def test_router_nics_in_cloudstack_order() -> None:
    parsed = parse_domain_xml(load("r-5-VM.xml"))
    assert [(n.device, n.bridge) for n in parsed.nics] == [
        ("vnet2", "brvx-1001"),
        ("vnet3", "cloud0"),
        ("vnet4", "breth1-100"),
    ]
    assert parsed.metadata == {}


NIC_CASES = [
    (0, NicInfo("52:54:00:aa:bb:01", "vnet7", "network", bridge="virbr0", network="default", model="e1000")),
    (1, NicInfo("52:54:00:aa:bb:02", "macvtap0", "direct", model="virtio", source_dev="eth1.100")),
    (2, NicInfo("52:54:00:aa:bb:03", "vhu0", "vhostuser", model="virtio")),
    (3, NicInfo("52:54:00:aa:bb:04", "tap-custom", "ethernet", model="virtio")),
    (4, NicInfo("52:54:00:aa:bb:05", "vnet8", "bridge", bridge="br-int", model="virtio", vlan_tag=204)),
    # not started yet: libvirt has not named the tap
    (5, NicInfo("52:54:00:aa:bb:06", None, "bridge", bridge="cloudbr0", model="virtio")),
]


@pytest.mark.parametrize(("index", "expected"), NIC_CASES)
def test_every_nic_type(index: int, expected: NicInfo) -> None:
    assert parse_domain_xml(load("mixed-nics.xml")).nics[index] == expected


def test_metadata_of_another_tool_only_is_read_generically() -> None:
    metadata = parse_domain_xml(load("mixed-nics.xml")).metadata
    assert metadata == {
        "name": "unrelated",
        "user.uuid": "u-1",
        "user": "bob",
        "project.uuid": "p-1",
        "project": "demo",
    }


METADATA_CASES = [
    # nested owner blocks with colliding leaf names: the shortest distinct tail wins
    (
        "<metadata><cs:vm xmlns:cs='urn:x-cloudstack'><owner><account><uuid>A</uuid></account>"
        "<domain><uuid>D</uuid></domain></owner><uuid>VM</uuid></cs:vm></metadata>",
        {"account.uuid": "A", "domain.uuid": "D", "vm.uuid": "VM"},
    ),
    # attributes, no namespace prefix on children, text on a wrapper
    (
        "<metadata><CloudStack owner='acct-1'/><note xmlns='urn:other'>hi</note></metadata>",
        {"CloudStack.owner": "acct-1"},
    ),
    ("<metadata><note xmlns='urn:other'>hi</note></metadata>", {"note": "hi"}),
    # empty text is not a value
    ("<metadata><cloudstack><a> </a><b>1</b></cloudstack></metadata>", {"b": "1"}),
    ("<metadata/>", {}),
]


@pytest.mark.parametrize(("xml", "expected"), METADATA_CASES)
def test_flatten_metadata(xml: str, expected: dict[str, str]) -> None:
    assert flatten_metadata(ET.fromstring(xml)) == expected


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<domain><name>x</name>", "malformed domain XML"),
        ("<network><name>x</name></network>", "not a domain XML document"),
        ("<domain><uuid>u</uuid></domain>", "lacks <name> or <uuid>"),
        ("<domain><name>x</name><uuid> </uuid></domain>", "lacks <name> or <uuid>"),
    ],
)
def test_bad_xml_is_a_clear_error(xml: str, message: str) -> None:
    with pytest.raises(DomainXmlError, match=message):
        parse_domain_xml(xml)


def test_domain_without_devices_or_metadata() -> None:
    parsed = parse_domain_xml("<domain><name>x</name><uuid>U</uuid></domain>")
    assert (parsed.nics, parsed.metadata, parsed.sysinfo) == ((), {}, {})


def test_unparseable_vlan_tag_is_ignored() -> None:
    xml = (
        "<domain><name>x</name><uuid>u</uuid><devices><interface type='bridge'>"
        "<mac address='AA:BB:CC:00:00:01'/><vlan><tag id='x'/></vlan></interface></devices></domain>"
    )
    assert parse_domain_xml(xml).nics == (NicInfo("aa:bb:cc:00:00:01", None, "bridge"),)


def test_values_many_nics_share_are_one_string_each() -> None:
    """A host's bridges, NIC types and models repeat on thousands of NICs: parsed once each."""
    first, second = (parse_domain_xml(load("i-2-10-VM.xml")) for _ in range(2))
    for a, b in zip(first.nics, second.nics, strict=True):
        assert a == b
        for name in ("nic_type", "bridge", "network", "model"):
            value = getattr(a, name)
            assert value is None or value is getattr(b, name)
    assert any(nic.bridge for nic in first.nics)
