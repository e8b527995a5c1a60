"""Two stores' usage compared by account, usage type and window."""

from __future__ import annotations

from kvmeter.collector.model import UsageKey
from kvmeter.collector.store import UsageRow
from kvmeter.collector.usage_diff import (
    Difference,
    WindowKey,
    by_window,
    differences,
    merge_differences,
    render,
)

W = 3_600_000
T0 = 1_715_677_200_000  # 2024-05-14T09:00:00Z


def row(
    account: str, usage_type: int, resource: str, start: int, quantity: int, adjustment: int = 0
) -> UsageRow:
    key = UsageKey(account, usage_type, resource, "", "public", start, start + W)
    return UsageRow(key, quantity + adjustment, quantity, adjustment, True, "", "", 0)


def test_net_quantities_summed_per_account_type_and_window() -> None:
    rows = [
        row("a", 4, "vm1", T0, 100),
        row("a", 4, "vm2", T0, 50, adjustment=7),  # net of its adjustments
        row("a", 4, "vm1", T0 + W, 10),
        row("b", 5, "vm3", T0, 5, adjustment=-5),  # nets to nothing: left out
    ]
    assert by_window(rows) == {WindowKey("a", 4, T0, T0 + W): 157, WindowKey("a", 4, T0 + W, T0 + 2 * W): 10}
    assert by_window(rows, through_ms=T0 + W) == {WindowKey("a", 4, T0, T0 + W): 157}  # open windows out


def test_differences_name_both_sides_and_render_a_table() -> None:
    live = {WindowKey("a", 4, T0, T0 + W): 157, WindowKey("b", 1, T0, T0 + W): 3_600_000}
    rebuilt = {
        WindowKey("a", 4, T0, T0 + W): 150,
        WindowKey("b", 1, T0, T0 + W): 3_600_000,
        WindowKey("c", 4, T0, T0 + W): 9,
    }
    diffs = differences(live, rebuilt)
    assert diffs == [
        Difference(WindowKey("a", 4, T0, T0 + W), 157, 150),
        Difference(WindowKey("c", 4, T0, T0 + W), 0, 9),
    ]
    lines = render(diffs).splitlines()
    assert lines[1].split() == ["2024-05-14T09:00:00Z", "2024-05-14T10:00:00Z", "a", "4", "157", "150", "-7"]
    assert lines[2].split()[-1] == "+9"
    assert render(diffs, limit=1).splitlines()[-1] == "... and 1 more"
    assert render([]) == "no difference\n"
    assert differences(live, dict(live)) == []


def test_the_merge_walk_of_sorted_totals_is_the_diff_of_the_maps() -> None:
    import random

    rng = random.Random(3)
    keys = [
        WindowKey(a, t, T0 + h * W, T0 + (h + 1) * W)
        for a in ("a", "B", "é", "z")
        for t in (4, 5)
        for h in range(5)
    ]
    for _ in range(20):
        live = {k: rng.choice([0, 1, 2, 3]) for k in keys if rng.random() < 0.7}
        rebuilt = {k: rng.choice([0, 1, 2, 3]) for k in keys if rng.random() < 0.7}
        expected = differences({k: v for k, v in live.items() if v}, {k: v for k, v in rebuilt.items() if v})
        assert merge_differences(sorted(live.items()), sorted(rebuilt.items())) == expected
