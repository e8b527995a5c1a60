"""Closing the API server while its loop is being woken (a worker finishing a response pulls the
same trigger): close() never writes to the trigger after the loop closed it (EBADF, or a write
into whatever file took its descriptor), and the loop ends."""

from __future__ import annotations

import threading
from pathlib import Path

from kvmeter.collector.api import ApiServer, create_app
from kvmeter.collector.store import Store


def test_close_while_the_loop_is_woken_by_others(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    for _ in range(200):
        server = ApiServer(create_app(store), "127.0.0.1", 0)
        loop = threading.Thread(target=server.run, daemon=True)
        loop.start()
        while not server._running.is_set():
            pass
        done = threading.Event()

        def wake(trigger: object = server.server.trigger, done: threading.Event = done) -> None:
            while not done.is_set():  # as workers do; after the close the pipe is gone
                try:
                    trigger.pull_trigger()  # type: ignore[attr-defined]
                except OSError:
                    return

        waker = threading.Thread(target=wake, daemon=True)
        waker.start()
        server.close()  # raised OSError (Bad file descriptor) when the loop ran its thunk first
        loop.join(10)
        done.set()
        waker.join(10)
        assert not loop.is_alive()
    store.close()
