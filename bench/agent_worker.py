"""Side-by-side agent poll cost for the N interfaces of the namespace this process runs in.

Run by bench.agent_bench as `ip netns exec <host ns> python -m bench.agent_worker ...`; prints one
JSON object. Traffic is pushed (untimed) before every round so that every counter moves and
kvmeter's poll emits a measure per direction per interface, as on a busy host.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from typing import Any

from bench import agent_path
from bench.frames import Pusher, ifindexes
from bench.timing import interleaved
from bench.vethns import BRIDGE_MAC, VethHost
from kvmeter.proto import pb


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--vm-ns", required=True)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--sample", type=int, default=40, help="NICs scanned per round for the per-NIC method")
    ap.add_argument("--slow-every", type=int, default=1, help="run pyroute2 only every k-th round")
    args = ap.parse_args(argv)

    taps = [VethHost.tap(i) for i in range(args.n)]
    peers = [VethHost.peer(i) for i in range(args.n)]
    index = ifindexes()
    missing = [t for t in taps if t not in index]
    if missing:
        raise SystemExit(f"{len(missing)} taps missing in this namespace, e.g. {missing[:3]}")
    pusher = Pusher(args.vm_ns, taps, peers, BRIDGE_MAC)
    kv = agent_path.KvmeterPoll(args.n, index)
    state_dir = tempfile.mkdtemp(prefix="kvmeter-bench-agent-", dir="/var/tmp")
    try:
        agent = agent_path.build_agent(args.n, state_dir)
        agent.start()
        last: list[Any] = []

        def agent_poll() -> None:  # what the daemon's loop calls every interval
            last[:] = [agent.poll()]  # the poll's batches

        pusher.push()
        kv.poll()  # the first poll baselines every counter; the timed ones emit deltas
        agent_poll()
        pyroute2, close_pyroute2 = agent_path.pyroute2_poll()
        methods = {
            "floor": agent_path.raw_read,
            "kvmeter": agent_poll,
            "kvmeter_core": kv.poll,
            "psutil": agent_path.psutil_poll(),
            "pyroute2": pyroute2,
            "per_nic_scan": agent_path.per_nic_sampler(taps, args.sample),
        }
        table_lines = agent_path.raw_read().count(b"\n") - 2
        samples = interleaved(
            methods, args.rounds, between=pusher.push, only_every={"pyroute2": args.slow_every}
        )
        close_pyroute2()
        pusher.close()
        agent.close()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    scale = {"per_nic_scan": args.n / min(args.sample, args.n)}
    out = {
        "n": args.n,
        "table_lines": table_lines,
        "measures_per_poll": sum(len(pb.MeasureBatch.FromString(b).measures) for b in last[0]),
        "batch_bytes": sum(map(len, last[0])),
        "core_measures_per_poll": kv.last_measures,
        "per_nic_sample": min(args.sample, args.n),
        "methods": {name: s.summary(scale.get(name, 1.0)) for name, s in samples.items()},
        # medians over the timed polls (the first, untimed baseline poll excluded)
        "kvmeter_stages_cpu_s": {
            stage: statistics.median(spent[1:]) for stage, spent in kv.stage_cpu.items()
        },
    }
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
