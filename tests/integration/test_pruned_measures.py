"""A late measure of a resource whose lifecycle events retention pruned: dead-lettered with its
bytes (reason resource-pruned, counted), never parked to be billed as unattributed, never billed
into the pruned past, not re-driven; one from after the pruned past parks as before. Both stores."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry

from kvmeter.collector.metrics import Metrics
from kvmeter.collector.model import Record
from kvmeter.collector.prune import Pruner
from kvmeter.collector.pruned_measures import RESOURCE_PRUNED
from kvmeter.collector.redrive import FAILED, Redriver
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from tests.collector_support import HOUR, MIN, T0, VM1, Clock, M, Stream
from tests.integration.test_retention import fed  # noqa: F401  (the fixture)
from tests.retention_support import NOW, POLICY, SETTINGS, event_resources


def test_a_late_measure_of_a_pruned_resource_is_dead_lettered_with_its_bytes(
    fed: tuple[Store, Collector, Clock],  # noqa: F811
) -> None:
    store, _, clock = fed
    Pruner(store, POLICY, clock).run()
    assert VM1 not in event_resources(store)  # closed a month ago: its events went
    billed, parked = store.net_usage(), store.parked_rows()
    letters_before = len(store.dead_letter_rows())
    replica = Collector(store, SETTINGS, clock)  # one that starts now: VM1 is known by its tombstone only
    late = Stream("stream-late", "h9").batch(
        [
            M(T0 + 40 * MIN, T0 + 41 * MIN, 4321, mac="", address=""),  # VM1, from its pruned past
            M(T0 + 50 * MIN, T0 + 51 * MIN, 79, mac="", address=""),
            M(NOW - HOUR, NOW - HOUR + MIN, 5, mac="", address=""),  # VM1 again, after it: parks
        ]
    )
    out = replica.apply_batches([Record(late, None, "measures/0@77")])

    assert [d.reason for d in out.dead_letters] == [RESOURCE_PRUNED]
    assert out.pruned_bytes == 4321 + 79
    assert out.parked == 1
    assert store.net_usage() == billed  # nothing billed into the pruned past
    assert sorted((m.instance_uuid, m.bytes) for m in store.parked_rows()) == sorted(
        [*((m.instance_uuid, m.bytes) for m in parked), (VM1, 5)]
    )
    rows = store.dead_letter_rows()
    assert len(rows) == letters_before + 1
    letter = rows[-1]
    assert (letter["source"], letter["origin"], letter["reason"]) == (
        "measures",
        "measures/0@77",
        RESOURCE_PRUNED,
    )
    doc = json.loads(letter["raw"])
    assert (doc["resource"], doc["bytes"], doc["seq"]) == (VM1, 4321 + 79, 1)
    assert [m["bytes"] for m in doc["measures"]] == [4321, 79]

    metrics = Metrics(CollectorRegistry())
    metrics.record(out)
    assert metrics.registry.get_sample_value("kvmeter_pruned_resource_bytes_total") == 4321 + 79
    assert (
        metrics.registry.get_sample_value(
            "kvmeter_dead_letters_total", {"source": "measures", "reason": RESOURCE_PRUNED}
        )
        == 1
    )

    # A retry applies nothing: the letter stays open, with its reason.
    (stored,) = [x for x in store.dead_letters() if x.reason == RESOURCE_PRUNED]
    done = Redriver(store, SETTINGS, clock).retry(stored.id)
    assert done is not None
    assert done.result == FAILED
    assert (done.letter.state, done.letter.reason) == ("open", RESOURCE_PRUNED)
    assert store.net_usage() == billed
    # The same batch again is a duplicate: no second letter.
    again = replica.apply_batches([Record(late, None, "measures/0@78")])
    assert (again.duplicates, again.dead_letters) == (1, [])
