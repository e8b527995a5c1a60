"""The delta engine's rules, one table per rule (see agent/delta.py)."""

from __future__ import annotations

import itertools

import pytest

from kvmeter.agent.delta import DeltaConfig, DeltaEngine
from kvmeter.agent.model import CounterKey, CounterSample
from kvmeter.agent.wrap_zone import WRAP32

BOOT = "boot-a"
K = CounterKey(BOOT, 7, "vnet0")
T0 = 1_700_000_000_000  # wall ms
M0 = 5_000_000  # monotonic ms
GBIT = 1_000_000_000


def s(key: CounterKey, rxb: int, txb: int, rxp: int = 0, txp: int = 0) -> CounterSample:
    return CounterSample(key=key, rx_bytes=rxb, tx_bytes=txb, rx_packets=rxp, tx_packets=txp)


def engine(ceiling_bps: int = 100 * GBIT) -> DeltaEngine:
    return DeltaEngine(BOOT, DeltaConfig(line_rate_ceiling_bps=ceiling_bps))


# -- new identities: baseline at a fresh start, count from zero when born while running ----------


@pytest.mark.parametrize(
    ("how", "second", "expected_rx"),
    [
        # present at the fresh start: baselined, then only growth counts
        ("present_at_start", (1500, 900), 500),
        # absent in the first poll, appears in the second: born while running, counts from zero
        ("appears_later", (1500, 900), 1500),
        # a "new" link event seen before its first reading: counts from zero
        ("new_event", (1500, 900), 1500),
    ],
)
def test_new_identity(how: str, second: tuple[int, int], expected_rx: int) -> None:
    e = engine()
    other = CounterKey(BOOT, 2, "eth0")
    if how == "present_at_start":
        assert e.poll(T0, M0, [s(K, 1000, 800)], present=[other]) == []
    elif how == "appears_later":
        assert e.poll(T0, M0, [], present=[other]) == []
    else:
        e.link_created(K)
        assert e.poll(T0, M0, [], present=[other]) == []
    deltas = e.poll(T0 + 10_000, M0 + 10_000, [s(K, *second)], present=[other])
    assert [d.rx_bytes for d in deltas] == [expected_rx]
    assert deltas[0].start_ms == T0
    assert deltas[0].end_ms == T0 + 10_000


def test_new_event_before_the_first_poll_counts_from_zero() -> None:
    e = engine()
    e.link_created(K)
    deltas = e.poll(T0, M0, [s(K, 300, 200, 3, 2)])
    assert [(d.rx_bytes, d.tx_bytes, d.rx_packets, d.tx_packets) for d in deltas] == [(300, 200, 3, 2)]


def test_preexisting_but_unmetered_at_start_is_baselined_when_it_becomes_metered() -> None:
    e = engine()
    e.poll(T0, M0, [], present=[K])  # the tap exists, inventory does not know it yet
    assert e.poll(T0 + 1000, M0 + 1000, [s(K, 5000, 5000)], present=[K]) == []
    assert [d.rx_bytes for d in e.poll(T0 + 2000, M0 + 2000, [s(K, 5100, 5000)])] == [100]


def test_same_name_new_ifindex_is_a_new_counter_after_the_old_one_closed() -> None:
    e = engine()
    e.poll(T0, M0, [s(K, 1000, 1000)])
    reborn = CounterKey(BOOT, 9, "vnet0")
    # the old incarnation is still open (its DELLINK not yet applied): the new one waits
    assert e.poll(T0 + 1000, M0 + 1000, [s(reborn, 40, 60)]) == []
    final = e.final(T0 + 1100, M0 + 1100, s(K, 1010, 1000))
    assert final is not None
    assert final.rx_bytes == 10
    deltas = e.poll(T0 + 2000, M0 + 2000, [s(reborn, 50, 60)])
    assert [(d.key, d.rx_bytes, d.tx_bytes, d.start_ms) for d in deltas] == [(reborn, 50, 60, T0 + 1000)]


