"""The collector's API over a store, in a process of its own: `python -m bench.api_worker --db URL`.
Prints its port, then serves until terminated."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    from kvmeter.collector.api import serve
    from kvmeter.collector.store import Store

    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True)
    args = ap.parse_args(argv)
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # 8 clients on 4 threads queue, as meant
    store = Store(args.db, pool_size=8)
    server = serve(store, "127.0.0.1", 0)  # as the collector serves it
    signal.signal(signal.SIGTERM, lambda *_: server.close())
    print(server.port, flush=True)
    thread = threading.Thread(target=server.run)
    thread.start()
    thread.join()
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
