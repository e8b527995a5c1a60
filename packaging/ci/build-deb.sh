#!/bin/bash
# Build kvmeter's .debs (python3-kvmeter, kvmeter-agent, kvmeter-collector) from this tree.
# The build runs in a copy (build/packages/deb/kvmeter) so the working tree stays clean;
# the packages land in dist/.
set -euo pipefail
# Debian's own Python and tools only (not a pyenv or venv python3 earlier on PATH).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
top=$(cd "$(dirname "$0")/../.." && pwd)
work=$top/build/packages/deb
src=$work/kvmeter
dist=${DIST_DIR:-$top/dist}

for f in packaging/config/agent.toml.example packaging/config/collector.toml.example; do
	[ -f "$top/$f" ] || { echo "build-deb: missing $f (needed as the package's conffile)" >&2; exit 1; }
done

rm -rf "$work" && mkdir -p "$src" "$dist"
# Tracked and new (not ignored) files: what `git status` shows, without .venv, build/, dist/.
(cd "$top" && git ls-files -z --cached --others --exclude-standard) |
	while IFS= read -r -d '' f; do [ -e "$top/$f" ] && printf '%s\0' "$f"; done |
	tar -C "$top" --null --verbatim-files-from -T - -cf - | tar -C "$src" -xf -
cp -r "$top/packaging/debian" "$src/debian"

upstream=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$top/pyproject.toml")
debver=$(cd "$src" && dpkg-parsechangelog -SVersion)
if [ "$upstream" != "$debver" ]; then
	echo "build-deb: pyproject.toml says $upstream but packaging/debian/changelog says $debver" >&2
	exit 1
fi

(cd "$src" && dpkg-buildpackage -b -us -uc --no-sign) >"$work/build.log" 2>&1 || {
	tail -n 60 "$work/build.log" >&2
	echo "build-deb: dpkg-buildpackage failed, full log: $work/build.log" >&2
	exit 1
}
for p in python3-kvmeter kvmeter-agent kvmeter-collector; do
	mv "$work/${p}_${debver}_all.deb" "$dist/"
	echo "$dist/${p}_${debver}_all.deb"
done
