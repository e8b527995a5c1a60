#!/bin/bash
# A clean Debian 12 root for the package install test, from a cached debootstrap tarball.
#   debian-root.sh create DIR    unpack the cached base (made on first use) into DIR, mount /proc
#   debian-root.sh destroy DIR   unmount and delete DIR
#   debian-root.sh apt DIR ARGS  apt-get ARGS inside DIR (serialised: the download cache is shared)
#   debian-root.sh boot DIR      boot DIR's systemd in a container (systemd-nspawn, own network
#                                namespace) until something in it powers off; at most 180 s
# The base has only Debian's packages (debootstrap minbase of bookworm + apt lists). Downloaded
# .debs are kept in $KVMETER_CI_CACHE/apt-archives and bind-mounted, so a warm run downloads nothing.
set -euo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
CACHE=${KVMETER_CI_CACHE:-/var/cache/kvmeter-ci}
MIRROR=${KVMETER_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${KVMETER_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
BASE=$CACHE/debian12-minbase.tar

die() { echo "debian-root: $*" >&2; exit 1; }

ensure_base() {
	mkdir -p "$CACHE/debootstrap-debs" "$CACHE/apt-archives/partial"
	exec 9>"$CACHE/base.lock"
	flock 9
	[ -s "$BASE" ] && return 0
	command -v debootstrap >/dev/null || die "debootstrap is not installed (make deps)"
	local tmp
	tmp=$(mktemp -d "$CACHE/mkbase.XXXXXX")
	echo "debian-root: building the cached Debian 12 base in $tmp (once)" >&2
	debootstrap --variant=minbase --cache-dir="$CACHE/debootstrap-debs" bookworm "$tmp" "$MIRROR" >&2 ||
		die "debootstrap failed (mirror $MIRROR)"
	cat >"$tmp/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY_MIRROR bookworm-security main
SOURCES
	cp /etc/resolv.conf "$tmp/etc/resolv.conf"
	chroot "$tmp" apt-get -q update >&2 || die "apt-get update in the base failed"
	chroot "$tmp" apt-get clean
	chmod 0755 "$tmp"
	tar -C "$tmp" -cf "$BASE.tmp" . && mv "$BASE.tmp" "$BASE"
	rm -rf --one-file-system "$tmp"
}

create() {
	local root=$1
	ensure_base
	mkdir -p "$root"
	tar -C "$root" -xf "$BASE"
	chmod 0755 "$root"  # the root's "/": services run as unprivileged users in there
	cp /etc/resolv.conf "$root/etc/resolv.conf"
	mount -t proc proc "$root/proc"
	mount --bind "$CACHE/apt-archives" "$root/var/cache/apt/archives"
	# No service starts inside the root (there is no systemd running there anyway).
	printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
	chmod 0755 "$root/usr/sbin/policy-rc.d"
}

destroy() {
	local root=$1
	[ -d "$root" ] || return 0
	root=$(cd "$root" && pwd -P)
	# Deepest mounts first; then make sure nothing is left mounted before deleting.
	findmnt -rn -o TARGET | grep -E "^$root(/|$)" | sort -r | while read -r m; do umount -l "$m"; done
	if findmnt -rn -o TARGET | grep -qE "^$root(/|$)"; then die "still mounted under $root"; fi
	rm -rf --one-file-system "$root"
}

apt() {
	local root=$1
	shift
	exec 8>"$CACHE/apt.lock"
	flock 8
	chroot "$root" env DEBIAN_FRONTEND=noninteractive PATH="$PATH" \
		apt-get -q -o APT::Sandbox::User=root "$@"
}

boot() {
	local root=$1 rc=0
	command -v systemd-nspawn >/dev/null || die "systemd-nspawn is not installed (make deps: package systemd-container)"
	# nspawn brings its own /proc; the apt cache is not the container's business.
	umount "$root/proc" "$root/var/cache/apt/archives"
	# --keep-unit/--register=no: no systemd or machined needed on the host.
	timeout 180 systemd-nspawn --quiet --directory="$root" --boot --private-network \
		--register=no --keep-unit </dev/null || rc=$?
	mount -t proc proc "$root/proc"
	mount --bind "$CACHE/apt-archives" "$root/var/cache/apt/archives"
	return $rc
}

case "${1:-}" in
create) [ -n "${2:-}" ] || die "usage: $0 create DIR"; create "$2" ;;
destroy) [ -n "${2:-}" ] || die "usage: $0 destroy DIR"; destroy "$2" ;;
apt) [ -n "${2:-}" ] || die "usage: $0 apt DIR ARGS..."; root=$2; shift 2; apt "$root" "$@" ;;
boot) [ -n "${2:-}" ] || die "usage: $0 boot DIR"; boot "$2" ;;
base) ensure_base ;;
*) die "usage: $0 create DIR | destroy DIR | apt DIR ARGS... | boot DIR | base" ;;
esac