def test_same_name_new_ifindex_counts_once_the_old_one_is_forgotten() -> None:
    e = engine()
    e.poll(T0, M0, [s(K, 1000, 1000)])
    reborn = CounterKey(BOOT, 9, "vnet0")
    deltas = []
    for i in range(1, 5):  # the DELLINK was lost: the old key is forgotten after a few polls
        deltas += e.poll(T0 + i * 1000, M0 + i * 1000, [s(reborn, 40, 60)])
    assert [(d.key, d.rx_bytes) for d in deltas] == [(reborn, 40)]


# -- decreases: wrap only when plausible, otherwise a reset counting from zero --------------------


@pytest.mark.parametrize(
    ("prev", "cur", "elapsed_ms", "ceiling", "moved", "wrapped"),
    [
        # near 2^32, small wrapped amount, 1 s at 10 Gbit/s: a wrap
        (WRAP32 - 100, 50, 1000, 10 * GBIT, 150, True),
        # far from 2^32: cannot be a wrap at 1 Gbit/s in 1 s -> reset, counts from zero
        (1_000_000, 50, 1000, GBIT, 50, False),
        # near 2^32 but the wrapped amount exceeds what the line allows -> reset
        (WRAP32 - 100_000_000, 100_000_000, 1000, GBIT, 100_000_000, False),
        # far from 2^32: a reset even when the line rate would allow a wrap
        (9000, 5, 1000, 100 * GBIT, 5, False),
        (1_000_000_000, 10, 10_000, 100 * GBIT, 10, False),
        # a 64-bit counter above 2^32 that goes down is never a 32-bit wrap -> reset
        (WRAP32 + 5, 10, 1000, 100 * GBIT, 10, False),
        # a longer interval makes a larger wrap plausible
        (WRAP32 - 1_000_000_000, 1_000, 10_000, 10 * GBIT, 1_000_001_000, True),
    ],
)
def test_decrease_is_wrap_or_reset(
    prev: int, cur: int, elapsed_ms: int, ceiling: int, moved: int, wrapped: bool
) -> None:
    e = engine(ceiling)
    e.poll(T0, M0, [s(K, prev, 0)])
    (d,) = e.poll(T0 + elapsed_ms, M0 + elapsed_ms, [s(K, cur, 0)])
    assert (d.rx_bytes, d.wrapped, d.quarantine_reason) == (moved, wrapped, None)


def test_reset_counts_every_counter_from_zero() -> None:
    e = engine(GBIT)
    e.poll(T0, M0, [s(K, 9_000_000, 8_000_000, 9000, 8000)])
    (d,) = e.poll(T0 + 1000, M0 + 1000, [s(K, 10, 9_000_000, 1, 8100)])
    assert (d.rx_bytes, d.tx_bytes, d.rx_packets, d.tx_packets, d.wrapped) == (10, 9_000_000, 1, 8100, False)


# -- quarantine: jumps above the line-rate ceiling are counted, never billed ----------------------


@pytest.mark.parametrize(
    ("jump", "elapsed_ms", "quarantined"),
    [
        (125_000_000, 1000, False),  # exactly 1 Gbit/s for 1 s
        (125_000_001, 1000, True),  # one byte more
        (1_250_000_000, 10_000, False),  # 10 s at the ceiling
        (10**15, 60_000, True),  # a driver bug
    ],
)
def test_jump_above_ceiling_is_quarantined(jump: int, elapsed_ms: int, quarantined: bool) -> None:
    e = engine(GBIT)
    e.poll(T0, M0, [s(K, 1000, 0)])
    (d,) = e.poll(T0 + elapsed_ms, M0 + elapsed_ms, [s(K, 1000 + jump, 0)])
    assert d.rx_bytes == jump
    assert (d.quarantine_reason is not None) == quarantined
    if quarantined:
        assert "ceiling" in (d.quarantine_reason or "")
    # the counter moved on either way: the next delta starts from the new value
    (d2,) = e.poll(T0 + elapsed_ms + 1000, M0 + elapsed_ms + 1000, [s(K, 1000 + jump + 7, 0)])
    assert (d2.rx_bytes, d2.quarantine_reason) == (7, None)


def test_plausibility_uses_monotonic_time_not_the_wall_clock() -> None:
    e = engine(GBIT)
    e.poll(T0, M0, [s(K, 0, 0)])
    # the wall clock jumped back an hour, 10 s really passed: 1 GB in 10 s is fine at 1 Gbit/s
    (d,) = e.poll(T0 - 3_600_000, M0 + 10_000, [s(K, 1_000_000_000, 0)])
    assert d.quarantine_reason is None


