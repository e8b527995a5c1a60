#!/bin/bash
# Build kvmeter's .rpms for the EL9 family from this tree: a wheel first (EL9's setuptools is too
# old for pyproject.toml), then rpmbuild twice with packaging/rpm/kvmeter.spec:
#   system Python (3.9): python3-kvmeter, kvmeter-agent
#   Python 3.11:         python3.11-kvmeter, kvmeter-collector
# --nodeps: the build host's rpm database is empty on Debian; the spec needs nothing from it.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
work=$build_root/rpm
version=$(upstream_version)

require_configs
command -v rpmbuild >/dev/null || die "rpmbuild is not installed (make deps)"
rm -rf "$work" && mkdir -p "$work/sources" "$dist"
copy_tree "$work/tree"
(cd "$work/tree" && python3 -m build --wheel --no-isolation --outdir "$work/sources") >"$work/wheel.log" 2>&1 || {
	tail -n 40 "$work/wheel.log" >&2
	die "building the wheel failed, full log: $work/wheel.log"
}
p=$top/packaging
cp "$p/systemd/kvmeter-agent.service" "$p/systemd/kvmeter-collector.service" "$work/sources/"
cp "$p/sysusers.d/kvmeter-agent.conf" "$work/sources/kvmeter-agent.sysusers.conf"
cp "$p/sysusers.d/kvmeter-collector.conf" "$work/sources/kvmeter-collector.sysusers.conf"
cp "$p/tmpfiles.d/kvmeter-agent.conf" "$work/sources/kvmeter-agent.tmpfiles.conf"
cp "$p/tmpfiles.d/kvmeter-collector.conf" "$work/sources/kvmeter-collector.tmpfiles.conf"
cp "$p/config/agent.toml.example" "$p/config/collector.toml.example" "$p/config/tariff.toml.example" "$work/sources/"
cp "$p/README.md" "$work/sources/README.packaging.md"
cp "$p/man/kvmeter.1" "$work/sources/"
cp "$p"/monitoring/grafana/kvmeter-{agent,collector}.json "$work/sources/"
cp "$p"/monitoring/prometheus/kvmeter-{agent,collector}.rules.yml "$work/sources/"

for flavour in 3 3.11; do
	rpmbuild -bb --nodeps \
		--define "_topdir $work/rpmbuild" \
		--define "_sourcedir $work/sources" \
		--define "kvmeter_version $version" \
		--define "packager kvmeter developers <kvmeter-dev@example.org>" \
		--define "python3_pkgversion $flavour" \
		"$p/rpm/kvmeter.spec" >"$work/rpmbuild-$flavour.log" 2>&1 || {
		tail -n 40 "$work/rpmbuild-$flavour.log" >&2
		die "rpmbuild ($flavour) failed, full log: $work/rpmbuild-$flavour.log"
	}
done
for f in "$work"/rpmbuild/RPMS/noarch/*.rpm; do
	mv "$f" "$dist/"
	echo "$dist/$(basename "$f")"
done
