"""The delta engine's mixed poll with newborn counters by columns (poll_mixed's
newborn_columns, what the agent's daemon asks for after link events) against its poll by rows.

For any sequence of polls and VM storms (taps replaced with or without their final counters
first, their new incarnations announced by a link event or not, counters that jump past the
line-rate ceiling, a wall clock that steps back), an engine that polls as the daemon does
concludes exactly what an engine that only polls by rows concludes, and keeps the same state."""

from __future__ import annotations

from functools import partial

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmeter.agent.delta import DeltaEngine
from kvmeter.agent.model import CounterKey, CounterSample, Delta
from tests.unit.test_delta_mixed import BOOT, CONFIG, M0, NAMES, T0
from tests.unit.test_delta_mixed import by_daemon as mixed_by_daemon

# What the daemon runs, newborns by columns as the agent asks for them
by_daemon = partial(mixed_by_daemon, newborn_columns=True)


def state(engine: DeltaEngine) -> tuple[object, ...]:
    copy = DeltaEngine.from_state(BOOT, engine.to_state(), CONFIG)  # tracked() would settle it
    saved = copy.to_state()
    return (
        sorted(tuple(row) for row in saved["counters"]),
        sorted(map(tuple, saved["preexisting"])),
        sorted(map(tuple, saved["closed"])),
        saved["last_poll"],
        sorted(engine._created.items()),
        copy.tracked(),
    )


storm = st.tuples(
    st.sets(st.integers(0, 5), max_size=4),  # taps replaced before this poll
    st.booleans(),  # their final counters arrive before the poll (else the old incarnation stays open)
    st.booleans(),  # their new incarnations are announced by a link event
    st.sampled_from(["grow", "grow", "still", "newborn_jump"]),
    st.integers(-3, 30_000),  # wall-clock step (ms)
    st.integers(1, 20_000),  # monotonic step (ms)
    st.booleans(),  # a link that existed before the engine ran becomes a metered one
)


@settings(max_examples=400, deadline=None)
@given(st.lists(storm, min_size=1, max_size=10), st.integers(1, 6), st.booleans(), st.booleans())
def test_newborns_by_columns_conclude_what_rows_conclude(
    steps: list[tuple], taps: int, saved_state: bool, by_ifindex: bool
) -> None:
    rows_engine = DeltaEngine(BOOT, CONFIG)
    engine = DeltaEngine(BOOT, CONFIG)
    ifindex = {name: 10 + i for i, name in enumerate(NAMES[:taps])}
    values = {name: [1000 * (i + 1), 10, 2000 * (i + 1), 20] for i, name in enumerate(NAMES[:taps])}
    open_old: dict[str, CounterKey] = {}  # replaced without a final yet
    next_index = 100
    now, mono = T0, M0
    keys = tuple(CounterKey(BOOT, ifindex[name], name) for name in NAMES[:taps])
    read = [tuple(values[name]) for name in NAMES[:taps]]
    # a link there before the engine ran, not metered yet (no domain NIC names it)
    early = CounterKey(BOOT, 9, "vnet-early")
    early_values = [5000, 50, 6000, 60]
    metered_early = False
    for e in (engine, rows_engine):  # the first poll baselines what existed before
        e.poll_readings(now, mono, list(zip(keys, read, strict=True)), frozenset((*keys, early)))
    if saved_state:  # a restart from the spooled state: nothing is fresh, nothing steady
        engine = DeltaEngine.from_state(BOOT, engine.to_state(), CONFIG)
    for replaced, finals, announced, what, wall_step, mono_step, adopt in steps:
        metered_early = metered_early or adopt
        early_values = [v + 10 for v in early_values]
        now += wall_step
        mono += mono_step
        events = bool(open_old or replaced)  # link events since the last poll
        for name, old in list(open_old.items()):  # late finals of the last storm
            final = CounterSample(old, 1, 1, 1, 1)
            assert engine.final(now - 2, mono - 2, final) == rows_engine.final(now - 2, mono - 2, final)
            del open_old[name]
        for i in sorted(replaced):
            name = NAMES[i % taps]
            old = CounterKey(BOOT, ifindex[name], name)
            v = values[name]
            if finals:
                final = CounterSample(old, v[0] + 5, v[2] + 7, v[1] + 1, v[3] + 1)
                assert engine.final(now - 1, mono - 1, final) == rows_engine.final(now - 1, mono - 1, final)
            else:
                open_old[name] = old
            ifindex[name] = next_index
            next_index += 1
            values[name] = [0, 0, 0, 0]
            if announced:
                for e in (engine, rows_engine):
                    e.link_created(CounterKey(BOOT, ifindex[name], name))
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
            if what == "newborn_jump" and v[0] < 10**6 and i == min(replaced, default=-1):
                v[0] += 10**12  # past the ceiling: quarantined
        keys = tuple(CounterKey(BOOT, ifindex[name], name) for name in NAMES[:taps])
        read = [tuple(values[name]) for name in NAMES[:taps]]
        if metered_early:
            keys += (early,)
            read.append(tuple(early_values))
        if by_ifindex:  # in the kernel's order: a tap made again comes last
            order = sorted(range(len(keys)), key=lambda i: keys[i].ifindex)
            keys, read = tuple(keys[i] for i in order), [read[i] for i in order]
        expected = rows_engine.poll_readings(
            now, mono, list(zip(keys, read, strict=True)), frozenset((*keys, early))
        )
        got, _path = by_daemon(engine, now, mono, keys, read, early, after_events=events)
        assert sorted(got) == sorted(expected)
        assert state(engine) == state(rows_engine)


