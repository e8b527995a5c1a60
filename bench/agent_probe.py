"""Agent.poll next to the floor (one raw read of /proc/net/dev), interleaved, in the namespace this
process runs in: the in-process reference figures for bench.agent_process. Prints one JSON object.

With `--storm F`, a fraction F of the taps is replaced (untimed) before every round, so every
timed Agent.poll is the poll right after those link events (bench.vethns.replace_taps). With
`--gone-first` too, the taps are only deleted before a round, their domains still running (a VM
stopping loses its tap before libvirt reports it shut off), and made again after it, with an
untimed poll that takes them: every timed Agent.poll is the poll between.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from typing import Any

from bench import agent_path
from bench.frames import Pusher
from bench.timing import interleaved
from bench.vethns import BRIDGE_MAC, VethHost, delete_taps, make_taps, replace_taps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--host-ns", required=True)
    ap.add_argument("--vm-ns", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--storm", type=float, default=0.0, help="fraction of taps replaced before each round")
    ap.add_argument("--storm-offset", type=int, default=0, help="first tap replaced")
    ap.add_argument(
        "--gone-first", action="store_true", help="time the poll between a storm's deletions and its new taps"
    )
    args = ap.parse_args(argv)

    taps = [VethHost.tap(i) for i in range(args.n)]
    peers = [VethHost.peer(i) for i in range(args.n)]
    per_round = max(1, int(args.n * args.storm)) if args.storm else 0
    state_dir = tempfile.mkdtemp(prefix="kvmeter-bench-probe-", dir="/var/tmp")
    events: list[int] = []
    gone: list[int] = []  # the taps deleted for the last round (--gone-first)
    try:
        agent = agent_path.build_agent(args.n, state_dir)
        agent.start()
        nxt = [args.storm_offset]

        def between() -> None:
            if per_round:
                first = nxt[0]
                batch = [(first + k) % args.n for k in range(per_round)]
                if args.gone_first:
                    if gone:
                        make_taps(args.host_ns, args.vm_ns, gone)
                        time.sleep(0.3)
                        agent.poll()
                    delete_taps(args.host_ns, batch)
                    gone[:] = batch
                else:
                    replace_taps(args.host_ns, args.vm_ns, batch)
                nxt[0] = (first + per_round) % args.n
                time.sleep(0.3)  # the topology's thread takes the link events, as between polls
            pusher = Pusher(args.vm_ns, taps, peers, BRIDGE_MAC)  # replaced taps: sockets anew
            pusher.push()
            pusher.close()
            events.append(agent._events.qsize())

        between()
        agent.poll()  # baselines every counter: the timed polls emit deltas
        samples = interleaved(
            {"floor": agent_path.raw_read, "agent_poll": agent.poll}, args.rounds, between=between
        )
        agent.close()
    finally:
        if gone:  # every tap back for whoever polls the namespace next
            make_taps(args.host_ns, args.vm_ns, gone)
        shutil.rmtree(state_dir, ignore_errors=True)
    out: dict[str, Any] = {
        "n": args.n,
        "replaced_per_round": per_round,
        "link_events_per_round": sorted(events[1:])[len(events[1:]) // 2] if len(events) > 1 else 0,
        "methods": {name: s.summary() for name, s in samples.items()},
        "rounds": {name: s.cpu for name, s in samples.items()},
    }
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
