"""The billing policy: per resource kind, which CloudStack events open and close what is billed.
A pure value (the config's [policy] section), passed into the lifecycle state machine and the
reconciler; the default is what the collector always did.

    BillingPolicy(allocated_from, allocated_until, running, ip_from, ip_until)
    DEFAULT_POLICY
    POLICY_SCHEMA                                  # the [policy] section's JSON schema
    policy_from(section: Mapping) -> BillingPolicy # after the schema check

- allocated_from (ALLOCATED_VM): "create" opens it at VM.CREATE (CloudStack's usage server);
  "first_start" at the first start after the create (a VM created and never started is not
  billed as allocated). Either way there is no allocation without a create.
- allocated_until: "destroy" closes it at VM.DESTROY (CloudStack's usage server); "expunge" at
  the expunge (a resource-state event to Expunging, or the reconciler's VM.EXPUNGE for a VM
  CloudStack no longer lists): a destroyed VM keeps its volumes until then and can be recovered.
  An expunge closes RUNNING too, under any policy: an expunged VM runs nowhere.
- running (RUNNING_VM): "usage_and_state" (VM.START / VM.STOP / VM.DESTROY usage events and
  resource-state transitions, whichever comes first: CloudStack's usage events plus the HA and
  out-of-band power changes only state events tell); "usage" (usage events alone, as
  CloudStack's usage server); "state" (resource-state events alone: the hypervisor's truth,
  needs publish.resource.state.events).
- ip_from / ip_until (IP_ADDRESS): "assign" / "release", NET.IPASSIGN to NET.IPRELEASE.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CREATE, FIRST_START = "create", "first_start"
DESTROY, EXPUNGE = "destroy", "expunge"
USAGE_AND_STATE, USAGE, STATE = "usage_and_state", "usage", "state"
ASSIGN, RELEASE = "assign", "release"

CHOICES: dict[str, tuple[str, ...]] = {
    "allocated_from": (CREATE, FIRST_START),
    "allocated_until": (DESTROY, EXPUNGE),
    "running": (USAGE_AND_STATE, USAGE, STATE),
    "ip_from": (ASSIGN,),
    "ip_until": (RELEASE,),
}

POLICY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {key: {"enum": list(values)} for key, values in CHOICES.items()},
}


@dataclass(frozen=True)
class BillingPolicy:
    """Which events open and close each billed state (see the module doc); the defaults are
    today's behaviour."""

    allocated_from: str = CREATE
    allocated_until: str = DESTROY
    running: str = USAGE_AND_STATE
    ip_from: str = ASSIGN
    ip_until: str = RELEASE

    def __post_init__(self) -> None:
        for key, values in CHOICES.items():
            if getattr(self, key) not in values:
                raise ValueError(f"policy.{key}: {getattr(self, key)!r} is not one of {', '.join(values)}")

    @property
    def running_by_usage(self) -> bool:
        """Usage events (VM.START / VM.STOP / VM.DESTROY) open and close RUNNING."""
        return self.running in (USAGE_AND_STATE, USAGE)

    @property
    def running_by_state(self) -> bool:
        """Resource-state transitions open and close RUNNING."""
        return self.running in (USAGE_AND_STATE, STATE)

    def describe(self) -> str:
        """One line for logs: every key and its value."""
        return " ".join(f"{key}={getattr(self, key)}" for key in CHOICES)


DEFAULT_POLICY = BillingPolicy()


def policy_from(section: Mapping[str, Any]) -> BillingPolicy:
    """The policy of a [policy] section already checked against POLICY_SCHEMA."""
    return BillingPolicy(**{key: section[key] for key in CHOICES if key in section})
