"""Each real part of the harness works for real: these fail when a part is missing."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import libvirt
import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from kvmeter.proto import SCHEMA_VERSION, pb
from tests.harness.kafka import FAST_GROUP
from tests.harness.netns import Host, Lab
from tests.harness.processes import group_lag


@pytest.mark.broker
def test_batch_round_trip_through_the_broker(kafka_bootstrap: str, unique_topic: Callable[..., str]) -> None:
    topic = unique_topic("harness", partitions=2)
    batch = pb.MeasureBatch(schema=SCHEMA_VERSION, host_id="kvm-01", stream_id="s", seq=1)
    batch.measures.add(header=SCHEMA_VERSION, saddr=0, bytes=1234, start=1, end=2, direction=pb.VM_TX)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "acks": "all"})
    delivered: list[object] = []
    producer.produce(
        topic, key=b"kvm-01", value=batch.SerializeToString(), on_delivery=lambda e, m: delivered.append(e)
    )
    producer.flush(15)
    assert delivered == [None]

    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"g-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            **FAST_GROUP,
        }
    )
    consumer.subscribe([topic])
    deadline = time.monotonic() + 30
    got = None
    while got is None and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            got = pb.MeasureBatch.FromString(msg.value())
    consumer.close()
    assert got == batch


@pytest.mark.pg
def test_group_lag_counts_what_the_group_has_not_committed(
    kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    topic = unique_topic("lag", partitions=2)
    assert group_lag(kafka_bootstrap, "lag-none", topic) == 0  # empty: at the end at once
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 200})  # batches of many
    for i in range(9):
        producer.produce(topic, value=b"x", partition=i % 2)
    assert producer.flush(15) == 0
    assert group_lag(kafka_bootstrap, "lag-none", topic) == 9  # no commit yet: everything
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": "lag-some", **FAST_GROUP})
    consumer.commit(offsets=[TopicPartition(topic, 0, 3), TopicPartition(topic, 1, 1)], asynchronous=False)
    consumer.close()
    assert group_lag(kafka_bootstrap, "lag-some", topic) == (5 - 3) + (4 - 1)


def test_postgresql_answers_queries(pg_database: str) -> None:
    with psycopg.connect(pg_database) as conn:
        conn.execute("CREATE TABLE t (n bigint)")
        conn.execute("INSERT INTO t VALUES (9223372036854775807)")
        (value,) = conn.execute("SELECT n FROM t").fetchone()  # type: ignore[misc]
        (version,) = conn.execute("SHOW server_version").fetchone()  # type: ignore[misc]
    assert value == 2**63 - 1
    assert int(version.split(".")[0]) >= 13


@pytest.mark.libvirt
def test_libvirt_test_driver_lists_cloudstack_domains(libvirt_uri: str) -> None:
    conn = libvirt.openReadOnly(libvirt_uri)
    try:
        names = {d.name(): d for d in conn.listAllDomains()}
        assert set(names) == {"i-2-10-VM", "r-5-VM", "s-1-VM"}
        assert names["r-5-VM"].isActive()
        assert not names["s-1-VM"].isActive()
        xml = names["r-5-VM"].XMLDesc(0)
        assert xml.count("<interface type='bridge'>") == 3
        assert "02:00:05:00:00:01" in xml
        assert "kvtap52" in xml
        assert "cloud0" in xml
    finally:
        conn.close()


@pytest.mark.netns
def test_bytes_pushed_across_a_veth_are_counted_by_the_kernel(
    netns_lab: Lab, netns_host: Callable[..., Host]
) -> None:
    host = netns_host("h1")
    vm = host.add_vm("i-2-10-VM", str(uuid.uuid4()), [("cloudbr0", "02:00:0a:00:00:01", "198.51.100.10/24")])
    nic = vm.nics[0]
    before = nic.counters()
    vm.send("198.51.100.1", 50_000, payload=1000)
    after = nic.counters()
    # 50 datagrams of 1000 bytes payload + 42 bytes of UDP/IP/Ethernet headers, plus one ARP request
    sent = after["tx_bytes"] - before["tx_bytes"]
    assert after["tx_packets"] - before["tx_packets"] >= 50
    assert 50 * 1042 <= sent <= 50 * 1042 + 2 * 42
    # the host end of the veth saw exactly what the VM end sent
    tap = host.tap_counters(nic.tap)
    assert tap["rx_bytes"] == after["tx_bytes"]
    # a reboot recreates the tap; the VM-side totals survive across incarnations
    host.reboot(vm)
    assert nic.total()["tx_bytes"] == after["tx_bytes"] + nic.counters()["tx_bytes"]


@pytest.mark.netns
def test_two_hosts_joined_by_a_guest_vxlan(netns_lab: Lab, netns_host: Callable[..., Host]) -> None:
    h1, h2 = netns_host("h1"), netns_host("h2")
    h1.join_vxlan(5001, [h2])
    h2.join_vxlan(5001, [h1])
    a = h1.add_vm("i-2-10-VM", str(uuid.uuid4()), [("brvx-5001", "02:00:0a:00:00:01", "10.1.1.10/24")])
    b = h2.add_vm("i-3-11-VM", str(uuid.uuid4()), [("brvx-5001", "02:00:0b:00:00:01", "10.1.1.11/24")])
    a.send(b.nics[0].ip, 20_000, payload=1000)
    # the datagrams crossed the VXLAN tunnel and arrived at the VM on the other host
    assert b.nics[0].counters()["rx_packets"] >= 20
    assert h2.tap_counters(b.nics[0].tap)["tx_bytes"] == b.nics[0].counters()["rx_bytes"]
    # migrating b to h1 recreates its tap there; VM-side totals span both incarnations
    before = b.nics[0].counters()
    h2.migrate(b, h1)
    assert b.host is h1
    a.send(b.nics[0].ip, 5_000, payload=1000)
    assert b.nics[0].total()["rx_bytes"] > before["rx_bytes"]
