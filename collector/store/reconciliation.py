"""The reconciler's tables (migration 8): its corrections (with source and reason) and the names
CloudStack's API gave to accounts, domains and offerings.

    save_corrections(conn, corrections, now_ms) -> int      # new rows; known event ids are kept
    list_corrections(conn, accounts=None, resource=None, start_ms=None, end_ms=None, limit=1000)
    save_names(conn, snapshot, now_ms)
    load_names(conn) -> Names                               # the lookup records and the API use
    save_witness(conn, changed) / load_witness(conn, domains=None)   # the agents' view of each domain
    save_witness_seen(conn, {domain: last poll})           # as it leaves a collector's memory
    save_snapshot(conn, snapshot, now_ms) / load_snapshot(conn) -> Snapshot | None
    last_pass_ms(conn) -> int | None                        # when any replica last kept a pass

The correcting events themselves are lifecycle events (lifecycle_events, same event id); these
rows say why they are there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from kvmeter.collector.cs_snapshot import Snapshot, snapshot_from_json, snapshot_to_json
from kvmeter.collector.reconcile import Correction, Witness
from kvmeter.collector.schema import (
    cloudstack_names,
    corrections,
    domain_witness,
    lifecycle_events,
    reconcile_state,
)
from kvmeter.collector.store.engine import slices


def _insert(conn: Connection, table: sa.Table) -> Any:
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


def save_corrections(conn: Connection, found: Iterable[Correction], now_ms: int) -> int:
    rows = [
        {
            "event_id": c.event_id, "resource": c.resource_uuid[:128], "resource_type": c.resource_type[:32],
            "event_type": c.event_type[:32], "time_ms": c.time_ms, "account": c.account[:64],
            "offering": c.offering[:128], "source": c.source[:32], "reason": c.reason, "created_ms": now_ms,
        }
        for c in found
    ]  # fmt: skip
    if not rows:
        return 0
    # Counted before the insert: its rowcount is 0 or -1 on psycopg, whatever it inserted.
    ids = [row["event_id"] for row in rows]
    stored = sa.select(corrections.c.event_id).where(corrections.c.event_id.in_(ids))
    known: set[str] = set(conn.execute(stored).scalars())
    conn.execute(_insert(conn, corrections).on_conflict_do_nothing(index_elements=["event_id"]), rows)
    return len(set(ids) - known)


def list_corrections(
    conn: Connection,
    *,
    accounts: frozenset[str] | None = None,
    resource: str | None = None,
    start_ms: int | None = None,
    end_ms: int | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Applied corrections (their event is stored) by time, then event id; `accounts` None: all,
    else only theirs."""
    c = corrections.c
    applied = sa.select(lifecycle_events.c.event_id).where(lifecycle_events.c.event_id == c.event_id)
    query = sa.select(corrections).where(applied.exists()).order_by(c.time_ms, c.event_id).limit(limit)
    if accounts is not None:
        query = query.where(c.account.in_(sorted(accounts)))
    if resource is not None:
        query = query.where(c.resource == resource)
    if start_ms is not None:
        query = query.where(c.time_ms >= start_ms)
    if end_ms is not None:
        query = query.where(c.time_ms < end_ms)
    return [dict(row._mapping) for row in conn.execute(query)]


def save_names(conn: Connection, snapshot: Snapshot, now_ms: int) -> None:
    rows: list[dict[str, Any]] = []
    for a in snapshot.accounts.values():
        rows.append({"kind": "account", "uuid": a.uuid, "name": a.name, "parent": a.domain_id})
    for d in snapshot.domains.values():
        rows.append({"kind": "domain", "uuid": d.uuid, "name": d.name, "parent": d.path})
    for o in snapshot.offerings.values():
        rows.append(
            {"kind": "offering", "uuid": o.uuid, "name": o.name, "parent": f"{o.cpu or ''}/{o.memory or ''}"}
        )
    if not rows:
        return
    for row in rows:
        row["uuid"], row["name"], row["updated_ms"] = row["uuid"][:128], row["name"][:255], now_ms
        row["parent"] = row["parent"][:1024]  # a deep domain's path: never a DataError (events' transaction)
    stmt = _insert(conn, cloudstack_names)
    stmt = stmt.on_conflict_do_update(
        index_elements=["kind", "uuid"],
        set_={
            "name": stmt.excluded.name,
            "parent": stmt.excluded.parent,
            "updated_ms": stmt.excluded.updated_ms,
        },
    )
    conn.execute(stmt, rows)


