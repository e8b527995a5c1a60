"""Adding a credit once: a billing system that posts a payment, times out and retries, or an
operator who runs `kvmeter credits add` again, adds it once when it gives the same idempotency
key (POST /v1/credits' `Idempotency-Key` header, the CLI's --idempotency-key).

A key is the caller's name for one credit of one account: (account, key) is unique in the
store (migration 25). The same key with the same request (amount, currency, note) is that
credit again, never a second one; with another request it is refused (KeyReused), nothing
added. The same key on another account is another credit: a key never finds, nor names,
another account's. Two replicas taking one key at once write one row: the second waits on
the account's lock (store/credits.py lock_account) until the first commits, then finds that
credit; the unique index holds even for a writer that took no lock.

An account's credits share one currency (the first's): under that same lock, so two first
credits in two currencies added at once are one credit and a CurrencyHeld, never both. An
account that holds two all the same (added before that lock) takes credits in either, and the
credits of one are taken out by reversing them (reverse_once): a credit of the opposite
amount, added once per credit reversed (its key is `reversal-of-<id>`). A currency whose
credits cancel is no longer held (balances.currencies): an account whose credits all cancel
holds none, and its next credit is a first one (a wrong-currency first credit reversed, the
right one is taken).

The tariff is in one currency, so every account's credits are in it: a tariff in another
(a reload, a restart with another file) is refused while an account holds credits in the one
before (tariff_guard), as is an account's first credit added without a tariff in force in a
currency other than the store's credits' (add_once's unguarded: the store keeps no tariff, its
credits say the currency; the CLI's tariff is its config's file, maybe one the collector
refused). Never silently: those accounts would have no balance, and every new credit of theirs
would be refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from sqlalchemy.engine import Connection

from kvmeter.collector.balances import currencies, elsewhere, elsewhere_error
from kvmeter.collector.billing.tariff import Tariff
from kvmeter.collector.billing.tariff_file import TariffError
from kvmeter.collector.schema_credits import KEY_MAX
from kvmeter.collector.store import Store
from kvmeter.collector.store import credits as stored

KEY = re.compile(rf"[\x21-\x7e]{{1,{KEY_MAX}}}")  # visible ASCII: a header's value, a shell word


class KeyReused(ValueError):
    """The key names another request's credit of the account: a retry must repeat its request."""


class CurrencyHeld(ValueError):
    """The account holds credits in another currency (an account's credits share one)."""


def idempotency_key(text: object) -> str:
    """The key as given, or ValueError saying why not."""
    if not isinstance(text, str) or not KEY.fullmatch(text):
        raise ValueError(
            f"the idempotency key must be 1 to {KEY_MAX} visible ASCII characters, no spaces "
            f"(e.g. the payment's id), not {str(text)[:40]!r}"
        )
    return text


def differences(credit: dict[str, Any], amount: Decimal, currency: str, note: str) -> list[str]:
    """The fields in which a request differs from the credit its key added ("25" and "25.00"
    are the same money)."""
    given = {"amount": amount, "currency": currency, "note": note}
    return [name for name, value in given.items() if credit[name] != value]


def add_once(
    conn: Connection,
    account: str,
    amount: Decimal,
    currency: str,
    note: str,
    by: str,
    now_ms: int,
    key: str | None = None,
    *,
    unguarded: bool = False,
) -> tuple[dict[str, Any], bool]:
    """(the credit, whether it was added before with `key`), inside the caller's write
    transaction. KeyReused: the key added another credit; CurrencyHeld: the account's credits
    are in another currency, or (unguarded: `currency` is no guarded tariff's) it is the
    account's first and the store's credits are in another. Either way nothing is added."""
    stored.lock_account(conn, account)  # first: what is read below stays true until the commit
    if key is not None and (found := stored.credit_by_key(conn, account, key)) is not None:
        return _same(found, amount, currency, note, key), True
    sums = stored.credit_sums(conn, frozenset({account})).get(account, {})
    held = currencies(sums)
    if held and currency not in held:
        raise CurrencyHeld(
            f"account {account} holds credits in {' and '.join(held)}, not {currency} (one added "
            "in the wrong currency is taken out with `kvmeter credits reverse`)"
        )
    if not held:  # an account's first: one at a time in the store, each seeing the others'
        stored.lock_first_credits(conn)
        if unguarded and (why := currency_refused(conn, currency)) is not None:
            raise CurrencyHeld(why)  # the store's credits say the collector's tariff's currency
    credit_id = stored.add_credit(conn, account, amount, currency, note, by, now_ms, key)
    if credit_id is None:  # a replica that took no lock (an older one) committed it meanwhile
        assert key is not None
        found = stored.credit_by_key(conn, account, key)
        assert found is not None
        return _same(found, amount, currency, note, key), True
    return stored.credit(conn, credit_id), False


def currency_refused(conn: Connection, currency: str) -> str | None:
    """Why credits in `currency` do not fit the store's (balances.elsewhere), or None. Reads
    the credits of the accounts holding one in another currency only, not the store's."""
    found = elsewhere(stored.credit_sums_outside(conn, currency), currency)
    return elsewhere_error(found, currency) if found else None


def tariff_guard(store: Store) -> Callable[[Tariff], None]:
    """The check of a tariff against the credits held, at start and before each reload puts one
    in force (TariffSource.guard): TariffError naming both currencies when the tariff's is not
    the credits'; a store with no credit yet takes any."""

    def guard(tariff: Tariff) -> None:
        with store.read() as conn:
            why = currency_refused(conn, tariff.currency)
        if why is not None:
            raise TariffError(tariff.source, [f"currency {tariff.currency}: {why}"])

    return guard


class NotReversible(ValueError):
    """No such credit, or it is a reversal itself."""


def reverse_once(
    conn: Connection, credit_id: int, note: str, by: str, now_ms: int
) -> tuple[dict[str, Any], bool]:
    """(the credit that reverses credit `credit_id`, whether it was added before), inside the
    caller's write transaction: the opposite amount in the same currency, to the same account,
    so the currency's credits net to zero (an operator taking a wrong-currency credit out of an
    account that holds two; balances.currencies). Once: reversing it again finds that one."""
    found = stored.credit_by_id(conn, credit_id)
    if found is None:
        raise NotReversible(f"no credit {credit_id}")
    account = found["account"]
    stored.lock_account(conn, account)
    key = f"reversal-of-{credit_id}"
    if (done := stored.credit_by_key(conn, account, key)) is not None:
        if (done["amount"], done["currency"]) != (-found["amount"], found["currency"]):
            raise NotReversible(f"idempotency key {key!r} of account {account} added credit {done['id']}")
        return done, True
    if found["amount"] <= 0:
        raise NotReversible(f"credit {credit_id} is a reversal ({found['amount']} {found['currency']})")
    amount = -found["amount"]
    added = stored.add_credit(conn, account, amount, found["currency"], note, by, now_ms, key)
    assert added is not None  # the account's lock is held: no other reversal of it meanwhile
    return stored.credit(conn, added), False


def _same(credit: dict[str, Any], amount: Decimal, currency: str, note: str, key: str) -> dict[str, Any]:
    differ = differences(credit, amount, currency, note)
    if differ:
        raise KeyReused(
            f"idempotency key {key!r} added credit {credit['id']} to account {credit['account']} "
            f"with another {', '.join(differ)}: a retry repeats its request; a new credit needs a new key"
        )
    return credit
