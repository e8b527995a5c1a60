"""Traffic type of a host interface, from where it sits: bridge name, VLAN id, VXLAN VNI.

Rules are data. Each rule names a traffic type and one or more conditions (a bridge-name glob,
a set of VLAN ids, a set of VNIs); a rule matches when all its conditions hold, and the first
matching rule wins. Operator rules from the config come first, CloudStack's defaults after them
(unless the config switches the defaults off), and ``fallback`` (default ``unknown``) is what is
left. Pure: no I/O.

Config shape (the agent's ``[traffic]`` table)::

    defaults = true           # keep CloudStack's defaults after the rules below
    fallback = "unknown"
    [[traffic.rules]]
    vlan = "100-199,300"      # int, "a-b", "a,b-c" or a list of those
    type = "public"
    [[traffic.rules]]
    bridge = "brbond1-*"      # fnmatch glob, case-sensitive
    type = "storage"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from kvmeter.agent.model import TRAFFIC_TYPES

VLAN_RANGE = (1, 4094)
VNI_RANGE = (0, 2**24 - 1)

Ranges = tuple[tuple[int, int], ...]


class TrafficRulesError(ValueError):
    """The traffic rules in the config are wrong; ``problems`` lists every one of them."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid traffic rules: " + "; ".join(self.problems))


@dataclass(frozen=True)
class TrafficRule:
    """One rule: ``traffic_type`` when every given condition holds (None = no condition)."""

    traffic_type: str
    bridge: str | None = None
    vlans: Ranges | None = None
    vnis: Ranges | None = None

    def matches(self, bridge: str | None, vlan_id: int | None, vxlan_vni: int | None) -> bool:
        if self.bridge is not None and (bridge is None or not fnmatchcase(bridge, self.bridge)):
            return False
        if self.vlans is not None and not _in_ranges(vlan_id, self.vlans):
            return False
        return self.vnis is None or _in_ranges(vxlan_vni, self.vnis)


def _in_ranges(value: int | None, ranges: Ranges) -> bool:
    return value is not None and any(low <= value <= high for low, high in ranges)


# CloudStack on KVM (BridgeVifDriver, agent.properties defaults): cloud0 is the link-local
# control bridge, cloudbr0 the public label bridge, cloudbr1 the private (management) one;
# brvx-<vni> carry VXLAN guest networks, br<pif>-<vlan> (legacy cloudVirBr<vlan>) VLAN ones.
# A public VLAN also lands on br<pif>-<vlan>: the operator adds a VLAN rule for its range.
CLOUDSTACK_DEFAULTS: tuple[TrafficRule, ...] = (
    TrafficRule("control", bridge="cloud0"),
    TrafficRule("guest", bridge="brvx-*"),
    TrafficRule("public", bridge="cloudbr0"),
    TrafficRule("management", bridge="cloudbr1"),
    TrafficRule("guest", bridge="cloudVirBr*"),
    TrafficRule("guest", bridge="br*-*"),
)


