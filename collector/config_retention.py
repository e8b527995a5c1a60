"""The `[retention]` section of the collector's (and the all-in-one's) TOML: how long each kind
of stored data is kept (retention.RetentionPolicy has the defaults and why), in days (fractions
allowed) or "forever".

    [retention]
    lifecycle_events_days = 400
    parked_measures_days = 90          # after they were reported as unattributed
    quarantined_measures_days = 400
    dead_letters_resolved_days = 30
    dead_letters_open_days = "forever"
    stream_marks_days = 180            # of streams that sent nothing for so long
    corrections_days = 400
    domain_witness_days = 30
    outbox_sent_days = 30              # hand-off items every sink confirmed
    usage_days = "forever"             # final usage records, adjustments, unbilled bytes
    enabled = true                     # the collector's periodic pass (kvmeter prune runs anyway)
    interval_seconds = 3600
    batch_rows = 5000                  # rows per transaction
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kvmeter.collector.retention import DAY_MS, KINDS, RetentionPolicy

_AGE = {"oneOf": [{"type": "number", "exclusiveMinimum": 0}, {"const": "forever"}]}

RETENTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        **{f"{kind}_days": _AGE for kind in KINDS},
        "enabled": {"type": "boolean"},
        "interval_seconds": {"type": "number", "exclusiveMinimum": 0},
        "batch_rows": {"type": "integer", "minimum": 1, "maximum": 100000},
    },
}


def retention_policy(section: Any, problems: list[str]) -> RetentionPolicy:
    """The section as a policy (defaults where a key is absent); cross-key problems are appended
    to `problems` (the schema has already reported shapes)."""
    if not isinstance(section, dict):
        return RetentionPolicy()
    changes: dict[str, Any] = {}
    for kind in KINDS:
        days = section.get(f"{kind}_days")
        if isinstance(days, int | float) and not isinstance(days, bool) and days > 0:
            changes[f"{kind}_ms"] = max(1, round(days * DAY_MS))
        elif days == "forever":
            changes[f"{kind}_ms"] = None
    if isinstance(section.get("enabled"), bool):
        changes["enabled"] = section["enabled"]
    interval = section.get("interval_seconds")
    if isinstance(interval, int | float) and not isinstance(interval, bool) and interval > 0:
        changes["interval_ms"] = max(1, round(interval * 1000))
    if isinstance(section.get("batch_rows"), int) and section["batch_rows"] > 0:
        changes["batch_rows"] = section["batch_rows"]
    policy = dataclasses.replace(RetentionPolicy(), **changes)
    problems.extend(policy.problems())
    return policy
