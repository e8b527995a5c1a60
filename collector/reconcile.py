"""Reconciliation against CloudStack's API: kvmeter's view + a snapshot -> corrections. Pure.

    reconcile(view: View, snapshot: Snapshot, previous: Snapshot | None, policy) -> Findings
    view_of(events_by_resource, histories, witness) -> View
    observe(witness, batches)   # witness.py: the agents' inventories -> per domain, running or not

VMs' states here; offerings and custom sizes in reconcile_offerings, IP addresses and routers'
owners in reconcile_addresses, the View and Findings they share in reconcile_view.

A correction (correction.py) is a usage event in CloudStack's bus format, stored and
applied like any other lifecycle event; its id is the digest of its content, so the same inputs
give the same event and a pass run again adds nothing. Rules:

- Two witnesses before any drift correction: CloudStack's answer now, and either the previous
  pass's answer (taken after the resource's last event, by more than the clock skew between the
  collector and the management servers) or the agents' own view of the domain
  (inventory state, for VMs; seen after the segment it would close opened). One witness alone
  waits for the next pass. The agents saying the opposite of CloudStack (a VM CloudStack calls
  stopped still running on a host that reported it within WITNESS_FRESH_MS) is a dispute: no
  correction, a note.
- The time of a correction is the earliest agreeing observation (the agents' first poll that saw
  the new state, else the previous pass), never before the segment it closes started and never
  before the last event that put the resource in its current state.
- VMs: kvmeter running, CloudStack Stopped -> VM.STOP; Destroyed / Expunging / Error / not
  listed -> VM.DESTROY (closes RUNNING and ALLOCATED); CloudStack Running, kvmeter not ->
  VM.START (and VM.CREATE when kvmeter has no open ALLOCATED: at CloudStack's `created` unless
  an allocation kvmeter has ended after it, else the previous pass); a listed VM kvmeter never
  heard of -> VM.CREATE at `created`.
  States in transition (Starting, Stopping, Migrating, ...) are left alone.
- Hidden VMs (displayvm=false; CloudStack's usage has no VM time for them, see _hidden): open
  segments closed by the end of an allocation at the previous pass that saw it hidden too (taken
  after its last event); never a VM.CREATE / VM.START; the host running it is no dispute.
- IPs: open in kvmeter, not listed (or Free) -> NET.IPRELEASE; listed Allocated, not open in
  kvmeter -> NET.IPASSIGN at `allocated` (or the earliest observation after kvmeter's last event).
- Offerings: a VM's open segments name no offering -> VM.DYNAMIC.SCALE at their start (a split
  at a segment's start names it); another offering than CloudStack's -> VM.DYNAMIC.SCALE at the
  last scaling event after the segment started, else the pass that first saw the new offering.
  Custom offerings (the VM's details name cpuNumber / memory, or the offering is customized):
  the size (cpunumber / memory) is compared as the offering is: unnamed -> named at the open
  segments' start; another -> VM.DYNAMIC.SCALE with cpunumber / memory at the same best known
  time, so RUNNING / ALLOCATED split there exactly as on an offering change.
- Routers: the owner of the router's guest network (or of its VPC's networks) -> ROUTER.OWNER,
  a usage-shaped event that sets the router's owner timeline and opens no segment.
- The owner is never guessed: events that open something carry the account CloudStack names,
  resolved by (account name, domain id) through listAccounts; unresolved (or project-owned, or
  disagreeing with kvmeter's owner) -> no correction, a note.
- A snapshot where most of the VMs kvmeter has open are missing is refused (a key that sees
  only part of the cloud must not destroy the rest).

Under the billing policy (collector/policy.py; the rules above are the default's) a correction is
an event the policy honours, so kvmeter's view and CloudStack's agree under it:
- running "state": RUNNING is started and stopped by resource-state events (Stopped -> Running,
  Running -> Stopped / Destroyed), not usage events; a destroy under allocated_until "destroy"
  adds the usage VM.DESTROY that closes ALLOCATED.
- allocated_until "expunge": a VM CloudStack lists as Destroyed or Error is still allocated (no
  correction); one it no longer lists (or lists as Expunging) gets a usage-shaped VM.EXPUNGE,
  which closes ALLOCATED and RUNNING under every policy.
- allocated_from "first_start": a VM created and never started has no ALLOCATED and needs none;
  a lost create is still corrected (it makes the VM allocatable).
"""

