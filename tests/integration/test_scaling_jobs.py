"""scaleVirtualMachine as CloudStack publishes it, each scaling taking its job's offering. Its
async job's commandEventType is ScaleVMCmd.getEventType(), "VM.UPGRADE" (every version), while
the usage event of a running VM is VM.DYNAMIC.SCALE (UserVmManagerImpl.upgradeVirtualMachine,
and again VirtualMachineManagerImpl.orchestrateReConfigureVm)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmeter.collector.model import RUNNING_VM, Record, Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from tests.collector_support import ACCT_A, HOUR, T0, VM1, Clock, usage_event

KAFKA = "cloudstack/0"  # one partition: the bus keys usage and job events by the VM's uuid


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path}/u.db")
    s.migrate()
    yield s
    s.close()


def _rec(kv: tuple[bytes, bytes], seq: int) -> Record:
    return Record(kv[1], kv[0], "", (KAFKA, seq))


def _job(kind: str, offering: str, n: int) -> tuple[bytes, bytes]:
    vm = {"id": VM1, "serviceofferingid": offering, "cpunumber": 1, "memory": 1024}
    doc = {
        "account": ACCT_A,
        "instanceUuid": VM1,
        "instanceType": "VirtualMachine",
        "commandEventType": kind,
        "jobId": f"job-{n}",
        "jobResult": {"virtualmachine": vm},
        "status": "SUCCEEDED",
    }
    return VM1.encode(), json.dumps(doc).encode()


def _running_by_offering(store: Store) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, qty in store.net_usage().items():
        if key.usage_type == RUNNING_VM:
            out[key.offering] = out.get(key.offering, 0) + qty
    return out


def test_two_scalings_pair_with_their_vm_upgrade_jobs(store: Store) -> None:
    """Two scaleVirtualMachine calls on a running VM, all delivered by one partition: each bare
    VM.DYNAMIC.SCALE usage event takes the offering of the completed job (commandEventType
    VM.UPGRADE) delivered just after it, so RUNNING is small 0-1h, medium 1-3h, large 3-5h."""
    c = Collector(store, Settings(), Clock(T0 + 5 * HOUR))
    c.apply_events(
        [
            _rec(usage_event("VM.CREATE", VM1, ACCT_A, T0), 0),
            _rec(_job("VM.CREATE", "small", 1), 1),
            _rec(usage_event("VM.START", VM1, ACCT_A, T0), 2),
            _rec(usage_event("VM.DYNAMIC.SCALE", VM1, ACCT_A, T0 + HOUR), 3),
            _rec(_job("VM.UPGRADE", "medium", 2), 4),
            _rec(usage_event("VM.DYNAMIC.SCALE", VM1, ACCT_A, T0 + 3 * HOUR), 5),
            _rec(_job("VM.UPGRADE", "large", 3), 6),
        ]
    )
    c.tick()
    assert _running_by_offering(store) == {"small": HOUR, "medium": 2 * HOUR, "large": 2 * HOUR}


def test_one_scaling_published_twice_takes_its_jobs_offering(store: Store) -> None:
    """One scaleVirtualMachine of a running VM: CloudStack publishes VM.DYNAMIC.SCALE twice
    (orchestrateReConfigureVm and upgradeVirtualMachine(ScaleVMCmd)), then its VM.UPGRADE job
    completes naming "medium": RUNNING is split at the scaling, medium from then on."""
    c = Collector(store, Settings(), Clock(T0 + 5 * HOUR))
    c.apply_events(
        [
            _rec(usage_event("VM.CREATE", VM1, ACCT_A, T0), 0),
            _rec(_job("VM.CREATE", "small", 1), 1),
            _rec(usage_event("VM.START", VM1, ACCT_A, T0), 2),
            _rec(usage_event("VM.DYNAMIC.SCALE", VM1, ACCT_A, T0 + HOUR), 3),
            _rec(usage_event("VM.DYNAMIC.SCALE", VM1, ACCT_A, T0 + HOUR + 1000), 4),
            _rec(_job("VM.UPGRADE", "medium", 2), 5),
        ]
    )
    c.tick()
    assert _running_by_offering(store) == {"small": HOUR, "medium": 4 * HOUR}
