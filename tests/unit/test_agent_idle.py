"""Between polls the agent's loop sleeps: librdkafka is served only while a delivery is due (and
then at least once a second, so a signal is seen), not every fraction of a second."""

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