# -- intervals: contiguous per counter, never inverted --------------------------------------------


@pytest.mark.parametrize(
    "walls",
    [
        [T0, T0 + 1000, T0 + 2000, T0 + 3000],
        [T0, T0 + 1000, T0 - 50_000, T0 + 500, T0 + 4000],  # steps back, then forward
        [T0, T0, T0, T0],  # a stuck clock
    ],
)
def test_intervals_contiguous_and_never_inverted(walls: list[int]) -> None:
    e = engine()
    e.poll(walls[0], M0, [s(K, 0, 0)])
    deltas = []
    for i, wall in enumerate(walls[1:], start=1):
        deltas += e.poll(wall, M0 + i * 1000, [s(K, i * 100, 0)])
    assert len(deltas) == len(walls) - 1
    assert all(d.end_ms > d.start_ms for d in deltas)
    assert all(a.end_ms == b.start_ms for a, b in itertools.pairwise(deltas))
    assert deltas[0].start_ms == walls[0]


# -- final samples (RTM_DELLINK): the tail is counted, then the counter is closed -----------------


def test_final_sample_counts_the_tail_and_closes() -> None:
    e = engine()
    e.poll(T0, M0, [s(K, 1000, 1000)])
    e.poll(T0 + 1000, M0 + 1000, [s(K, 1500, 1100)])
    d = e.final(T0 + 1500, M0 + 1500, s(K, 1600, 1300, 5, 6))
    assert d is not None
    assert (d.rx_bytes, d.tx_bytes, d.final_at_delete) == (100, 200, True)
    assert (d.start_ms, d.end_ms) == (T0 + 1000, T0 + 1500)
    # a stale reading of the same key (read before the delete, processed after) is ignored
    assert e.poll(T0 + 2000, M0 + 2000, [s(K, 1550, 1200)]) == []
    assert e.final(T0 + 2000, M0 + 2000, s(K, 1600, 1300)) is None
    assert K not in e.tracked()


def test_final_with_no_movement_still_closes() -> None:
    e = engine()
    e.poll(T0, M0, [s(K, 10, 10)])
    d = e.final(T0 + 500, M0 + 500, s(K, 10, 10))
    assert d is not None
    assert d.final_at_delete
    assert d.rx_bytes == 0
    assert K not in e.tracked()


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("born_between_polls", 700),  # created and deleted between two polls: all of it counts
        ("preexisting_unmetered", None),  # existed before we ran: not ours
        ("before_first_poll", None),  # fresh start, nothing known: never over-bill
    ],
)
def test_final_of_untracked_key(setup: str, expected: int | None) -> None:
    e = engine()
    if setup == "born_between_polls":
        e.poll(T0, M0, [])
    elif setup == "preexisting_unmetered":
        e.poll(T0, M0, [], present=[K])
    d = e.final(T0 + 1000, M0 + 1000, s(K, 700, 0))
    assert (d.rx_bytes if d else None) == expected


def test_tracked_key_missing_from_reads_waits_for_its_late_final() -> None:
    e = engine()
    e.poll(T0, M0, [s(K, 100, 100)])
    e.poll(T0 + 1000, M0 + 1000, [])  # gone from /proc/net/dev, DELLINK not yet handled
    d = e.final(T0 + 1200, M0 + 1200, s(K, 180, 100))
    assert d is not None
    assert d.rx_bytes == 80


def test_tracked_key_forgotten_after_repeated_absence() -> None:
    e = engine()
    e.poll(T0, M0, [s(K, 100, 100)])
    for i in range(1, 4):
        e.poll(T0 + i * 1000, M0 + i * 1000, [])
    assert K not in e.tracked()


def test_other_boot_samples_are_ignored() -> None:
    e = engine()
    e.poll(T0, M0, [s(CounterKey("boot-b", 7, "vnet0"), 10, 10)])
    assert e.tracked() == {}


# -- saved state: resume without loss or double count ---------------------------------------------


