"""What the agents' inventories taught a replica, held while in use: owner hints (domain uuid or
name -> CloudStack's <metadata> owner fields) and the witness (each domain running or not, since
when). Both are kept in the store (owner_hints, domain_witness); a replica holds the domains it
met lately (recent.Recent) and reads the others back when a batch names them again, so its memory
follows the cloud of now, not its history.

    ._recall(conn, batches)          # before reading them: the batches' domains back from the store
    ._learn_hints(conn, batches, now) -> learned    # new owner fields, stored
    ._witness_changes(batches) -> changed           # the witness folded in (saved by the caller)
    ._forget_inventory(now)          # every age: what was not touched leaves (the witness's last
                                     # poll is written then, so it comes back as it left)
    ._forget_absent()                # domains found without a hint or a witness: looked up again

InventoryMemory is a mixin of service.Collector, whose state it works on (annotated below).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy.engine import Connection

from kvmeter.collector import decode
from kvmeter.collector.attribution import is_router
from kvmeter.collector.model import Settings
from kvmeter.collector.recent import Recent
from kvmeter.collector.store import Store, reconciliation
from kvmeter.collector.witness import Witness, observe


class InventoryMemory:
    store: Store
    settings: Settings
    hints: Recent[str, dict[str, str]]
    witness: Recent[str, Witness]
    _no_hint: Recent[str, bool]  # domains with no stored hint when last looked at
    _no_witness: Recent[str, bool]
    _inventory_ms: int  # when what was not touched last left

    def _recall(self, conn: Connection, batches: Sequence[decode.DecodedBatch]) -> None:
        """The hints and witness of the batches' domains not in memory, read from the store. A
        router's measure without a hint always looks again: another replica may have seen it."""
        hint_keys: set[str] = set()
        again: set[str] = set()
        domains: set[str] = set()
        for b in batches:
            for dom in b.inventory:
                hint_keys.update(k for k in (dom.uuid, dom.name) if k)
                if dom.uuid:
                    domains.add(dom.uuid)
            for t in set(b.targets):
                if (
                    t.instance_uuid not in self.hints or t.domain_name not in self.hints
                ) and not b.owner_hint(t):
                    keys = {k for k in (t.instance_uuid, t.domain_name) if k}
                    hint_keys |= keys
                    if t.domain_name.startswith("r-") and is_router(t.domain_name):
                        again |= keys
        missing = {k for k in hint_keys if k not in self.hints and (k in again or k not in self._no_hint)}
        if missing:
            found = self.store.owner_hints_of(conn, missing)
            self.hints.update(found)
            for key in missing - found.keys():
                self._no_hint[key] = True
        missing = {d for d in domains if d not in self.witness and d not in self._no_witness}
        if missing:
            stored = reconciliation.load_witness(conn, missing)
            self.witness.update(stored)
            for domain in missing - stored.keys():
                self._no_witness[domain] = True

    def _learn_hints(self, batches: Iterable[decode.DecodedBatch]) -> dict[str, dict[str, str]]:
        """The owner fields the batches' inventories tell that memory did not hold (to store)."""
        learned = {d: o for d, o in _owner_hints(batches).items() if self.hints.get(d) != o}
        self.hints.update(learned)
        for key in learned:
            self._no_hint.pop(key, None)
        return learned

    def _witness_changes(self, batches: Sequence[decode.DecodedBatch]) -> dict[str, Witness]:
        """Fold the batches' inventories into the witness; the domains whose state changed."""
        changed = witness_changes(self.witness, batches)
        for domain in changed:
            self._no_witness.pop(domain, None)
        return changed

    def _forget_inventory(self, now: int) -> None:
        """Every max(evict_after, grace): hints and witness not touched for that long leave."""
        keep = self.settings.evict_after_ms
        if keep is None or now - self._inventory_ms < max(keep, self.settings.grace_ms):
            return
        self._inventory_ms = now
        self.hints.rotate()
        gone = self.witness.rotate()
        if gone:
            with self.store.write() as conn:
                reconciliation.save_witness_seen(conn, {d: w.seen_ms for d, w in gone.items()})

    def _forget_absent(self) -> None:
        self._no_hint.rotate()
        self._no_witness.rotate()


def witness_changes(
    witness: Recent[str, Witness], batches: Sequence[decode.DecodedBatch]
) -> dict[str, Witness]:
    """Fold the batches' inventories into `witness`; the domains whose state changed."""
    before = {dom.uuid: witness.get(dom.uuid) for b in batches for dom in b.inventory if dom.uuid}
    if not before:
        return {}
    observe(witness, batches)
    return {
        d: w
        for d, old in before.items()
        if (w := witness.get(d)) is not None
        and (old is None or (old.running, old.since_ms) != (w.running, w.since_ms))
    }


def _owner_hints(batches: Iterable[decode.DecodedBatch]) -> dict[str, dict[str, str]]:
    """Domain uuid and name -> the owner fields of its <metadata>, from the batches' inventories."""
    hints: dict[str, dict[str, str]] = {}
    for batch in batches:
        for dom in batch.inventory:
            if dom.owner:
                for key in (dom.uuid, dom.name):
                    if key:
                        hints[key] = dict(dom.owner)
    return hints
