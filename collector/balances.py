"""Balances and low-balance crossings. Pure: credits, costs, thresholds and the last state in;
balances, the new state and the crossings out.

An account's balance is its credits minus its costs (billing.months_costs: rated from usage,
every month from the one of its first credit through now). It is *below* when it is under the
account's threshold (its own, else the default). A crossing is the change from not below (or
never evaluated) to below: it raises one alert. Staying below raises nothing more; a credit that
lifts the balance to the threshold or above re-arms it, so the next fall is a new crossing.
Metering and billing never look at a balance.

An account's credits are in one currency, the balance's. A store may hold accounts whose
credits are in two (first credits added at once, on PostgreSQL, before a credit took its
account's lock: credit_keys): such an account has no balance, never one that counts one
currency's credits and not the other's, until an operator reverses the credits of the wrong
one (`kvmeter credits reverse`): a currency whose credits sum to zero is no longer held. An
account whose credits all cancel holds no currency (as CloudStack's quota, where a correction is
one more signed credit summed into the balance): its next credit is a first one, in any currency
its guard takes, so a wrong-currency first credit reversed is replaced by one in the right one.
Its costs still count from its first credit, whatever its currency: it was prepaid from then.

An alert's key (its webhook's Idempotency-Key) is derived from what makes it that alert: the
account, its crossing's number and the evaluation's instant. The same alert keeps it on every
retry, after a restart and in a rebuilt store (carried); another store's alert, numbered from 1
again (a new installation, a second one posting to the same receiver), gets another.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal

# Fixed forever: changing it would change the key of every alert not yet delivered.
ALERT_NAMESPACE = uuid.UUID("3bad8e46-3e26-404d-a6c0-5ffa2057c98b")


Sums = Mapping[str, tuple[Decimal, int]]  # an account's {currency: (credits summed, first one's time)}


def currencies(sums: Sums) -> list[str]:
    """The currencies an account holds, from its credits summed per currency (store/credits.py
    credit_sums, in the order of each one's first credit): those whose credits do not cancel
    out; none when they all do (it holds no money, in no currency). More than one: its credits
    count in no balance."""
    return [currency for currency, (total, _) in sums.items() if total != 0]


def first_ms(sums: Sums) -> int:
    """The account's first credit's time, whatever its currency: its costs count from that
    month (a credit reversed and added again in another currency leaves no month out)."""
    return min(first for _, first in sums.values())


def mixed_error(account: str, held: list[str]) -> str:
    return (
        f"account {account} holds credits in {' and '.join(held)}: a balance counts one currency, "
        "so it has none until the credits of all but one are reversed (`kvmeter credits reverse`)"
    )


def elsewhere(sums: Mapping[str, Sums], currency: str) -> dict[str, str]:
    """{account: the currency it holds} of the accounts (sums: credit_sums's) whose credits
    are in one currency, not `currency`, and do not cancel out: under a tariff in `currency`
    each would lose its balance and take no credit. An account holding two has none under any
    tariff; one whose credits were all reversed holds no money (currencies)."""
    out = {}
    for account, by_currency in sums.items():
        held = currencies(by_currency)
        if len(held) == 1 and held[0] != currency:
            out[account] = held[0]
    return out


def elsewhere_error(found: Mapping[str, str], currency: str) -> str:
    """Why `currency` (a tariff's, a credit's) is refused: the accounts holding credits in
    another, by currency, each with one of them named."""
    by_currency: dict[str, list[str]] = {}
    for account, held in sorted(found.items()):
        by_currency.setdefault(held, []).append(account)
    held_in = " and ".join(f"{c} ({len(a)} account(s), e.g. {a[0]})" for c, a in sorted(by_currency.items()))
    return (
        f"the store's credits are in {held_in}, not {currency}: those accounts would have no "
        f"balance and take no credit in {currency} (an account keeps its credits' currency until "
        "they are all reversed with `kvmeter credits reverse`)"
    )


@dataclass(frozen=True)
class Thresholds:
    """default: for every account with credits (None: only accounts named here are watched)."""

    default: Decimal | None = None
    accounts: Mapping[str, Decimal] = field(default_factory=dict)

    def of(self, account: str) -> Decimal | None:
        return self.accounts.get(account, self.default)


@dataclass(frozen=True)
class Balance:
    account: str
    currency: str
    credits: Decimal
    costs: Decimal
    threshold: Decimal | None

    @property
    def balance(self) -> Decimal:
        return self.credits - self.costs

    @property
    def below(self) -> bool:
        return self.threshold is not None and self.balance < self.threshold


@dataclass(frozen=True)
class Crossing:
    """The balance fell below the threshold (one alert)."""

    account: str
    balance: Decimal
    threshold: Decimal
    currency: str


def crossings(balances: list[Balance], below_before: Mapping[str, bool]) -> list[Crossing]:
    """The balances that are below now and were not at the last evaluation (or never were
    evaluated); an account without a threshold never crosses."""
    out = []
    for b in balances:
        if b.below and not below_before.get(b.account, False):
            assert b.threshold is not None
            out.append(Crossing(b.account, b.balance, b.threshold, b.currency))
    return out


def alert_key(account: str, crossing: int, crossed_ms: int) -> str:
    """The Idempotency-Key of the account's crossing-th alert, raised at crossed_ms."""
    name = json.dumps([account, crossing, crossed_ms], separators=(",", ":"), ensure_ascii=True)
    return f"kvmeter-balance-alert-{uuid.uuid5(ALERT_NAMESPACE, name)}"
