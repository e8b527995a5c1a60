"""kvmeter_unpriced_usage_items / kvmeter_unpriced_usage{usage_type}: the current month's usage
the tariff in force does not price (billing.unpriced), computed from the store at scrape time
(kept `ttl_s`, and every replica reports the shared store's truth). The same usage shows in
/v1/costs as `unpriced`, with the reason, and makes the account's costs not `complete`."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector as PromCollector

from kvmeter.collector.billing import month_bounds
from kvmeter.collector.billing.reads import CachedFacts
from kvmeter.collector.billing.tariff import BYTE_TYPES
from kvmeter.collector.billing.tariff_file import TariffSource
from kvmeter.collector.billing.unpriced import Unpriced, unpriced
from kvmeter.collector.model import USAGE_TYPE_NAMES
from kvmeter.collector.store import Store

log = logging.getLogger(__name__)


class UnpricedGauges(PromCollector):
    def __init__(self, store: Store, tariffs: TariffSource, *, ttl_s: float = 60.0,
                 clock: Callable[[], float] = time.time):  # fmt: skip
        self.store = store
        self.tariffs = tariffs
        self.ttl_s = ttl_s
        self.clock = clock
        self.facts = CachedFacts(store, ttl_s)
        self._lock = threading.Lock()
        self._last: tuple[float, object, dict[int, Unpriced]] | None = None

    def _current(self) -> dict[int, Unpriced]:
        tariff, now = self.tariffs.current, self.clock()
        with self._lock:
            last = self._last
            if last is not None and last[1] is tariff and now < last[0] + self.ttl_s:
                return last[2]
            start, end = month_bounds(int(now * 1000))
            with self.store.read() as conn:
                found = unpriced(conn, tariff, self.facts.get(conn), start, end)
            self._last = (now, tariff, found)
            return found

    def collect(self) -> Iterator[GaugeMetricFamily]:
        items = GaugeMetricFamily(
            "kvmeter_unpriced_usage_items",
            "Records and adjustments of this month (UTC) some of whose usage no rate of the tariff prices",
            labels=["usage_type"],
        )
        quantity = GaugeMetricFamily(
            "kvmeter_unpriced_usage",
            "This month's usage (UTC) no rate of the tariff prices, in its unit (ms or bytes)",
            labels=["usage_type", "unit"],
        )
        try:
            found = self._current()
        except Exception as exc:  # a scrape must not fail because the database is down
            log.warning("unpriced usage gauges unavailable: %s", exc)
            return
        for usage_type, what in sorted(found.items()):
            name = USAGE_TYPE_NAMES.get(usage_type, str(usage_type))
            items.add_metric([name], what.items)
            quantity.add_metric([name, "bytes" if usage_type in BYTE_TYPES else "ms"], what.quantity)
        yield items
        yield quantity


def watch(tariffs: TariffSource | None, store: Store, registry: CollectorRegistry) -> None:
    """With a tariff ([billing] tariff_file): the gauges on the daemon's /metrics."""
    if tariffs is not None:
        registry.register(UnpricedGauges(store, tariffs))
