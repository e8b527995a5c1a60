#!/bin/bash
# Run the benchmarks against a committed tree instead of the working tree (which others may be
# editing mid-change): bench/at_commit.sh [REV] [python -m bench options...]
# The tree of REV (default HEAD) is exported to a temporary directory and put ahead of the
# editable install on PYTHONPATH; results.json is written to this checkout's bench/.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
rev=HEAD
if [[ $# -gt 0 && $1 != -* ]]; then rev=$1; shift; fi
sha=$(git -C "$repo" rev-parse --short "$rev")
snap=$(mktemp -d "/tmp/kvmeter-bench-$sha-XXXX")
trap 'rm -rf "$snap"' EXIT
git -C "$repo" archive "$rev" | tar -x -C "$snap"
# the installed layout (kvmeter, kvmeter.agent, ...) as a tree of the exported sources
mkdir -p "$snap/site"
cp -r "$snap/src/kvmeter" "$snap/site/kvmeter"
for part in agent collector proto pipeline; do cp -r "$snap/$part" "$snap/site/kvmeter/$part"; done
cd "$snap"
KVMETER_BENCH_COMMIT=$sha PYTHONPATH="$snap/site:$snap" "$repo/.venv/bin/python" -m bench \
	--out "$repo/bench/results.json" "$@"
