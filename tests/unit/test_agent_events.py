"""A poll's link events on distinct keys (a VM storm's: one deletion and one birth per tap),
applied by C-level passes (Measuring._apply_distinct), conclude what applying them in turn does
(Measuring._apply_in_turn): the same deltas in the same order, the same engine state, the same
links gone and the same attribution, whatever the events are (births, deletions with and
without final counters, moves, of tracked, lifted, born or unknown links, attributed or not)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmeter.agent.measuring import Measuring, StampedEvent
from kvmeter.agent.metered import MeteredLinks
from kvmeter.agent.model import CounterKey, DomainInfo, NicInfo
from tests.unit.test_delta_finals import (
    BORN,
    KEYS,
    M0,
    T0,
    UNKNOWN,
    counts,
    final_counts,
    state,
    steady_engine,
)

LINKS = [*KEYS, BORN, UNKNOWN, CounterKey(KEYS[0].boot_id, 90, "vnet0")]  # vnet0 made again
NIC = NicInfo(mac="52:54:00:00:00:01", device="vnet0", nic_type="bridge")
DOMAIN = DomainInfo(uuid="u", name="i-2-1-VM", state="running", kind="user_vm", nics=(NIC,))
DEVICES = {key.name: (DOMAIN, NIC) for key in LINKS[::2]}  # half the links are a NIC's


class Events(Measuring):
    """Measuring's event bookkeeping over a real engine and real link keys."""

    def __init__(self, before: list[tuple[int, ...]], lifted: set[int], attributed: set[int]) -> None:
        self.boot_id = KEYS[0].boot_id
        self.engine = steady_engine(before, lifted)
        self._links = MeteredLinks(self.boot_id, lambda _name: None)
        self._gone: dict[str, CounterKey] = {}
        self._attribution: dict[CounterKey, Any] = {
            self._links.key(LINKS[i].name, LINKS[i].ifindex): "known" for i in attributed
        }
        self._retired: dict[CounterKey, Any] = {}  # (no hand-over here)

    def _remember(self, key: CounterKey, domain: DomainInfo, nic: NicInfo, placement: Any = None) -> None:
        self._attribution[key] = (domain, nic)


event = st.tuples(
    st.sampled_from(["new", "del", "del", "moved"]),
    st.integers(0, len(LINKS) - 1),
    st.none() | st.tuples(final_counts, final_counts, final_counts, final_counts),
    st.integers(-5_000, 30_000),  # ms after the last poll
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(counts, counts, counts, counts), min_size=6, max_size=6),
    st.sets(st.integers(0, 5), max_size=2),
    st.sets(st.integers(0, len(LINKS) - 1)),
    st.lists(event, max_size=10, unique_by=lambda e: e[1]),
)
def test_events_on_distinct_keys_together_conclude_what_each_in_turn_concludes(
    before: list[tuple[int, ...]], lifted: set[int], attributed: set[int], drawn: list[tuple]
) -> None:
    together, in_turn = Events(before, lifted, attributed), Events(before, lifted, attributed)
    events = [
        StampedEvent(
            kind, LINKS[i].name, LINKS[i].ifindex, stats, T0 + 10_000 + after, M0 + 10_000 + max(after, 0)
        )
        for kind, i, stats, after in drawn
    ]
    keys = together._links.keys_of([e.ifname for e in events], [e.ifindex for e in events])
    assert together._apply_distinct(events, keys, DEVICES) == in_turn._apply_in_turn(
        events, in_turn._links.keys_of([e.ifname for e in events], [e.ifindex for e in events]), DEVICES
    )
    assert state(together.engine) == state(in_turn.engine)
    assert together._gone == in_turn._gone
    assert together._attribution == in_turn._attribution
