"""The delta engine's steady poll by columns (poll_columns) against its poll by rows.

poll_columns is only an accelerator: for any sequence of polls, an engine that tries it first and
falls back to poll_readings (as the agent's daemon does) concludes exactly what an engine that
only polls by rows concludes, and saves the same state."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmeter.agent.delta import DeltaConfig, DeltaEngine
from kvmeter.agent.model import ColumnDeltas, CounterKey, Delta
from kvmeter.agent.wrap_zone import WRAP32

BOOT = "boot-a"
KEYS = tuple(CounterKey(BOOT, 10 + i, f"vnet{i}") for i in range(4))
T0 = 1_700_000_000_000
M0 = 5_000_000
CONFIG = DeltaConfig(line_rate_ceiling_bps=1_000_000_000)  # 125 MB/s: jumps are easy to reach

Readings = list[tuple[int, int, int, int]]  # per key: rx_bytes, rx_packets, tx_bytes, tx_packets


def as_deltas(cd: ColumnDeltas) -> list[Delta]:
    """The row engine's output for the same poll: one Delta per counter that moved."""
    rows = zip(cd.keys, cd.rx_bytes, cd.tx_bytes, cd.rx_packets, cd.tx_packets, strict=True)
    return [
        Delta(k, cd.start_ms, cd.end_ms, rb, tb, rp, tp) for k, rb, tb, rp, tp in rows if rb or tb or rp or tp
    ]


def by_columns(
    engine: DeltaEngine, now: int, mono: int, keys: tuple[CounterKey, ...], values: Readings
) -> list[Delta]:
    columns = [list(c) for c in zip(*values, strict=True)] if values else [[], [], [], []]
    steady = engine.poll_columns(now, mono, keys, *columns, present=frozenset(KEYS))
    if steady is not None:
        return as_deltas(steady)
    return engine.poll_readings(now, mono, list(zip(keys, values, strict=True)), frozenset(KEYS))


def saved_counters(engine: DeltaEngine) -> dict[tuple[int, str], tuple[int, ...]]:
    """The counters a restart would resume from, whatever their layout in the snapshot."""
    resumed = DeltaEngine.from_state(BOOT, engine.to_state(), CONFIG)
    state = resumed.to_state()
    assert state["steady"] is None
    return {(row[0], row[1]): tuple(row[2:]) for row in state["counters"]}


step = st.tuples(
    st.integers(0, 3),  # how many keys are read (a prefix: later ones vanish or are not there yet)
    st.sampled_from(["grow", "grow", "grow", "still", "reset", "jump", "wrap"]),
    st.integers(0, 3),  # which counter the odd event hits
    st.integers(-3, 30_000),  # wall-clock step (ms): may go back
    st.integers(1, 20_000),  # monotonic step (ms)
)


@settings(max_examples=300, deadline=None)
@given(st.lists(step, min_size=1, max_size=12), st.booleans())
def test_columns_conclude_what_rows_conclude(
    steps: list[tuple[int, str, int, int, int]], restart: bool
) -> None:
    rows_engine = DeltaEngine(BOOT, CONFIG)
    cols_engine = DeltaEngine(BOOT, CONFIG)
    values = [[1000 * (i + 1), 10, 2000 * (i + 1), 20] for i in range(len(KEYS))]
    now, mono = T0, M0
    for n, what, which, wall_step, mono_step in steps:
        now += wall_step
        mono += mono_step
        for i, v in enumerate(values):
            if what == "still":
                continue
            v[0] += 1500 * (i + 1)
            v[1] += 3
            v[2] += 700
            v[3] += 1
            if i == which and what == "reset":
                v[:] = [v[0] // 7, 1, 5, 1]
            elif i == which and what == "jump":
                v[2] += 10**12
            elif i == which and what == "wrap":
                v[0] = WRAP32 - 10 if v[0] < WRAP32 - 10 else (v[0] + 100) % WRAP32
        keys = KEYS[: n + 1]
        read = [tuple(v) for v in values[: n + 1]]
        expected = rows_engine.poll_readings(now, mono, list(zip(keys, read, strict=True)), frozenset(KEYS))
        assert by_columns(cols_engine, now, mono, keys, read) == expected
        assert saved_counters(cols_engine) == saved_counters(rows_engine)
        if restart:  # a kill -9 and a restart between any two polls resume the same counters
            cols_engine = DeltaEngine.from_state(BOOT, cols_engine.to_state(), CONFIG)


def test_steady_polls_run_by_columns_and_keep_their_columns() -> None:
    e = DeltaEngine(BOOT, CONFIG)
    keys = KEYS[:2]
    e.poll_readings(T0, M0, [(keys[0], (100, 1, 200, 2)), (keys[1], (300, 3, 400, 4))], frozenset(KEYS))
    cd = e.poll_columns(
        T0 + 10_000, M0 + 10_000, keys, [150, 300], [2, 3], [260, 400], [3, 4], frozenset(KEYS)
    )
    assert cd == ColumnDeltas(keys, T0, T0 + 10_000, [50, 0], [60, 0], [1, 0], [1, 0])
    assert e.to_state()["counters"] == []  # the steady counters are saved as columns
    assert e.to_state()["steady"][0] == (10, 11)
    again = e.poll_columns(
        T0 + 20_000, M0 + 20_000, keys, [151, 301], [2, 3], [261, 401], [3, 4], frozenset(KEYS)
    )
    assert again == ColumnDeltas(keys, T0 + 10_000, T0 + 20_000, [1, 1], [1, 1], [0, 0], [0, 0])
    assert e.tracked_count() == 2
    assert set(e.tracked_keys()) == set(keys)
    assert e.tracked() == {keys[0]: (151, 261, 2, 3), keys[1]: (301, 401, 3, 4)}


def test_columns_decline_and_change_nothing() -> None:
    fresh = DeltaEngine(BOOT, CONFIG)
    assert fresh.poll_columns(T0, M0, KEYS[:1], [1], [1], [1], [1]) is None  # nothing baselined yet
    assert fresh.to_state() == DeltaEngine(BOOT, CONFIG).to_state()

    e = DeltaEngine(BOOT, CONFIG)
    e.poll_readings(T0, M0, [(KEYS[0], (1000, 10, 1000, 10))], frozenset(KEYS))
    before = e.to_state()
    later = (T0 + 1000, M0 + 1000)
    assert e.poll_columns(*later, KEYS[:2], [2000, 1], [11, 1], [2000, 1], [11, 1]) is None  # unknown key
    assert e.poll_columns(*later, KEYS[:1], [900], [11], [2000], [11]) is None  # a decrease
    assert e.poll_columns(*later, KEYS[:1], [1000 + 10**9], [11], [2000], [11]) is None  # over the ceiling
    assert e.to_state() == before