def test_a_storms_newborns_go_by_columns() -> None:
    engine = DeltaEngine(BOOT, CONFIG)
    keys = tuple(CounterKey(BOOT, 10 + i, f"vnet{i}") for i in range(10))
    engine.poll_readings(T0, M0, [(k, (100, 1, 100, 1)) for k in keys], frozenset(keys))
    engine.poll_columns(T0 + 10_000, M0 + 10_000, keys, *[[200] * 10, [2] * 10, [200] * 10, [2] * 10])
    gone = keys[3]
    assert engine.final(T0 + 15_000, M0 + 15_000, CounterSample(gone, 250, 250, 3, 3)) is not None
    born = CounterKey(BOOT, 99, "vnet3")
    engine.link_created(born)
    now = (*keys[:3], born, *keys[4:])
    rx = [300] * 10
    rx[3] = 40
    cd, rows = engine.poll_mixed(
        T0 + 20_000, M0 + 20_000, now, rx, [3] * 10, rx, [3] * 10, frozenset(now), newborn_columns=True
    )
    assert cd.keys == now
    assert cd.rx_bytes == [100, 100, 100, 40, 100, 100, 100, 100, 100, 100]  # vnet3 from zero, by columns
    assert (cd.start_ms, rows) == (T0 + 10_000, [])
    assert engine.to_state()["steady"][0] == tuple(k.ifindex for k in now)
    # its older incarnation still open (no final yet): the newborn waits, by rows
    engine2 = DeltaEngine(BOOT, CONFIG)
    engine2.poll_readings(T0, M0, [(k, (100, 1, 100, 1)) for k in keys], frozenset(keys))
    engine2.poll_columns(T0 + 10_000, M0 + 10_000, keys, *[[200] * 10, [2] * 10, [200] * 10, [2] * 10])
    engine2.link_created(born)
    cd, rows = engine2.poll_mixed(
        T0 + 20_000, M0 + 20_000, now, rx, [3] * 10, rx, [3] * 10, frozenset(now), newborn_columns=True
    )
    assert cd.rx_bytes[3] == 0
    assert rows == []


def both(
    *polls: tuple[int, tuple[CounterKey, ...], list[tuple[int, ...]]], final: CounterSample | None = None
) -> list[str]:
    """The polls (seconds after T0, keys read, their counters) by the daemon's way and by rows,
    `final` taken 5 ms before the last poll: the deltas of each must be the same; returns the
    daemon's paths."""
    daemon, rows = DeltaEngine(BOOT, CONFIG), DeltaEngine(BOOT, CONFIG)
    paths = []
    present = frozenset(k for _, keys, _ in polls for k in keys)
    for n, (seconds, keys, values) in enumerate(polls):
        now, mono = T0 + 1000 * seconds, M0 + 1000 * seconds
        if final is not None and n == len(polls) - 1:
            assert daemon.final(now - 5, mono - 5, final) == rows.final(now - 5, mono - 5, final)
        got, path = by_daemon(daemon, now, mono, keys, values, *present)
        assert sorted(got) == sorted(
            rows.poll_readings(now, mono, list(zip(keys, values, strict=True)), present)
        )
        paths.append(path)
    return paths


