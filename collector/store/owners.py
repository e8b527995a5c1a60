"""Owner hints learned from the agents' inventories (domain -> CloudStack owner), shared by
replicas through the store."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kvmeter.collector.schema import owner_hints
from kvmeter.collector.store.engine import StoreCore, slices


class OwnerHints(StoreCore):
    """{domain: owner fields}, the latest learned for each domain."""

    def save_owner_hints(self, conn: Connection, hints: Mapping[str, Mapping[str, str]], now_ms: int) -> None:
        rows = [
            {"domain": d[:255], "owner": json.dumps(dict(hints[d]), sort_keys=True), "updated_ms": now_ms}
            for d in sorted(hints)
        ]
        if rows:
            stmt = self._insert(owner_hints)
            stmt = stmt.on_conflict_do_update(
                index_elements=["domain"], set_={"owner": stmt.excluded.owner, "updated_ms": now_ms}
            )
            conn.execute(stmt, rows)

    def owner_hints_of(self, conn: Connection, domains: Iterable[str]) -> dict[str, dict[str, str]]:
        """The stored hints of the domains named (uuids or names)."""
        h = owner_hints.c
        out: dict[str, dict[str, str]] = {}
        for part in slices(sorted({d[:255] for d in domains if d})):
            rows = conn.execute(sa.select(h.domain, h.owner).where(h.domain.in_(part)))
            out.update({row[0]: json.loads(row[1]) for row in rows})
        return out

    def owner_hints(self, conn: Connection) -> dict[str, dict[str, str]]:
        return self.owner_hints_dated(conn)[0]

    def owner_hints_dated(self, conn: Connection) -> tuple[dict[str, dict[str, str]], dict[str, int]]:
        """Every hint, and when each was learned (changed last) by the same keys: one read."""
        hints: dict[str, dict[str, str]] = {}
        learned: dict[str, int] = {}
        h = owner_hints.c
        for row in conn.execute(sa.select(h.domain, h.owner, h.updated_ms)):
            hints[row[0]], learned[row[0]] = json.loads(row[1]), int(row[2])
        return hints, learned
