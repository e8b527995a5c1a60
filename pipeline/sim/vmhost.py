"""A real libvirtd with QEMU guests inside a simulated KVM host's network namespace.

``Libvirtd(ns, state_dir)`` runs ``virtlogd`` and ``libvirtd`` inside the network namespace
``ns`` (so every tap libvirt creates lands on that namespace's bridges) and inside a mount
namespace of their own, where libvirt's directories (/run/libvirt, /var/lib/libvirt,
/var/cache/libvirt, /var/log/libvirt, /etc/libvirt/qemu) and ``qemu.conf`` are bind mounts of
directories under ``state_dir``. So no system file changes, the system's libvirt (if any) is not
touched, and several of these can run side by side. The sockets stay reachable from outside
through ``state_dir``: ``uri`` (read-write) and ``readonly_uri`` (the agent's).

QEMU runs as root (``user``/``group`` in the private ``qemu.conf``): as ``libvirt-qemu``, libvirt
finds /dev/kvm unusable and probes QEMU again on nearly every call (48 s per define). Guests
run under software emulation (``<domain type='qemu'>``): this machine's KVM cannot run them.

The daemons are stopped by their PIDs (from their pid files); they fork away from us, so they
are not our children.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

from kvmeter.pipeline.sim.simlibvirt import CLOUDSTACK_NS
from kvmeter.pipeline.sim.vmguest import POWEROFF_PORT

# libvirt's directories that get a private copy (bind mount target -> name under state_dir)
PRIVATE_DIRS = {
    "/run/libvirt": "run",
    "/var/lib/libvirt": "lib",
    "/var/cache/libvirt": "cache",
    "/var/log/libvirt": "log",
    "/etc/libvirt/qemu": "etc-qemu",
}
# root (see above); files left as they are (no chown, no owner xattrs); no AppArmor profile
QEMU_CONF = """user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
"""


class Libvirtd:
    """virtlogd + libvirtd in network namespace ``ns``; ``start()``, ``restart()``, ``stop()``."""

    def __init__(
        self, ns: str, state_dir: Path, *, cache_dir: Path | None = None, exec_prefix: list[str] | None = None
    ):
        self.ns = ns
        self.state_dir = state_dir.resolve()
        # libvirt's probe of QEMU's capabilities takes seconds; its cache may outlive the daemon
        self.cache_dir = (cache_dir or self.state_dir / "cache").resolve()
        self.exec_prefix = exec_prefix if exec_prefix is not None else ["ip", "netns", "exec", ns]
        self.log = state_dir / "daemons.log"

    @property
    def socket(self) -> Path:
        return self.state_dir / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    @property
    def readonly_uri(self) -> str:
        return f"qemu:///system?socket={self.socket}-ro"

    def _pid(self, name: str) -> int | None:
        try:
            return int((self.state_dir / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    @property
    def libvirtd_pid(self) -> int | None:
        return self._pid("libvirtd")

    def start(self, timeout: float = 60.0) -> Libvirtd:
        for target in PRIVATE_DIRS:
            self._source(target).mkdir(parents=True, exist_ok=True)
        (self.state_dir / "qemu.conf").write_text(QEMU_CONF)
        self._spawn(with_virtlogd=self._pid_alive("virtlogd") is None)
        self.wait_ready(timeout)
        return self

    def _spawn(self, *, with_virtlogd: bool) -> None:
        mounts = [
            f"mkdir -p {target} && mount --bind {shlex.quote(str(self._source(target)))} {target}"
            for target in PRIVATE_DIRS
        ]
        mounts.append(f"mount --bind {shlex.quote(str(self.state_dir / 'qemu.conf'))} /etc/libvirt/qemu.conf")
        daemons = []
        if with_virtlogd:
            daemons.append(f"virtlogd -d -p {shlex.quote(str(self.state_dir / 'virtlogd.pid'))}")
        daemons.append(f"libvirtd -d -p {shlex.quote(str(self.state_dir / 'libvirtd.pid'))}")
        # `ip netns exec` gives the command a mount namespace whose changes stay inside it; the
        # unshare makes sure of that under other prefixes too.
        script = " && ".join(["mount --make-rprivate /", *mounts, *daemons])
        with open(self.log, "ab") as log:
            subprocess.run(
                [*self.exec_prefix, "unshare", "--mount", "sh", "-c", script],
                stdout=log,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=60,
            )

    def _source(self, target: str) -> Path:
        return self.cache_dir if target == "/var/cache/libvirt" else self.state_dir / PRIVATE_DIRS[target]

    def _pid_alive(self, name: str) -> int | None:
        pid = self._pid(name)
        if pid is None:
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            result = subprocess.run(
                ["virsh", "-c", self.uri, "version"], capture_output=True, text=True, check=False
            )
            if result.returncode == 0:
                return
            last = result.stderr.strip()
            time.sleep(0.1)
        raise RuntimeError(f"libvirtd in {self.ns} did not answer within {timeout} s: {last}\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def _kill(self, name: str, timeout: float = 15.0) -> None:
        pid = self._pid_alive(name)
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _running(pid):
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    def restart(self, timeout: float = 60.0) -> None:
        """Stop libvirtd (guests keep running, as on a real host) and start it again."""
        self._kill("libvirtd")
        self._spawn(with_virtlogd=self._pid_alive("virtlogd") is None)
        self.wait_ready(timeout)

    def stop(self) -> None:
        """Destroy and undefine every domain, then stop both daemons."""
        if self._pid_alive("libvirtd") is not None:
            for name in self.virsh("list", "--all", "--name").split():
                self.virsh("destroy", name, check=False)
                self.virsh("undefine", name, check=False)
        self._kill("libvirtd")
        self._kill("virtlogd")

    def virsh(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        command = ["virsh", "-q", "-c", self.uri, *args]
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout


def poweroff_command(address: str) -> list[str]:
    """Run in the guest's network: asks the guest at ``address`` to power itself off (see
    kvmeter.pipeline.sim.vmguest)."""
    connect = (
        "import socket, time\n"
        "for attempt in range(100):\n"
        "    try:\n"
        f"        socket.create_connection(({address!r}, {POWEROFF_PORT}), 10).close()\n"
        "        break\n"
        "    except ConnectionRefusedError:\n"  # its listener is starting right now
        "        time.sleep(0.1)\n"
        "else:\n"
        "    raise SystemExit('the guest never listened')\n"
    )
    return [sys.executable, "-c", connect]


def _running(pid: int) -> bool:
    """True while ``pid`` runs (a zombie no longer does: no init reaps the daemons here)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass(frozen=True)
