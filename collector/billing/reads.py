"""What rating reads from the store: an account's month of records and adjustments, and the
facts about resources (zones, VM sizes) the reconciler and the agents' metadata told."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kvmeter.collector.billing.rating import ADJUSTMENT, RECORD, Facts, Item
from kvmeter.collector.billing.tariff import Tariff
from kvmeter.collector.billing.tariff_file import TariffSource
from kvmeter.collector.model import UsageKey
from kvmeter.collector.owner_directory import OwnerDirectory
from kvmeter.collector.schema import KEY_COLUMNS, cloudstack_names, usage_adjustments, usage_records
from kvmeter.collector.store import Store
from kvmeter.collector.store.reconciliation import load_snapshot

if TYPE_CHECKING:
    from kvmeter.collector.config import CollectorConfig


def month_items(
    conn: Connection, start_ms: int, end_ms: int, accounts: frozenset[str] | None
) -> dict[str, list[Item]]:
    """{account: its records (recorded quantity) and adjustments (delta) of windows starting in
    [start_ms, end_ms)}; accounts None: every account's."""
    if accounts is not None and not accounts:
        return {}
    rec, adj = usage_records.c, usage_adjustments.c
    out: dict[str, list[Item]] = {}
    records = sa.select(*(rec[c] for c in KEY_COLUMNS), rec.quantity).where(
        rec.window_start_ms >= start_ms, rec.window_start_ms < end_ms
    )
    adjustments = sa.select(*(adj[c] for c in KEY_COLUMNS), adj.delta, adj.created_ms, adj.id).where(
        adj.window_start_ms >= start_ms, adj.window_start_ms < end_ms
    )
    if accounts is not None:
        records = records.where(rec.account.in_(sorted(accounts)))
        adjustments = adjustments.where(adj.account.in_(sorted(accounts)))
    new = tuple.__new__  # Items straight from the rows' tuples: 3,600 of them a month per VM
    for row in conn.execute(records):
        key = new(UsageKey, row[:7])
        out.setdefault(row[0], []).append(new(Item, (key, row[7], RECORD, row[5], 0)))
    for row in conn.execute(adjustments):
        key = new(UsageKey, row[:7])
        out.setdefault(row[0], []).append(new(Item, (key, row[7], ADJUSTMENT, row[8], row[9])))
    return out


def rating_facts(store: Store, conn: Connection) -> Facts:
    """Zones and sizes: CloudStack's API (the reconciler's last snapshot, its offerings) first,
    the VMs' own metadata (owner hints) where the API said nothing."""
    directory = OwnerDirectory.from_hints(store.owner_hints(conn))
    zones = {vm: i.zone_id for vm, i in directory.instances.items() if i.zone_id}
    sizes = {vm: (i.cpu_cores, i.memory_mb) for vm, i in directory.instances.items()}
    snapshot = load_snapshot(conn)
    if snapshot is not None:
        for vm in snapshot.vms.values():
            if vm.zone:
                zones[vm.uuid.lower()] = vm.zone
            sizes[vm.uuid.lower()] = (vm.cpu, vm.memory)
        zones.update({ip.uuid.lower(): ip.zone for ip in snapshot.ips.values() if ip.zone})
    offerings: dict[str, tuple[int | None, int | None]] = {}
    n = cloudstack_names.c
    for uuid, parent in conn.execute(sa.select(n.uuid, n.parent).where(n.kind == "offering")):
        cpu, _, memory = str(parent).partition("/")
        offerings[str(uuid)] = (_number(cpu), _number(memory))
    return Facts(zones, sizes, offerings)


def _number(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() else None


class CachedFacts:
    """rating_facts, read again at most every ttl_s (they change with a reconciler pass or a
    VM's metadata, not per request)."""

    def __init__(self, store: Store, ttl_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.ttl_s = ttl_s
        self.clock = clock
        self._lock = threading.Lock()
        self._facts: tuple[float, Facts] | None = None

    def get(self, conn: Connection) -> Facts:
        with self._lock:
            now = self.clock()
            if self._facts is None or self._facts[0] <= now:
                self._facts = (now + self.ttl_s, rating_facts(self.store, conn))
            return self._facts[1]


def priced(store: Store, cfg: CollectorConfig) -> TariffSource | None:
    """The config's tariff ([billing] tariff_file) and, with the store's outbox ([handoff]), the
    pricing of its items by it: set before anything makes items (a changed [policy] put in force
    at start, a dead letter retried, a correction), by every command that opens the store."""
    if cfg.tariff is None or cfg.tariff_file is None:
        return None
    tariffs = TariffSource(cfg.tariff, cfg.tariff_file, cfg.settings.billable)
    if store.outbox:  # each billable item carries its cost (store/item_costs.py)
        store.pricing = item_pricing(store, tariffs)
    return tariffs


def item_pricing(store: Store, tariffs: TariffSource) -> Callable[[Connection], tuple[Tariff, Facts]]:
    """store.pricing for the hand-off's items (store/item_costs.py): the tariff in force (a
    SIGHUP reload applies to items made after it) and the facts, read again every few seconds."""
    facts = CachedFacts(store)
    return lambda conn: (tariffs.current, facts.get(conn))