class TrafficRules:
    """An ordered rule list; :meth:`classify` returns the first match's type or ``fallback``."""

    def __init__(self, rules: Sequence[TrafficRule], fallback: str = "unknown") -> None:
        problems = [
            f"unknown traffic type {r.traffic_type!r}" for r in rules if r.traffic_type not in TRAFFIC_TYPES
        ]
        if fallback not in TRAFFIC_TYPES:
            problems.append(f"unknown fallback traffic type {fallback!r}")
        if problems:
            raise TrafficRulesError(problems)
        self.rules: tuple[TrafficRule, ...] = tuple(rules)
        self.fallback = fallback
        # The rules never change and a host has few distinct (bridge, VLAN, VNI): every NIC is
        # classified again when the link map changes, so the answers are kept.
        self._known: dict[tuple[str | None, int | None, int | None], str] = {}

    def classify(self, bridge: str | None, vlan_id: int | None, vxlan_vni: int | None) -> str:
        """Traffic type for an interface on ``bridge`` whose uplink has ``vlan_id`` / ``vxlan_vni``."""
        where = (bridge, vlan_id, vxlan_vni)
        known = self._known.get(where)
        if known is None:
            known = next((r.traffic_type for r in self.rules if r.matches(*where)), self.fallback)
            if len(self._known) < 4096:  # bounded: bridge names come from the host
                self._known[where] = known
        return known

    def __repr__(self) -> str:
        return f"TrafficRules({list(self.rules)!r}, fallback={self.fallback!r})"

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> TrafficRules:
        """Build rules from the config's ``[traffic]`` table; raise :class:`TrafficRulesError`
        naming every bad entry at once."""
        config = dict(config or {})
        problems: list[str] = []
        for key in sorted(set(config) - {"rules", "defaults", "fallback"}):
            problems.append(f"unknown key {key!r}")
        use_defaults = config.get("defaults", True)
        if not isinstance(use_defaults, bool):
            problems.append(f"'defaults' must be true or false, not {use_defaults!r}")
        fallback = config.get("fallback", "unknown")
        if fallback not in TRAFFIC_TYPES:
            problems.append(f"'fallback' must be one of {', '.join(TRAFFIC_TYPES)}, not {fallback!r}")
        raw_rules = config.get("rules", [])
        rules: list[TrafficRule] = []
        if not isinstance(raw_rules, list):
            problems.append("'rules' must be a list of tables")
            raw_rules = []
        for index, raw in enumerate(raw_rules):
            rule = _rule_from_config(raw, f"rules[{index}]", problems)
            if rule is not None:
                rules.append(rule)
        if problems:
            raise TrafficRulesError(problems)
        if use_defaults:
            rules.extend(CLOUDSTACK_DEFAULTS)
        return cls(rules, fallback=fallback)


def _rule_from_config(raw: Any, where: str, problems: list[str]) -> TrafficRule | None:
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: must be a table")
        return None
    before = len(problems)
    for key in sorted(set(raw) - {"type", "bridge", "vlan", "vni"}):
        problems.append(f"{where}: unknown key {key!r}")
    traffic_type = raw.get("type")
    if traffic_type not in TRAFFIC_TYPES:
        problems.append(f"{where}: 'type' must be one of {', '.join(TRAFFIC_TYPES)}, not {traffic_type!r}")
    bridge = raw.get("bridge")
    if bridge is not None and (not isinstance(bridge, str) or not bridge):
        problems.append(f"{where}: 'bridge' must be a non-empty glob string")
    vlans = _ranges(raw.get("vlan"), VLAN_RANGE, f"{where}: 'vlan'", problems)
    vnis = _ranges(raw.get("vni"), VNI_RANGE, f"{where}: 'vni'", problems)
    if bridge is None and "vlan" not in raw and "vni" not in raw:
        problems.append(
            f"{where}: needs at least one of 'bridge', 'vlan', 'vni' (use 'fallback' for the rest)"
        )
    if len(problems) > before:
        return None
    return TrafficRule(str(traffic_type), bridge=bridge, vlans=vlans, vnis=vnis)


def parse_ranges(value: Any, bounds: tuple[int, int]) -> Ranges:
    """``100``, ``"100-199,300"`` or a list of those -> ((100, 199), (300, 300)); ValueError if bad."""
    items = value if isinstance(value, list) else [value]
    ranges: list[tuple[int, int]] = []
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"{item!r} is not a number or range")
        if isinstance(item, int):
            ranges.append((item, item))
            continue
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{item!r} is not a number or range")
        for part in item.split(","):
            low_text, sep, high_text = part.strip().partition("-")
            try:
                low = int(low_text)
                high = int(high_text) if sep else low
            except ValueError:
                raise ValueError(f"{part.strip()!r} is not a number or range") from None
            ranges.append((low, high))
    if not ranges:
        raise ValueError("empty range list")
    for low, high in ranges:
        if low > high:
            raise ValueError(f"range {low}-{high} runs backwards")
        if low < bounds[0] or high > bounds[1]:
            raise ValueError(f"{low}-{high} is outside {bounds[0]}-{bounds[1]}")
    return tuple(ranges)


def _ranges(value: Any, bounds: tuple[int, int], where: str, problems: list[str]) -> Ranges | None:
    if value is None:
        return None
    try:
        return parse_ranges(value, bounds)
    except ValueError as exc:
        problems.append(f"{where}: {exc}")
        return None


DEFAULT_RULES = TrafficRules(CLOUDSTACK_DEFAULTS)
