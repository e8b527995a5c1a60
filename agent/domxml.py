"""Libvirt domain XML -> what the agent needs: identity, NICs, CloudStack metadata, sysinfo.

Pure parsing, no libvirt calls: :mod:`kvmeter.agent.inventory` feeds it ``XMLDesc()`` text.

CloudStack (PR #11061, mid-2025) writes instance and owner data into ``<metadata>``; its namespace
and element names are not pinned down, so :func:`flatten_metadata` reads any element tree by local
names into one flat ``Dict[str, str]`` (see there for how keys are built).
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field

from kvmeter.agent.model import DomainInfo, NicInfo
from kvmeter.agent.names import parse_domain_name


class DomainXmlError(ValueError):
    """The domain XML cannot be read (malformed, or lacks name/uuid)."""


@dataclass(frozen=True)
class ParsedDomain:
    """The parts of one domain's XML the agent uses."""

    uuid: str  # lower-case, as libvirt prints it
    name: str
    nics: tuple[NicInfo, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)  # flattened <metadata>, see flatten_metadata
    sysinfo: dict[str, str] = field(default_factory=dict)  # <sysinfo type='smbios'><system> entries
    domain_id: int | None = None  # <domain id=...>: libvirt's id of the running QEMU process


def local_name(tag: str) -> str:
    """``{namespace}name`` -> ``name``."""
    return tag.rsplit("}", 1)[-1]


def parse_domain_xml(xml_text: str) -> ParsedDomain:
    """Parse ``virDomainGetXMLDesc`` output. Raises :class:`DomainXmlError` on unusable input."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        raise DomainXmlError(f"malformed domain XML: {exc}") from None
    if local_name(root.tag) != "domain":
        raise DomainXmlError(f"not a domain XML document (root element <{local_name(root.tag)}>)")
    name = (root.findtext("name") or "").strip()
    uuid = (root.findtext("uuid") or "").strip().lower()
    if not name or not uuid:
        raise DomainXmlError(f"domain XML lacks <name> or <uuid> (name={name!r}, uuid={uuid!r})")
    devices = root.find("devices")
    interfaces = devices.findall("interface") if devices is not None else []
    metadata_element = root.find("metadata")
    return ParsedDomain(
        uuid=uuid,
        name=name,
        nics=tuple(parse_interface(element) for element in interfaces),
        metadata=flatten_metadata(metadata_element) if metadata_element is not None else {},
        sysinfo=_sysinfo(root),
        domain_id=_domain_id(root.get("id")),
    )


def domain_info(parsed: ParsedDomain, state: str, instance_suffix: str) -> DomainInfo:
    """The inventory's record of a parsed domain in `state`: its kind and ids from its name."""
    name = parse_domain_name(parsed.name, instance_suffix)
    return DomainInfo(
        uuid=parsed.uuid,
        name=parsed.name,
        state=state,
        kind=name.kind,
        nics=parsed.nics,
        account_id=name.account_id,
        vm_id=name.vm_id,
        owner=parsed.metadata,
        domain_id=parsed.domain_id,
    )


def _domain_id(text: str | None) -> int | None:
    """A running domain's id (a new one each time its QEMU starts: a start, a migration in);
    None for an inactive domain (absent or -1) or one that cannot be read."""
    try:
        value = int(text) if text is not None else -1
    except ValueError:
        return None
    return value if value >= 0 else None


def parse_interface(element: ET.Element) -> NicInfo:
    """One ``<interface>``: bridge, network, direct (macvtap), vhostuser, ethernet, hostdev, ..."""
    nic_type = element.get("type", "")
    mac = _attr(element, "mac", "address")
    source = element.find("source")
    bridge = network = source_dev = None
    if source is not None:
        # type='network' in live XML also names the network's bridge.
        bridge = source.get("bridge") or None
        network = source.get("network") or None
        if nic_type == "direct":
            source_dev = source.get("dev") or None
    model = _attr(element, "model", "type")
    # Values shared by thousands of NICs (a host's few bridges, types and models): one string
    # each, not one per NIC (about 1.7 MB at 10,000 NICs).
    return NicInfo(
        mac=(mac or "").lower(),
        device=_attr(element, "target", "dev"),
        nic_type=sys.intern(nic_type),
        bridge=sys.intern(bridge) if bridge else None,
        network=sys.intern(network) if network else None,
        model=sys.intern(model) if model else None,
        source_dev=source_dev,
        vlan_tag=_vlan_tag(element),
    )


def _attr(element: ET.Element, child: str, attribute: str) -> str | None:
    found = element.find(child)
    if found is None:
        return None
    return found.get(attribute) or None


def _vlan_tag(element: ET.Element) -> int | None:
    tag = element.find("vlan/tag")
    if tag is None:
        return None
    try:
        return int(tag.get("id", ""))
    except ValueError:
        return None


def _sysinfo(root: ET.Element) -> dict[str, str]:
    entries: dict[str, str] = {}
    for sysinfo in root.findall("sysinfo"):
        if sysinfo.get("type", "smbios") != "smbios":
            continue
        for entry in sysinfo.findall("system/entry"):
            key = entry.get("name")
            if key and entry.text and entry.text.strip():
                entries[key] = entry.text.strip()
    return entries


def flatten_metadata(metadata: ET.Element) -> dict[str, str]:
    """Flatten ``<metadata>`` into ``{key: text}`` by element local names.

    * Each value is a leaf element's text or an attribute; its *path* is the chain of local names
      from the child of ``<metadata>`` down (an attribute is the last step; repeated siblings get
      ``name[i]``).
    * The key is the shortest tail of the path that no other value shares: ``ownerAccountUuid``
      when the name is unique, ``account.uuid`` vs ``domain.uuid`` when not. Attribute keys keep
      their element's name (``account.uuid``, never bare ``uuid``).
    * When one child of ``<metadata>`` is CloudStack's (its namespace or name says
      ``cloudstack``), only CloudStack's children are read; other tools' entries (libosinfo, ...)
      are left out.
    """
    wrappers = list(metadata)
    ours = [w for w in wrappers if "cloudstack" in w.tag.lower()]
    paths: list[tuple[tuple[str, ...], str, int]] = []  # (path, value, minimum key length)
    for wrapper in ours or wrappers:
        _collect(wrapper, (local_name(wrapper.tag),), paths)
    return _shortest_unique_keys(paths)


def _collect(element: ET.Element, path: tuple[str, ...], out: list[tuple[tuple[str, ...], str, int]]) -> None:
    for attribute, value in element.attrib.items():
        out.append(((*path, local_name(attribute)), value, 2))
    children = list(element)
    counts = Counter(local_name(child.tag) for child in children)
    seen: Counter[str] = Counter()
    for child in children:
        name = local_name(child.tag)
        step = name
        if counts[name] > 1:
            step = f"{name}[{seen[name]}]"
            seen[name] += 1
        _collect(child, (*path, step), out)
    text = (element.text or "").strip()
    if text:
        out.append((path, text, 1))


def _shortest_unique_keys(paths: list[tuple[tuple[str, ...], str, int]]) -> dict[str, str]:
    result: dict[str, str] = {}
    for path, value, minimum in paths:
        for length in range(min(minimum, len(path)), len(path) + 1):
            tail = path[-length:]
            if sum(1 for other, _, _ in paths if other[-length:] == tail) == 1:
                break
        result[".".join(tail)] = value
    return result
