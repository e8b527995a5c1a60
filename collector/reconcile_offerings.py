"""Reconciliation of VMs' service offerings and custom sizes (see reconcile's module doc):
open segments naming no offering, or another offering or size than CloudStack's, get a
VM.DYNAMIC.SCALE at the best known time. Pure."""

from __future__ import annotations

from kvmeter.collector.correction import Correction
from kvmeter.collector.cs_snapshot import Snapshot, Vm
from kvmeter.collector.reconcile_view import Findings, View, open_segment, read_after
from kvmeter.collector.vm_size import size_text


def offerings(
    view: View, snapshot: Snapshot, previous: Snapshot | None, out: Findings, skip: set[str]
) -> None:
    for uuid, vm in sorted(snapshot.vms.items()):
        history = view.histories.get(uuid)
        if uuid in skip or history is None or not vm.offering:
            continue
        opened = (open_segment(history.allocated), open_segment(history.running))
        segments = [s for s in opened if s is not None]
        size = custom_size(snapshot, vm)
        named, sizes = {s.offering for s in segments}, {s.size for s in segments}
        if not segments or (named == {vm.offering} and (not size or sizes == {size})):
            continue
        if not read_after(
            snapshot.taken_ms, max(view.last_event_ms.get(uuid, 0), view.scaled_ms.get(uuid, 0))
        ):
            # The read began before the VM's latest event, or within the clock skew of it (a
            # scaling the bus told of meanwhile): it says nothing of the offering since; the
            # next pass will.
            out.notes.append(f"{uuid}: an event came after this pass's read began: offering left alone")
            continue
        start = max(s.start_ms for s in segments)
        if named == {""}:
            at = min(s.start_ms for s in segments)
            reason = f"offering {vm.offering} learned from CloudStack"
        elif named == {vm.offering} and sizes == {""}:
            at = min(s.start_ms for s in segments)
            reason = f"size {size} (vCPUs/MiB) of custom offering {vm.offering} learned from CloudStack"
        else:
            before = previous.vms.get(uuid) if previous is not None else None
            scaled = view.scaled_ms.get(uuid, 0)
            if scaled > start:
                at = scaled
            elif before is not None and (before.offering, custom_size(previous, before)) == (
                vm.offering,
                size,
            ):
                assert previous is not None
                at = max(previous.taken_ms, start)  # the previous pass saw it already
            else:
                at = snapshot.taken_ms
            was = "/".join(sorted(o or "none" for o in named))
            if named != {vm.offering}:
                reason = f"offering changed from {was} to {vm.offering} (no offering on the bus)"
            else:
                old = ", ".join(sorted(s or "unknown" for s in sizes))
                reason = f"custom offering {vm.offering} scaled from {old} to {size} (vCPUs/MiB)"
        out.corrections.append(
            Correction(
                uuid,
                "VirtualMachine",
                "VM.DYNAMIC.SCALE",
                at,
                history.owner_at(at) or "",  # the owner then, unchanged: who may see the correction
                reason,
                vm.offering,
                zone=vm.zone,
                details=size_details(vm, size),
            )
        )


def custom_size(snapshot: Snapshot | None, vm: Vm) -> str:
    """The VM's own size when its offering is custom (its details name cpuNumber / memory, or
    the offering is customized: ServiceOfferingResponse without cpunumber / memory), else "":
    a fixed offering's size is the offering's."""
    offering = snapshot.offerings.get(vm.offering) if snapshot is not None else None
    customized = offering is not None and (
        offering.customized or offering.cpu is None or offering.memory is None
    )
    return size_text(vm.cpu, vm.memory) if vm.custom or customized else ""


def size_details(vm: Vm, size: str) -> tuple[tuple[str, str], ...]:
    """The correction's cpunumber / memory: named only for a custom offering's VM."""
    return (("cpunumber", str(vm.cpu)), ("memory", str(vm.memory))) if size else ()