@dataclass
class Names:
    """Account, domain and offering names by uuid, as CloudStack's API last gave them."""

    accounts: dict[str, tuple[str, str]] = field(default_factory=dict)  # uuid -> (name, domain uuid)
    domains: dict[str, tuple[str, str]] = field(default_factory=dict)  # uuid -> (name, path)
    offerings: dict[str, str] = field(default_factory=dict)  # uuid -> name
    domains_listed_ms: dict[str, int] = field(default_factory=dict)  # uuid -> the listing that last gave it
    accounts_listed_ms: dict[str, int] = field(default_factory=dict)  # the same, of accounts

    def account(self, uuid: str) -> dict[str, str]:
        """CloudStack's owner fields of a usage record ({} when the account is not known)."""
        if uuid not in self.accounts:
            return {}
        name, domain = self.accounts[uuid]
        domain_name, path = self.domains.get(domain, ("", ""))
        return {"account": name, "domainid": domain, "domain": domain_name, "domainpath": path}

    def accounts_of_domains(self, domains: Sequence[str]) -> frozenset[str]:
        return frozenset(u for u, (_, d) in self.accounts.items() if d in domains)


def load_names(conn: Connection) -> Names:
    names = Names()
    n = cloudstack_names.c
    for row in conn.execute(sa.select(n.kind, n.uuid, n.name, n.parent, n.updated_ms)):
        kind, uuid, name, parent = str(row[0]), str(row[1]), str(row[2]), str(row[3])
        if kind == "account":
            names.accounts[uuid] = (name, parent)
            names.accounts_listed_ms[uuid] = int(row[4])
        elif kind == "domain":
            names.domains[uuid] = (name, parent)
            names.domains_listed_ms[uuid] = int(row[4])
        elif kind == "offering":
            names.offerings[uuid] = name
    return names


def save_witness(conn: Connection, changed: dict[str, Witness]) -> None:
    if not changed:
        return
    rows = [
        {"domain": d[:128], "running": w.running, "since_ms": w.since_ms} for d, w in sorted(changed.items())
    ]
    stmt = _insert(conn, domain_witness)
    stmt = stmt.on_conflict_do_update(
        index_elements=["domain"], set_={"running": stmt.excluded.running, "since_ms": stmt.excluded.since_ms}
    )
    conn.execute(stmt, rows)


def load_witness(conn: Connection, domains: Iterable[str] | None = None) -> dict[str, Witness]:
    """The stored witness, of every domain or of those named; its last poll is the one kept when
    it left a collector's memory (save_witness_seen), else its `since`."""
    w = domain_witness.c
    query = sa.select(w.domain, w.running, w.since_ms, w.seen_ms)
    out: dict[str, Witness] = {}
    parts = [None] if domains is None else list(slices(sorted({d[:128] for d in domains if d})))
    for part in parts:
        rows = conn.execute(query if part is None else query.where(w.domain.in_(part)))
        for row in rows:
            since: int = row[2]
            out[str(row[0])] = Witness(bool(row[1]), since, max(since, row[3] or since))
    return out


def save_witness_seen(conn: Connection, seen: dict[str, int]) -> None:
    """Keep the last poll of domains whose witness leaves memory (their rows exist: saved on change)."""
    w = domain_witness.c
    seen_ms: Any = sa.bindparam("s")
    later = sa.case((w.seen_ms > seen_ms, w.seen_ms), else_=seen_ms)  # another replica's may be later
    stmt = sa.update(domain_witness).where(w.domain == sa.bindparam("d")).values(seen_ms=later)
    rows = [{"d": d[:128], "s": ms} for d, ms in sorted(seen.items())]
    if rows:
        conn.execute(stmt, rows)


_PREVIOUS = "previous_snapshot"


def save_snapshot(conn: Connection, snapshot: Snapshot, now_ms: int) -> None:
    stmt = _insert(conn, reconcile_state).values(
        name=_PREVIOUS, value=snapshot_to_json(snapshot), updated_ms=now_ms
    )
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["name"],
            set_={"value": stmt.excluded.value, "updated_ms": stmt.excluded.updated_ms},
        )
    )


def last_pass_ms(conn: Connection) -> int | None:
    """When the last pass (of any replica) was kept, by its collector's clock."""
    row = conn.execute(
        sa.select(reconcile_state.c.updated_ms).where(reconcile_state.c.name == _PREVIOUS)
    ).first()
    return None if row is None else int(row[0])


def load_snapshot(conn: Connection) -> Snapshot | None:
    text = conn.execute(
        sa.select(reconcile_state.c.value).where(reconcile_state.c.name == _PREVIOUS)
    ).scalar()
    return snapshot_from_json(text) if text else None
