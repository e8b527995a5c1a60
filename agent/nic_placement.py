"""A NIC's placement where the kernel does not tell it: an Open vSwitch port's master is the
datapath (ovs-system), whichever OVS bridge and VLAN tag the port has; libvirt's XML says those
(``<source bridge='br-int'/>``, ``<vlan><tag id='204'/></vlan>``). Pure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from kvmeter.agent.model import LinkPlacement, NicInfo
from kvmeter.agent.traffic import TrafficRules

_KEPT = 4096  # bounded: a host has few bridges and tags


class NicPlacements:
    """A link's placement with neither bridge nor uplink completed by its NIC's bridge and VLAN
    tag, classified by the traffic rules in force; one object per distinct answer, so the
    attribution and measure templates built on it are kept from plan to plan."""

    def __init__(self, rules: Callable[[], TrafficRules]) -> None:
        self._rules = rules
        self._for: TrafficRules | None = None  # the rules `_known` was classified by
        self._known: dict[tuple[LinkPlacement, str | None, int | None], LinkPlacement] = {}

    def __call__(self, placement: LinkPlacement, nic: NicInfo) -> LinkPlacement:
        if placement.bridge is not None or placement.uplink is not None:
            return placement  # the kernel's answer (every Linux bridge's port)
        if nic.bridge is None and nic.vlan_tag is None:
            return placement
        rules = self._rules()
        if rules is not self._for:  # reloaded: classified again
            self._for, self._known = rules, {}
        where = (placement, nic.bridge, nic.vlan_tag)
        known = self._known.get(where)
        if known is None:
            traffic = rules.classify(nic.bridge, nic.vlan_tag, placement.vxlan_vni)
            known = replace(placement, bridge=nic.bridge, vlan_id=nic.vlan_tag, traffic_type=traffic)
            if len(self._known) < _KEPT:
                self._known[where] = known
        return known
