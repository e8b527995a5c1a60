"""The CloudStack API double's items carry only field names of CloudStack's response classes, and
the reconciler's snapshot reads them: a field renamed on either side fails here.

FIELDS are the @SerializedName values (ApiConstants resolved) of apache/cloudstack's classes in
api/src/main/java/org/apache/cloudstack/api/response/, the part a reconciliation pass may see."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kvmeter.collector.cs_snapshot import LISTS, parse_snapshot, snapshot_from_json, snapshot_to_json
from tests.harness import cloudstack_api as api

T0 = 1_715_680_800_000  # 2024-05-14T10:00:00Z

FIELDS: dict[str, frozenset[str]] = {
    "UserVmResponse": frozenset(
        "id name displayname account userid username projectid project domainid domain created state "
        "haenable groupid group zoneid zonename hostid hostname templateid templatename "
        "templatedisplaytext passwordenabled isoid isoname isodisplaytext serviceofferingid "
        "serviceofferingname diskofferingid diskofferingname forvirtualnetwork cpunumber cpuspeed "
        "memory vgpu cpuused networkkbsread networkkbswrite guestosid rootdeviceid rootdevicetype "
        "securitygroup password nic hypervisor publicipid publicip instancename details "
        "readonlyuidetails keypair affinitygroup displayvm isdynamicallyscalable servicestate "
        "ostypeid osdisplayname tags".split()
    ),
    "DomainRouterResponse": frozenset(
        "id zoneid zonename dns1 dns2 ip6dns1 ip6dns2 networkdomain gateway name podid podname hostid "
        "hostname hypervisor linklocalip linklocalmacaddress linklocalnetmask linklocalnetworkid "
        "publicip publicmacaddress publicnetmask publicnetworkid guestipaddress guestmacaddress "
        "guestnetmask guestnetworkid guestnetworkname templateid templatename created state account "
        "projectid project domainid domain serviceofferingid serviceofferingname isredundantrouter "
        "redundantstate version scriptsversion vpcid vpcname role nic requiresupgrade".split()
    ),
    "IPAddressResponse": frozenset(
        "id ipaddress allocated zoneid zonename issourcenat account projectid project domainid domain "
        "forvirtualnetwork vlanid vlanname isstaticnat issystem virtualmachineid vmipaddress "
        "virtualmachinename virtualmachinedisplayname associatednetworkid associatednetworkname "
        "networkid state physicalnetworkid purpose vpcid vpcname tags isportable fordisplay".split()
    ),
    "NetworkResponse": frozenset(
        "id name displaytext broadcastdomaintype traffictype gateway netmask cidr zoneid zonename "
        "networkofferingid networkofferingname issystem state related broadcasturi dns1 dns2 type vlan "
        "acltype subdomainaccess account projectid project domainid domain isdefault service "
        "networkdomain physicalnetworkid restartrequired vpcid vpcname tags details created".split()
    ),
    "AccountResponse": frozenset(
        "id name accounttype roleid roletype rolename domainid domain domainpath defaultzoneid state "
        "created user networkdomain accountdetails isdefault".split()
    ),
    "DomainResponse": frozenset(
        "id name level parentdomainid parentdomainname haschild networkdomain path state created".split()
    ),
    "ServiceOfferingResponse": frozenset(
        "id name displaytext cpunumber cpuspeed memory created storagetype provisioningtype offerha "
        "limitcpuuse isvolatile storagetags domainid domain zoneid zone hosttags issystem defaultuse "
        "systemvmtype networkrate serviceofferingdetails iscustomized dynamicscalingenabled".split()
    ),
    "VlanIpRangeResponse": frozenset(
        "id forvirtualnetwork zoneid vlan account domainid domain domainpath podid podname description "
        "gateway netmask cidr startip endip networkid projectid project physicalnetworkid startipv6 "
        "endipv6 ip6gateway ip6cidr forsystemvms fornsx".split()
    ),
}

# What each list command answers with: (response class, the object name it sets on each item)
COMMANDS = {
    "listVirtualMachines": ("UserVmResponse", "virtualmachine"),
    "listRouters": ("DomainRouterResponse", "router"),
    "listPublicIpAddresses": ("IPAddressResponse", "publicipaddress"),
    "listNetworks": ("NetworkResponse", "network"),
    "listAccounts": ("AccountResponse", "account"),
    "listDomains": ("DomainResponse", "domain"),
    "listServiceOfferings": ("ServiceOfferingResponse", "serviceoffering"),
    "listVlanIpRanges": ("VlanIpRangeResponse", "vlaniprange"),
}


def cloud() -> dict[str, list[dict[str, Any]]]:
    return {
        "listVirtualMachines": [
            api.vm("vm-1", "web-1", "alice", "Running", "small", T0, cpu=2, memory=2048),
            api.custom_vm("vm-2", "web-2", "alice", "Stopped", "custom", T0, cpu=4, memory=8192),
            api.vm("vm-3", "proj-vm", "PrjAcct-p", "Running", "small", T0, project_id="proj-1"),
        ],
        "listRouters": [
            api.router("r-1", "r-5-VM", network_id="net-1", created_ms=T0, owner="alice"),
            api.router("r-2", "r-6-VM", vpc_id="vpc-1", created_ms=T0),
        ],
        "listPublicIpAddresses": [api.public_ip("ip-1", "203.0.113.7", "alice", T0)],
        "listNetworks": [
            api.network("net-1", "alice-net", "alice"),
            api.network("net-2", "v", "bob", vpc_id="vpc-1"),
        ],
        "listAccounts": [api.account("acct-a", "alice"), api.account("acct-b", "bob")],
        "listDomains": [api.domain()],
        "listServiceOfferings": [
            api.offering("small", "Small", 2, 2048),
            api.offering("custom", "Custom", None, None),
        ],
        "listVlanIpRanges": [api.vlan_range("v-1", "vlan://100"), api.vlan_range("v-2", "300", public=False)],
    }


def test_the_lists_are_cloudstacks_object_names() -> None:
    assert {command: name for command, (_, name) in COMMANDS.items()} == LISTS


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_doubles_items_use_only_the_response_classes_fields(command: str) -> None:
    cls = COMMANDS[command][0]
    for item in cloud()[command]:
        unknown = set(item) - FIELDS[cls]
        assert not unknown, f"{command}: {sorted(unknown)} are no fields of {cls}"


def test_the_snapshot_reads_every_field_it_needs_by_cloudstacks_names() -> None:
    snap = parse_snapshot(cloud(), T0 + 1)
    vm, custom = snap.vms["vm-1"], snap.vms["vm-2"]
    assert (vm.name, vm.state, vm.account, vm.domain_id, vm.offering, vm.cpu, vm.memory, vm.zone) == (
        "web-1", "Running", "alice", api.ROOT, "small", 2, 2048, "zone-1",
    )  # fmt: skip
    assert vm.created_ms == T0
    assert (custom.offering, custom.cpu, custom.memory, custom.custom) == ("custom", 4, 8192, True)
    assert not vm.custom
    assert snap.vms["vm-3"].project_id == "proj-1"
    r1, r2 = snap.routers["r-1"], snap.routers["r-2"]
    assert (r1.network_id, r1.vpc_id, r1.created_ms, r2.vpc_id, r2.state) == (
        "net-1",
        "",
        T0,
        "vpc-1",
        "Running",
    )
    ip = snap.ips["ip-1"]
    assert (ip.address, ip.state, ip.account, ip.allocated_ms, ip.zone) == (
        "203.0.113.7",
        "Allocated",
        "alice",
        T0,
        "zone-1",
    )
    assert (snap.networks["net-2"].account, snap.networks["net-2"].vpc_id) == ("bob", "vpc-1")
    assert snap.account_uuid("alice", api.ROOT) == "acct-a"
    assert (snap.domains[api.ROOT].name, snap.domains[api.ROOT].path) == ("ROOT", "ROOT")
    small, customized = snap.offerings["small"], snap.offerings["custom"]
    assert (small.cpu, small.memory, small.customized) == (2, 2048, False)
    assert (customized.cpu, customized.memory, customized.customized) == (None, None, True)
    public, shared = snap.vlans["v-1"], snap.vlans["v-2"]
    assert (public.vlan, public.public, public.zone, shared.vlan, shared.public) == (
        "vlan://100", True, "zone-1", "300", False,
    )  # fmt: skip
    assert snapshot_from_json(snapshot_to_json(snap)) == snap


def test_a_snapshot_kept_before_custom_offerings_still_loads() -> None:
    """Snapshots kept by an earlier release lack the newer fields: their defaults apply."""
    doc = json.loads(snapshot_to_json(parse_snapshot(cloud(), T0)))
    for item in doc["vms"].values():
        del item["custom"]
    for item in doc["offerings"].values():
        del item["customized"]
    back = snapshot_from_json(json.dumps(doc))
    assert back.vms["vm-2"].custom is False
    assert back.offerings["custom"].customized is False
    assert back.vms["vm-2"].cpu == 4


def test_a_snapshot_kept_before_vlan_ranges_still_loads() -> None:
    """A snapshot kept by a release that did not read listVlanIpRanges has no `vlans`: none."""
    doc = json.loads(snapshot_to_json(parse_snapshot(cloud(), T0)))
    del doc["vlans"]
    assert snapshot_from_json(json.dumps(doc)).vlans == {}