def test_state_round_trip_resumes_from_saved_values() -> None:
    e = engine()
    e.poll(T0, M0, [s(K, 1000, 2000)])
    e.poll(T0 + 1000, M0 + 1000, [s(K, 1100, 2100)])
    restored = DeltaEngine.from_state(BOOT, e.to_state(), DeltaConfig())
    (d,) = restored.poll(T0 + 5000, M0 + 5000, [s(K, 1500, 2300)])
    assert (d.rx_bytes, d.tx_bytes, d.start_ms) == (400, 200, T0 + 1000)


def test_restored_state_counts_links_created_while_down_from_zero() -> None:
    e = engine()
    e.poll(T0, M0, [s(K, 1000, 2000)])
    restored = DeltaEngine.from_state(BOOT, e.to_state())
    born = CounterKey(BOOT, 12, "vnet1")
    deltas = restored.poll(T0 + 9000, M0 + 9000, [s(K, 1000, 2000), s(born, 70, 30)])
    assert [(d.key, d.rx_bytes, d.start_ms) for d in deltas] == [(born, 70, T0)]


def test_restored_state_keeps_preexisting_keys_baselined() -> None:
    e = engine()
    e.poll(T0, M0, [], present=[K])
    restored = DeltaEngine.from_state(BOOT, e.to_state())
    assert restored.poll(T0 + 1000, M0 + 1000, [s(K, 5000, 5000)]) == []


def test_state_of_another_boot_starts_fresh_and_baselines() -> None:
    e = engine()
    e.poll(T0, M0, [s(K, 1000, 2000)])
    other = DeltaEngine.from_state("boot-b", e.to_state())
    k2 = CounterKey("boot-b", 7, "vnet0")
    assert other.poll(T0 + 1000, M0 + 1000, [s(k2, 5000, 5000)]) == []


def test_final_sample_never_resets_a_counter_it_reports_lower() -> None:
    # a veth's RTM_DELLINK reports rx 0: the kernel sums it from the peer, already detached
    e = engine()
    e.poll(T0, M0, [s(K, 9000, 7000, 90, 70)])
    d = e.final(T0 + 500, M0 + 500, s(K, 0, 7300, 0, 73))
    assert d is not None
    assert (d.rx_bytes, d.tx_bytes, d.rx_packets, d.tx_packets, d.wrapped) == (0, 300, 0, 3, False)


def test_a_read_key_is_never_aged_out_whatever_the_readings_iterable_or_present_set() -> None:
    e = engine()
    present: frozenset[CounterKey] = frozenset()  # the same frozenset every poll: recognised by identity
    e.poll_readings(T0, M0, iter([(K, (1000, 10, 2000, 20))]), present)
    moved = []
    for i in range(1, 6):
        readings = iter([(K, (1000 + 100 * i, 10 + i, 2000, 20))])  # a one-shot iterator
        moved += [d.rx_bytes for d in e.poll_readings(T0 + 1000 * i, M0 + 1000 * i, readings, present)]
    assert moved == [100] * 5
    assert K in e.tracked()


def test_a_present_set_is_this_boots_keys_whatever_the_last_one_held() -> None:
    """A new frozenset after one of this boot's keys only (a storm's): the keys it adds are
    looked at, another boot's among them left out; then one with it, then one without."""
    e = engine()
    other = CounterKey("boot-b", 7, "vnet7")
    born = CounterKey(BOOT, 8, "vnet8")
    ours = frozenset({K})
    assert e._present_set(ours, []) is ours
    for present, expected in (
        (ours | {born, other}, {K, born}),
        (ours | {other}, {K}),
        (ours | {born}, {K, born}),
        (frozenset({born}), {born}),
    ):
        got = e._present_set(present, [])
        assert got == expected
        assert (got is present) == (other not in present)  # no copy of a set of this boot's keys


def test_a_birth_announced_for_another_boots_key_is_not_taken() -> None:
    """Only this boot's links are born while the engine runs: another boot's key stays as the
    engine found it (here baselined, so its counters are not billed from zero)."""
    other = CounterKey("boot-b", 7, "vnet7")
    e = engine()
    e.poll(T0, M0, [], present=[other])
    e.links_created([other])
    assert e._created == {}
    assert e.poll(T0 + 1000, M0 + 1000, [s(other, 5000, 5000)]) == []
