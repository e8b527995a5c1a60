"""A real agent poll loop for memory and CPU: the agent as `kvmeter agent` builds it
(kvmeter.agent.cli.build_agent: libvirt inventory, netlink topology, spool, Kafka publisher) over
N interfaces, in the namespace this process runs in, running Agent.run(). libvirt is its test
driver with one domain per two taps, each NIC naming its tap as a running QEMU domain's live
XML does (bench.vethns.TAP_PREFIX says why the taps are not named vnetN). bench.agent_bench
watches the resident memory from outside (psutil) while bench.frames pushes traffic on every
interface.

CPU is split into what the polls take (the poll thread's CPU time around each poll) and
the rest (topology's event thread, librdkafka's threads, the loop's waits) per second of run, so
the share of one core at any poll interval follows: (poll CPU + rest/s x interval) / interval.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time

from kvmeter.agent.cli import build_agent
from kvmeter.agent.config import validate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--polls", type=int, default=6)
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--libvirt-uri", required=True)
    ap.add_argument("--topic", default="kvmeter.measures")
    ap.add_argument("--kafka-properties", default="{}", help="JSON: extra producer properties")
    args = ap.parse_args(argv)

    state_dir = tempfile.mkdtemp(prefix="kvmeter-bench-loop-", dir="/var/tmp")
    config = validate(
        {
            "agent": {"host_id": "bench-host", "poll_interval": args.interval, "state_dir": state_dir},
            "libvirt": {"uri": args.libvirt_uri},
            "kafka": {
                "bootstrap_servers": args.bootstrap,
                "topic": args.topic,
                "properties": json.loads(args.kafka_properties),
            },
            "metrics": {"enabled": False},
        }
    )
    agent = build_agent(config, read_only=False)
    poll_cpu: list[float] = []
    measures: list[int] = []
    batches: list[int] = []
    marks: list[float] = []  # process CPU and wall time at the end of the first (baseline) poll
    real_poll = agent.poll_and_publish  # what the loop calls every interval

    def poll() -> None:
        c0 = time.thread_time()
        seq = agent.seq
        real_poll()
        poll_cpu.append(time.thread_time() - c0)
        measures.append(agent.last_measures)
        batches.append(agent.seq - seq)
        if len(poll_cpu) == 1:
            marks[:] = [time.process_time(), time.monotonic()]
        if len(poll_cpu) > args.polls:
            agent.stop_event.set()

    agent.poll_and_publish = poll  # type: ignore[method-assign]
    agent.start()
    try:
        agent.run()  # ends with one last poll and a flush
    finally:
        agent.close()
        shutil.rmtree(state_dir, ignore_errors=True)
    steady = poll_cpu[1 : args.polls + 1]  # without the baseline poll and the last one
    cpu_total = time.process_time() - marks[0]
    seconds = time.monotonic() - marks[1]
    rest_per_s = max(0.0, cpu_total - sum(poll_cpu[1:])) / seconds
    delivered = agent.publisher.delivered if agent.publisher is not None else None
    json.dump(
        {
            "n": args.n,
            "polls": len(steady),
            "interval_s": args.interval,
            "poll_cpu_s": statistics.median(steady),
            "poll_cpu_mean_s": sum(steady) / len(steady),
            "poll_cpu_max_s": max(steady),
            "other_cpu_per_s": rest_per_s,
            "measures_per_poll": int(statistics.median(measures[1:])),
            "batches_per_poll": int(statistics.median(batches[1:])),
            "batches_delivered": delivered,
        },
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
