"""The agent's path from spool to broker at its edges, with the test broker: a tenant's resource
tags never make a batch the producer refuses (the host's stream stalled behind it), a property
librdkafka refuses is an invalid config (exit 2) not a traceback, and a batch the spool's bound
dropped while the producer held it is either delivered or counted lost, never both."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from kvmeter.agent.model import DomainInfo
from kvmeter.agent.publish import Publisher
from kvmeter.agent.spool import Spool
from kvmeter.proto import pb
from tests.unit.test_agent_daemon import NIC, Clock, FakeInventory, Host, make_agent


def _consume(
    bootstrap: str, topic: str, done: Callable[[list[pb.MeasureBatch]], bool], timeout: float = 60.0
) -> list[pb.MeasureBatch]:
    """The topic's batches from its start, until `done` says enough or `timeout` seconds."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"g-{uuid.uuid4().hex}"})
    # every partition: a producer that reached the broker first may have auto-created the topic
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    got: list[pb.MeasureBatch] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not done(got):
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                got.append(pb.MeasureBatch.FromString(msg.value()))
    finally:
        consumer.close()
    return got


def test_a_tenants_resource_tags_do_not_stop_the_hosts_stream(
    kafka_bootstrap: str,
    unique_topic: Callable[..., str],
    tmp_path: Path,
) -> None:
    """A domain's inventory record carries its <metadata>, resource tags the tenant sets
    included (no limit on their number): a record larger than a batch may be is trimmed, its
    largest entries first and the owner's kept, so the batch fits (one VM with ~1 MB of tags
    made a batch librdkafka refused, MSG_SIZE_TOO_LARGE, and every later batch of the host
    waited behind it: one tenant stopped the billing of every VM on the hypervisor)."""
    topic = unique_topic("measures")
    owner = {"ownerAccountUuid": "acct-0001", "ownerDomainUuid": "dom-0001"}
    owner.update({f"resourceTags.tag[{i}].value": f"{i:04d}" + "x" * 246 for i in range(4200)})
    noisy = DomainInfo(
        uuid="u-1", name="i-2-10-VM", state="running", kind="user_vm", nics=(NIC,), owner=owner
    )
    host = Host()
    clock = Clock()
    spool = Spool(tmp_path / "spool")
    publisher = Publisher(spool, bootstrap=kafka_bootstrap, topic=topic, key="h1")
    agent = make_agent(host, tmp_path, clock, FakeInventory((noisy,)), spool=spool, publisher=publisher)
    try:
        agent.poll()  # baseline, with every domain's inventory record
        host.traffic("vnet0", 1000, 3000)
        clock.t += 10
        batches = agent.poll()
        sizes = [len(b) for b in spool_batches(spool)]
        delivered = publisher.flush(20)
        assert delivered, (
            f"the host's stream is stuck behind a batch of {max(sizes)} bytes: {publisher.last_error}"
        )
        assert max(sizes) <= agent.config.batch_bytes
        got = _consume(
            kafka_bootstrap, topic, lambda got: sum(m.bytes for b in got for m in b.measures) >= 4000
        )
        assert sum(m.bytes for b in got for m in b.measures) == 4000
        records = [d for b in got for d in b.inventory]
        assert records
        assert records[0].owner["ownerAccountUuid"] == "acct-0001"
        assert batches
    finally:
        agent.close()


def spool_batches(spool: Spool) -> list[bytes]:
    return [spool.read_batch(f) for f in spool.pending()]


@pytest.mark.parametrize(
    ("prop", "value"),
    [
        ("linger.msx", 5),  # a typo: no such librdkafka property
        ("max.in.flight.requests.per.connection", 10),  # refused next to the forced idempotence
    ],
)
def test_a_bad_kafka_property_is_an_invalid_config_not_a_traceback(
    tmp_path: Path, prop: str, value: int
) -> None:
    """A property librdkafka does not know, or refuses beside the idempotence the agent forces,
    is an invalid config naming `kafka.properties` (exit 2), as every bad key is (it killed the
    daemon with a KafkaException traceback: a restart loop under systemd)."""
    from click.testing import CliRunner

    from kvmeter.agent.cli import agent

    path = tmp_path / "agent.toml"
    path.write_text(
        f'[agent]\nhost_id = "h1"\nstate_dir = "{tmp_path}/state"\n'
        '[kafka]\nbootstrap_servers = "127.0.0.1:1"\n'
        f'[kafka.properties]\n"{prop}" = {value}\n'
        "[metrics]\nenabled = false\n"
    )
    result = CliRunner().invoke(agent, ["--config", str(path)])
    assert not (result.exception and not isinstance(result.exception, SystemExit)), (
        f"the agent died with {result.exception!r}"
    )
    assert result.exit_code == 2
    assert "invalid config" in result.output
    assert "kafka.properties" in result.output


def test_batches_dropped_at_the_spool_bound_are_not_also_delivered(tmp_path: Path) -> None:
    """While the broker is away, the producer holds the oldest batches (its probes), and the
    spool's bound drops exactly those: they count as lost only if the producer does not
    deliver them after all (they were counted lost, kvmeter_agent_dropped_measured_bytes_total,
    and then delivered and billed when the broker came back)."""
    from confluent_kafka import KafkaError, KafkaException

    from kvmeter.agent.metrics import AgentMetrics
    from kvmeter.proto import SCHEMA_VERSION
    from tests.harness.kafka import Broker, create_topic
    from tests.harness.ports import free_port

    def batch(seq: int) -> bytes:
        b = pb.MeasureBatch(schema=SCHEMA_VERSION, host_id="h1", boot_id="boot", stream_id="s", seq=seq)
        b.measures.add(header=SCHEMA_VERSION, saddr=0, bytes=1000 + seq, start=seq, end=seq + 1)
        return b.SerializeToString()

    port = free_port("127.0.0.1")
    bootstrap = f"127.0.0.1:{port}"
    topic = f"measures-{uuid.uuid4().hex[:8]}"
    metrics = AgentMetrics()
    frame_size = len(batch(10)) + 40
    spool = Spool(tmp_path / "spool", max_bytes=4 * frame_size, on_drop=metrics.spool_dropped)
    publisher = Publisher(spool, bootstrap=bootstrap, topic=topic, key="h1", metrics=metrics)
    measured = 0
    for seq in range(1, 13):  # polls while the broker is away: the bound drops the oldest
        spool.append("s", seq, batch(seq), {}, seq)
        measured += 1000 + seq
        publisher.pump()
        publisher.service(0.05)
    assert spool.dropped_frames > 0
    broker = Broker(port=port, log_dir=tmp_path).start()
    try:
        try:
            create_topic(bootstrap, topic)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
        assert publisher.flush(60), f"not delivered: {publisher.last_error}"
        got = _consume(bootstrap, topic, lambda got: {b.seq for b in got} >= set(range(1, 13)))
    finally:
        spool.close()
        broker.stop()
    billed = {b.seq: sum(m.bytes for m in b.measures) for b in got}  # the collector: once per seq
    lost = metrics.registry.get_sample_value("kvmeter_agent_dropped_measured_bytes_total")
    assert sum(billed.values()) + lost == measured, (
        f"batches {sorted(billed)} billed, {lost:.0f} bytes reported lost at the bound: "
        f"{sum(billed.values()) + lost - measured:.0f} bytes both billed and reported lost"
    )
