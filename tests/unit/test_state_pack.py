"""The spool's state packer writes msgpack's own bytes, reusing only sequences it packed last
time by identity (kvmeter.agent.state_pack)."""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmeter.agent.state_pack import REUSED_FROM, StatePacker

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(0, 2**64 - 1), st.integers(-(2**63), -1), st.text(max_size=20),
    st.binary(max_size=20), st.floats(allow_nan=False),
)  # fmt: skip
# A big column (drawn cheaply): ints from a start, or their names, as a list or a tuple
big_columns = st.builds(
    lambda start, kind, named: kind(
        f"tap{i}" if named else i * 7**9 for i in range(start, start + REUSED_FROM + start % 3)
    ),
    st.integers(0, 2**20),
    st.sampled_from([list, tuple]),
    st.booleans(),
)
states = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(st.text(max_size=8), inner, max_size=6),
        big_columns,
    ),
    max_leaves=40,
)


@settings(max_examples=60, deadline=None)
@given(states)
def test_the_bytes_are_msgpacks(state: object) -> None:
    packer = StatePacker()
    assert packer.pack(state) == msgpack.packb(state, use_bin_type=True)
    assert packer.pack(state) == msgpack.packb(state, use_bin_type=True)  # (reusing its sequences)


def engine_state(ifindexes: tuple[int, ...], names: tuple[str, ...], rng: random.Random) -> dict:
    columns = [[rng.randrange(2**40) for _ in ifindexes] for _ in range(4)]
    return {
        "v": 1,
        "engine": {
            "v": 3,
            "boot_id": "b",
            "counters": [[7, "tap7", 1, 2, 3, 4, 5, 6]],
            "steady": [ifindexes, names, *columns, rng.randrange(2**41), rng.randrange(2**30)],
            "preexisting": [[1, "lo"]],
            "closed": [],
            "last_poll": [1, 2],
            "fresh": False,
        },
    }


def test_a_steady_polls_key_columns_are_reused_and_new_ones_packed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's ifindex and name columns, the same tuples from poll to poll, are packed
    once; the moving columns each time; columns made anew (a link came) are packed again, and
    the bytes stay msgpack's throughout."""
    rng = random.Random(7)
    ifindexes = tuple(range(100, 100 + 2 * REUSED_FROM))
    names = tuple(f"tap{i}" for i in ifindexes)
    packer = StatePacker()
    packed: list[object] = []
    real = msgpack.packb

    def counting(value: object, **kw: object) -> bytes:
        packed.append(value)
        return real(value, **kw)

    monkeypatch.setattr(msgpack, "packb", counting)
    for poll in range(4):
        if poll == 2:  # a link came: new columns
            ifindexes = (*ifindexes, 9999)
            names = (*names, "tap9999")
        state = engine_state(ifindexes, names, rng)
        packed.clear()
        assert packer.pack(state) == real(state, use_bin_type=True)
        again = [v for v in packed if v is ifindexes or v is names]
        assert len(again) == (2 if poll in (0, 2) else 0), poll
        assert sum(1 for v in packed if type(v) is list and len(v) == len(ifindexes)) == 4
