"""Clock skew and a lossy, duplicating event bus, found in review. An event delivered twice (a
producer's retry, a line written twice) keeps its first place in its source's delivery order
whether both copies come in one chunk or in two; `kvmeter ingest` of two files of one name
numbers the second after the first; so the clock-skew rule, and the records it gives, do not
depend on how deliveries were batched or ingested. The reconciler takes a previous pass as a
witness after a VM's last event only when it was read later by more than the clock skew."""

from __future__ import annotations

from pathlib import Path

from kvmeter.collector.ingest import ingest_events
from kvmeter.collector.model import RUNNING_VM, Record, Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from tests.collector_support import ACCT_A, HOUR, T0, VM1, Clock, usage_event
from tests.harness import cloudstack_api as api
from tests.integration.test_reconcile import Rig, cloud_double

NOW = T0 + 3 * HOUR
SOURCE = "cloudstack/0"  # a Kafka partition


def _skewed_start_stop_start_again() -> list[tuple[bytes, bytes]]:
    """A START from a management server whose clock is 2 s fast, the STOP delivered after it
    (stamped 2 s earlier: the VM ran for a moment), then the START again, byte for byte (the
    producer retried it)."""
    start = usage_event("VM.START", VM1, ACCT_A, T0 + 2000)
    stop = usage_event("VM.STOP", VM1, ACCT_A, T0)
    return [start, stop, start]


def _running_ms(store: Store) -> int:
    return sum(q for key, q in store.net_usage().items() if key.usage_type == RUNNING_VM)


def test_a_start_delivered_twice_in_one_chunk_keeps_its_first_place(store: Store, tmp_path: Path) -> None:
    """The same deliveries (offsets 0, 1, 2; offset 2 repeats offset 0) applied in one chunk and
    one at a time give the same records: the repeated START keeps offset 0, so the STOP delivered
    after it leaves the VM stopped and no RUNNING_VM is billed. Before, in one chunk the store
    kept the START at offset 2 (after the STOP), and the VM was billed as running ever after."""
    records = [Record(v, k, "", (SOURCE, i)) for i, (k, v) in enumerate(_skewed_start_stop_start_again())]
    live = Collector(store, Settings(), Clock(NOW))
    live.apply_events(records)  # one consumer batch
    live.tick()
    one_by_one = Store(f"sqlite:///{tmp_path}/one-by-one.db")
    one_by_one.migrate()
    other = Collector(one_by_one, Settings(), Clock(NOW))
    for record in records:
        other.apply_events([record])
    other.tick()
    assert _running_ms(store) == 0
    assert store.net_usage() == one_by_one.net_usage()
    one_by_one.close()


def test_an_events_file_with_a_line_written_twice_bills_what_it_would_without(
    store: Store, tmp_path: Path
) -> None:
    """An events file (`[lifecycle] events_file`, `kvmeter ingest --events`) whose relay wrote
    the START line twice: a line read twice changes nothing (README), so the skewed START / STOP
    pair bills no running time, as it does without the repeated line (test_clock_skew.py)."""
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(value for _, value in _skewed_start_stop_start_again()) + b"\n")
    collector = Collector(store, Settings(), Clock(NOW))
    ingest_events(collector, events)
    collector.tick()
    assert _running_ms(store) == 0


def test_two_exports_of_one_name_ingested_one_after_the_other_keep_their_order(
    store: Store, tmp_path: Path
) -> None:
    """`kvmeter ingest --events` of Monday's events.jsonl, then of Tuesday's (another directory,
    the same name: one source for the clock-skew rule). The VM started at 23:59:50 (Monday's last
    lines) and stopped 30 s later (Tuesday's first line): 30 s of RUNNING_VM. Before, each run
    numbered its lines from 1, so Tuesday's STOP took a place before Monday's START, the START
    (stamped 30 s earlier) was applied after it, and the VM was billed as running ever after."""
    other = "3c5e0000-0000-4000-8000-0000000000vm3"
    monday = [
        usage_event("VM.START", other, ACCT_A, T0 - HOUR),
        usage_event("VM.STOP", other, ACCT_A, T0 - HOUR + 60_000),
        usage_event("VM.START", VM1, ACCT_A, T0 - 10_000),
    ]
    tuesday = [usage_event("VM.STOP", VM1, ACCT_A, T0 + 20_000)]
    collector = Collector(store, Settings(), Clock(NOW))
    for day, lines in (("mon", monday), ("tue", tuesday)):
        (tmp_path / day).mkdir()
        events = tmp_path / day / "events.jsonl"
        events.write_bytes(b"\n".join(value for _, value in lines) + b"\n")
        ingest_events(collector, events)
    collector.tick()
    running = [
        q for key, q in store.net_usage().items() if key.usage_type == RUNNING_VM and key.resource == VM1
    ]
    assert sum(running) == 30_000  # 10 s in Monday's last window, 20 s in Tuesday's first


def test_a_pass_read_within_the_skew_before_a_start_is_no_witness_after_it(tmp_path: Path) -> None:
    """The reconciler's previous pass is a second witness only if it was read after the VM's last
    event, but the pass is timed by the collector's clock and the event by a management server's.
    Here that server runs 30 s slow: a pass reads the VM Stopped, the VM starts just after (its
    START stamped 30 s before the pass), runs 20 minutes, and its STOP is late on the bus. The
    next pass (CloudStack: Stopped) must not take the first one as seeing the VM stopped after its
    start: that closed RUNNING at the first pass's time, 30 s after the start, and the STOP that
    came then changed nothing (19.5 minutes never billed). It waits for a second witness; the
    STOP closes RUNNING at its stamp."""
    with cloud_double() as double:
        rig = Rig(tmp_path, double)
        rig.events(usage_event("VM.CREATE", VM1, ACCT_A, T0))
        double.cloud["listVirtualMachines"] = [api.vm(VM1, "web-1", "alice", "Stopped", "small", T0)]
        first = rig.clock.now
        rig.run_pass()  # Stopped, as kvmeter has it
        started = first - 30_000  # a slow clock's stamp; in truth just after the pass
        stopped = started + 20 * 60_000
        rig.events(usage_event("VM.START", VM1, ACCT_A, started))
        rig.run_pass(hours_later=1)  # Stopped again: the STOP is still on its way
        rig.events(usage_event("VM.STOP", VM1, ACCT_A, stopped))
        rig.run_pass(hours_later=1)
        assert [row["event_type"] for row in rig.corrections()] == []
        assert sum(rig.quantity(RUNNING_VM, VM1).values()) == 20 * 60_000
        rig.store.close()
