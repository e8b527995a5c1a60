"""libvirt test-driver node XML for tests: the same writer `kvmeter demo` uses."""

from kvmeter.pipeline.sim.simlibvirt import (
    CLOUDSTACK_HOST,
    ROUTER,
    SYSTEM_VM,
    USER_VM,
    Domain,
    Nic,
    domain_xml,
    tap_mac,
    write_node_xml,
)

__all__ = [
    "CLOUDSTACK_HOST",
    "ROUTER",
    "SYSTEM_VM",
    "USER_VM",
    "Domain",
    "Nic",
    "domain_xml",
    "tap_mac",
    "write_node_xml",
]
