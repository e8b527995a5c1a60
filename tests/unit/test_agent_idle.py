"""Between polls the agent's loop sleeps: librdkafka is served only while a delivery is due (and
then at least once a second, so a signal is seen), not every fraction of a second; otherwise it
waits for the next poll, which a stop or a reload asked for ends at once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from tests.unit.test_agent_daemon import Clock, Host, make_agent


class CountingPublisher:
    """Takes each poll's batch and delivers it at the next service() call."""

    def __init__(self, *, away: bool = False) -> None:
        self.flight = 0
        self.services: list[float] = []
        self.pumps = 0
        self.away = away  # a broker that delivers nothing: batches pile up in flight

    def pump(self) -> int:
        self.pumps += 1
        self.flight = 1
        return 1

    def in_flight(self) -> int:
        return self.flight

    def stalled(self) -> bool:
        return self.away

    def service(self, timeout: float) -> None:
        self.services.append(timeout)
        if not self.away:
            self.flight = 0

    def close(self, timeout: float = 5.0) -> bool:
        return True


def test_the_loop_serves_the_publisher_once_per_poll_and_sleeps_otherwise(tmp_path: Path) -> None:
    host = Host()
    publisher = CountingPublisher()
    agent = make_agent(
        host,
        tmp_path,
        Clock(),
        settings={"agent": {"host_id": "h1", "poll_interval": 0.5}},
        publisher=publisher,
        wall=time.time,
        mono=time.monotonic,
    )
    loop = threading.Thread(target=agent.run)
    loop.start()
    time.sleep(1.8)  # polls at 0, 0.5, 1.0 and 1.5 s
    agent.stop_event.set()
    loop.join(5)
    agent.close()
    assert not loop.is_alive()
    polls = publisher.pumps - 1  # the last poll's pump, at shutdown, is not served by the loop
    assert 3 <= polls <= 5
    assert len(publisher.services) == polls  # one wake-up per poll's delivery, no idle polling
    assert max(publisher.services) <= 1.0


def test_a_broker_that_delivers_nothing_is_not_waited_on_between_polls(tmp_path: Path) -> None:
    publisher = CountingPublisher(away=True)
    agent = make_agent(
        Host(),
        tmp_path,
        Clock(),
        settings={"agent": {"host_id": "h1", "poll_interval": 0.5}},
        publisher=publisher,
        wall=time.time,
        mono=time.monotonic,
    )
    loop = threading.Thread(target=agent.run)
    loop.start()
    time.sleep(1.3)
    agent.stop_event.set()
    loop.join(5)
    agent.close()
    assert not loop.is_alive()
    assert publisher.pumps >= 3  # every poll still hands its batch over (and serves the client)
    assert publisher.services == []


def test_between_polls_the_loop_waits_once_and_a_stop_or_a_reload_ends_the_wait(tmp_path: Path) -> None:
    """A wakeup only to look whether to stop costs CPU on every hypervisor: with nothing in
    flight the loop waits for its next poll in one wait, and stop_event (a signal handler's, or
    another thread's) or wake() (SIGHUP's, after asking for a reload) ends it."""
    agent = make_agent(
        Host(),
        tmp_path,
        Clock(),
        settings={"agent": {"host_id": "h1", "poll_interval": 120}},
        wall=time.time,
        mono=time.monotonic,
    )
    waits: list[float] = []
    wait = agent._wake.wait

    def counted(timeout: float | None = None) -> bool:
        waits.append(timeout or 0.0)
        return wait(timeout)

    agent._wake.wait = counted  # type: ignore[method-assign]
    reloaded = threading.Event()
    agent.reloads.add("test", lambda: reloaded.set() or "done")
    loop = threading.Thread(target=agent.run)
    loop.start()
    try:
        deadline = time.monotonic() + 10
        while not waits and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)
        assert len(waits) == 1  # the first poll, then one wait for the next (120 s away)
        assert waits[0] > 100
        agent.reloads.request()
        agent.wake()
        assert reloaded.wait(5)  # run at once, not at the next poll
        deadline = time.monotonic() + 5
        while len(waits) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(waits) == 2  # and the loop waits again
    finally:
        agent.stop_event.set()
        loop.join(10)
        agent.close()
    assert not loop.is_alive()  # the stop ended the second wait
    assert len(waits) == 2
