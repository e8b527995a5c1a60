"""Bytes of a VM at a time its history has it stopped, through the real Collector and the store
(SQLite and PostgreSQL). A stopped VM sends nothing: such bytes mean events not here yet (the bus
and the measures topic are independent). CloudStack moves a VM to another account only while it
is stopped, so the new owner's VM.START may come after its first bytes: the bytes wait, parked,
for the VM's next event while their window is open, and go to the owner the history then names;
what no event explains is billed by the history as it is just before its window is made final,
never left to UNATTRIBUTED. A rebuild (lifecycle first) gives the same records."""

from __future__ import annotations

from kvmeter.collector.model import UNATTRIBUTED, Record, Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from tests.collector_support import ACCT_A, ACCT_B, HOUR, T0, VM1, Clock, M, Stream, usage_event

MIN = 60_000
STOPPED = [
    usage_event("VM.CREATE", VM1, ACCT_A, T0),
    usage_event("VM.START", VM1, ACCT_A, T0),
    usage_event("VM.STOP", VM1, ACCT_A, T0 + HOUR),
]
# assignVirtualMachine at 02:00 (the VM stopped), then the new owner starts it
MOVED = [
    usage_event("VM.DESTROY", VM1, ACCT_A, T0 + 2 * HOUR),
    usage_event("VM.CREATE", VM1, ACCT_B, T0 + 2 * HOUR),
    usage_event("VM.START", VM1, ACCT_B, T0 + 2 * HOUR + 5 * MIN),
]


def events(values: list[tuple[bytes, bytes]]) -> list[Record]:
    return [Record(value, key) for key, value in values]


def bytes_by_account(store: Store) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, qty in store.net_usage().items():
        if key.usage_type in (4, 5):  # NETWORK_BYTES_SENT / RECEIVED
            out[key.account] = out.get(key.account, 0) + qty
    return out


def test_bytes_before_a_late_ownership_move_go_to_the_new_owner(store: Store, tmp_path) -> None:
    """The bytes of 02:10 come before the move's events: they wait, and the move bills them to
    B; a rebuild (events first) gives the same."""
    batch = Stream("s1").batch([M(T0 + 2 * HOUR + 10 * MIN, T0 + 2 * HOUR + 11 * MIN, 1000)])
    clock = Clock(T0 + 2 * HOUR + 12 * MIN)
    live = Collector(store, Settings(), clock)
    live.apply_events(events(STOPPED))
    out = live.apply_batches([Record(batch)])
    assert (out.parked, bytes_by_account(store)) == (1, {})
    moved = live.apply_events(events(MOVED))
    assert moved.unparked == 1
    clock.now = T0 + 3 * HOUR
    live.tick()
    assert bytes_by_account(store) == {ACCT_B: 1000}

    replay = Store(f"sqlite:///{tmp_path}/replay.db")
    replay.migrate()
    rebuilt = Collector(replay, Settings(), Clock(T0 + 3 * HOUR))
    rebuilt.apply_events(events(STOPPED + MOVED))
    rebuilt.apply_batches([Record(batch)])
    rebuilt.tick()
    assert bytes_by_account(replay) == {ACCT_B: 1000}
    replay.close()


def test_a_stopped_vms_bytes_no_event_explains_are_billed_before_their_window_is_final(store: Store) -> None:
    """No event comes: the bytes go to the owner the history names, into their window before it
    is made final (a record, not an adjustment), never to UNATTRIBUTED."""
    clock = Clock(T0 + 2 * HOUR + 12 * MIN)
    c = Collector(store, Settings(), clock)
    c.apply_events(events(STOPPED))
    c.apply_batches(
        [Record(Stream("s1").batch([M(T0 + 2 * HOUR + 10 * MIN, T0 + 2 * HOUR + 11 * MIN, 700)]))]
    )
    clock.now = T0 + 4 * HOUR + 30 * MIN  # the 02:00 window is still open (two hours' grace)
    assert c.tick().unparked == 0
    assert bytes_by_account(store) == {}
    clock.now = T0 + 5 * HOUR + MIN  # now it is made final
    out = c.tick()
    assert (out.unparked, out.adjustments, out.unattributed) == (1, 0, 0)
    assert bytes_by_account(store) == {ACCT_A: 700}
    rows = store.usage(T0 + 2 * HOUR, T0 + 3 * HOUR, usage_type=4)
    assert [(r.key.account, r.recorded, r.adjustment, r.final) for r in rows] == [(ACCT_A, 700, 0, True)]
    assert UNATTRIBUTED not in bytes_by_account(store)