class GuestNic:
    bridge: str
    mac: str
    address: str  # CIDR inside the guest
    peer: str | None = None  # whom the guest pings from this NIC

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]


@dataclass(frozen=True)
class Guest:
    """A CloudStack-shaped domain: ``i-<account>-<id>-VM`` or ``r-<id>-VM``."""

    name: str
    uuid: str
    nics: tuple[GuestNic, ...]
    owner: dict[str, str] = field(default_factory=dict)  # CloudStack's <metadata> owner fields
    memory_mb: int = 96
    ping_size: int = 1000
    ping_every: float = 0.2

    def cmdline(self) -> str:
        args = ["console=ttyS0", "quiet", "loglevel=3", "panic=-1", "ipv6.disable=1"]
        for k, nic in enumerate(self.nics):
            args.append(f"kvm.ip{k}={nic.address}")
            if nic.peer:
                args.append(f"kvm.peer{k}={nic.peer}")
        args += [f"kvm.size={self.ping_size}", f"kvm.every={self.ping_every}"]
        return " ".join(args)

    def xml(self, kernel: Path, initrd: Path, serial_log: Path) -> str:
        metadata = ""
        if self.owner:
            fields = "".join(f"<cs:{k}>{escape(v)}</cs:{k}>" for k, v in sorted(self.owner.items()))
            metadata = f"<metadata><cs:instance xmlns:cs='{CLOUDSTACK_NS}'>{fields}</cs:instance></metadata>"
        nics = "".join(
            f"<interface type='bridge'><mac address='{n.mac}'/><source bridge='{escape(n.bridge)}'/>"
            "<model type='virtio'/></interface>"
            for n in self.nics
        )
        log = escape(str(serial_log))
        return (
            f"<domain type='qemu'><name>{escape(self.name)}</name><uuid>{self.uuid}</uuid>{metadata}"
            f"<memory unit='MiB'>{self.memory_mb}</memory><vcpu>1</vcpu>"
            f"<os><type arch='x86_64' machine='pc'>hvm</type><kernel>{escape(str(kernel))}</kernel>"
            f"<initrd>{escape(str(initrd))}</initrd><cmdline>{escape(self.cmdline())}</cmdline></os>"
            "<features><acpi/><apic/></features><clock offset='utc'/>"
            "<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>"
            f"<devices>{nics}"
            f"<serial type='file'><source path='{log}'/><target port='0'/></serial>"
            f"<console type='file'><source path='{log}'/><target type='serial' port='0'/></console>"
            "<video><model type='none'/></video><memballoon model='none'/>"
            "<controller type='usb' model='none'/></devices></domain>"
        )