A, B, C = (CounterKey(BOOT, 10 + i, name) for i, name in enumerate(NAMES[:3]))


def test_a_counter_read_at_another_instant_is_not_taken_for_a_newborn() -> None:
    """B missed a poll (left out of the table's read): its last reading is older than the
    steady ones', so it goes by rows, not from zero, beside a newborn C."""
    paths = both(
        (0, (A, B), [(100, 1, 100, 1), (100, 1, 100, 1)]),
        (10, (A, B), [(200, 2, 200, 2), (200, 2, 200, 2)]),
        (20, (A,), [(300, 3, 300, 3)]),
        (30, (A, B, C), [(400, 4, 400, 4), (400, 4, 400, 4), (50, 1, 50, 1)]),
    )
    assert paths[-1] == "mixed"


def test_a_closed_counter_still_in_the_table_is_not_taken_for_a_newborn() -> None:
    """B's final counters closed it, yet the table still lists it at the next poll: it is not
    counted again from zero beside a newborn C."""
    paths = both(
        (0, (A, B), [(100, 1, 100, 1), (100, 1, 100, 1)]),
        (10, (A, B), [(200, 2, 200, 2), (200, 2, 200, 2)]),
        (20, (A, B, C), [(300, 3, 300, 3), (260, 3, 260, 3), (50, 1, 50, 1)]),
        final=CounterSample(B, 250, 250, 2, 2),
    )
    assert paths[-1] == "mixed"


def storm_poll(read: tuple[CounterKey, ...], values: list[tuple[int, ...]]) -> list[Delta]:
    """A storm's finals close B by columns and make C, then the poll reads `read`: the deltas
    of the daemon's mixed poll, which must be the rows' deltas."""
    engines = DeltaEngine(BOOT, CONFIG), DeltaEngine(BOOT, CONFIG)
    for e in engines:
        e.poll_readings(T0, M0, [(A, (100, 1, 100, 1)), (B, (100, 1, 100, 1))], frozenset((A, B)))
    daemon, rows = engines
    assert by_daemon(daemon, T0 + 10_000, M0 + 10_000, (A, B), [(200, 2, 200, 2)] * 2)[1] == "columns"
    rows.poll_readings(T0 + 10_000, M0 + 10_000, [(A, (200, 2, 200, 2)), (B, (200, 2, 200, 2))], None)
    assert daemon.finals([(T0 + 15_000, M0 + 15_000, B, (250, 2, 250, 2))]) == [
        rows.final(T0 + 15_000, M0 + 15_000, CounterSample(B, 250, 250, 2, 2))
    ]
    for e in engines:
        e.link_created(C)
    got, path = by_daemon(daemon, T0 + 20_000, M0 + 20_000, read, values, after_events=True)
    assert path == "mixed"
    assert sorted(got) == sorted(
        rows.poll_readings(T0 + 20_000, M0 + 20_000, list(zip(read, values, strict=True)), frozenset(read))
    )
    return got


def test_a_storms_closed_counter_still_in_the_table_is_not_taken_for_a_newborn() -> None:
    """The table still lists B beside C: C goes by columns from zero, B is not counted again."""
    got = storm_poll((A, B, C), [(300, 3, 300, 3), (260, 3, 260, 3), (50, 1, 50, 1)])
    assert sorted((d.key.name, d.rx_bytes) for d in got) == [("vnet0", 100), ("vnet2", 50)]


def test_another_boots_counter_is_not_taken_for_a_newborn() -> None:
    """A key of another boot among a storm's new ones is not this agent's to count."""
    other = CounterKey("boot-b", 13, "vnet3")
    got = storm_poll((A, C, other), [(300, 3, 300, 3), (50, 1, 50, 1), (70, 1, 70, 1)])
    assert sorted((d.key.name, d.rx_bytes) for d in got) == [("vnet0", 100), ("vnet2", 50)]
