"""Credentials minted by `kvmeter credentials create`, kept in the collector's store (table
api_credentials), and which accounts a CloudStack domain holds (from what the store knows).

A bearer token is kept as its SHA-256 only: it is shown once, at creation. A CloudStack secret
key is kept as it is, since verifying a request's HMAC-SHA1 needs the key itself: whoever can
read the store's database can sign requests with it, so keep the database (SQLite file,
PostgreSQL role) readable by the collector only.

Every lookup reads the database, so a revocation holds from the next request on, in every
collector replica and without a restart.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from kvmeter.collector.credentials import Grant, new_key_pair, new_token, token_digest
from kvmeter.collector.owner_directory import OwnerDirectory
from kvmeter.collector.schema import api_credentials
from kvmeter.collector.store import Store
from kvmeter.collector.store.reconciliation import load_names

TOKEN = "token"
CLOUDSTACK = "cloudstack"
KINDS = (CLOUDSTACK, TOKEN)


@dataclass(frozen=True)
class StoredCredential:
    id: int
    name: str
    kind: str
    lookup: str  # the API key, or the token's SHA-256
    grant: Grant
    created_ms: int
    revoked_ms: int | None

    @property
    def key(self) -> str:
        """What identifies it in listings: the API key, or the start of the token's digest."""
        return self.lookup if self.kind == CLOUDSTACK else f"sha256:{self.lookup[:16]}"


class MintedCredentials:
    def __init__(self, store: Store):
        self.store = store

    def create(
        self, kind: str, name: str, grant: Grant, now_ms: int
    ) -> tuple[StoredCredential, dict[str, str]]:
        """A new credential of `kind` for `grant`; returns it and its secrets, which are shown
        once: {"token": ...} or {"api_key": ..., "secret_key": ...}."""
        if kind == TOKEN:
            token = new_token()
            lookup, secret, shown = token_digest(token), None, {"token": token}
        elif kind == CLOUDSTACK:
            api_key, secret = new_key_pair()
            lookup, shown = api_key, {"api_key": api_key, "secret_key": secret}
        else:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        row = {
            "name": name,
            "kind": kind,
            "lookup": lookup,
            "secret": secret,
            "accounts": None if grant.accounts is None else json.dumps(sorted(grant.accounts)),
            "domains": json.dumps(sorted(grant.domains)),
            "created_ms": now_ms,
            "revoked_ms": None,
        }
        with self.store.write() as conn:
            inserted = conn.execute(sa.insert(api_credentials).values(row)).inserted_primary_key
            assert inserted is not None
            new_id = inserted[0]
        return _stored({**row, "id": new_id}), shown

    def listing(self, *, revoked: bool = False) -> list[StoredCredential]:
        query = sa.select(api_credentials).order_by(api_credentials.c.id)
        if not revoked:
            query = query.where(api_credentials.c.revoked_ms.is_(None))
        with self.store.read() as conn:
            return [_stored(row._mapping) for row in conn.execute(query)]

    def revoke(self, credential_id: int, now_ms: int) -> StoredCredential | None:
        """Revoke it; None when there is no such credential or it was revoked already."""
        c = api_credentials.c
        with self.store.write() as conn:
            done = conn.execute(
                sa.update(api_credentials)
                .where(c.id == credential_id, c.revoked_ms.is_(None))
                .values(revoked_ms=now_ms)
            )
            if done.rowcount != 1:
                return None
            row = conn.execute(sa.select(api_credentials).where(c.id == credential_id)).one()
        return _stored(row._mapping)

    # -- the API's lookups, once per request ---------------------------------------------------
    def by_token(self, token: str) -> Grant | None:
        found = self._active(TOKEN, token_digest(token))
        return None if found is None else found[1]

    def by_api_key(self, api_key: str) -> tuple[str, Grant] | None:
        return self._active(CLOUDSTACK, api_key)

    def any_active(self) -> bool:
        query = sa.select(api_credentials.c.id).where(api_credentials.c.revoked_ms.is_(None)).limit(1)
        with self.store.read() as conn:
            return conn.execute(query).first() is not None

    def _active(self, kind: str, lookup: str) -> tuple[str, Grant] | None:
        c = api_credentials.c
        query = sa.select(api_credentials).where(c.lookup == lookup, c.kind == kind, c.revoked_ms.is_(None))
        with self.store.read() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        return row.secret or "", _stored(row._mapping).grant

    def domain_accounts(self, domains: Iterable[str]) -> frozenset[str]:
        """The accounts of these CloudStack domains, and of their subdomains where the domain
        tree is known, as listUsageRecords sees them: from CloudStack's API (the reconciler's
        names) and from the owner fields of CloudStack's <metadata> the agents reported."""
        wanted = sorted(set(domains))
        if not wanted:
            return frozenset()
        with self.store.read() as conn:
            hinted = OwnerDirectory.from_hints(self.store.owner_hints(conn))
            names = load_names(conn)
        directory = hinted.with_names(names.accounts, names.domains, names.domains_listed_ms)
        accounts: set[str] = set()
        for domain in wanted:
            # With its subdomains as the listing that gave it gave them (a removed domain's path
            # taken again by another customer's is neither's); its own accounts where the domain
            # tree is not known.
            tree_known = bool(names.domains.get(domain, ("", ""))[1])
            accounts |= directory.accounts_in_domain(domain, recursive=tree_known) or frozenset()
        return frozenset(accounts)


def _stored(row: Any) -> StoredCredential:
    accounts = None if row["accounts"] is None else frozenset(json.loads(row["accounts"]))
    label = f"{row['name']} (credential {row['id']})"
    return StoredCredential(
        id=row["id"],
        name=row["name"],
        kind=row["kind"],
        lookup=row["lookup"],
        grant=Grant(label, accounts, frozenset(json.loads(row["domains"]))),
        created_ms=row["created_ms"],
        revoked_ms=row["revoked_ms"],
    )
