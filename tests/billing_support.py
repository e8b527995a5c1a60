"""Shared by the credits and balances tests: a store metered through the collector's own path
(one VM per account), and a small tariff that makes its costs easy to count."""

from __future__ import annotations

import time
from decimal import Decimal

from kvmeter.collector.billing import tariff_file
from kvmeter.collector.billing.tariff import Tariff
from kvmeter.collector.model import Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from kvmeter.collector.store import credits as stored
from tests.collector_support import Clock, M, Stream

ACCT_A = "aaaaaaaa-0000-4000-8000-00000000000a"
ACCT_B = "bbbbbbbb-0000-4000-8000-00000000000b"
GB = 10**9
# 1.00 EUR per GB sent, received free, time free: costs are the GB an account's VMs sent.
TARIFF_DOC = {
    "currency": "EUR",
    "decimals": 2,
    "rate": [
        {"usage_type": "RUNNING_VM", "per_hour": "0"},
        {"usage_type": "ALLOCATED_VM", "per_hour": "0"},
        {"usage_type": "IP_ADDRESS", "per_hour": "0"},
        {"usage_type": "NETWORK_BYTES_SENT", "traffic_type": "public", "unit": "GB", "price": "1.00"},
        {"usage_type": "NETWORK_BYTES_RECEIVED", "traffic_type": "public", "unit": "GB", "price": "0"},
    ],
}


def tariff() -> Tariff:
    return tariff_file.from_dict(TARIFF_DOC, "test tariff", billable=["public"])


class Cloud:
    """A store metered through the collector's own path, one VM per account (owner from the
    VM's metadata), the clock at now (records in this month, where credits count)."""

    def __init__(self, store: Store):
        self.store = store
        self.now = int(time.time() * 1000)
        self.collector = Collector(store, Settings(), Clock(self.now))
        owners = {f"i-{n}-VM": {"ownerAccountUuid": a} for n, a in enumerate((ACCT_A, ACCT_B))}
        self.stream = Stream("stream-balances", owners=owners)
        self.sent = 0

    def send(self, account: str, nbytes: int) -> None:
        n = (ACCT_A, ACCT_B).index(account)
        self.sent += 1
        end = self.now - 1000 + self.sent  # distinct instants, inside this month
        m = M(end - 1, end, nbytes, instance="", domain=f"i-{n}-VM", mac=f"02:00:00:00:00:0{n}", address="")
        out = self.collector.apply_batch(self.stream.batch([m]))
        assert out.billed_bytes == nbytes, out

    def credit(self, account: str, amount: str) -> None:
        with self.store.write() as conn:
            stored.add_credit(conn, account, Decimal(amount), "EUR", "test", "operator", self.now - 5000)