from __future__ import annotations

from dataclasses import replace

from kvmeter.collector.correction import SOURCE, Correction
from kvmeter.collector.cs_snapshot import Snapshot, SnapshotError, Vm
from kvmeter.collector.model import ResourceHistory, Segment
from kvmeter.collector.policy import DEFAULT_POLICY, DESTROY, BillingPolicy
from kvmeter.collector.reconcile_addresses import ips, routers
from kvmeter.collector.reconcile_offerings import custom_size, offerings, size_details
from kvmeter.collector.reconcile_view import Findings, View, open_segment, read_after, view_of
from kvmeter.collector.witness import Witness, observe

__all__ = ["SOURCE", "Correction", "Findings", "View", "Witness", "observe", "reconcile", "view_of"]

RUNNING = "Running"
STOPPED = "Stopped"
GONE_STATES = frozenset({"Destroyed", "Expunging", "Expunged", "Error"})
EXPUNGED_STATES = frozenset({"Expunging", "Expunged"})
MAX_GONE_FRACTION = 0.5  # of the VMs kvmeter has open, when at least MIN_FOR_GUARD are
MIN_FOR_GUARD = 4
WITNESS_FRESH_MS = 15 * 60_000  # the agents' last report of a domain this recent can dispute
_GONE = "(not listed)"


def reconcile(
    view: View, snapshot: Snapshot, previous: Snapshot | None = None, policy: BillingPolicy = DEFAULT_POLICY
) -> Findings:
    """The corrections that make kvmeter's view agree with CloudStack's under the billing policy
    (see module doc)."""
    out = Findings()
    _guard(view, snapshot)
    corrected = _vms(view, snapshot, previous, out, policy)
    offerings(view, snapshot, previous, out, skip=corrected)
    ips(view, snapshot, previous, out)
    routers(view, snapshot, out)
    out.corrections.sort(key=lambda c: (c.resource_uuid, c.time_ms, c.event_type))
    return out


def _vm_histories(view: View) -> dict[str, ResourceHistory]:
    return {u: h for u, h in view.histories.items() if h.running or h.allocated or h.allocation_pending}


def _running_change(
    policy: BillingPolicy, correction: Correction, allocated: Segment | None
) -> list[Correction]:
    """A VM.START / VM.STOP / VM.DESTROY correction as events the policy honours: under running
    "state", a state event for RUNNING (and the usage VM.DESTROY for an open ALLOCATED, when the
    policy ends it at the destroy)."""
    if policy.running_by_usage:
        return [correction]
    old, new = {"VM.START": ("Stopped", RUNNING), "VM.STOP": (RUNNING, STOPPED)}.get(
        correction.event_type, (RUNNING, "Destroyed")
    )
    found = [replace(correction, states=(old, new), offering="", zone="")]
    if correction.event_type == "VM.DESTROY" and allocated is not None and policy.allocated_until == DESTROY:
        found.append(correction)
    return found


def _guard(view: View, snapshot: Snapshot) -> None:
    histories = _vm_histories(view).items()
    open_vms = [u for u, h in histories if open_segment(h.allocated) or open_segment(h.running)]
    missing = [u for u in open_vms if u not in snapshot.vms]
    if len(open_vms) >= MIN_FOR_GUARD and len(missing) > MAX_GONE_FRACTION * len(open_vms):
        raise SnapshotError(
            f"{len(missing)} of {len(open_vms)} VMs kvmeter has open are not listed: "
            "does the API key see the whole cloud (listall as a root admin)?"
        )


def _fresh(witness: Witness, snapshot: Snapshot) -> bool:
    """The agents reported the domain lately: enough to dispute CloudStack (a host that stopped
    reporting must not keep a VM running forever)."""
    return witness.seen_ms >= snapshot.taken_ms - WITNESS_FRESH_MS


def _state(snapshot: Snapshot | None, uuid: str) -> str | None:
    if snapshot is None:
        return None
    vm = snapshot.vms.get(uuid)
    return vm.state if vm is not None else _GONE


