"""The floor as the running agent meets it: one raw read of /proc/net/dev every poll interval, the
traffic moving between reads, in a process that does nothing else. Prints one JSON object.

bench.agent_probe's floor is read between other reads of the same table (Agent.poll's, and
frames pushed through every tap just before): the kernel's per-link data is then in the caches.
A process that reads once an interval finds them cold, and the same read costs more (about
1.4 ms back to back and 3.2 ms two seconds apart, at 2,000 interfaces on the bench machine).
bench.agent_process reports the running process against both floors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from bench.agent_path import raw_read
from bench.timing import interleaved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reads", type=int, required=True)
    ap.add_argument("--every", type=float, required=True, help="seconds between reads: the poll interval")
    args = ap.parse_args(argv)
    samples = interleaved({"floor": raw_read}, args.reads, between=lambda: time.sleep(args.every))
    json.dump({"reads": args.reads, "every_s": args.every, "cpu_s": samples["floor"].cpu}, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
