"""Reconciliation of IP addresses and virtual routers' owners (see reconcile's module doc):
addresses open in kvmeter and no longer allocated in CloudStack (or the reverse), seen by two
witnesses, get NET.IPRELEASE / NET.IPASSIGN; a router whose owner differs from its network's gets
ROUTER.OWNER. Pure."""

from __future__ import annotations

from kvmeter.collector.correction import Correction
from kvmeter.collector.cs_snapshot import Snapshot
from kvmeter.collector.lifecycle import ROUTER_OWNER
from kvmeter.collector.reconcile_view import Findings, View, open_segment, read_after

_IP_FREED = frozenset({"Free", "Releasing"})  # IPAddressResponse states of an address given back


def ips(view: View, snapshot: Snapshot, previous: Snapshot | None, out: Findings) -> None:
    ip_histories = {u: h for u, h in view.histories.items() if h.ip}
    for uuid in sorted(set(ip_histories) | set(snapshot.ips)):
        history, ip = ip_histories.get(uuid), snapshot.ips.get(uuid)
        held = open_segment(history.ip) if history else None
        listed = ip is not None and ip.state not in _IP_FREED
        last = view.last_event_ms.get(uuid, 0)
        before = previous.ips.get(uuid) if previous is not None else None
        prev_ms = previous.taken_ms if previous is not None else -1
        prev_ok = previous is not None and read_after(prev_ms, last)
        if held is not None and not listed:
            if not (prev_ok and (before is None or before.state in _IP_FREED)):
                out.notes.append(
                    f"{uuid}: not allocated in CloudStack, open in kvmeter: awaiting a second witness"
                )
                continue
            account = history.owner_at(snapshot.taken_ms) or "" if history else ""
            at = max(prev_ms, held.start_ms)
            reason = "CloudStack no longer lists the address as allocated (release event lost)"
            out.corrections.append(
                Correction(uuid, "IpAddress", "NET.IPRELEASE", at, account, reason, address=held.address)
            )
        elif ip is not None and held is None and ip.state == "Allocated":
            seen_before = prev_ok and before is not None and before.state == "Allocated"
            if not seen_before:
                out.notes.append(
                    f"{uuid}: allocated in CloudStack, not in kvmeter: awaiting a second witness"
                )
                continue
            owner = snapshot.account_uuid(ip.account, ip.domain_id, ip.project_id)
            if owner is None:
                out.notes.append(
                    f"{uuid}: allocated in CloudStack to an account not known for sure: left alone"
                )
                continue
            at = ip.allocated_ms if ip.allocated_ms is not None and ip.allocated_ms > last else prev_ms
            reason = "CloudStack lists the address as allocated while kvmeter had it free (assign event lost)"
            out.corrections.append(
                Correction(
                    uuid, "IpAddress", "NET.IPASSIGN", at, owner, reason, address=ip.address, zone=ip.zone
                )
            )


def routers(view: View, snapshot: Snapshot, out: Findings) -> None:
    for uuid, router in sorted(snapshot.routers.items()):
        if router.network_id:
            networks = [n for n in (snapshot.networks.get(router.network_id),) if n is not None]
        else:
            networks = [n for n in snapshot.networks.values() if router.vpc_id and n.vpc_id == router.vpc_id]
        owners = {snapshot.account_uuid(n.account, n.domain_id, n.project_id) for n in networks}
        if len(owners) != 1 or None in owners:
            out.notes.append(f"{uuid} ({router.name}): owner of its network not known for sure: left alone")
            continue
        owner = owners.pop()
        assert owner is not None
        history = view.histories.get(uuid)
        ours = history.owners[-1].account if history is not None and history.owners else None
        if ours == owner:
            continue
        if ours is None and router.created_ms is not None:
            at = router.created_ms
        else:
            at = max(snapshot.taken_ms, view.last_event_ms.get(uuid, 0))
        net = router.network_id or f"VPC {router.vpc_id}"
        reason = f"router {router.name} serves network {net} of account {owner}"
        out.corrections.append(Correction(uuid, "DomainRouter", ROUTER_OWNER, at, owner, reason))