def _owner(view: View, snapshot: Snapshot, uuid: str, name: str, domain: str, project: str) -> str | None:
    """CloudStack's owner of a resource, checked against kvmeter's; None when not sure."""
    theirs = snapshot.account_uuid(name, domain, project)
    history = view.histories.get(uuid)
    ours = history.owners[-1].account if history is not None and history.owners else None
    if theirs is not None and ours is not None and theirs != ours:
        return None
    return theirs or ours


def _vms(
    view: View, snapshot: Snapshot, previous: Snapshot | None, out: Findings, policy: BillingPolicy
) -> set[str]:
    corrected: set[str] = set()
    histories = _vm_histories(view)
    for uuid in sorted(set(histories) | set(snapshot.vms)):
        vm, history = snapshot.vms.get(uuid), histories.get(uuid)
        state = vm.state if vm is not None else _GONE
        prev = _state(previous, uuid)
        last = view.last_event_ms.get(uuid, 0)
        prev_ms = previous.taken_ms if previous is not None else -1
        prev_ok = previous is not None and read_after(prev_ms, last)
        running = open_segment(history.running) if history else None
        allocated = open_segment(history.allocated) if history else None
        witness = view.witness.get(uuid)
        gone = state == _GONE or state in GONE_STATES
        # What ends the allocation under the policy, and the previous pass confirming it.
        ended = {_GONE, *(GONE_STATES if policy.allocated_until == DESTROY else EXPUNGED_STATES)}
        ending = "VM.DESTROY" if policy.allocated_until == DESTROY else "VM.EXPUNGE"
        account = history.owner_at(snapshot.taken_ms) or "" if history else ""
        if vm is not None and not vm.display and not gone:
            hidden = _hidden(
                vm, previous, running, allocated, account, out, policy, prev_ok=prev_ok, ending=ending
            )
            if hidden:
                corrected.add(uuid)
            continue
        if running is not None and (state == STOPPED or gone):
            if witness is not None and witness.running and _fresh(witness, snapshot):
                out.notes.append(f"{uuid}: CloudStack says {state}, its host still runs it: left running")
                continue
            # The agents saw it not running after the segment opened (older news says nothing).
            seen = [
                w.since_ms
                for w in (witness,)
                if w is not None and not w.running and w.since_ms > running.start_ms
            ]
            if prev_ok and prev is not None and (prev == STOPPED or prev == _GONE or prev in GONE_STATES):
                seen.append(prev_ms)
            if not seen:
                out.notes.append(
                    f"{uuid}: CloudStack says {state}, kvmeter running: awaiting a second witness"
                )
                continue
            at = max(min(seen), running.start_ms)
            destroyed = gone and prev_ok and (prev == _GONE or prev in GONE_STATES)
            if destroyed and state in ended and prev in ended:
                kind = ending
            else:
                kind = "VM.DESTROY" if destroyed else "VM.STOP"
            reason = f"CloudStack says {state} while kvmeter had it running (stop event lost)"
            found = Correction(uuid, "VirtualMachine", kind, at, account, reason)
            out.corrections.extend(
                [found] if kind == "VM.EXPUNGE" else _running_change(policy, found, allocated)
            )
            corrected.add(uuid)
        elif allocated is not None and running is None and state in ended:
            if prev_ok and prev in ended:
                at = max(prev_ms, allocated.start_ms)
                lost = "destroy" if ending == "VM.DESTROY" else "expunge"
                reason = f"CloudStack says {state} while kvmeter had it allocated ({lost} event lost)"
                out.corrections.append(Correction(uuid, "VirtualMachine", ending, at, account, reason))
                corrected.add(uuid)
            else:
                out.notes.append(
                    f"{uuid}: CloudStack says {state}, kvmeter allocated: awaiting a second witness"
                )
        elif vm is not None and not gone and (state == RUNNING or state == STOPPED):
            unallocated = allocated is None and not (history is not None and history.allocation_pending)
            if (running is None and state == RUNNING) or unallocated:
                if _opened(
                    view,
                    snapshot,
                    previous,
                    vm,
                    history,
                    running,
                    witness,
                    out,
                    policy,
                    unallocated=unallocated,
                ):
                    corrected.add(uuid)
    return corrected


