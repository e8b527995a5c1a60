"""The demo's cloud on real guests (`kvmeter demo --real-vms`): the same host, VMs and lifecycle
as kvmeter.pipeline.sim.democloud, but the VMs are QEMU guests of a real libvirtd (software
emulation) with real `vnetN` taps on the host's bridges.

The guests make their own traffic (each pings its peer: alice's VM the router, the router and
bob's VM the public gateway) and the host sends UDP into
the public network. Bob's VM.STOP is the guest powering itself off; at the end every guest is
destroyed, so each tap's whole life is in its delete message, which a watcher records: the
truth the billed bytes are compared with.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

from kvmeter.collector.model import NETWORK_BYTES_RECEIVED, NETWORK_BYTES_SENT
from kvmeter.pipeline.sim.democloud import BOB_VM, PUBLIC_GATEWAY, ROUTER, SPECS, VmSpec
from kvmeter.pipeline.sim.simlibvirt import tap_mac
from kvmeter.pipeline.sim.simnet import SENDER, Host, Lab
from kvmeter.pipeline.sim.tapwatch import LinkWatch
from kvmeter.pipeline.sim.vmguest import build_guest, download_kernel, guest_prints
from kvmeter.pipeline.sim.vmhost import Guest, GuestNic, Libvirtd, poweroff_command

# whom each NIC pings, by guest MAC: alice's VM the router across the guest network, the router
# and bob's VM the public gateway (the router's control NIC stays quiet: the demo bills public
# and guest traffic only)
PEERS = {
    "02:00:0a:00:00:01": "10.1.1.1",
    "06:00:05:00:00:03": PUBLIC_GATEWAY,
    "02:00:0b:00:00:01": PUBLIC_GATEWAY,
}
# the host's UDP into the public network, every second: (to, bytes)
INBOUND = ((BOB_VM, "198.51.100.11", 30_000), (ROUTER, "198.51.100.5", 60_000))


def guest_of(spec: VmSpec) -> Guest:
    nics = tuple(GuestNic(bridge, mac, address, PEERS.get(mac)) for bridge, mac, address in spec.nics)
    owner = dict(spec.owner) or {"ownerAccountUuid": spec.account}  # CloudStack's <metadata>
    return Guest(spec.name, spec.uuid, nics, owner=owner, ping_size=1200, ping_every=0.1)


class RealCloud:
    """The demo's host with real guests; the interface of democloud.Cloud."""

    truth_label = "the taps' final counters (from their delete messages)"

    def __init__(self, workdir: Path, cache_dir: Path):
        self.workdir = workdir
        self.quiet: set[str] = set()  # real guests stop sending when they stop
        self.lab = Lab()
        self.libvirtd: Libvirtd | None = None
        self.watch: LinkWatch | None = None
        try:
            self.host: Host = self.lab.add_host("kvm1")
            image = build_guest(cache_dir, download_kernel(cache_dir / "debs"))
            self.libvirtd = Libvirtd(self.host.ns, workdir / "libvirt", cache_dir=cache_dir / "libvirt-cache")
            self.libvirtd.start()
            self.watch = LinkWatch(self.host.ns)
            for spec in SPECS:
                xml = workdir / f"{spec.name}.xml"
                xml.write_text(
                    guest_of(spec).xml(image.kernel, image.initrd, workdir / f"{spec.name}.serial.log")
                )
                self.libvirtd.virsh("define", str(xml))
        except BaseException:
            self.close()
            raise
        self.uri = self.libvirtd.readonly_uri

    def _running(self, spec: VmSpec) -> bool:
        assert self.libvirtd is not None
        return self.libvirtd.virsh("domstate", spec.name).strip() == "running"

    def boot(self, spec: VmSpec) -> None:
        assert self.libvirtd is not None
        if self._running(spec):
            return
        deadline = time.monotonic() + 30
        while self.libvirtd.virsh("domstate", spec.name).strip() != "shut off":  # still shutting down
            if time.monotonic() > deadline:
                raise RuntimeError(f"{spec.name} did not shut off")
            time.sleep(0.1)
        self._serial_log(spec).unlink(missing_ok=True)
        self.libvirtd.virsh("start", spec.name)

    def _wait_up(self, spec: VmSpec, timeout: float = 120) -> None:
        log = self._serial_log(spec)
        deadline = time.monotonic() + timeout
        while not guest_prints(log.read_text(errors="replace") if log.exists() else "", "up"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{spec.name} did not boot within {timeout} s (serial log {log})")
            time.sleep(0.1)

    def _serial_log(self, spec: VmSpec) -> Path:
        return self.workdir / f"{spec.name}.serial.log"

    def stop(self, spec: VmSpec) -> None:
        """The guest powers itself off (CloudStack's stop is a shutdown request to the guest)."""
        assert self.libvirtd is not None
        if self._running(spec):
            self._wait_up(spec)  # one that is still booting would not hear it
            self.host.run(*poweroff_command(spec.nics[0][2].split("/")[0]))

    def traffic(self) -> None:
        """One second's inbound public traffic (the guests ping on their own)."""
        for spec, dst, nbytes in INBOUND:
            if self._running(spec):
                self.host.run(sys.executable, str(SENDER), PUBLIC_GATEWAY, dst, str(nbytes), "1200")

    def finish(self) -> None:
        """Every guest stops (destroyed): its taps go, with their final counters."""
        assert self.libvirtd is not None
        for spec in SPECS:
            self.libvirtd.virsh("destroy", spec.name, check=False)

    def kernel_totals(self) -> dict[tuple[str, int], int]:
        """What every tap counted over its whole life, as the VM sees it: (vm uuid, usage type)."""
        vms = {tap_mac(mac): spec.uuid for spec in SPECS for _bridge, mac, _address in spec.nics}
        totals: dict[tuple[str, int], int] = defaultdict(int)
        for record in self.watch.deleted() if self.watch is not None else []:
            totals[(vms[record.mac], NETWORK_BYTES_SENT)] += record.rx_bytes or 0
            totals[(vms[record.mac], NETWORK_BYTES_RECEIVED)] += record.tx_bytes or 0
        return totals

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
        if self.libvirtd is not None:
            self.libvirtd.stop()
        self.lab.close()
