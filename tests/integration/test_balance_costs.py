"""The balance check's costs (balance_costs.CostsSince), on both stores: each account's costs
since its first credit equal the months rated from scratch after every kind of change (the
current month growing, a late record or an adjustment in a closed month, records gone, a new
tariff), while an unchanged closed month is not rated again."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import sqlalchemy as sa

from kvmeter.collector.balance_costs import CostsSince, months
from kvmeter.collector.billing import month_bounds, months_costs, tariff_file
from kvmeter.collector.billing.tariff import Tariff
from kvmeter.collector.model import NETWORK_BYTES_SENT, UsageKey
from kvmeter.collector.schema import usage_records
from kvmeter.collector.store import Store
from tests.billing_support import ACCT_A, ACCT_B, GB, TARIFF_DOC, tariff

HOUR = 3_600_000


def ms(year: int, month: int, day: int, hour: int = 0) -> int:
    return int(dt.datetime(year, month, day, hour, tzinfo=dt.UTC).timestamp() * 1000)


NOW = ms(2026, 4, 10, 12)
SINCE = {ACCT_A: ms(2026, 1, 5), ACCT_B: ms(2026, 2, 20)}


def send(store: Store, account: str, start: int, nbytes: int, *, late: bool = False) -> None:
    """Bytes sent in the hour from `start`: a record, or (late) an adjustment of a final window."""
    key = UsageKey(account, NETWORK_BYTES_SENT, f"vm-{account[:4]}", "", "public", start, start + HOUR)
    with store.write() as conn:
        store.add_bytes(conn, {key: nbytes}, {}, start + HOUR if late else 0, NOW)


def from_scratch(store: Store, t: Tariff) -> dict[str, Decimal]:
    out = dict.fromkeys(SINCE, Decimal(0))
    for month in months(min(SINCE.values()), NOW):
        for c in months_costs(store, t, frozenset(SINCE), NOW, month_ms=month):
            if SINCE[c.account] < month_bounds(month)[1]:
                out[c.account] += c.cost
    return out


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_kept_closed_months_and_every_change_seen(store: Store) -> None:
    for month, gb in ((1, 1), (2, 2), (3, 3), (4, 4)):
        send(store, ACCT_A, ms(2026, month, 3), gb * GB)
    send(store, ACCT_B, ms(2026, 1, 25), 50 * GB)  # before its first credit's month: not counted
    send(store, ACCT_B, ms(2026, 2, 25), 5 * GB)
    send(store, ACCT_B, ms(2026, 4, 2), 6 * GB)
    t, clock = tariff(), Clock()
    book = CostsSince(store, clock=clock, full_every_s=3600)

    def check(expected_a: str, expected_b: str) -> None:
        got = book.costs(t, SINCE, NOW)
        assert got == from_scratch(store, t)
        assert got == {ACCT_A: Decimal(expected_a), ACCT_B: Decimal(expected_b)}

    check("10.00", "11.00")
    assert (book.rated_months, book.kept_months) == (2 + 3 + 1, 0)  # April for both; A's Jan-Mar, B's Feb
    check("10.00", "11.00")
    assert (book.rated_months, book.kept_months) == (6 + 2, 4)  # only April rated again
    send(store, ACCT_A, ms(2026, 4, 3), GB // 2)  # the current month grows
    check("10.50", "11.00")
    assert book.kept_months == 8
    send(store, ACCT_A, ms(2026, 2, 3), GB, late=True)  # an adjustment of a final window in February
    send(store, ACCT_B, ms(2026, 3, 7), 7 * GB)  # a late record in March, a month B had no usage
    before = book.rated_months
    check("11.50", "18.00")
    assert book.rated_months - before == 2 + 2  # April, A's February, B's March
    with store.write() as conn:  # A's January gone (a prune, a rebuild)
        conn.execute(sa.delete(usage_records).where(usage_records.c.window_start_ms < ms(2026, 2, 1)))
    check("10.50", "18.00")
    before = book.rated_months
    rates = [*TARIFF_DOC["rate"][:3], {**TARIFF_DOC["rate"][3], "price": "2.00"}, TARIFF_DOC["rate"][4]]
    t = tariff_file.from_dict({**TARIFF_DOC, "rate": rates})
    check("21.00", "36.00")  # a new tariff: every month rated again
    assert book.rated_months - before == 2 + 2 + 2
    before = book.rated_months
    clock.now = 3601.0  # a full pass now and then, whatever the fingerprints say
    check("21.00", "36.00")
    assert book.rated_months - before == 6
