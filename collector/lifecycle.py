"""The lifecycle state machine: CloudStack events -> per-resource owner timeline and segments.

    build_history(events: Iterable[pb.LifecycleEvent], policy=DEFAULT_POLICY) -> dict[str, ResourceHistory]
    build_resource_history(resource_uuid: str, events: Iterable[pb.LifecycleEvent], policy=DEFAULT_POLICY)
        -> ResourceHistory
    event_order(event: pb.LifecycleEvent) -> tuple   # the sort key (ties at one time: see Order)
    as_read(event: pb.LifecycleEvent) -> pb.LifecycleEvent  # the part of an event it reads

Pure and total: history is rebuilt from all events of a resource, so a late event corrects the
past and any permutation (and duplication) of the same events gives the same history.

Rules (CloudStack's usage server, UsageManagerImpl.createHelperRecord, plus what the bus adds):
- Usage events drive segments and are the only source of ownership (their `account` is the
  owner). Action and async-job events never change segments or owners (their account is the
  caller); they only contribute MACs / addresses, and are listed in `ignored` for audit.
- VM.CREATE opens ALLOCATED; VM.START opens RUNNING (and splits ALLOCATED when it names a new
  offering); VM.STOP closes RUNNING; VM.UPGRADE splits an open ALLOCATED at a new offering;
  VM.DYNAMIC.SCALE splits open RUNNING / ALLOCATED at a new offering; VM.DESTROY closes both.
  NET.IPASSIGN opens IP, NET.IPRELEASE closes it. Other usage types are ignored.
- Duplicates change nothing: START while running with the same (or no) offering, STOP while
  stopped, and so on. An event without an offering inherits the resource's last known one (the
  bus carries none, §1.5); a START naming another offering while running closes one segment
  and opens the next at the event time.
- Resource-state events (post-transition, of VMs only) cover HA and out-of-band power changes: a
  transition to Running opens RUNNING if it is not open, to Stopped / Destroyed / Expunging /
  Error / Shutdown closes it if open. The state is one flag, so a usage VM.STOP and a state
  event for the same stop never count twice; whichever comes first in event time wins.
- Order (events of one time, clock skew between management servers): lifecycle_order.py.
- Offerings from async jobs (their jobResult is the VM as the API returned it; they have no
  time): a completed VM.CREATE job's offering is the VM's first; a completed scaling job's
  (VM.UPGRADE / VM.DYNAMIC.SCALE) offering goes to the resource's one scaling usage event
  without an offering; more than one: each job to the bare scaling event delivered just before
  it, when one source (a Kafka partition, a stream, a file) delivered them all, else not paired
  (the reconciler settles it).
- A VM deployed hidden (its completed VM.CREATE job's VM has displayvm false, hidden_deploy.py):
  its VM usage and resource-state events before the VM.CREATE that shows it change nothing, as
  CloudStack saved none of them; they are listed in `ignored`. Later, the openers provably
  hidden do the same: a start after a VM.DESTROY (a hide) or a completed job naming the VM
  hidden, a recover after such a job (or before one, no VM.UPDATE nor other VM.DESTROY between),
  a hidden start job's own start, unless a sign of display (a job naming it displayed, a show's
  VM.CREATE) came between; placed by one source's delivery order, so a lost event leaves a
  visible start billed, never dropped.
- Sizes (custom offerings, vm_size.py): a VM usage event naming cpunumber and memory (the
  reconciler's corrections; a job result's VM details, paired as its offering is) sets the
  VM's size; a segment carries the offering and size in force when it opened, and a scaling
  event that changes either splits RUNNING / ALLOCATED at its time, as an offering change does.
  A new offering without a size ends the old size; an event naming neither inherits both.
- Segments of zero length are dropped. A segment's account is the owner at its start.

The rules above are the default billing policy (collector/policy.py). Another policy changes
which events open and close ALLOCATED and RUNNING, nothing else (owners, offerings, splits, order):
- allocated_from "first_start": VM.CREATE opens no segment but makes the VM allocatable; the first
  moment it is also running (a start after the create, or a create while running) opens
  ALLOCATED. A destroy (or expunge) before any start ends the allocation unbilled.
- allocated_until "expunge": VM.DESTROY leaves ALLOCATED open (and closes RUNNING); a state
  event to Expunging, or the reconciler's usage-shaped VM.EXPUNGE, closes ALLOCATED and RUNNING.
  VM.EXPUNGE closes both under every policy (CloudStack itself sends no such usage event).
- running "usage": state events open and close nothing (but a state event to Expunging closes
  RUNNING, as under every policy); "state": VM.START / VM.STOP / VM.DESTROY open and close
  nothing in RUNNING (a VM.START naming a new offering still splits it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from kvmeter.collector.hidden_deploy import unsaved_at_deploy, unsaved_before_hidden_jobs
from kvmeter.collector.job_offerings import with_job_offerings
from kvmeter.collector.lifecycle_order import (
    EFFECT_RANK,
    MAX_SKEW_MS,
    RUNNING_STATE,
    STOPPED_STATES,
    effect_order,
    event_order,
    order_times,
)
from kvmeter.collector.model import OwnerChange, ResourceHistory, Segment
from kvmeter.collector.policy import CREATE, DEFAULT_POLICY, DESTROY, EXPUNGE, BillingPolicy
from kvmeter.collector.vm_size import size_of
from kvmeter.proto import pb

__all__ = [
    "MAX_SKEW_MS",
    "ResourceHistory",
    "Segment",
    "as_read",
    "build_history",
    "build_resource_history",
    "event_order",
]

EXPUNGING_STATE = "Expunging"
# State events of other resources (networks, volumes, hosts) never touch RUNNING.
_VM_TYPES = frozenset({"", "VirtualMachine", "DomainRouter", "ConsoleProxy", "SecondaryStorageVm"})
_NIC_MAC = re.compile(r"^nic\.\d+\.mac$")
_NIC_IP = re.compile(r"^nic\.\d+\.ip$")
_READ_ATTRIBUTES = re.compile(
    r"^(old-state|new-state|nic\.\d+\.(mac|ip)|cpunumber|cpuNumber|memory|details\.(cpuNumber|memory)|displayvm)$"
)  # all it reads

ROUTER_OWNER = "ROUTER.OWNER"  # the reconciler's: the owner of a virtual router's network


def as_read(event: pb.LifecycleEvent) -> pb.LifecycleEvent:
    """The event as this machine reads it: every field, and of the attributes (the payload's
    other keys, for audit) only those it reads. The store keeps this beside the raw payload
    rather than a second copy of the whole of it."""
    kept = {k: v for k, v in event.attributes.items() if _READ_ATTRIBUTES.match(k)}
    if len(kept) == len(event.attributes):
        return event
    slim = pb.LifecycleEvent()
    slim.CopyFrom(event)
    slim.attributes.clear()
    slim.attributes.update(kept)
    return slim


def build_history(
    events: Iterable[pb.LifecycleEvent], policy: BillingPolicy = DEFAULT_POLICY
) -> dict[str, ResourceHistory]:
    """Histories of every resource named by the events, keyed by resource uuid.

    Events without a resource uuid are skipped (nothing to attach them to).
    """
    by_resource: dict[str, dict[str, pb.LifecycleEvent]] = {}
    for ev in events:
        if ev.resource_uuid:
            _dedupe_into(by_resource.setdefault(ev.resource_uuid, {}), ev)
    return {uuid: _build(uuid, list(evs.values()), policy) for uuid, evs in sorted(by_resource.items())}


def build_resource_history(
    resource_uuid: str, events: Iterable[pb.LifecycleEvent], policy: BillingPolicy = DEFAULT_POLICY
) -> ResourceHistory:
    """The history of one resource from its events (others' events are skipped)."""
    unique: dict[str, pb.LifecycleEvent] = {}
    for ev in events:
        if ev.resource_uuid == resource_uuid:
            _dedupe_into(unique, ev)
    return _build(resource_uuid, list(unique.values()), policy)


def _dedupe_into(unique: dict[str, pb.LifecycleEvent], ev: pb.LifecycleEvent) -> None:
    key = ev.event_id or ev.SerializeToString(deterministic=True).hex()
    old = unique.get(key)
    # Same id, different content can only come from hand-made events: keep one deterministically.
    if old is None or ev.SerializeToString(deterministic=True) < old.SerializeToString(deterministic=True):
        unique[key] = ev


@dataclass
class _Open:
    start_ms: int
    offering: str
    size: str = ""


class _Machine:
    """Replays one resource's ordered events; the segments collect in `segments`."""

    def __init__(
        self,
        policy: BillingPolicy = DEFAULT_POLICY,
        *,
        router: bool = False,
        unsaved: frozenset[int] = frozenset(),
    ) -> None:
        self.policy = policy
        self.unsaved = unsaved  # id() of usage events CloudStack did not save (hidden_deploy.py)
        # A virtual router: CloudStack publishes its state events as a VM's, but bills no VM time
        # for system VMs (usage events are for user VMs only); its owner is for its bytes.
        self.router = router
        # first_start: a create is in force (seen, not yet ended by the policy's closer)
        self.created = False
        self.open: dict[str, _Open | None] = {"running": None, "allocated": None, "ip": None}
        self.segments: dict[str, list[tuple[int, int | None, str, str]]] = {
            "running": [],
            "allocated": [],
            "ip": [],
        }
        self.offering = ""  # last offering an event named for this resource
        self.size = ""  # last size an event named for it (vm_size.py), while that offering holds
        # The last boundary of each kind: with skew an event stamped before it is applied
        # after it, and its boundary is held here (in stamp order it never matters).
        self.floor: dict[str, int] = {}

    def opened(self, kind: str, at: int, offering: str, size: str = "") -> bool:
        if self.open[kind] is not None or (self.router and kind != "ip"):
            return False
        at = max(at, self.floor.get(kind, at))
        self.open[kind] = _Open(at, offering, size)
        self.floor[kind] = at
        return True

    def close(self, kind: str, at: int) -> bool:
        cur = self.open[kind]
        if cur is None:
            return False
        at = max(at, cur.start_ms)  # never negative
        if at > cur.start_ms:
            self.segments[kind].append((cur.start_ms, at, cur.offering, cur.size))
        self.open[kind] = None
        self.floor[kind] = at
        return True

    def split(self, kind: str, at: int, *, named: bool) -> bool:
        """Close and reopen an open segment when an event that named an offering or a size
        changed them (self.offering / self.size); else nothing."""
        cur = self.open[kind]
        if cur is None or not named or (cur.offering, cur.size) == (self.offering, self.size):
            return False
        self.close(kind, at)
        return self.opened(kind, at, self.offering, self.size)

    def name(self, ev: pb.LifecycleEvent) -> bool:
        """Take the offering and the size a VM usage event names; True when it names either. A
        new offering without a size ends the old size (it was the old offering's)."""
        if not ev.event_type.startswith("VM."):
            return False
        offering, size = ev.offering_uuid, size_of(ev.attributes)
        if offering and offering != self.offering:
            self.offering, self.size = offering, ""
        if size:
            self.size = size
        return bool(offering or size)

    def deallocate(self, at: int) -> bool:
        """The policy's end of an allocation: ALLOCATED closed, a pending one (first_start) dropped."""
        pending, self.created = self.created, False
        return self.close("allocated", at) or pending

    def apply(self, ev: pb.LifecycleEvent) -> bool:
        """Apply one event; True when it changed the state (opened, closed, split or allocatable)."""
        if id(ev) in self.unsaved:
            return False
        if ev.category == pb.USAGE:
            changed = self.usage(ev)
        elif ev.category == pb.RESOURCE_STATE:
            changed = self.state(ev)
        else:
            return False
        if self.created and self.open["running"] is not None and self.open["allocated"] is None:
            changed = self.opened("allocated", ev.time, self.offering, self.size) or changed  # first_start
        return changed

    def would_change(self, ev: pb.LifecycleEvent) -> bool:
        """Whether apply(ev) would change the state; the machine is left as it was."""
        if ev.category not in (pb.USAGE, pb.RESOURCE_STATE):
            return False
        opened, offering, size = dict(self.open), self.offering, self.size
        floor, created = dict(self.floor), self.created
        lengths = {kind: len(segs) for kind, segs in self.segments.items()}
        changed = self.apply(ev)
        self.open, self.offering, self.size, self.floor, self.created = opened, offering, size, floor, created
        for kind, length in lengths.items():
            del self.segments[kind][length:]
        return changed

    def usage(self, ev: pb.LifecycleEvent) -> bool:
        t, kind = ev.time, ev.event_type
        if kind not in EFFECT_RANK:
            return False  # other usage types (volumes, network offerings, ...) are not metered here
        named = self.name(ev)
        offering, size = self.offering, self.size
        policy = self.policy
        if kind == "VM.CREATE":
            if policy.allocated_from == CREATE or self.open["allocated"] is not None:
                return self.opened("allocated", t, offering, size) or self.split("allocated", t, named=named)
            created, self.created = self.created, True  # first_start: opened by the first start
            return not created
        if kind == "VM.START":
            changed = self.split("allocated", t, named=named)
            if not policy.running_by_usage:
                return self.split("running", t, named=named) or changed
            opened = self.opened("running", t, offering, size)
            return opened or self.split("running", t, named=named) or changed
        if kind == "VM.STOP":
            return policy.running_by_usage and self.close("running", t)
        if kind == "VM.UPGRADE":
            return self.split("allocated", t, named=named)
        if kind == "VM.DYNAMIC.SCALE":
            running = self.split("running", t, named=named)
            return self.split("allocated", t, named=named) or running
        if kind == "VM.DESTROY":
            running = policy.running_by_usage and self.close("running", t)
            return (policy.allocated_until == DESTROY and self.deallocate(t)) or running
        if kind == "VM.EXPUNGE":  # the reconciler's, for a VM no longer listed: under every policy
            running = self.close("running", t)
            return self.deallocate(t) or running
        if kind == "NET.IPASSIGN":
            return self.opened("ip", t, "")
        if kind == "NET.IPRELEASE":
            return self.close("ip", t)
        return False

    def state(self, ev: pb.LifecycleEvent) -> bool:
        if ev.status == "preStateTransitionEvent" or ev.resource_type not in _VM_TYPES:
            return False
        old, new = ev.attributes.get("old-state", ""), ev.attributes.get("new-state", "")
        if old == new:
            return False
        if new == EXPUNGING_STATE:  # an expunged VM runs nowhere: RUNNING closed under every policy
            running = self.close("running", ev.time)
            return (self.policy.allocated_until == EXPUNGE and self.deallocate(ev.time)) or running
        if not self.policy.running_by_state:
            return False
        if new == RUNNING_STATE:
            return self.opened("running", ev.time, self.offering, self.size)
        if new in STOPPED_STATES:
            return self.close("running", ev.time)
        return False


def _build(uuid: str, events: list[pb.LifecycleEvent], policy: BillingPolicy) -> ResourceHistory:
    initial, events = with_job_offerings(events)
    at = order_times(events)
    events.sort(key=lambda ev: (at[id(ev)], *event_order(ev)))
    hist = ResourceHistory(resource_uuid=uuid)
    router = any(ev.category == pb.USAGE and ev.event_type == ROUTER_OWNER for ev in events)
    unsaved = unsaved_at_deploy(events) | unsaved_before_hidden_jobs(events)
    machine = _Machine(policy, router=router, unsaved=frozenset(unsaved))
    machine.offering, machine.size = initial
    address = ""
    for ev in effect_order(machine.would_change, events, at):
        if not hist.resource_type and ev.resource_type:
            hist.resource_type = ev.resource_type
        _collect_addresses(hist, ev)
        if ev.resource_type == "IpAddress" and ev.ip_address:
            address = ev.ip_address
        if ev.category == pb.USAGE and ev.account_is_owner and ev.account_uuid:
            if not hist.owners or hist.owners[-1].account != ev.account_uuid:
                # skew: never before the order time (an opener it makes opens no earlier)
                since = max(at[id(ev)], hist.owners[-1].time_ms) if hist.owners else ev.time
                hist.owners.append(OwnerChange(since, ev.account_uuid))
        (hist.applied if machine.apply(ev) else hist.ignored).append(ev.event_id)
    hist.allocation_pending = not router and machine.created and machine.open["allocated"] is None
    for kind, cur in machine.open.items():
        if cur is not None:
            machine.segments[kind].append((cur.start_ms, None, cur.offering, cur.size))
    for kind, target in (("running", hist.running), ("allocated", hist.allocated), ("ip", hist.ip)):
        for start, end, offering, size in machine.segments[kind]:
            owner = hist.owner_at(start) or ""
            target.append(Segment(start, end, offering, owner, address if kind == "ip" else "", size))
    return hist


def _collect_addresses(hist: ResourceHistory, ev: pb.LifecycleEvent) -> None:
    macs = [ev.mac] + [v for k, v in sorted(ev.attributes.items()) if _NIC_MAC.match(k)]
    ips = [ev.ip_address] + [v for k, v in sorted(ev.attributes.items()) if _NIC_IP.match(k)]
    for mac in macs:
        if mac and mac.lower() not in hist.macs:
            hist.macs.append(mac.lower())
    for ip in ips:
        if ip and ip not in hist.addresses:
            hist.addresses.append(ip)