def _hidden(
    vm: Vm,
    previous: Snapshot | None,
    running: Segment | None,
    allocated: Segment | None,
    account: str,
    out: Findings,
    policy: BillingPolicy,
    *,
    prev_ok: bool,
    ending: str,
) -> bool:
    """A VM CloudStack hides (displayvm=false) has no VM time in its usage: UsageEventUtils saves
    no usage event of a hidden VM (its VM.CREATE / START / STOP / DESTROY reach the bus only),
    and hiding one saves VM.DESTROY (and VM.STOP when running). So its open segments are closed
    as at a destroy, none is opened, and its host running it is no dispute. `prev_ok`: the
    previous pass read after the VM's last event; `ending`: what ends allocation by the policy."""
    if running is None and allocated is None:
        return False
    before = previous.vms.get(vm.uuid) if previous is not None else None
    if previous is None or before is None or before.display or not prev_ok:
        out.notes.append(
            f"{vm.uuid}: CloudStack hides it (displayvm=false), kvmeter bills it: awaiting a second witness"
        )
        return False
    reason = "CloudStack hides the VM (displayvm=false): its usage has no VM time for it"
    found = Correction(vm.uuid, "VirtualMachine", ending, previous.taken_ms, account, reason)
    out.corrections.extend([found] if ending == "VM.EXPUNGE" else _running_change(policy, found, allocated))
    return True


def _opened(
    view: View,
    snapshot: Snapshot,
    previous: Snapshot | None,
    vm: Vm,
    history: ResourceHistory | None,
    running: Segment | None,
    witness: Witness | None,
    out: Findings,
    policy: BillingPolicy,
    *,
    unallocated: bool,
) -> bool:
    """Lost VM.CREATE / VM.START of a VM CloudStack lists as existing (Running or Stopped)."""
    uuid, last = vm.uuid, view.last_event_ms.get(vm.uuid, 0)
    prev = _state(previous, uuid)
    prev_ms = previous.taken_ms if previous is not None else -1
    prev_ok = previous is not None and read_after(prev_ms, last)
    owner = _owner(view, snapshot, uuid, vm.account, vm.domain_id, vm.project_id)
    if owner is None:
        out.notes.append(f"{uuid}: CloudStack says {vm.state}, owner not known for sure: left alone")
        return False
    added = False
    if unallocated:
        listed = prev_ok and prev is not None and prev != _GONE and prev not in GONE_STATES
        ended = [s.end_ms for s in history.allocated if s.end_ms is not None] if history else []
        if vm.created_ms is not None and vm.created_ms >= max(ended, default=0) and listed:
            create_at: int | None = vm.created_ms  # CloudStack's own time: exact
        else:
            create_at = prev_ms if listed else None
        if create_at is None:
            out.notes.append(
                f"{uuid}: CloudStack lists it, kvmeter has no allocation: awaiting a second witness"
            )
            return False
        reason = "CloudStack lists the VM while kvmeter had no allocation (create event lost)"
        out.corrections.append(
            Correction(
                uuid,
                "VirtualMachine",
                "VM.CREATE",
                create_at,
                owner,
                reason,
                vm.offering,
                zone=vm.zone,
                details=size_details(vm, custom_size(snapshot, vm)),
            )
        )
        last, added = max(last, create_at), True
    if vm.state == RUNNING and running is None:
        seen = [w.since_ms for w in (witness,) if w is not None and w.running and w.since_ms > last]
        if prev == RUNNING and prev_ok:
            seen.append(prev_ms)
        if (
            witness is not None
            and not witness.running
            and witness.since_ms > last
            and _fresh(witness, snapshot)
        ):
            out.notes.append(f"{uuid}: CloudStack says Running, its host says not: left stopped")
            return added
        if not seen:
            out.notes.append(f"{uuid}: CloudStack says Running, kvmeter not: awaiting a second witness")
            return added
        reason = "CloudStack says Running while kvmeter had it stopped (start event lost)"
        start = Correction(
            uuid, "VirtualMachine", "VM.START", min(seen), owner, reason, vm.offering, zone=vm.zone,
            details=size_details(vm, custom_size(snapshot, vm)),
        )  # fmt: skip
        out.corrections.extend(_running_change(policy, start, None))
        added = True
    return added
