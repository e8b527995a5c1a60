# Shared by the package build scripts (sourced).
# Debian's own Python and tools only (not a pyenv or venv python3 earlier on PATH).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
dist=${DIST_DIR:-$top/dist}
# Where the copies are built (a test passes its own, so concurrent runs do not collide).
build_root=${PACKAGE_BUILD_DIR:-$top/build/packages}

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

upstream_version() { sed -n 's/^version = "\(.*\)"$/\1/p' "$top/pyproject.toml"; }

require_configs() {
	local f
	for f in packaging/config/agent.toml.example packaging/config/collector.toml.example \
		packaging/config/tariff.toml.example; do
		[ -f "$top/$f" ] || die "missing $f (it becomes the package's config file)"
	done
}

# copy_tree DEST: tracked and new (not ignored) files, i.e. what `git status` shows, without
# .venv, build/ or dist/, so a build sees the working tree and leaves it untouched.
copy_tree() {
	mkdir -p "$1"
	(cd "$top" && git ls-files -z --cached --others --exclude-standard) |
		while IFS= read -r -d '' f; do [ -e "$top/$f" ] && printf '%s\0' "$f"; done |
		tar -C "$top" --null --verbatim-files-from -T - -cf - | tar -C "$1" -xf -
}
