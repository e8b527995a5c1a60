"""The inventory of a batch as MeasureBatch.inventory records (wire bytes), kept per domain from
batch to batch. Pure, no I/O.

A domain's record is kept while the domain object, its NICs' placements and their ifindexes stay
the same: after a VM's taps come or go, only that VM's record is written again (the poll right
after link events sends the full inventory). And when only ifindexes changed (a tap made again
under a domain that stayed), it is written from the domain's shape: protobuf writes a message's
fields in the order of their numbers, so a NIC's ifindex (field 10) comes last in the NIC and the
NICs (field 8) last in the domain; the shape holds the bytes before each, built by protobuf. The
bytes decode exactly as MeasureBatch(inventory=[domain_inventory(...) for each domain])
serialises (tests/unit/test_inventory_records.py: byte for byte).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from operator import attrgetter, is_, itemgetter
from typing import NamedTuple

from kvmeter.agent.measures import domain_inventory
from kvmeter.agent.model import DomainInfo, LinkPlacement
from kvmeter.agent.varint import varint

_INVENTORY_TAG = b"\x42"  # MeasureBatch.inventory = 8, length-delimited
_NIC_TAG = b"\x42"  # DomainInventory.nics = 8, length-delimited: the domain's last field
_IFINDEX_TAG = b"\x50"  # NicInventory.ifindex = 10, varint: the NIC's last field


class _Shape(NamedTuple):
    """A domain's record less its NICs' ifindexes, for the placements it was built with."""

    domain: DomainInfo
    placements: tuple[LinkPlacement | None, ...]  # its NIC devices' (see _devices)
    head: bytes  # the domain's fields before its NICs
    nics: tuple[bytes, ...]  # each NIC's fields before its ifindex
    devices: tuple[str | None, ...]  # each NIC's device (None: no ifindex)


class _Kept(NamedTuple):
    shape: _Shape
    ifindexes: tuple[int | None, ...]  # its NIC devices'
    record: bytes


class InventoryRecords:
    """The inventory records of a batch (see the module's docstring)."""

    def __init__(self) -> None:
        self._records: dict[str, _Kept] = {}
        # The last call's domains (touched or not), their uuids and the uuid -> domain map
        self._domains: tuple[tuple[DomainInfo, ...], list[str], dict[str, DomainInfo]] | None = None

    def encode(
        self,
        domains: Iterable[DomainInfo],
        placements: Mapping[str, LinkPlacement],
        ifindexes: Mapping[str, int],
        touched: Set[str] | None = None,
    ) -> bytes:
        """`touched`: the only domains (uuids) that may differ from the last call's (their
        object, their NICs' placements or ifindexes), None for any: the others' records are
        taken as they are, without a Python step each."""
        domains = tuple(domains)
        if touched is not None:
            joined = self._encode_touched(domains, placements, ifindexes, touched)
            if joined is not None:
                return joined
        cache, kept, records = self._records, {}, []
        for domain in domains:
            entry = kept[domain.uuid] = _kept(cache.get(domain.uuid), domain, placements, ifindexes)
            records.append(entry.record)
        self._records = kept
        return b"".join(records)

    def _encode_touched(
        self,
        domains: tuple[DomainInfo, ...],
        placements: Mapping[str, LinkPlacement],
        ifindexes: Mapping[str, int],
        touched: Set[str],
    ) -> bytes | None:
        cache = self._records
        last = self._domains
        if last is not None and len(last[0]) == len(domains) and all(map(is_, last[0], domains)):
            uuids, by_uuid = last[1], last[2]  # the same domain objects: no pass to map them
        else:
            uuids = list(map(_UUID, domains))
            by_uuid = dict(zip(uuids, domains))
            self._domains = (domains, uuids, by_uuid)
        for uuid in touched:
            domain = by_uuid.get(uuid)
            if domain is None:
                cache.pop(uuid, None)
                continue
            cache[uuid] = _kept(cache.get(uuid), domain, placements, ifindexes)
        if len(cache) != len(uuids):
            return None  # not what the last call left: every domain is looked at
        try:
            return b"".join(map(_RECORD, map(cache.__getitem__, uuids)))
        except KeyError:
            return None


_UUID = attrgetter("uuid")
_RECORD = itemgetter(2)


def _kept(
    known: _Kept | None,
    domain: DomainInfo,
    placements: Mapping[str, LinkPlacement],
    ifindexes: Mapping[str, int],
) -> _Kept:
    """A domain's record: `known` when nothing in it changed, else from its shape (known's, when
    only ifindexes changed)."""
    devices = [nic.device for nic in domain.nics if nic.device]
    places = tuple(map(placements.get, devices))
    indexes = tuple(map(ifindexes.get, devices))
    if known is not None and known.shape.domain is domain and _same_items(known.shape.placements, places):
        if known.ifindexes == indexes:
            return known
        shape = known.shape
    else:
        shape = _shape(domain, placements, places)
    return _Kept(shape, indexes, _record(shape, ifindexes))


def _shape(
    domain: DomainInfo, placements: Mapping[str, LinkPlacement], places: tuple[LinkPlacement | None, ...]
) -> _Shape:
    message = domain_inventory(domain, placements, {})  # no ifindexes
    nics = tuple(nic.SerializeToString() for nic in message.nics)
    message.ClearField("nics")
    devices = tuple(nic.device or None for nic in domain.nics)
    return _Shape(domain, places, message.SerializeToString(), nics, devices)


def _record(shape: _Shape, ifindexes: Mapping[str, int]) -> bytes:
    parts = [shape.head]
    for nic, device in zip(shape.nics, shape.devices):
        ifindex = ifindexes.get(device) if device is not None else None
        if ifindex is not None:
            nic += _IFINDEX_TAG + varint(ifindex)
        parts += (_NIC_TAG, varint(len(nic)), nic)
    body = b"".join(parts)
    return _INVENTORY_TAG + varint(len(body)) + body


def _same_items(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    return len(a) == len(b) and all(x is y or x == y for x, y in zip(a, b))
