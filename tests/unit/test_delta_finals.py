"""The delta engine's final samples taken together (DeltaEngine.finals) against final() for each
in turn: the same deltas in the same order and the same state, whatever the finals are (on the
steady columns or not, lifted before, unknown, another boot's, twice the same key, grown, lower,
in the 32-bit wrap zone, over the ceiling, stamped before the last poll)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmeter.agent.delta import DeltaConfig, DeltaEngine
from kvmeter.agent.model import CounterKey, CounterSample
from kvmeter.agent.wrap_zone import WRAP32, WRAP_NEAR

BOOT = "boot-a"
T0 = 1_700_000_000_000
M0 = 5_000_000
CONFIG = DeltaConfig(line_rate_ceiling_bps=1_000_000_000)
KEYS = [CounterKey(BOOT, 10 + i, f"vnet{i}") for i in range(6)]
# not on the columns: born since the last poll, another boot's, never seen
BORN = CounterKey(BOOT, 50, "vnet50")
OTHER_BOOT = CounterKey("boot-b", 11, "vnet1")
UNKNOWN = CounterKey(BOOT, 77, "vnet77")

counts = st.integers(1, 10**9) | st.integers(WRAP_NEAR - 10**6, WRAP32 + 10**6)
final_counts = st.integers(0, 2**33) | st.integers(WRAP_NEAR - 10**6, WRAP32 + 10**6)
one_final = st.tuples(
    st.sampled_from([*KEYS, BORN, OTHER_BOOT, UNKNOWN]),
    st.tuples(final_counts, final_counts, final_counts, final_counts),
    st.integers(-20_000, 60_000) | st.integers(-5, 1_500),  # ms after the last poll
    st.none() | st.integers(0, 10**6) | st.integers(10**8, 3 * 10**8),  # or grew by this since the last poll
)


def steady_engine(before: list[tuple[int, ...]], lifted: set[int]) -> DeltaEngine:
    """Counters last read by columns, some of them lifted out by an earlier final, one born."""
    engine = DeltaEngine(BOOT, CONFIG)
    first = [tuple(max(1, v - 10**6) for v in values) for values in before]
    engine.poll_readings(T0, M0, list(zip(KEYS, first, strict=True)), frozenset(KEYS))
    columns = [list(c) for c in zip(*before, strict=True)]
    assert engine.poll_columns(T0 + 10_000, M0 + 10_000, tuple(KEYS), *columns) is not None
    for i in sorted(lifted):
        rxb, rxp, txb, txp = before[i]
        engine.final(T0 + 11_000, M0 + 11_000, CounterSample(KEYS[i], rxb + 9, txb + 9, rxp + 1, txp + 1))
    engine.link_created(BORN)
    return engine


def state(engine: DeltaEngine) -> tuple:
    """What the engine tracks and saves (sets and rows as sets: their order does not count)."""
    tracked = set(engine.tracked_keys())
    saved = DeltaEngine.from_state(BOOT, engine.to_state(), CONFIG).to_state()
    for name in ("counters", "preexisting", "closed"):
        saved[name] = frozenset(map(tuple, saved[name]))
    return tracked, engine._closed, engine._created, engine._lifted, saved


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(counts, counts, counts, counts), min_size=6, max_size=6),
    st.sets(st.integers(0, 5), max_size=2),
    st.lists(one_final, max_size=8),
)
def test_finals_together_conclude_what_each_in_turn_concludes(
    before: list[tuple[int, ...]], lifted: set[int], drawn: list[tuple]
) -> None:
    together, in_turn = steady_engine(before, lifted), steady_engine(before, lifted)
    finals = []
    for key, values, after, grew in drawn:
        if grew is not None and key in KEYS:
            values = tuple(v + grew for v in before[KEYS.index(key)])
        finals.append((T0 + 10_000 + after, M0 + 10_000 + max(after, 0), key, values))
    expected = []
    for wall, mono, key, (rxb, rxp, txb, txp) in finals:
        delta = in_turn.final(wall, mono, CounterSample(key, rxb, txb, rxp, txp))
        if delta is not None:
            expected.append(delta)
    assert together.finals(finals) == expected
    everyone = [*KEYS, BORN, OTHER_BOOT, UNKNOWN]
    assert together.untracked(everyone) == set(everyone) - set(together.tracked_keys())
    assert state(together) == state(in_turn)


def test_a_storm_of_finals_is_concluded_on_the_columns() -> None:
    """The bench's case: every final on the columns, a veth's rx read as 0 at delete; the same
    deltas and state as final() for each in turn."""
    before = [(1000 * (i + 1), 10, 2000, 20) for i in range(6)]
    engine, in_turn = steady_engine(before, set()), steady_engine(before, set())
    finals = [(T0 + 12_000 + i, M0 + 12_000 + i, key, (0, 10, 2500 + i, 25)) for i, key in enumerate(KEYS)]
    deltas = engine.finals(finals)
    expected = [
        in_turn.final(wall, mono, CounterSample(key, rxb, txb, rxp, txp))
        for wall, mono, key, (rxb, rxp, txb, txp) in finals
    ]
    assert deltas == expected
    assert [(d.key, d.rx_bytes, d.tx_bytes, d.rx_packets, d.tx_packets) for d in deltas] == [
        (key, 0, 500 + i, 0, 5) for i, key in enumerate(KEYS)
    ]
    assert all(d.final_at_delete and d.start_ms == T0 + 10_000 for d in deltas)
    assert [d.end_ms for d in deltas] == [T0 + 12_000 + i for i in range(len(KEYS))]
    assert engine._lifted == set(KEYS)
    assert engine._closed == set(KEYS)
    assert not set(engine.tracked_keys())  # the born key is announced, not yet tracked
    assert state(engine) == state(in_turn)  # (saving settles the engines: last)
