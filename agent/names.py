"""CloudStack's libvirt domain names: who a domain is, from its name alone.

CloudStack names KVM domains (``VirtualMachineName.java``) as

* ``i-<accountId>-<vmId>-<instance>``  user VMs,
* ``r-<id>-<instance>``                virtual routers,
* ``s-<id>-<instance>``                secondary storage VMs,
* ``v-<id>-<instance>``                console proxies,

where ``<instance>`` is the global setting ``instance.name`` (default ``VM``). Anything else is
``other``: the agent still meters it, it just cannot name an owner from the name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from re import Pattern

USER_VM = "user_vm"
VIRTUAL_ROUTER = "virtual_router"
SYSTEM_VM = "system_vm"
OTHER = "other"

DEFAULT_INSTANCE_SUFFIX = "VM"

# System VM prefixes -> what kind of system VM (kept for logs and reports).
_SYSTEM_PREFIXES = {"s": "secondary_storage", "v": "console_proxy"}


@dataclass(frozen=True)
class DomainName:
    """What a domain name says: its kind and, when the name carries them, the CloudStack ids."""

    kind: str  # user_vm, virtual_router, system_vm, other
    account_id: str | None = None  # user VMs only
    vm_id: str | None = None  # the VM's (or router's, or system VM's) numeric id
    role: str | None = None  # system VMs: secondary_storage or console_proxy


_cache: dict[str, tuple[Pattern[str], Pattern[str]]] = {}


def _patterns(instance_suffix: str) -> tuple[Pattern[str], Pattern[str]]:
    compiled = _cache.get(instance_suffix)
    if compiled is None:
        suffix = re.escape(instance_suffix)
        compiled = (
            re.compile(rf"i-(\d+)-(\d+)-{suffix}"),
            re.compile(rf"([rsv])-(\d+)-{suffix}"),
        )
        _cache[instance_suffix] = compiled
    return compiled


def parse_domain_name(name: str, instance_suffix: str = DEFAULT_INSTANCE_SUFFIX) -> DomainName:
    """Classify a libvirt domain name.

    ``instance_suffix`` is CloudStack's ``instance.name``; a name with another suffix is ``other``
    (it belongs to another CloudStack installation or to nobody we know).
    """
    if not instance_suffix:
        raise ValueError("instance_suffix must not be empty")
    user_vm, system = _patterns(instance_suffix)
    match = user_vm.fullmatch(name)
    if match:
        return DomainName(USER_VM, account_id=match.group(1), vm_id=match.group(2))
    match = system.fullmatch(name)
    if match:
        prefix, vm_id = match.group(1), match.group(2)
        if prefix == "r":
            return DomainName(VIRTUAL_ROUTER, vm_id=vm_id)
        return DomainName(SYSTEM_VM, vm_id=vm_id, role=_SYSTEM_PREFIXES[prefix])
    return DomainName(OTHER)
