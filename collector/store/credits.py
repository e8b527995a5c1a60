"""Credits, balance state and the low-balance alerts' outbox (schema_credits), read and written
inside the caller's transaction."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from kvmeter.collector.balances import Balance, Crossing, alert_key, currencies
from kvmeter.collector.schema_credits import balance_alerts, balance_state, credits
from kvmeter.collector.store.engine import slices
from kvmeter.collector.store.usage import resource_lock_id

_CREDIT = sa.select(credits)  # every column: id, account, amount, ..., idempotency_key


def lock_account(conn: Connection, account: str) -> None:
    """Hold the account's credits until commit (PostgreSQL; SQLite's writer is alone anyway):
    two replicas adding an account's first credits at once each read none, so without it both
    were added, in two currencies. An advisory lock, as per-resource recomputes take (no row
    exists yet to lock); the credit's transaction takes no other lock."""
    if conn.dialect.name == "postgresql":
        key = resource_lock_id(f"credits:{account}")
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})


def lock_first_credits(conn: Connection) -> None:
    """Hold the store's first credits of accounts until commit (PostgreSQL): without a tariff the
    store's credits say its currency (credit_keys.add_once), so two accounts' first credits in
    two currencies added at once each read none and were both added. Taken after the account's
    lock, never before it (no cycle)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": resource_lock_id("credits:first")})


def add_credit(
    conn: Connection,
    account: str,
    amount: Decimal,
    currency: str,
    note: str,
    by: str,
    now_ms: int,
    key: str | None = None,
) -> int | None:
    """The new credit's id; None when the account holds a credit with this idempotency key
    already (committed by another transaction meanwhile: PostgreSQL holds this insert on the
    unique index until that one ends)."""
    row: dict[str, Any] = {"account": account, "amount": format(amount, "f"), "currency": currency}
    row |= {"note": note, "created_by": _fitted(by), "created_ms": now_ms}
    if key is None:
        inserted = conn.execute(sa.insert(credits).values(**row)).inserted_primary_key
        assert inserted is not None
        return int(inserted[0])
    insert = postgresql.insert(credits) if conn.dialect.name == "postgresql" else sqlite.insert(credits)
    once = insert.on_conflict_do_nothing(index_elements=["account", "idempotency_key"])
    return _inserted(conn, once, credits.c.id, {**row, "idempotency_key": key})


def _inserted(conn: Connection, once: Any, id_column: Any, row: dict[str, Any]) -> int | None:
    """An INSERT ... ON CONFLICT DO NOTHING: the new row's id, None when the key was taken.
    PostgreSQL says so by RETURNING (its rowcount can be -1 there); SQLite by rowcount and
    lastrowid, since SQLAlchemy 1.4 (Debian 12's) compiles no RETURNING for it (one writer at a
    time: lastrowid is this insert's)."""
    if conn.dialect.name == "postgresql":
        found = conn.execute(once.returning(id_column), row).first()
        return None if found is None else int(found[0])
    result = conn.execute(once, row)
    return int(result.lastrowid) if result.rowcount == 1 else None


def credit_by_key(conn: Connection, account: str, key: str) -> dict[str, Any] | None:
    """The account's credit added with this idempotency key (as list_credits gives it), if any."""
    query = _CREDIT.where(credits.c.account == account, credits.c.idempotency_key == key)
    row = conn.execute(query).mappings().first()
    return None if row is None else {**row, "amount": Decimal(row["amount"])}


CREATED_BY_MAX = 128  # characters of credits.created_by (schema_credits)


def _fitted(by: str) -> str:
    """`by` within the column: a minted credential's label, `<name> (credential <id>)`, outgrows
    it for a long name (PostgreSQL refuses an over-long value); the end, naming the credential,
    is kept."""
    if len(by) <= CREATED_BY_MAX:
        return by
    half = CREATED_BY_MAX // 2
    return by[: half - 1] + "…" + by[-half:]


def list_credits(
    conn: Connection, accounts: frozenset[str] | None, limit: int, after_id: int | None = None
) -> list[dict[str, Any]]:
    """Up to `limit` credits by id (oldest first), after the credit `after_id` when given."""
    c = credits.c
    query = _CREDIT
    if accounts is not None:
        query = query.where(c.account.in_(sorted(accounts)))
    if after_id is not None:
        query = query.where(c.id > after_id)
    rows = conn.execute(query.order_by(c.id).limit(limit)).mappings()
    return [{**row, "amount": Decimal(row["amount"])} for row in rows]


def credit(conn: Connection, credit_id: int) -> dict[str, Any]:
    """One credit by its id (as list_credits gives it)."""
    found = credit_by_id(conn, credit_id)
    assert found is not None
    return found


def credit_by_id(conn: Connection, credit_id: int) -> dict[str, Any] | None:
    row = conn.execute(_CREDIT.where(credits.c.id == credit_id)).mappings().first()
    return None if row is None else {**row, "amount": Decimal(row["amount"])}


def credit_sums(
    conn: Connection, accounts: frozenset[str] | None
) -> dict[str, dict[str, tuple[Decimal, int]]]:
    """{account: {currency: (its credits summed, its first credit's time)}}, each account's
    currencies in the order of their first credit."""
    c = credits.c
    return _sums(conn, None if accounts is None else c.account.in_(sorted(accounts)))


def credit_sums_outside(conn: Connection, currency: str) -> dict[str, dict[str, tuple[Decimal, int]]]:
    """credit_sums of the accounts holding a credit in another currency than `currency` (every
    other account's are all in it): their rows only, found by ix_credits_currency (migration
    30), never the whole table as a first credit's check once read. `<>` is no index range on
    either database; `<` or `>` is two."""
    c = credits.c
    other = sa.select(c.account).where(sa.or_(c.currency < currency, c.currency > currency))
    return _sums(conn, c.account.in_(other))


def _sums(conn: Connection, where: Any) -> dict[str, dict[str, tuple[Decimal, int]]]:
    c = credits.c
    query = sa.select(c.account, c.amount, c.currency, c.created_ms)
    if where is not None:
        query = query.where(where)
    out: dict[str, dict[str, tuple[Decimal, int]]] = {}
    for row in conn.execute(query.order_by(c.id)):
        sums = out.setdefault(str(row[0]), {})
        total, first_ms = sums.get(str(row[2]), (Decimal(0), int(row[3])))
        sums[str(row[2])] = (total + Decimal(str(row[1])), first_ms)
    return out


def mixed_currencies(conn: Connection, accounts: frozenset[str] | None = None) -> dict[str, list[str]]:
    """{account: the currencies it holds} of the accounts that hold credits in more than one
    (balances.currencies): only accounts with credits in two currencies are summed."""
    c = credits.c
    several = sa.select(c.account).group_by(c.account).having(sa.func.count(sa.distinct(c.currency)) > 1)
    if accounts is not None:
        several = several.where(c.account.in_(sorted(accounts)))
    names = frozenset(map(str, conn.execute(several).scalars()))
    if not names:
        return {}
    out = {}
    for account, sums in credit_sums(conn, names).items():
        held = currencies(sums)
        if len(held) > 1:
            out[account] = held
    return out


UNEVALUATED = {
    "below": False,
    "balance": "0",
    "threshold": "",
    "currency": "",
    "evaluated_ms": 0,
    "crossings": 0,
}


def lock_states(
    conn: Connection, accounts: Iterable[str], *, postgres: bool
) -> dict[str, tuple[bool, int, int]]:
    """{account: (below at the last evaluation, crossings so far, that evaluation's instant)},
    rows locked until commit (PostgreSQL; SQLite's writer is alone anyway) so replicas
    evaluating at once take turns; the alert's unique (account, crossing) makes one alert of a
    crossing whatever happens."""
    names = sorted(set(accounts))
    if not names:
        return {}
    s = balance_state.c
    if postgres:
        stmt = postgresql.insert(balance_state).on_conflict_do_nothing(index_elements=["account"])
        conn.execute(
            stmt,
            [{**UNEVALUATED, "account": a} for a in names],
        )
    query = sa.select(s.account, s.below, s.crossings, s.evaluated_ms).where(s.account.in_(names))
    if postgres:
        query = query.order_by(s.account).with_for_update()
    return {row[0]: (bool(row[1]), int(row[2]), int(row[3])) for row in conn.execute(query)}


def unwatch(conn: Connection, watched: Iterable[str], now_ms: int) -> list[str]:
    """Accounts that had a threshold at their last evaluation and are not watched now (no
    threshold any more, credits no longer in the tariff's currency): no longer below anything
    (their crossings count stays, so a later crossing gets a new number). Returns them. A state
    evaluated after `now_ms` (another replica's newer view, which may watch an account this one
    rated before its first credit) stands: re-armed, its fall would alert a second time."""
    s = balance_state.c
    keep = set(watched)
    older = sa.and_(s.threshold != "", s.evaluated_ms <= now_ms)
    listed: list[str] = list(conn.execute(sa.select(s.account).where(older)).scalars())
    stale = sorted(a for a in listed if a not in keep)
    for part in slices(stale, 1000):  # the condition again: checked on the row as it is now
        conn.execute(
            sa.update(balance_state).where(s.account.in_(part), older).values(below=False, threshold="")
        )
    return stale


def save_states(
    conn: Connection, balances: list[Balance], now_ms: int, crossings: Mapping[str, int], *, postgres: bool
) -> None:
    """The evaluation's state; crossings: each account's crossings so far, this one's included."""
    if not balances:
        return
    rows = [
        {
            "account": b.account,
            "below": b.below,
            "balance": format(b.balance, "f"),
            "threshold": "" if b.threshold is None else format(b.threshold, "f"),
            "currency": b.currency,
            "evaluated_ms": now_ms,
            "crossings": crossings.get(b.account, 0),
        }
        for b in balances
    ]
    insert = postgresql.insert(balance_state) if postgres else sqlite.insert(balance_state)
    names = ("below", "balance", "threshold", "currency", "evaluated_ms", "crossings")
    changed = {k: insert.excluded[k] for k in names}
    conn.execute(insert.on_conflict_do_update(index_elements=["account"], set_=changed), rows)


def add_alerts(
    conn: Connection, raised: list[Crossing], numbers: Mapping[str, int], now_ms: int, *, postgres: bool
) -> list[Crossing]:
    """An alert per crossing, numbered (numbers: the account's n-th crossing); the crossings
    whose alert this wrote (not one another replica wrote first for the same number)."""
    written = []
    insert = postgresql.insert(balance_alerts) if postgres else sqlite.insert(balance_alerts)
    once = insert.on_conflict_do_nothing(index_elements=["account", "crossing"])
    for x in raised:
        row = {
            "account": x.account,
            "balance": format(x.balance, "f"),
            "threshold": format(x.threshold, "f"),
            "currency": x.currency,
            "crossed_ms": now_ms,
            "attempts": 0,
            "crossing": numbers[x.account],
            "idempotency_key": alert_key(x.account, numbers[x.account], now_ms),
        }
        if _inserted(conn, once, balance_alerts.c.id, row) is not None:
            written.append(x)
    return written


def states(conn: Connection) -> list[dict[str, Any]]:
    s = balance_state.c
    query = sa.select(s.account, s.below, s.balance, s.threshold, s.currency, s.evaluated_ms)
    watched = sa.and_(s.evaluated_ms > 0, s.threshold != "")  # not an account no longer watched
    return [dict(row) for row in conn.execute(query.where(watched).order_by(s.account)).mappings()]


def undelivered(conn: Connection, limit: int = 100) -> list[dict[str, Any]]:
    """A round's alerts: those never tried (new ones) first, oldest first, then those tried
    least recently. An alert tried goes behind all the others: alerts the receiver refuses for
    good, however many, never keep another out of a round for more than a round."""
    a = balance_alerts.c
    columns = (a.id, a.account, a.balance, a.threshold, a.currency, a.crossed_ms, a.idempotency_key)
    order = (sa.func.coalesce(a.tried_ms, 0), a.id)
    query = sa.select(*columns).where(a.delivered_ms.is_(None)).order_by(*order).limit(limit)
    return [dict(row) for row in conn.execute(query).mappings()]


def alerts(conn: Connection, accounts: frozenset[str] | None) -> list[dict[str, Any]]:
    a = balance_alerts.c
    query = sa.select(
        a.id, a.account, a.balance, a.threshold, a.currency, a.crossed_ms, a.delivered_ms, a.idempotency_key
    )
    if accounts is not None:
        query = query.where(a.account.in_(sorted(accounts)))
    return [dict(row) for row in conn.execute(query.order_by(a.id)).mappings()]


def mark_delivered(conn: Connection, alert_id: int, now_ms: int) -> None:
    a = balance_alerts.c
    conn.execute(sa.update(balance_alerts).where(a.id == alert_id).values(delivered_ms=now_ms))


def count_attempts(conn: Connection, attempts: Mapping[int, int], now_ms: int) -> None:
    """These alerts were tried (n times each) at now_ms."""
    a = balance_alerts.c
    for alert_id, n in attempts.items():
        tried = {"attempts": a.attempts + n, "tried_ms": now_ms}
        conn.execute(sa.update(balance_alerts).where(a.id == alert_id).values(tried))


def carry(source: Connection, into: Connection, *, postgres: bool) -> int:
    """A rebuild: the live store's credits, balance states and alerts, as they are, ids and
    keys included (no topic or event holds a credit: this table is its only ledger; an alert
    raised before migration 26 is POSTed under its id, which a new alert must never reuse).
    Returns the credits carried."""
    carried = 0
    for table in (credits, balance_state, balance_alerts):
        if not sa.inspect(source).has_table(table.name):
            continue
        have = {c["name"] for c in sa.inspect(source).get_columns(table.name)}  # before migration 18
        columns = [c for c in table.c if c.name in have]
        order = table.c.id if "id" in table.c else table.c.account
        rows = [dict(r) for r in source.execute(sa.select(*columns).order_by(order)).mappings()]
        for part in slices(rows, 1000):
            into.execute(sa.insert(table), list(part))
        if table is credits:
            carried = len(rows)
        if postgres and rows and "id" in table.c:  # the next id after the carried ones
            sequence = f"pg_get_serial_sequence('{table.name}', 'id')"
            into.execute(sa.text(f"SELECT setval({sequence}, (SELECT max(id) FROM {table.name}))"))
    return carried
