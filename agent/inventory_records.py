"""The inventory of a batch as MeasureBatch.inventory records (wire bytes), kept per domain from
batch to batch. Pure, no I/O.

A domain's record is kept while the domain object, its NICs' placements and their ifindexes stay
the same: after a VM's taps come or go, only that VM's record is written again (the poll right
after link events sends the full inventory). And when only ifindexes changed (a tap made again
under a domain that stayed), it is written again from its own bytes: protobuf writes a
message's fields in the order of their numbers, so a NIC's ifindex (field 10) comes last in the
NIC and the NICs (field 8) last in the domain; a record keeps where the bytes before each lie.
The bytes decode exactly as MeasureBatch(inventory=[domain_inventory(...) for each domain])
serialises (tests/unit/test_inventory_records.py: byte for byte).

`version` says when the records changed: the agent sends the inventory when it differs from the
version it last sent, with no copy of every placement and ifindex kept to compare against.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Mapping, Set
from operator import attrgetter, is_, itemgetter
from typing import NamedTuple

from kvmeter.agent.measures import domain_inventory
from kvmeter.agent.model import DomainInfo, LinkPlacement
from kvmeter.agent.varint import varint, varint_size

_INVENTORY_TAG = b"\x42"  # MeasureBatch.inventory = 8, length-delimited
_NIC_TAG = b"\x42"  # DomainInventory.nics = 8, length-delimited: the domain's last field
_IFINDEX_TAG = b"\x50"  # NicInventory.ifindex = 10, varint: the NIC's last field


class _Kept(NamedTuple):
    """A domain's record and what it was written from."""

    domain: DomainInfo
    where: tuple[object, ...]  # its NIC devices' placements, then their ifindexes (see _kept)
    record: bytes
    # Where the domain's fields before its NICs, then each NIC's before its ifindex, lie in
    # `record` (start and end of each, as array("I") bytes): a few bytes a domain, no copies
    cuts: bytes


class InventoryRecords:
    """The inventory records of a batch (see the module's docstring)."""

    def __init__(self) -> None:
        self._records: dict[str, _Kept] = {}
        # The last call's domains (touched or not), their uuids and the uuid -> domain map
        self._domains: tuple[tuple[DomainInfo, ...], list[str], dict[str, DomainInfo]] | None = None
        # One more whenever an encode's records are not the last encode's (a record written
        # again, added, dropped or moved): the same version, the same bytes
        self.version = 0

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
        changed = False
        if touched is not None:
            changed, joined = self._encode_touched(domains, placements, ifindexes, touched)
            if joined is not None:
                self.version += changed
                return joined
        cache, kept, records = self._records, {}, []
        for domain in domains:
            entry = kept[domain.uuid] = _kept(cache.get(domain.uuid), domain, placements, ifindexes)
            records.append(entry.record)
        uuids = list(map(_UUID, domains))
        self._domains = (domains, uuids, dict(zip(uuids, domains)))
        # a record written again is another object: compared by identity, in order
        changed = changed or len(kept) != len(cache) or not all(map(is_, kept.values(), cache.values()))
        self.version += changed
        self._records = kept
        return b"".join(records)

    def _encode_touched(
        self,
        domains: tuple[DomainInfo, ...],
        placements: Mapping[str, LinkPlacement],
        ifindexes: Mapping[str, int],
        touched: Set[str],
    ) -> tuple[bool, bytes | None]:
        """(whether a record changed, the records; None when every domain is to be looked at)."""
        cache = self._records
        last = self._domains
        changed = False
        if last is not None and len(last[0]) == len(domains) and all(map(is_, last[0], domains)):
            uuids, by_uuid = last[1], last[2]  # the same domain objects: no pass to map them
        else:
            uuids = list(map(_UUID, domains))
            by_uuid = dict(zip(uuids, domains))
            changed = last is None or uuids != last[1]
            self._domains = (domains, uuids, by_uuid)
        for uuid in touched:
            domain = by_uuid.get(uuid)
            known = cache.get(uuid)
            if domain is None:
                if known is not None:
                    del cache[uuid]
                    changed = True
                continue
            record = cache[uuid] = _kept(known, domain, placements, ifindexes)
            changed = changed or record is not known
        if len(cache) != len(uuids):
            return changed, None  # not what the last call left: every domain is looked at
        try:
            return changed, b"".join(map(_RECORD, map(cache.__getitem__, uuids)))
        except KeyError:
            return changed, None


