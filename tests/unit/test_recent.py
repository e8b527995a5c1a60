"""Recent: what a replica holds while in use (owner hints, witness, uuids without events)."""

from __future__ import annotations

from kvmeter.collector.recent import Recent


def test_untouched_for_a_whole_period_leaves_at_the_next_rotation() -> None:
    held: Recent[str, int] = Recent()
    held["a"], held["b"], held["c"] = 1, 2, 3
    assert held.rotate() == {}  # all were written in the period that just ended
    assert held.get("a") == 1  # touched: stays another period
    held["c"] = 30  # written again: stays too
    assert held["b"] == 2  # a plain read touches nothing (a reconciler pass reads them all)
    assert dict(held) == {"a": 1, "c": 30, "b": 2}
    assert held.rotate() == {"b": 2}
    assert set(held) == {"a", "c"}
    assert held.rotate() == {"a": 1, "c": 30}
    assert len(held) == 0
    assert held.get("a") is None
    assert held.get("a", 7) == 7


def test_a_mutable_mapping_over_both_generations() -> None:
    held: Recent[str, int] = Recent()
    held["old"] = 1
    held.rotate()
    held["new"] = 2
    assert "old" in held
    assert len(held) == 2
    del held["old"]
    assert "old" not in held
    held.update({"x": 3})
    assert held.pop("x") == 3
    copy: dict[str, int] = {}
    copy.update(held)
    assert copy == {"new": 2}
