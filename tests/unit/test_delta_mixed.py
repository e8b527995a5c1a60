"""The delta engine's mixed poll (poll_mixed: the steady counters by columns, the others by
rows) against its poll by rows, with link events between polls.

poll_mixed is only an accelerator: for any sequence of polls and VM reboots (a tap's final
counters, then a new incarnation under the same name), an engine that polls by columns, then
mixed, then by rows (as the agent's daemon does) concludes exactly what an engine that only
polls by rows concludes, and saves the same state."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmeter.agent.delta import DeltaConfig, DeltaEngine
from kvmeter.agent.model import ColumnDeltas, CounterKey, CounterSample, Delta
from kvmeter.agent.wrap_zone import WRAP32, WRAP_NEAR

BOOT = "boot-a"
T0 = 1_700_000_000_000
M0 = 5_000_000
CONFIG = DeltaConfig(line_rate_ceiling_bps=1_000_000_000)
NAMES = [f"vnet{i}" for i in range(6)]


def as_deltas(cd: ColumnDeltas) -> list[Delta]:
    rows = zip(cd.keys, cd.rx_bytes, cd.tx_bytes, cd.rx_packets, cd.tx_packets, strict=True)
    return [
        Delta(k, cd.start_ms, cd.end_ms, rb, tb, rp, tp) for k, rb, tb, rp, tp in rows if rb or tb or rp or tp
    ]


def by_daemon(
    engine: DeltaEngine,
    now: int,
    mono: int,
    keys: tuple[CounterKey, ...],
    values: list[tuple[int, ...]],
    *also_present: CounterKey,
    after_events: bool = False,
    newborn_columns: bool = False,
) -> tuple[list[Delta], str]:
    """What the daemon runs: columns (unless link events came since the last poll), else
    mixed, else rows; and which of them concluded. `also_present`: links not metered."""
    present = frozenset((*keys, *also_present))
    columns = [list(c) for c in zip(*values, strict=True)] if values else [[], [], [], []]
    steady = None if after_events else engine.poll_columns(now, mono, keys, *columns, present=present)
    if steady is not None:
        return as_deltas(steady), "columns"
    mixed = engine.poll_mixed(now, mono, keys, *columns, present, newborn_columns=newborn_columns)
    if mixed is not None:
        return mixed[1] + as_deltas(mixed[0]), "mixed"
    return engine.poll_readings(now, mono, list(zip(keys, values, strict=True)), present), "rows"


def saved(engine: DeltaEngine) -> dict[tuple[int, str], tuple[int, ...]]:
    state = DeltaEngine.from_state(BOOT, engine.to_state(), CONFIG).to_state()
    return {(row[0], row[1]): tuple(row[2:]) for row in state["counters"]}


step = st.tuples(
    st.sets(st.integers(0, 5), max_size=3),  # taps replaced (a VM reboot) before this poll
    st.sampled_from(["grow", "grow", "still", "reset", "jump", "wrap", "grow"]),
    st.integers(0, 5),  # which counter the odd event hits
    st.integers(-3, 30_000),  # wall-clock step (ms)
    st.integers(1, 20_000),  # monotonic step (ms)
    st.booleans(),  # the replaced taps' new incarnations announced by a link event
)


@settings(max_examples=300, deadline=None)
@given(st.lists(step, min_size=1, max_size=10), st.integers(1, 6), st.booleans())
def test_mixed_polls_conclude_what_rows_conclude(steps: list[tuple], taps: int, by_ifindex: bool) -> None:
    rows_engine = DeltaEngine(BOOT, CONFIG)
    engine = DeltaEngine(BOOT, CONFIG)
    ifindex = {name: 10 + i for i, name in enumerate(NAMES[:taps])}
    values = {name: [1000 * (i + 1), 10, 2000 * (i + 1), 20] for i, name in enumerate(NAMES[:taps])}
    next_index = 100
    now, mono = T0, M0
    seen: set[str] = set()
    ever: set[CounterKey] = set()  # every key read or closed so far
    for replaced, what, which, wall_step, mono_step, announced in steps:
        now += wall_step
        mono += mono_step
        for i in sorted(replaced):
            name = NAMES[i % taps]
            old = CounterKey(BOOT, ifindex[name], name)
            v = values[name]
            final = CounterSample(old, v[0] + 5, v[2] + 7, v[1] + 1, v[3] + 1)
            assert engine.final(now - 1, mono - 1, final) == rows_engine.final(now - 1, mono - 1, final)
            ifindex[name] = next_index
            next_index += 1
            values[name] = [0, 0, 0, 0]
            if announced:
                for e in (engine, rows_engine):
                    e.link_created(CounterKey(BOOT, ifindex[name], name))
        # the finals took their counters out of the steady columns, the rest stayed columns
        assert set(engine.tracked_keys()) == set(rows_engine.tracked_keys())
        assert engine.tracked_count() == rows_engine.tracked_count()
        for i, name in enumerate(NAMES[:taps]):
            v = values[name]
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
        # in the taps' order, or in the kernel's (by ifindex: a tap made again comes last)
        names = sorted(NAMES[:taps], key=ifindex.__getitem__) if by_ifindex else NAMES[:taps]
        keys = tuple(CounterKey(BOOT, ifindex[name], name) for name in names)
        read = [tuple(values[name]) for name in names]
        expected = rows_engine.poll_readings(now, mono, list(zip(keys, read, strict=True)), frozenset(keys))
        got, path = by_daemon(engine, now, mono, keys, read, after_events=bool(replaced))
        seen.add(path)
        assert sorted(got) == sorted(expected)
        assert saved(engine) == saved(rows_engine)
        ever = {*ever, *keys, *engine._closed}
        assert engine.untracked(ever) == ever - set(engine.tracked_keys())
        # on a copy: tracked() puts the steady columns back into rows, and the next step's
        # poll must find them as the daemon leaves them
        assert DeltaEngine.from_state(BOOT, engine.to_state(), CONFIG).tracked() == rows_engine.tracked()


def test_a_storm_keeps_the_steady_counters_on_columns() -> None:
    engine = DeltaEngine(BOOT, CONFIG)
    keys = tuple(CounterKey(BOOT, 10 + i, f"vnet{i}") for i in range(10))
    engine.poll_readings(T0, M0, [(k, (100, 1, 100, 1)) for k in keys], frozenset(keys))
    engine.poll_columns(T0 + 10_000, M0 + 10_000, keys, *[[200] * 10, [2] * 10, [200] * 10, [2] * 10])
    # vnet3 rebooted: its final counters, then a new incarnation counting from zero
    gone = keys[3]
    assert engine.final(T0 + 15_000, M0 + 15_000, CounterSample(gone, 250, 250, 3, 3)) is not None
    born = CounterKey(BOOT, 99, "vnet3")
    engine.link_created(born)
    now = (*keys[:3], born, *keys[4:])
    rx = [300] * 10
    rx[3] = 40
    cd, rows = engine.poll_mixed(T0 + 20_000, M0 + 20_000, now, rx, [3] * 10, rx, [3] * 10, frozenset(now))
    assert cd.keys == now
    assert cd.rx_bytes == [100, 100, 100, 0, 100, 100, 100, 100, 100, 100]  # vnet3 went by rows
    assert [(d.key, d.rx_bytes, d.start_ms) for d in rows] == [(born, 40, T0 + 10_000)]
    assert engine.to_state()["steady"][0] == tuple(k.ifindex for k in now if k != born)


counts = st.integers(0, 2**33)
# A steady poll's counters (grown by at most 10**6 over 10 s: within the ceiling), some where a
# lower final one may have wrapped at 32 bits
steady = st.integers(1, 10**9) | st.integers(WRAP_NEAR - 10**6, WRAP32 + 10**6)


@settings(max_examples=300, deadline=None)
@given(
    st.tuples(steady, steady, steady, steady),
    st.tuples(counts, counts, counts, counts),
    st.integers(-5, 60_000),
)
def test_a_final_on_the_fast_path_concludes_what_the_rules_conclude(
    before: tuple[int, ...], final: tuple[int, ...], elapsed: int
) -> None:
    """The final sample's fast path (all four grew within the ceiling, or one reported lower
    cannot have wrapped) against the full rules (wraps, lower counters in a final, the
    ceiling's quarantine), from a counter last read by columns."""
    key = CounterKey(BOOT, 10, "vnet0")
    first = tuple(max(1, v - 10**6) for v in before)
    engines = []
    for _ in range(2):
        engine = DeltaEngine(BOOT, CONFIG)
        engine.poll_readings(T0, M0, [(key, first)], frozenset([key]))
        assert engine.poll_columns(T0 + 10_000, M0 + 10_000, (key,), *([v] for v in before)) is not None
        engines.append(engine)
    fast, rules = engines
    sample = CounterSample(key, final[0], final[2], final[1], final[3])
    at = (T0 + 10_000 + elapsed, M0 + 10_000 + elapsed)
    rules._lift(key)  # what final() does first, then the rules without the fast path
    expected = rules._advance(sample, *at, final=True)
    assert fast.final(*at, sample) == expected
