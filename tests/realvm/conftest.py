"""The real-VM tier's parts: one simulated KVM host (network namespace with CloudStack's bridges)
running a real libvirtd, QEMU guests built once, and a broker on the lab's management network.

Nothing here skips: a part that cannot start (no QEMU, no kernel .deb, no libvirtd) fails the
tier and says why. `make test` installs the packages and fetches the kernel (`make realvm-deps`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmeter.pipeline.sim.simnet import Lab, ip
from kvmeter.pipeline.sim.vmguest import build_guest, download_kernel
from kvmeter.pipeline.sim.vmhost import Libvirtd
from tests.harness import kafka
from tests.harness.realvm import GUEST_PEER, RealHost

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "realvm"


@pytest.fixture(scope="session")
def realvm_lab() -> Iterator[Lab]:
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="session")
def real_host(realvm_lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealHost]:
    """Host `h1` of the lab with a real libvirtd; guests are defined by the tests."""
    image = build_guest(BUILD, download_kernel(BUILD / "debs"))
    host = realvm_lab.add_host("h1")
    ip("addr", "add", f"{GUEST_PEER}/24", "dev", "brvx-5001", ns=host.ns)
    ip("link", "set", "brvx-5001", "up", ns=host.ns)
    workdir = tmp_path_factory.mktemp("realvm")
    libvirtd = Libvirtd(host.ns, workdir / "libvirt", cache_dir=BUILD / "libvirt-cache")
    try:
        libvirtd.start()
        real = RealHost(host, libvirtd, image, workdir)
        yield real
        real.remove_all()
    finally:
        libvirtd.stop()


@pytest.fixture(scope="session")
def realvm_broker(realvm_lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A broker in the lab's core namespace: reachable from the host (agent) and the root
    namespace (collector). Returns bootstrap."""
    broker = kafka.Broker(host=realvm_lab.core_ip, port=9092, log_dir=tmp_path_factory.mktemp("broker"))
    broker.start(prefix=realvm_lab.in_core())
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def guests(real_host: RealHost) -> Iterator[RealHost]:
    """The real host, with every guest a test defined destroyed and undefined after it."""
    try:
        yield real_host
    finally:
        real_host.remove_all()
