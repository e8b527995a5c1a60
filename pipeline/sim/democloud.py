"""The demo's simulated CloudStack cloud and the lifecycle it plays (see kvmeter.pipeline.sim.demo).

One KVM host with CloudStack's bridges, alice's isolated network (a user VM and its virtual
router with guest, control and public NICs) and bob's VM on a shared public network. Without
root it is libvirt's test driver alone; as root, network namespaces stand behind the domains and
carry real traffic.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kvmeter.collector.model import NETWORK_BYTES_RECEIVED, NETWORK_BYTES_SENT
from kvmeter.pipeline.sim.simevents import EventBus
from kvmeter.pipeline.sim.simlibvirt import Domain, Nic, write_node_xml
from kvmeter.pipeline.sim.simnet import Host, Lab, Vm

ACCOUNTS = {
    "5a1ce000-0000-4000-8000-00000000a11c": "alice",
    "b0b00000-0000-4000-8000-000000000b0b": "bob",
}
ALICE, BOB = list(ACCOUNTS)
SMALL, MEDIUM = "c0ffee00-0000-4000-8000-000000000001", "c0ffee00-0000-4000-8000-000000000002"


@dataclass(frozen=True)
class VmSpec:
    name: str
    uuid: str
    account: str
    nics: tuple[tuple[str, str, str], ...]  # (bridge, guest MAC, address/prefix)
    owner: tuple[tuple[str, str], ...] = ()  # CloudStack <metadata> of a router


ALICE_VM = VmSpec(
    "i-2-10-VM",
    "6f1c6c4e-0000-4000-8000-000000000010",
    ALICE,
    (("brvx-5001", "02:00:0a:00:00:01", "10.1.1.10/24"),),
)
ROUTER = VmSpec(
    "r-5-VM",
    "6f1c6c4e-0000-4000-8000-000000000005",
    ALICE,
    (
        ("brvx-5001", "02:00:05:00:00:01", "10.1.1.1/24"),  # eth0 guest
        ("cloud0", "0e:00:a9:fe:00:05", "169.254.3.5/16"),  # eth1 control
        ("cloudbr0", "06:00:05:00:00:03", "198.51.100.5/24"),  # eth2 public (source NAT)
    ),
    owner=(("ownerAccountUuid", ALICE), ("ownerAccountName", "alice")),
)
BOB_VM = VmSpec(
    "i-3-11-VM",
    "6f1c6c4e-0000-4000-8000-000000000011",
    BOB,
    (("cloudbr0", "02:00:0b:00:00:01", "198.51.100.11/24"),),
)
SPECS = (ALICE_VM, ROUTER, BOB_VM)
PUBLIC_GATEWAY = "198.51.100.1"
POLL_SECONDS = 2.0


class Cloud:
    """The simulated host. Without root it is libvirt's test driver alone: no taps, no bytes."""

    truth_label = "the VMs' own kernel counters"

    def __init__(self, workdir: Path, *, real_network: bool):
        self.workdir = workdir
        self.lab: Lab | None = None
        self.host: Host | None = None
        self.vms: dict[str, Vm] = {}  # every VM booted so far, running or stopped
        self.quiet: set[str] = set()  # VMs shutting down: no more traffic from them
        if real_network:
            self.lab = Lab()
            self.host = self.lab.add_host("kvm1")
        self.uri = self.write_libvirt()

    def write_libvirt(self) -> str:
        domains = [
            Domain(s.name, s.uuid, tuple(Nic(mac=m, bridge=b) for b, m, _ in s.nics), owner=dict(s.owner))
            for s in SPECS
        ]
        return write_node_xml(self.workdir / "node.xml", domains)

    def boot(self, spec: VmSpec) -> None:
        if self.host is None:
            return
        vm = self.vms.get(spec.name)
        if vm is None:
            self.vms[spec.name] = self.host.add_vm(spec.name, spec.uuid, list(spec.nics))
        elif not vm.present:
            self.host.plug_all(vm)  # started again: the same taps come back
        self.quiet.discard(spec.name)

    def stop(self, spec: VmSpec) -> None:
        vm = self.vms.get(spec.name)
        if self.host is not None and vm is not None and vm.present:
            self.host.unplug_all(vm)  # the taps vanish with their last bytes

    def traffic(self) -> None:
        """One second's worth: guest traffic to the router, public traffic out and in."""
        sends = [
            (ALICE_VM.name, "10.1.1.1", 40_000, 0),
            (ROUTER.name, PUBLIC_GATEWAY, 120_000, 2),
            (BOB_VM.name, PUBLIC_GATEWAY, 60_000, 0),
        ]
        for name, dst, nbytes, nic in sends:
            vm = self.vms.get(name)
            if vm is not None and vm.present and name not in self.quiet:
                vm.send(dst, nbytes, nic=nic)

    def finish(self) -> None:
        """Traffic ends with the demo's loop; the VMs stay up."""

    def kernel_totals(self) -> dict[tuple[str, int], int]:
        """VM-side kernel counters over every incarnation: (vm uuid, usage type) -> bytes."""
        totals: dict[tuple[str, int], int] = defaultdict(int)
        for vm in self.vms.values():
            for nic in vm.nics:
                t = nic.total()
                totals[(vm.uuid, NETWORK_BYTES_SENT)] += t["tx_bytes"]
                totals[(vm.uuid, NETWORK_BYTES_RECEIVED)] += t["rx_bytes"]
        return totals

    def close(self) -> None:
        if self.lab is not None:
            self.lab.close()