_UUID = attrgetter("uuid")
_RECORD = itemgetter(2)


def _kept(
    known: _Kept | None,
    domain: DomainInfo,
    placements: Mapping[str, LinkPlacement],
    ifindexes: Mapping[str, int],
) -> _Kept:
    """A domain's record: `known` when nothing in it changed; when only ifindexes changed, from
    known's bytes; else from protobuf's."""
    devices = [nic.device for nic in domain.nics if nic.device]
    where = (*map(placements.get, devices), *map(ifindexes.get, devices))
    n = len(devices)
    # tuples compare their items by identity first, then by ==
    if known is not None and known.domain is domain and known.where[:n] == where[:n]:
        if known.where == where:
            return known
        cuts = array("I")
        cuts.frombytes(known.cuts)
        same_sizes = _same_sizes(known, domain, cuts, where, n)
        if same_sizes is not None:
            return same_sizes
        record = known.record
        head = record[cuts[0] : cuts[1]]
        nics = [record[cuts[i] : cuts[i + 1]] for i in range(2, len(cuts), 2)]
    else:
        message = domain_inventory(domain, placements, {})  # no ifindexes
        nics = [nic.SerializeToString() for nic in message.nics]
        message.ClearField("nics")
        head = message.SerializeToString()
    return _written(domain, where, head, nics, ifindexes)


def _same_sizes(
    known: _Kept, domain: DomainInfo, cuts: array[int], where: tuple[object, ...], n: int
) -> _Kept | None:
    """`known` with the new ifindexes (where[n:]) written over the old ones, when each takes as
    many bytes as the one it replaces (a tap made again: ifindexes grow by a few): no length
    and no cut moves. None when one does not (or a NIC gains or loses its ifindex)."""
    record: bytearray | None = None
    pairs = zip(known.where[n:], where[n:])
    at = 3  # cuts[at]: where a NIC's fields before its ifindex end
    for nic in domain.nics:
        if nic.device:
            old, new = next(pairs)
            if old != new:
                if not isinstance(old, int) or not isinstance(new, int):
                    return None
                field = varint(new)
                if len(field) != varint_size(old):
                    return None
                if record is None:
                    record = bytearray(known.record)
                start = cuts[at] + 1  # behind the ifindex's tag
                record[start : start + len(field)] = field
        at += 2
    return _Kept(domain, where, bytes(record) if record is not None else known.record, known.cuts)


def _written(
    domain: DomainInfo,
    where: tuple[object, ...],
    head: bytes,
    nics: list[bytes],
    ifindexes: Mapping[str, int],
) -> _Kept:
    """The record of `head` and `nics` (each NIC's fields before its ifindex), with the
    ifindexes of the NICs' devices."""
    parts = [head]
    cuts = [0, len(head)]  # in the body, moved behind the record's tag and length below
    size = len(head)
    for before, nic in zip(nics, domain.nics):
        ifindex = ifindexes.get(nic.device) if nic.device else None
        whole = before + _IFINDEX_TAG + varint(ifindex) if ifindex is not None else before
        length = varint(len(whole))
        start = size + 1 + len(length)
        cuts += (start, start + len(before))
        parts += (_NIC_TAG, length, whole)
        size = start + len(whole)
    body = b"".join(parts)
    prefix = _INVENTORY_TAG + varint(len(body))
    at = len(prefix)
    return _Kept(domain, where, prefix + body, array("I", [c + at for c in cuts]).tobytes())
