"""[retention]: ages in days or "forever", defaults as documented, bad values refused by name."""

from __future__ import annotations

import pytest

from kvmeter.collector import config
from kvmeter.collector.model import ResourceHistory, Segment
from kvmeter.collector.retention import DAY_MS, KINDS, RetentionPolicy, closed_through, window_floor
from tests.unit.test_collector_config import EXAMPLE


def test_the_shipped_example_states_the_default_policy() -> None:
    assert config.load(EXAMPLE).retention == RetentionPolicy() == config.CollectorConfig().retention
    policy = RetentionPolicy()
    assert policy.usage_ms is None
    assert policy.dead_letters_open_ms is None
    assert policy.lifecycle_events_ms == 400 * DAY_MS
    assert (policy.enabled, policy.interval_ms, policy.batch_rows) == (True, 3_600_000, 5000)


def test_ages_in_days_fractions_and_forever() -> None:
    cfg = config.from_dict(
        {
            "retention": {
                "lifecycle_events_days": 0.5,
                "dead_letters_open_days": 7,
                "usage_days": 3650,
                "quarantined_measures_days": "forever",
                "interval_seconds": 0.25,
                "batch_rows": 100,
                "enabled": False,
            }
        }
    )
    policy = cfg.retention
    assert policy.lifecycle_events_ms == DAY_MS // 2
    assert policy.dead_letters_open_ms == 7 * DAY_MS
    assert policy.usage_ms == 3650 * DAY_MS
    assert policy.quarantined_measures_ms is None
    assert (policy.interval_ms, policy.batch_rows, policy.enabled) == (250, 100, False)
    # Unset kinds keep their defaults; cutoffs exist for the kinds with an age only.
    assert policy.parked_measures_ms == 90 * DAY_MS
    cutoffs = policy.cutoffs(1000 * DAY_MS)
    assert "quarantined_measures" not in cutoffs
    assert cutoffs["lifecycle_events"] == 1000 * DAY_MS - DAY_MS // 2
    assert set(cutoffs) == set(KINDS) - {"quarantined_measures"}


def test_bad_values_are_refused_each_by_name() -> None:
    doc = {
        "retention": {
            "lifecycle_events_days": 0,
            "usage_days": "never",
            "batch_rows": 0,
            "interval_seconds": -1,
            "stream_marks": 3,
        }
    }
    with pytest.raises(config.ConfigError) as err:
        config.from_dict(doc)
    problems = err.value.problems
    for where in ("retention.lifecycle_events_days", "retention.usage_days", "retention.batch_rows",
                  "retention.interval_seconds", "retention.stream_marks"):  # fmt: skip
        assert any(p.startswith(where + ":") for p in problems), (where, problems)


def test_final_usage_is_kept_longest() -> None:
    with pytest.raises(config.ConfigError) as err:
        config.from_dict({"retention": {"usage_days": 100}})  # events default to 400 days
    assert err.value.problems == [
        "retention.lifecycle_events_days: longer than usage_days (final usage is kept longest)"
    ]
    ok = config.from_dict({"retention": {"usage_days": 400, "lifecycle_events_days": 400}})
    assert ok.retention.usage_ms == 400 * DAY_MS


def test_a_history_is_closed_when_every_segment_ended() -> None:
    h = ResourceHistory("vm", running=[Segment(10, 20)], allocated=[Segment(5, 30)])
    assert closed_through(h) == 30
    assert closed_through(ResourceHistory("net")) == 0  # audit events only: nothing billed
    h.ip.append(Segment(40, None))
    assert closed_through(h) is None
    assert window_floor(7_200_000, 3_600_000) == 7_200_000
    assert window_floor(7_200_001, 3_600_000) == 10_800_000