def test_the_last_polls_bytes_after_a_stop_are_billed_at_once(store: Store) -> None:
    """The tap is deleted after CloudStack stamps VM.STOP, and hosts' clocks differ from the
    management servers': bytes within the clock skew of a running segment are no doubt."""
    c = Collector(store, Settings(), Clock(T0 + HOUR + 5 * MIN))
    c.apply_events(events(STOPPED))
    tail = M(T0 + HOUR + 2 * MIN, T0 + HOUR + 2 * MIN + 10_000, 300)
    first = M(T0 - 2 * MIN, T0 - 2 * MIN + 10_000, 40)  # before VM.START's stamp: a slow boot's
    out = c.apply_batches([Record(Stream("s1").batch([tail])), Record(Stream("s2").batch([first]))])
    assert out.parked == 0
    assert bytes_by_account(store) == {ACCT_A: 340}


def test_a_late_batch_from_before_a_vms_current_run_is_doubted_too(store: Store) -> None:
    """The VM runs again now; a batch from its stopped hour, delivered late, must not take the
    running VM's shortcut: it waits like any stopped VM's bytes (here for the move that explains
    it), while the current run's bytes are billed at once."""
    clock = Clock(T0 + 3 * HOUR)
    c = Collector(store, Settings(), clock)
    c.apply_events(events([*STOPPED, usage_event("VM.START", VM1, ACCT_A, T0 + 2 * HOUR + 40 * MIN)]))
    stream = Stream("s1")
    late = M(T0 + HOUR + 30 * MIN, T0 + HOUR + 31 * MIN, 500)
    now = M(T0 + 2 * HOUR + 50 * MIN, T0 + 2 * HOUR + 51 * MIN, 60)
    out = c.apply_batches([Record(stream.batch([late])), Record(stream.batch([now]))])
    assert out.parked == 1
    assert bytes_by_account(store) == {ACCT_A: 60}
    # The event that explains it: B had the VM between 01:20 and 02:30
    c.apply_events(
        events(
            [
                usage_event("VM.DESTROY", VM1, ACCT_A, T0 + HOUR + 20 * MIN),
                usage_event("VM.CREATE", VM1, ACCT_B, T0 + HOUR + 20 * MIN),
                usage_event("VM.START", VM1, ACCT_B, T0 + HOUR + 25 * MIN),
                usage_event("VM.STOP", VM1, ACCT_B, T0 + 2 * HOUR),
                usage_event("VM.DESTROY", VM1, ACCT_B, T0 + 2 * HOUR + 30 * MIN),
                usage_event("VM.CREATE", VM1, ACCT_A, T0 + 2 * HOUR + 30 * MIN),
            ]
        )
    )
    assert bytes_by_account(store) == {ACCT_A: 60, ACCT_B: 500}


def test_parked_bytes_the_store_cannot_add_are_dead_lettered_not_retried_for_ever(store: Store) -> None:
    """Two parked measures whose sum passes int64 (each alone valid): the tick that bills them
    before their window is final, and the event that explains another VM's, bill what the store
    can hold and dead-letter the measure it refuses (the tick failed, and was retried in place
    for ever; the event itself was dead-lettered as unstorable, the measures' refusal taken for
    its own, and the VM's lifecycle lost)."""
    clock = Clock(T0 + 2 * HOUR + 12 * MIN)
    c = Collector(store, Settings(), clock)
    c.apply_events(events(STOPPED))
    at = T0 + 2 * HOUR + 10 * MIN
    vm2 = "9b1f0000-0000-4000-8000-000000000vm2"  # no event names it yet
    nics = [
        {"instance": instance, "mac": f"02:00:3a:7b:00:{i:02x}", "device": f"vnet{i}"}
        for i, instance in enumerate((VM1, VM1, vm2, vm2))
    ]
    batch = Stream("s1").batch([M(at, at + MIN, 2**62, **nic) for nic in nics])  # type: ignore[arg-type]
    assert c.apply_batches([Record(batch)]).parked == 4

    out = c.apply_events(events([usage_event("VM.CREATE", vm2, ACCT_B, T0)]))
    assert (out.unparked, [(d.source, d.reason) for d in out.dead_letters]) == (
        1,
        [("measures", "unstorable")],
    )
    assert c.histories[vm2].owners[0].account == ACCT_B
    clock.now = T0 + 5 * HOUR + MIN  # VM1's window is made final: its doubted bytes are billed
    out = c.tick()
    assert (out.unparked, [d.reason for d in out.dead_letters]) == (1, ["unstorable"])
    assert bytes_by_account(store) == {ACCT_A: 2**62, ACCT_B: 2**62}
    assert store.parked_rows() == []
    assert len(store.dead_letter_rows()) == 2
