"""The inventory of a batch as MeasureBatch.inventory records (wire bytes), kept per domain from
batch to batch. Pure, no I/O.

A domain's record is kept while the domain object, its NICs' placements and their ifindexes stay
the same: after a VM's taps come or go, only that VM's record is written again, and only it
needs to go out (`since`). And when only ifindexes changed (a tap made again under a domain that
stayed), it is written again from its own bytes: protobuf writes a message's fields in the order
of their numbers, so a NIC's ifindex (field 10) comes last in the NIC and the NICs (field 8) last
in the domain; a record keeps where the bytes before each lie.
The bytes decode exactly as MeasureBatch(inventory=[domain_inventory(...) for each domain])
serialises (tests/unit/test_inventory_records.py: byte for byte).

`version` says when the records changed, and each record the version whose update wrote it: the
agent sends what was written since the version it last sent (`since`), and every record now and
then (`joined`), with no copy of every placement and ifindex kept to compare against.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Set
from operator import attrgetter, is_, itemgetter
from typing import NamedTuple

from kvmeter.agent.measures import domain_inventory
from kvmeter.agent.model import DomainInfo, LinkPlacement, new_tuple
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
    stamp: int  # the version of the update that wrote it


class InventoryRecords:
    """The inventory records of a batch (see the module's docstring)."""

    def __init__(self) -> None:
        self._records: dict[str, _Kept] = {}
        # The last update's domains (touched or not), their uuids and the uuid -> domain map
        self._domains: tuple[tuple[DomainInfo, ...], list[str], dict[str, DomainInfo]] | None = None
        # One more whenever an update's records are not the last update's (a record written
        # again, added, dropped or moved): the same version, the same bytes
        self.version = 0
        # Each record written, in order: its stamp (never decreasing) and its domain's uuid
        self._stamps: list[int] = []
        self._written: list[str] = []

    def update(
        self,
        domains: Iterable[DomainInfo],
        placements: Mapping[str, LinkPlacement],
        ifindexes: Mapping[str, int],
        touched: Set[str] | None = None,
    ) -> None:
        """The records of `domains`, in their order. `touched`: the only domains (uuids) that may
        differ from the last update's (their object, their NICs' placements or ifindexes), None
        for any: the others' records are kept as they are, without a Python step each."""
        domains = tuple(domains)
        stamp = self.version + 1  # the version if a record is written
        changed = False
        if touched is not None:
            changed, whole = self._update_touched(domains, placements, ifindexes, touched, stamp)
            if whole:
                self.version += changed
                self._trim_log()
                return
        cache, kept = self._records, {}
        for domain in domains:
            known = cache.get(domain.uuid)
            entry = kept[domain.uuid] = _kept(known, domain, placements, ifindexes, stamp)
            if entry is not known:
                self._log(stamp, domain.uuid)
        uuids = list(map(_UUID, domains))
        self._domains = (domains, uuids, dict(zip(uuids, domains)))
        # a record written again is another object: compared by identity, in order
        changed = changed or len(kept) != len(cache) or not all(map(is_, kept.values(), cache.values()))
        self.version += changed
        self._records = kept
        self._trim_log()

    def joined(self) -> bytes:
        """Every record of the last update, in its domains' order."""
        return b"".join(map(_RECORD, self._in_order()))

    def since(self, version: int) -> bytes:
        """The records written after `version` (new or changed since), each once, in the order
        of their uuids (the agent's domains come so: the same bytes however the records were
        updated); the domains dropped since have none. Looks only at what was written since (a
        VM storm's domains, not the host's)."""
        records = self._records
        written = sorted(set(self._written[bisect_right(self._stamps, version) :]))
        kept = [k for k in map(records.get, written) if k is not None and k.stamp > version]
        return b"".join(map(_RECORD, kept))

    def _in_order(self) -> list[_Kept]:
        return list(map(self._records.__getitem__, self._domains[1])) if self._domains else []

    def _log(self, stamp: int, uuid: str) -> None:
        self._stamps.append(stamp)
        self._written.append(uuid)

    def _trim_log(self) -> None:
        """Only the last write of each record left, once the log is twice their number."""
        if len(self._written) > 2 * len(self._records) + 256:
            last = sorted(zip(map(_STAMP, self._records.values()), self._records))
            self._stamps, self._written = [s for s, _ in last], [u for _, u in last]

    def _update_touched(
        self,
        domains: tuple[DomainInfo, ...],
        placements: Mapping[str, LinkPlacement],
        ifindexes: Mapping[str, int],
        touched: Set[str],
        stamp: int,
    ) -> tuple[bool, bool]:
        """(whether a record changed, whether every domain has its record: else every domain is
        to be looked at)."""
        cache = self._records
        last = self._domains
        changed = False
        if last is not None and len(last[0]) == len(domains) and all(map(is_, last[0], domains)):
            same, uuids, by_uuid = True, last[1], last[2]  # the same domain objects: no pass to map them
        else:
            same = False
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
            record = cache[uuid] = _kept(known, domain, placements, ifindexes, stamp)
            if record is not known:
                changed = True
                self._log(stamp, uuid)
        # Every domain has its record when the domains are the last update's (that one left
        # them complete); else each is looked at, unless the records' keys are the uuids.
        whole = same or (len(cache) == len(uuids) and cache.keys() == by_uuid.keys())
        return changed, whole


_UUID = attrgetter("uuid")
_RECORD = itemgetter(2)
_STAMP = itemgetter(4)


def _kept(
    known: _Kept | None,
    domain: DomainInfo,
    placements: Mapping[str, LinkPlacement],
    ifindexes: Mapping[str, int],
    stamp: int,
) -> _Kept:
    """A domain's record: `known` when nothing in it changed; when only ifindexes changed, from
    known's bytes; else from protobuf's (a new one stamped `stamp`)."""
    devices = [nic.device for nic in domain.nics if nic.device]
    where = (*map(placements.get, devices), *map(ifindexes.get, devices))
    n = len(devices)
    # tuples compare their items by identity first, then by ==
    if known is not None and known.domain is domain and known.where[:n] == where[:n]:
        if known.where == where:
            return known
        cuts = array("I")
        cuts.frombytes(known.cuts)
        same_sizes = _same_sizes(known, domain, cuts, where, n, stamp)
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
    return _written(domain, where, head, nics, ifindexes, stamp)


def _same_sizes(
    known: _Kept, domain: DomainInfo, cuts: array[int], where: tuple[object, ...], n: int, stamp: int
) -> _Kept | None:
    """`known` with the new ifindexes (where[n:]) written over the old ones, when each takes as
    many bytes as the one it replaces (a tap made again: ifindexes grow by a few): no length
    and no cut moves. None when one does not (or a NIC gains or loses its ifindex)."""
    record: bytearray | None = None
    olds = known.where
    at = 3  # cuts[at]: where a NIC's fields before its ifindex end
    k = n  # where[k]: a NIC's ifindex (a storm's hundred domains: no zip)
    for nic in domain.nics:
        if nic.device:
            old, new = olds[k], where[k]
            k += 1
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
    record_bytes = bytes(record) if record is not None else known.record
    return new_tuple(_Kept, (domain, where, record_bytes, known.cuts, stamp))  # (a storm's hundred)


def _written(
    domain: DomainInfo,
    where: tuple[object, ...],
    head: bytes,
    nics: list[bytes],
    ifindexes: Mapping[str, int],
    stamp: int,
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
    return _Kept(domain, where, prefix + body, array("I", [c + at for c in cuts]).tobytes(), stamp)
