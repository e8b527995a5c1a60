"""Reload on SIGHUP: the things a daemon re-reads from its files without a restart.

    reloads = Reloads(on_failure=lambda name: metric.labels(name).inc())
    reloads.add("router owners", read_router_owners)   # returns a one-line summary, raises to refuse
    reloads.install()                                   # SIGHUP asks for a reload
    ...
    reloads.run_pending()                               # at a safe point of the daemon's loop

A signal handler runs between any two bytecodes of the main thread, in the middle of whatever
it was doing: SIGHUP only asks, and the daemon's loop runs the reloads between two rounds. Each
reloadable is on its own: one whose file is bad keeps what is in force, logs why and counts a
failure; the others still run. Adding one is one `add` call.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

log = logging.getLogger("kvmeter.reload")


class Reloads:
    def __init__(self, on_failure: Callable[[str], None] | None = None) -> None:
        self._items: list[tuple[str, Callable[[], str]]] = []
        self._asked = threading.Event()
        self._on_failure = on_failure
        self._apart: list[Reloads] = []

    def add(self, name: str, reload: Callable[[], str]) -> None:
        """`reload()` reads its files and puts them in force, returning what it now uses in a
        line; it raises (ValueError, OSError, ...) instead when they are bad, changing nothing."""
        self._items.append((name, reload))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._items]

    def request(self) -> None:
        """Ask for a reload (safe in a signal handler)."""
        self._asked.set()
        for other in self._apart:
            other.request()

    def apart(self, name: str) -> Reloads:
        """Take the reload `name` out of the daemon's loop: it runs on a thread of its own as soon
        as a reload is asked for, never waiting for a round of the loop (which may be retrying a
        failing store for minutes, or recomputing the store under a new policy). For what must
        hold at once: a credential removed from a file stops working when SIGHUP comes."""
        own = Reloads(self._on_failure)
        own._items = [(n, r) for n, r in self._items if n == name]
        self._items = [(n, r) for n, r in self._items if n != name]
        self._apart.append(own)

        def serve() -> None:
            while True:
                own._asked.wait()
                own.run_pending()

        threading.Thread(target=serve, name=f"reload {name}", daemon=True).start()
        return own

    def install(
        self,
        signum: int = signal.SIGHUP,
        then: Callable[[], None] | None = None,
        held: threading.Event | None = None,
    ) -> None:
        """`signum` asks for a reload, then calls `then` (a loop's wakeup, so the reload does not
        wait for its next round); one `held` (see `hold`) since the start is asked for now. Call
        from the main thread."""

        def asked(_signum: int, _frame: object) -> None:
            self.request()
            if then is not None:
                then()

        signal.signal(signum, asked)
        if held is not None and held.is_set():
            asked(signum, None)

    @property
    def pending(self) -> bool:
        return self._asked.is_set()

    def run_pending(self) -> list[str]:
        """Run every reload if one was asked for; returns the names of those that failed."""
        if not self._asked.is_set():
            return []
        self._asked.clear()
        return self.run_all()

    def run_all(self) -> list[str]:
        failed = []
        for name, reload in self._items:
            try:
                summary = reload()
            except Exception as exc:  # a bad file must never stop the daemon
                failed.append(name)
                log.error("reload of %s refused, the one in force stays: %s", name, _why(exc))
                if self._on_failure is not None:
                    self._on_failure(name)
                continue
            log.info("reloaded %s: %s", name, summary)
        return failed


def hold(signum: int = signal.SIGHUP) -> threading.Event:
    """`signum` only noted, from a daemon's first step until its reloads are installed: SIGHUP's
    default action ends the process, and systemd counts that death as a clean exit (Restart=
    on-failure starts nothing again), so a `systemctl reload` during a start that takes seconds
    (an agent asking its broker) or minutes (a collector recomputing its store under a changed
    policy) left the daemon down. Pass the event to `Reloads.install`."""
    noted = threading.Event()
    signal.signal(signum, lambda _signum, _frame: noted.set())
    return noted


def _why(exc: Exception) -> str:
    text = str(exc)
    if isinstance(exc, (ValueError, OSError)) and text:
        return text
    return f"{type(exc).__name__}: {text}"
