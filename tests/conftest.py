"""Session-wide fixtures for the real parts. None of them skips: a part that cannot start fails
the run and says why."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.harness import kafka, postgres, rabbitmq
from tests.harness.libvirt_node import CLOUDSTACK_HOST, write_node_xml
from tests.harness.netns import Host, Lab


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """bootstrap.servers of a real Kafka-protocol broker: $KAFKA_BOOTSTRAP, or Tansu on loopback."""
    external = kafka.env_bootstrap()
    if external:
        yield external
        return
    broker = kafka.Broker(log_dir=tmp_path_factory.mktemp("tansu")).start()
    yield broker.bootstrap
    broker.stop()


@pytest.fixture
def unique_topic(kafka_bootstrap: str) -> Callable[..., str]:
    """Create a fresh topic: unique_topic("measures", partitions=3) -> its name."""

    def make(prefix: str = "t", partitions: int = 1) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        kafka.create_topic(kafka_bootstrap, name, partitions)
        return name

    return make


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """DSN of a throw-away PostgreSQL (superuser, database `postgres`), or $KVMETER_PG_DSN."""
    external = os.environ.get("KVMETER_PG_DSN")
    if external:
        yield external
        return
    cluster = postgres.Cluster().start()
    yield cluster.dsn
    cluster.stop()


@pytest.fixture(scope="session")
def rabbitmq_node() -> Iterator[rabbitmq.Node]:
    """A throw-away RabbitMQ node (Debian's rabbitmq-server) on free ports, started once."""
    node = rabbitmq.Node().start()
    yield node
    node.stop()


@pytest.fixture
def pg_database(pg_dsn: str) -> str:
    """A fresh, empty PostgreSQL database for one test; returns its DSN."""
    return postgres.create_database(pg_dsn)


@pytest.fixture
def libvirt_uri(tmp_path: Path) -> str:
    """libvirt test driver with a CloudStack host: i-2-10-VM, r-5-VM (3 NICs), s-1-VM (stopped)."""
    return write_node_xml(tmp_path / "node.xml", CLOUDSTACK_HOST)


@pytest.fixture
def netns_lab() -> Iterator[Lab]:
    """Namespaces for one test: a core/management network; add hosts with lab.add_host()."""
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def netns_host(netns_lab: Lab) -> Callable[..., Host]:
    """Factory: netns_host("h1", vnis=(5001,)) -> a simulated KVM host in its own namespace."""

    def make(name: str = "h1", vnis: Sequence[int] = (5001,)) -> Host:
        return netns_lab.add_host(name, vnis)

    return make


@pytest.fixture
def lab_broker(netns_lab: Lab, tmp_path: Path) -> Iterator[str]:
    """A Tansu broker inside the lab's core namespace, reachable from the root namespace and from
    every lab host over its management link (which host.mgmt_down() cuts). Returns bootstrap."""
    broker = kafka.Broker(host=netns_lab.core_ip, port=9092, log_dir=tmp_path)
    broker.start(prefix=netns_lab.in_core())
    try:
        yield broker.bootstrap
    finally:
        broker.stop()
