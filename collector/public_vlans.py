"""Public VLANs the agents type otherwise. CloudStack puts a tagged public network on a
`br<pif>-<vlan>` bridge as it does a guest VLAN, which the agent's default [traffic] rules type
`guest`: without a `vlan` rule for its public VLANs (`type = "public"`) a zone's public bytes are
never billed as public, and nothing else would say so. The reconciler learns the zone's public
VLANs from CloudStack (listVlanIpRanges, forvirtualnetwork) and reports the agents' NICs placed
on one but typed otherwise; it never re-types them: the agent's rules are the declared source of
a measure's type, and a VLAN id is not unique across zones or physical networks (a guest VLAN of
another zone would be billed as public).

    public_vlan_zones(ranges) -> {VLAN id: zones}    # pure
    mistyped(placed, public) -> {(host, vlan, type): NICs}   # pure
    Placements.observe(batches, now) / .current(now) # the inventories' NICs, by domain
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Container, Iterable, Mapping, Sequence

from kvmeter.collector import decode
from kvmeter.collector.cs_snapshot import VlanRange
from kvmeter.proto import pb

PUBLIC = "public"
# A domain's NICs are reported every agent.inventory_every polls (60: 10 minutes by default)
# changed or not, and when they change: one not reported for hours has left (its host gone; a
# domain that stops or leaves says so).
HORIZON_MS = 3 * 3_600_000
_LEFT = {pb.SHUTOFF, pb.CRASHED, pb.GONE}

Key = tuple[str, int, str]  # host, VLAN id, traffic type


def vlan_id(tag: str) -> int | None:
    """A VlanIpRangeResponse `vlan` (Vlan.getVlanTag): "vlan://100" or "100"; None for
    "untagged" (no VLAN device: a bridge the defaults already place by name) and anything else."""
    text = tag.strip().lower().removeprefix("vlan://")
    return int(text) if text.isdigit() and 0 < int(text) < 4095 else None


def public_vlan_zones(ranges: Iterable[VlanRange]) -> dict[int, list[str]]:
    """The VLAN ids of the public (virtual network) IP ranges, each with the zones it is public in
    (a VLAN id is a zone's: the log names them)."""
    zones: dict[int, set[str]] = {}
    for r in ranges:
        vlan = vlan_id(r.vlan) if r.public else None
        if vlan is not None:
            zones.setdefault(vlan, set()).add(r.zone)
    return {vlan: sorted(names) for vlan, names in zones.items()}


def mistyped(placed: Mapping[Key, int], public: Container[int]) -> dict[Key, int]:
    """The placements on a public VLAN typed other than public, with their NIC counts."""
    return {key: n for key, n in placed.items() if key[1] in public and key[2] != PUBLIC}


class Placements:
    """Where the agents last said each domain's NICs sit: host, VLAN and traffic type."""

    def __init__(self, horizon_ms: int = HORIZON_MS) -> None:
        self.horizon_ms = horizon_ms
        self._by_domain: dict[str, tuple[int, list[Key]]] = {}
        self._pruned_ms = 0

    def observe(self, batches: Sequence[decode.DecodedBatch], now: int) -> None:
        if now - self._pruned_ms >= self.horizon_ms:  # bounded without a reconciler reading it
            self._prune(now)
        for b in batches:
            for dom in b.inventory:
                key = dom.uuid or dom.name
                if not key:
                    continue
                if dom.state in _LEFT:
                    self._by_domain.pop(key, None)
                    continue
                nics = [
                    (b.host_id, n.vlan_id, decode.TRAFFIC_TYPES.get(n.traffic_type, ""))
                    for n in dom.nics
                    if n.vlan_id
                ]
                self._by_domain[key] = (now, nics)

    def current(self, now: int) -> Counter[Key]:
        """NICs per (host, VLAN, type), of the domains reported within the horizon."""
        self._prune(now)
        return Counter(key for _, nics in self._by_domain.values() for key in nics)

    def _prune(self, now: int) -> None:
        self._pruned_ms = now
        for domain in [d for d, (seen, _) in self._by_domain.items() if now - seen > self.horizon_ms]:
            del self._by_domain[domain]