class Stage(Protocol):
    """What the script plays on: this module's Cloud, or real guests (kvmeter.pipeline.sim.demoreal)."""

    quiet: set[str]

    def boot(self, spec: VmSpec) -> None: ...

    def stop(self, spec: VmSpec) -> None: ...


class Script:
    """The lifecycle, as CloudStack would publish it, appended to the events file on cue."""

    def __init__(self, cloud: Stage, events: Path, seconds: float):
        self.cloud, self.events, self.seconds = cloud, events, seconds
        self.bus = EventBus(offset_minutes=60)  # a management server in UTC+1
        self.t0 = time.time()
        s = seconds
        # (at second, what, action)
        self.steps = [
            (0.0, "alice: VM.CREATE + VM.START i-2-10-VM; router r-5-VM up", self._start_alice),
            (0.0, "bob: VM.CREATE + VM.START i-3-11-VM, NET.IPASSIGN 198.51.100.11", self._start_bob),
            (s * 0.15, "alice: NET.IPASSIGN 198.51.100.20", self._alice_ip),
            # A guest goes quiet before it powers off. (A veth, unlike a real tap, loses its
            # receive counter in the delete message, so bob's sending stops a poll earlier.)
            (max(0.0, s * 0.35 - 5), "bob: shutting down", self._quiet_bob),
            (s * 0.35, "bob: VM.STOP (taps deleted with their last bytes)", self._stop_bob),
            (s * 0.45, "bob: VM.UPGRADE to the medium offering", self._upgrade_bob),
            (s * 0.5, "bob: VM.START (medium)", self._start_bob_again),
            (s * 0.75, "alice: NET.IPRELEASE 198.51.100.20", self._release_alice_ip),
        ]

    def _emit(self, *records: tuple[bytes, bytes]) -> None:
        with open(self.events, "ab") as f:
            for _key, value in records:
                f.write(value + b"\n")

    def _ms(self) -> int:
        return int(time.time() * 1000)

    def _start_alice(self) -> None:
        self.cloud.boot(ROUTER)
        self.cloud.boot(ALICE_VM)
        now = self._ms()
        self._emit(
            self.bus.vm("VM.CREATE", ALICE_VM.uuid, ALICE, now, SMALL),
            self.bus.vm("VM.START", ALICE_VM.uuid, ALICE, now, SMALL),
        )

    def _start_bob(self) -> None:
        self.cloud.boot(BOB_VM)
        now = self._ms()
        self._emit(
            self.bus.vm("VM.CREATE", BOB_VM.uuid, BOB, now, SMALL),
            self.bus.vm("VM.START", BOB_VM.uuid, BOB, now, SMALL),
            self.bus.ip("NET.IPASSIGN", "1b000000-0000-4000-8000-000000000011", BOB, now, "198.51.100.11"),
        )

    def _alice_ip(self) -> None:
        self._emit(
            self.bus.ip(
                "NET.IPASSIGN", "1a000000-0000-4000-8000-000000000020", ALICE, self._ms(), "198.51.100.20"
            )
        )

    def _release_alice_ip(self) -> None:
        self._emit(
            self.bus.ip(
                "NET.IPRELEASE", "1a000000-0000-4000-8000-000000000020", ALICE, self._ms(), "198.51.100.20"
            )
        )

    def _quiet_bob(self) -> None:
        self.cloud.quiet.add(BOB_VM.name)

    def _stop_bob(self) -> None:
        self.cloud.stop(BOB_VM)
        self._emit(self.bus.vm("VM.STOP", BOB_VM.uuid, BOB, self._ms(), SMALL))

    def _upgrade_bob(self) -> None:
        self._emit(self.bus.vm("VM.UPGRADE", BOB_VM.uuid, BOB, self._ms(), MEDIUM))

    def _start_bob_again(self) -> None:
        self.cloud.boot(BOB_VM)
        self._emit(self.bus.vm("VM.START", BOB_VM.uuid, BOB, self._ms(), MEDIUM))

    def due(self) -> list[str]:
        """Run the steps whose time has come; return what they were."""
        elapsed = time.time() - self.t0
        done = []
        while self.steps and self.steps[0][0] <= elapsed:
            _, what, action = self.steps.pop(0)
            action()
            done.append(what)
        return done
