"""Synthetic fleets for the collector benchmarks, encoded with kvmeter's own agent code.

A fleet is H hosts with M VM NICs each (two NICs per CloudStack user VM, on the public bridge so
every byte is billable). `poll_batches` turns one poll of every host into the serialized
MeasureBatch each agent would publish (kvmeter.agent.measures.build_batch over Delta values), and
`lifecycle_events` gives the CloudStack event-bus records (VM.CREATE and VM.START usage events,
as CloudStack publishes them) that make every VM's owner known to the collector.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

ACCOUNTS = 50


@dataclass(frozen=True)
class Host:
    host_id: str
    boot_id: str
    stream_id: str
    attribution: dict[Any, Any]  # CounterKey -> measures.Attribution
    keys: tuple[Any, ...]  # CounterKey per NIC, in NIC order
    vms: tuple[tuple[str, str], ...]  # (instance uuid, account uuid)


def account_uuid(i: int) -> str:
    return str(uuid.UUID(int=(0xACC << 64) + i))


def _mac(n: int) -> str:
    return "52:54:" + ":".join(f"{(n >> shift) & 255:02x}" for shift in (24, 16, 8, 0))


def make_fleet(hosts: int, nics_per_host: int, *, seed: int = 1, first_host: int = 0) -> list[Host]:
    from kvmeter.agent.measures import Attribution
    from kvmeter.agent.model import CounterKey, DomainInfo, LinkPlacement, NicInfo

    rng = random.Random(seed)
    placement = LinkPlacement(bridge="cloudbr0", traffic_type="public")
    fleet = []
    for h in range(first_host, first_host + hosts):
        boot_id = str(uuid.UUID(int=rng.getrandbits(128)))
        attribution: dict[Any, Any] = {}
        keys = []
        vms = []
        for v in range((nics_per_host + 1) // 2):
            vm_number = h * 1000 + v
            vm_uuid = str(uuid.UUID(int=(h << 32) + v + 1))
            account = account_uuid(vm_number % ACCOUNTS)
            nics = tuple(
                NicInfo(
                    mac=_mac(2 * vm_number + k),
                    device=f"vnet{2 * v + k}",
                    nic_type="bridge",
                    bridge="cloudbr0",
                    model="virtio",
                )
                for k in range(min(2, nics_per_host - 2 * v))
            )
            domain = DomainInfo(
                uuid=vm_uuid, name=f"i-{vm_number % ACCOUNTS + 2}-{vm_number}-VM", state="running",
                kind="user_vm", nics=nics,
            )  # fmt: skip
            vms.append((vm_uuid, account))
            for nic in nics:
                key = CounterKey(boot_id, 100 + len(keys), nic.device or "")
                keys.append(key)
                attribution[key] = Attribution(domain=domain, nic=nic, placement=placement)
        fleet.append(Host(f"kvm-{h:05d}", boot_id, uuid.uuid4().hex, attribution, tuple(keys), tuple(vms)))
    return fleet


def poll_batch(
    host: Host, seq: int, start_ms: int, end_ms: int, rng: random.Random
) -> tuple[bytes, int, int]:
    """(serialized batch, measures, bytes) of one poll of `host` in which every NIC moved bytes."""
    from kvmeter.agent.measures import build_batch
    from kvmeter.agent.model import Delta

    deltas = []
    for key in host.keys:
        rx, tx = rng.randrange(1, 10**8), rng.randrange(1, 10**8)
        deltas.append(Delta(key, start_ms, end_ms, rx, tx, rx // 800 + 1, tx // 800 + 1))
    batch, unattributed = build_batch(
        host_id=host.host_id,
        boot_id=host.boot_id,
        stream_id=host.stream_id,
        seq=seq,
        poll_ms=end_ms,
        deltas=deltas,
        attribution=host.attribution,
    )
    if unattributed:
        raise RuntimeError(f"{len(unattributed)} deltas of {host.host_id} had no attribution")
    return batch.SerializeToString(), len(batch.measures), sum(m.bytes for m in batch.measures)


def poll_batches(
    fleet: list[Host], polls: int, interval_ms: int, *, start_ms: int | None = None, seed: int = 2
) -> tuple[list[tuple[bytes, bytes]], int, int]:
    """([(key, value)] in publish order: poll by poll, every host once per poll), measures, bytes."""
    rng = random.Random(seed)
    start = start_ms if start_ms is not None else (time.time_ns() // 1_000_000) - polls * interval_ms
    records = []
    measures = total = 0
    for p in range(polls):
        for host in fleet:
            value, m, b = poll_batch(host, p + 1, start + p * interval_ms, start + (p + 1) * interval_ms, rng)
            records.append((host.host_id.encode(), value))
            measures += m
            total += b
    return records, measures, total


def lifecycle_events(fleet: list[Host], at_ms: int, *, create: bool = True) -> list[tuple[bytes, bytes]]:
    """[(key, value)]: CloudStack usage events VM.CREATE (unless create=False) and VM.START for
    every VM of the fleet; either names the owner."""
    when = time.strftime("%Y-%m-%d %H:%M:%S +0000", time.gmtime(at_ms / 1000))
    zone = str(uuid.UUID(int=0x20E))
    out = []
    for host in fleet:
        for vm_uuid, account in host.vms:
            for event in ("VM.CREATE", "VM.START") if create else ("VM.START",):
                value = {
                    "account": account,
                    "zone": zone,
                    "event": event,
                    "resource": "com.cloud.vm.VirtualMachine",
                    "id": vm_uuid,
                    "eventDateTime": when,
                }
                out.append((vm_uuid.encode(), json.dumps(value).encode()))
    return out
