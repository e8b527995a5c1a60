#!/bin/bash
# Build kvmeter's .debs (python3-kvmeter, kvmeter-agent, kvmeter-collector) from this tree with
# debhelper + pybuild, in a copy (build/packages/deb/kvmeter); the packages land in dist/.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
work=$build_root/deb
src=$work/kvmeter

require_configs
rm -rf "$work" && mkdir -p "$work" "$dist"
copy_tree "$src"
cp -r "$top/packaging/debian" "$src/debian"

upstream=$(upstream_version)
debver=$(cd "$src" && dpkg-parsechangelog -SVersion)
[ "$upstream" = "$debver" ] ||
	die "pyproject.toml says $upstream but packaging/debian/changelog says $debver"

(cd "$src" && dpkg-buildpackage -b -us -uc --no-sign) >"$work/build.log" 2>&1 || {
	tail -n 60 "$work/build.log" >&2
	die "dpkg-buildpackage failed, full log: $work/build.log"
}
for p in python3-kvmeter kvmeter-agent kvmeter-collector; do
	mv "$work/${p}_${debver}_all.deb" "$dist/"
	echo "$dist/${p}_${debver}_all.deb"
done
