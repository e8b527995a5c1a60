"""A tiny real guest for QEMU: Debian's cloud kernel and a busybox initramfs, built once.

The guest boots straight into ``/init`` (no disk), loads the virtio NIC driver, sets up its
NICs from the kernel command line and then:

* pings its peer on each NIC (``kvm.peerK``) every ``kvm.every`` s with ``kvm.size`` bytes of
  ICMP payload: traffic in both directions;
* prints its own ``/proc/net/dev`` line of every NIC to the serial console, prefixed ``KVMRV``,
  once a second and right before it powers off: the guest's ground truth;
* powers itself off (``poweroff -f``, which ACPI turns into a guest-initiated shutdown) when a
  TCP connection reaches port 7 of its first address.

Parameters: ``kvm.ipK=ADDR/PREFIX`` and ``kvm.peerK=ADDR`` for NIC K (eth0, eth1, ...),
``kvm.size`` and ``kvm.every``. The kernel comes from the ``linux-image-*-cloud-amd64`` .deb
(``apt-get download``); in that kernel virtio is modular, so the modules go into the initramfs
and are loaded in dependency order. Builds are cached under a directory by the hash of what
goes into them.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

# The virtio NIC driver and what it needs, in load order.
VIRTIO_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
)
BUSYBOX = Path("/bin/busybox")
KERNEL_PACKAGE = "linux-image-cloud-amd64"
SERIAL_TAG = "KVMRV"
POWEROFF_PORT = 7

INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in @MODULES@; do insmod /lib/modules/$m.ko || echo "@TAG@ insmod $m failed"; done
size=1000; every=0.2
for arg in $(cat /proc/cmdline); do
  case "$arg" in kvm.*=*) k="${arg%%=*}"; eval "${k#kvm.}=\"\${arg#*=}\"";; esac
done
ip link set lo up
n=0
while :; do
  eval "addr=\$ip$n; peer=\$peer$n"
  [ -n "$addr" ] || break
  i=0
  while [ ! -e /sys/class/net/eth$n ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
  ip addr add "$addr" dev eth$n
  ip link set eth$n up
  n=$((n + 1))
done
counters() { grep ' eth' /proc/net/dev | sed "s/^ */@TAG@ $1 /" > /dev/console; }
nc -l -p @PORT@ > /dev/null 2>&1 &
trigger=$!
counters up
pids=""
k=0
while [ $k -lt $n ]; do
  eval "peer=\$peer$k"
  if [ -n "$peer" ]; then
    ping -q -s "$size" -i "$every" "$peer" > /dev/null 2>&1 &
    pids="$pids $!"
  fi
  k=$((k + 1))
done
(while :; do sleep 1; counters tick; done) &
pids="$pids $!"
wait $trigger
# quiet first (the last replies come in), so the final line is all this guest ever moved
kill $pids
sleep 0.5
counters final
poweroff -f
"""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path


def kernel_debs(deb_dir: Path) -> list[Path]:
    """The versioned cloud-kernel .debs in ``deb_dir`` (the meta package is not needed)."""
    return sorted(Path(p) for p in glob.glob(str(deb_dir / "linux-image-*-cloud-amd64_*.deb")))


def download_kernel(deb_dir: Path) -> Path:
    """The newest cloud-kernel .deb in ``deb_dir``; fetched with ``apt-get download`` if none is there."""
    found = kernel_debs(deb_dir)
    if found:
        return found[-1]
    deb_dir.mkdir(parents=True, exist_ok=True)
    depends = _run(["apt-cache", "depends", KERNEL_PACKAGE])
    versioned = [line.split()[-1] for line in depends.splitlines() if "Depends: linux-image-" in line]
    if not versioned:
        raise RuntimeError(f"apt-cache knows no kernel behind {KERNEL_PACKAGE}: run apt-get update")
    _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", versioned[0]], cwd=deb_dir)
    found = kernel_debs(deb_dir)
    if not found:
        raise RuntimeError(f"apt-get download {versioned[0]} left no .deb in {deb_dir}")
    return found[-1]


def init_script() -> str:
    return (
        INIT.replace("@MODULES@", " ".join(VIRTIO_MODULES))
        .replace("@TAG@", SERIAL_TAG)
        .replace("@PORT@", str(POWEROFF_PORT))
    )


def build_guest(cache_dir: Path, deb: Path) -> GuestImage:
    """Kernel and initramfs for the guest, from ``deb`` and the host's static busybox; reused
    when nothing that goes into them changed."""
    if not BUSYBOX.exists():
        raise RuntimeError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    digest = hashlib.sha256()
    for part in (init_script().encode(), BUSYBOX.read_bytes(), deb.read_bytes()):
        digest.update(hashlib.sha256(part).digest())
    out = cache_dir / f"guest-{digest.hexdigest()[:16]}"
    image = GuestImage(out / "vmlinuz", out / "initrd.gz")
    if image.kernel.exists() and image.initrd.exists():
        return image
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="guest-", dir=cache_dir))
    try:
        unpacked = work / "deb"
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)])
        kernels = sorted((unpacked / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise RuntimeError(f"{deb} holds no boot/vmlinuz-*")
        root = work / "root"
        (root / "bin").mkdir(parents=True)
        (root / "lib" / "modules").mkdir(parents=True)
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        for name in VIRTIO_MODULES:
            found = list(unpacked.glob(f"lib/modules/*/kernel/**/{name}.ko"))
            if len(found) != 1:
                raise RuntimeError(f"module {name}.ko: {len(found)} found in {deb}")
            shutil.copy2(found[0], root / "lib" / "modules" / f"{name}.ko")
        init = root / "init"
        init.write_text(init_script())
        init.chmod(0o755)
        staged = work / "out"
        staged.mkdir()
        shutil.copy2(kernels[-1], staged / "vmlinuz")
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        archive = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            input=("\n".join([".", *files]) + "\n").encode(),
            cwd=root,
            capture_output=True,
            check=True,
        )
        with gzip.open(staged / "initrd.gz", "wb", compresslevel=6) as f:
            f.write(archive.stdout)
        if not out.exists():  # a build running side by side may have finished first
            os.replace(staged, out)
        return image
    finally:
        shutil.rmtree(work, ignore_errors=True)


def guest_prints(serial: str, label: str) -> list[dict[str, dict[str, int]]]:
    """The guest's own counter lines with ``label`` (up, tick, final) in its serial log, oldest
    first: one {ifname: {rx_bytes, tx_bytes}} per print."""
    prints: list[dict[str, dict[str, int]]] = []
    current: dict[str, dict[str, int]] = {}
    last_eth = -1
    for line in serial.split("\n")[:-1]:  # the last one may be half written
        parts = line.strip().split(None, 2)
        if len(parts) < 3 or parts[0] != SERIAL_TAG or parts[1] != label:
            continue
        ifname, numbers = parts[2].split(":", 1)
        fields = [int(v) for v in numbers.split()]
        k = int(ifname.strip()[3:])
        if k <= last_eth:  # the next print starts at eth0 again
            prints.append(current)
            current = {}
        current[ifname.strip()] = {"rx_bytes": fields[0], "tx_bytes": fields[8]}
        last_eth = k
    if current:
        prints.append(current)
    return prints


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout
