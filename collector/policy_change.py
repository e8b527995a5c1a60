"""A changed billing policy put in force over the whole store, on SIGHUP or at a start.

    put_in_force(service, policy) -> str      # a reload: the policy read again
    put_in_force_at_start(service) -> str     # a start: the configured policy against the store's

Either way every resource with stored events is recomputed under the new policy from all its
events (open windows rewritten, final windows adjusted by the difference: Collector.set_policy),
so the store never holds records of two policies, whether the operator reloaded or restarted.
The change is recorded in billing_policies only after the last resource is recomputed: a
recompute cut short (a crash, the store failing midway) leaves the old policy recorded, so the
next start recomputes again, and a recompute is idempotent (a resource already recomputed makes
no new record or adjustment). Shared by the collector and the all-in-one.
"""

from __future__ import annotations

import logging

from kvmeter.collector.model import Outcome
from kvmeter.collector.policy import BillingPolicy
from kvmeter.collector.service import Collector
from kvmeter.collector.store import policies

log = logging.getLogger(__name__)


def put_in_force(service: Collector, policy: BillingPolicy) -> str:
    """A policy read again: nothing when unchanged; else every resource recomputed under it,
    then recorded and warned of."""
    if policy == service.settings.policy:
        return f"unchanged: {policy.describe()}"
    before = policies.Previous(service.settings.policy.describe(), 0)
    out = service.set_policy(policy)
    _warn("on reload", _record(service) or before, policy, out)
    return f"{policy.describe()} ({out.records} record(s), {out.adjustments} adjustment(s))"


def put_in_force_at_start(service: Collector) -> str:
    """At a start, before the loop: the configured policy (service.settings.policy) put in
    force over the store when its records follow another one (the last recorded)."""
    policy = service.settings.policy
    with service.store.read() as conn:
        last = policies.last_policy(conn)
    if last is None or last.policy == policy.describe():  # a new store, or unchanged
        _record(service)
        return f"policy {policy.describe()}"
    out = service.recompute_all()
    _record(service)
    _warn("since the last start", last, policy, out)
    return f"policy {policy.describe()} ({out.records} record(s), {out.adjustments} adjustment(s))"


def _record(service: Collector) -> policies.Previous | None:
    with service.store.write() as conn:
        return policies.policy_in_force(conn, service.settings.policy, service.clock())


def _warn(when: str, before: policies.Previous, policy: BillingPolicy, out: Outcome) -> None:
    since = f"{before.since_ms} ms" if before.since_ms > 0 else "the store began"
    log.warning(
        "billing policy changed %s: records so far follow %s (since %s), now %s; every resource "
        "recomputed under it from all its events: %d record(s) rewritten, %d adjustment(s) of final windows",
        when, before.policy, since, policy.describe(), out.records, out.adjustments,
    )  # fmt: skip
