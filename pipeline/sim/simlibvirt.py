"""Node XML for libvirt's own test driver (`test:///path/node.xml`), CloudStack-style.

Note: libvirt drops `<target dev='vnetN'/>` (and `macvtapN`) from defined XML because those
prefixes are reserved for generated names; the test driver then names the NIC `testnetN`.
Tests that need the agent to find a `vnetN` tap rely on the MAC match instead: the host-side
tap carries the guest MAC with the first octet set to 0xfe, as libvirt does on a real host.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

CLOUDSTACK_NS = "http://cloudstack.apache.org/metadata/1.0"


@dataclass(frozen=True)
class Nic:
    mac: str
    bridge: str | None = None
    dev: str | None = None
    nic_type: str = "bridge"  # bridge, network, direct, vhostuser
    network: str | None = None
    model: str = "virtio"


@dataclass(frozen=True)
class Domain:
    name: str
    uuid: str
    nics: tuple[Nic, ...] = ()
    running: bool = True
    owner: dict[str, str] = field(default_factory=dict)  # CloudStack <metadata> owner fields


def tap_mac(guest_mac: str) -> str:
    """The MAC libvirt gives a domain NIC's host-side tap: the guest MAC with 0xfe first."""
    return "fe:" + guest_mac.lower().split(":", 1)[1]


def _nic_xml(nic: Nic) -> str:
    if nic.nic_type == "network":
        source = f"<source network='{escape(nic.network or 'default')}'/>"
    elif nic.nic_type == "direct":
        source = f"<source dev='{escape(nic.bridge or 'eth0')}' mode='bridge'/>"
    elif nic.nic_type == "vhostuser":
        source = "<source type='unix' path='/run/vhost.sock' mode='client'/>"
    else:
        source = f"<source bridge='{escape(nic.bridge or '')}'/>"
    target = f"<target dev='{escape(nic.dev)}'/>" if nic.dev else ""
    return (
        f"<interface type='{nic.nic_type}'><mac address='{nic.mac}'/>{source}{target}"
        f"<model type='{nic.model}'/></interface>"
    )


def domain_xml(dom: Domain) -> str:
    metadata = ""
    if dom.owner:
        fields = "".join(f"<cs:{k}>{escape(v)}</cs:{k}>" for k, v in sorted(dom.owner.items()))
        metadata = f"<metadata><cs:instance xmlns:cs='{CLOUDSTACK_NS}'>{fields}</cs:instance></metadata>"
    runstate = "" if dom.running else "<test:runstate>5</test:runstate>"
    nics = "".join(_nic_xml(n) for n in dom.nics)
    return (
        "<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>"
        f"<name>{escape(dom.name)}</name><uuid>{dom.uuid}</uuid>{metadata}"
        "<memory>524288</memory><vcpu>1</vcpu><os><type>hvm</type></os>"
        f"<devices>{nics}</devices>{runstate}</domain>"
    )


def write_node_xml(path: Path, domains: Iterable[Domain]) -> str:
    """Write a test-driver node file and return its URI."""
    body = "".join(domain_xml(d) for d in domains)
    path.write_text(f"<node>{body}</node>\n")
    return f"test://{path}"


# A small CloudStack host: a user VM with a guest and a public NIC, an isolated-network
# virtual router (eth0 guest, eth1 control, eth2 public) and a stopped system VM.
USER_VM = Domain(
    name="i-2-10-VM",
    uuid="6f1c6c4e-0000-4000-8000-000000000010",
    nics=(
        Nic(mac="02:00:0a:00:00:01", bridge="brvx-5001", dev="kvtap10"),
        Nic(mac="02:00:0a:00:00:02", bridge="cloudbr0", dev="kvtap11"),
    ),
)
ROUTER = Domain(
    name="r-5-VM",
    uuid="6f1c6c4e-0000-4000-8000-000000000005",
    nics=(
        Nic(mac="02:00:05:00:00:01", bridge="brvx-5001", dev="kvtap50"),
        Nic(mac="0e:00:a9:fe:00:05", bridge="cloud0", dev="kvtap51"),
        Nic(mac="06:00:05:00:00:03", bridge="cloudbr0", dev="kvtap52"),
    ),
    owner={
        "ownerAccountUuid": "acct-2",
        "ownerAccountName": "alice",
        "instanceUuid": "6f1c6c4e-0000-4000-8000-000000000005",
    },
)
SYSTEM_VM = Domain(name="s-1-VM", uuid="6f1c6c4e-0000-4000-8000-000000000001", running=False)
CLOUDSTACK_HOST = (USER_VM, ROUTER, SYSTEM_VM)
