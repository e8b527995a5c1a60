"""Resident memory that libvirt's in-process test driver adds to a process holding a given node.

The bench's agent process uses libvirt's test driver, which keeps every domain inside the agent's
own process; on a real host those live in libvirtd. This measures that share so the agent's own
memory can be told apart: RSS after opening the URI and reading every domain's XML (as the
inventory does), minus RSS with the libvirt module loaded but no connection. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

import libvirt
import psutil


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--uri", required=True)
    args = ap.parse_args(argv)
    me = psutil.Process()
    before = me.memory_info().rss
    conn = libvirt.openReadOnly(args.uri)
    domains = conn.listAllDomains()
    for dom in domains:
        dom.XMLDesc(0)
    after = me.memory_info().rss
    json.dump({"domains": len(domains), "test_driver_mb": (after - before) / 2**20}, sys.stdout)
    conn.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
