"""The agent as a real process inside a simulated KVM host namespace, real traffic, a real broker.

Every check compares what reached the broker (each (stream, seq) once) with the VM-side kernel
counters, to the byte: steady traffic; a VM reboot (taps deleted and recreated between polls);
`kill -9` of the agent mid-traffic and a restart; the broker unreachable for 30 s.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from kvmeter.proto import pb
from tests.collector_support import wait_for
from tests.harness.kafka import Broker, create_topic
from tests.harness.netns import Host, Lab, Vm
from tests.harness.processes import AgentProcess

pytestmark = [pytest.mark.netns, pytest.mark.broker, pytest.mark.libvirt]

POLL = 1.0
# The agent's interpreter: KVM hosts run Python 3.9 (EL9); point this at such a venv to prove it.
HOST_BRIDGE_IP = "198.51.100.1"

# Steady UDP from inside a VM for `seconds`: the traffic keeps flowing while the agent is killed.
STREAM = textwrap.dedent(
    """
    import socket, sys, time
    src, dst, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    end = time.monotonic() + seconds
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((src, 0))
        while time.monotonic() < end:
            for _ in range(20):
                s.sendto(b"s" * 1200, (dst, 9))
            time.sleep(0.01)
    """
)


def consume_streams(bootstrap: str, topic: str, finals: int, timeout: float = 60.0) -> list[pb.MeasureBatch]:
    """Every batch on the topic until `finals` batches with final=True arrived; duplicates of one
    (stream, seq) (re-sent after a crash) are kept once, as the collector does."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"g-{uuid.uuid4().hex}"})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    batches: dict[tuple[str, int], pb.MeasureBatch] = {}
    deadline = time.monotonic() + timeout
    try:
        while sum(b.final for b in batches.values()) < finals and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                b = pb.MeasureBatch.FromString(msg.value())
                batches.setdefault((b.stream_id, b.seq), b)
    finally:
        consumer.close()
    return list(batches.values())


def measured(batches: list[pb.MeasureBatch]) -> dict[tuple[str, int], int]:
    """Billable + quarantined bytes per (mac, VM direction)."""
    totals: dict[tuple[str, int], int] = defaultdict(int)
    for b in batches:
        for m in b.measures:
            totals[(m.mac, m.direction)] += m.bytes
    return dict(totals)


def vm_side(vms: list[Vm], baseline: dict[str, dict[str, int]]) -> dict[tuple[str, int], int]:
    """What the VMs' own kernels counted since the baseline, as (mac, VM direction) -> bytes."""
    out = {}
    for vm in vms:
        for nic in vm.nics:
            total = nic.total()
            out[(nic.mac, pb.VM_RX)] = total["rx_bytes"] - baseline[nic.mac]["rx_bytes"]
            out[(nic.mac, pb.VM_TX)] = total["tx_bytes"] - baseline[nic.mac]["tx_bytes"]
    return {k: v for k, v in out.items() if v}


def check_streams(batches: list[pb.MeasureBatch], streams: int) -> None:
    by_stream: dict[str, list[int]] = defaultdict(list)
    for b in batches:
        by_stream[b.stream_id].append(b.seq)
    assert len(by_stream) == streams
    for seqs in by_stream.values():
        assert sorted(seqs) == list(range(1, len(seqs) + 1))  # no gap in any stream


class Site:
    """One simulated host with two VMs, a topic on the lab broker and the agent's process."""

    def __init__(self, host: Host, workdir: Path, bootstrap: str) -> None:
        self.host = host
        self.bootstrap = bootstrap
        self.vm1 = host.add_vm(
            "i-2-10-VM",
            "6d2a3c5e-0000-4000-8000-000000000010",
            [
                ("cloudbr0", "02:00:4c:0f:00:10", "198.51.100.10/24"),
                ("brvx-5001", "02:00:0a:01:00:10", "10.1.0.10/24"),
            ],
        )
        self.vm2 = host.add_vm(
            "i-2-11-VM",
            "6d2a3c5e-0000-4000-8000-000000000011",
            [("brvx-5001", "02:00:0a:01:00:11", "10.1.0.11/24")],
        )
        self.vms = [self.vm1, self.vm2]
        self.topic = f"measures-{uuid.uuid4().hex[:8]}"
        create_topic(bootstrap, self.topic)
        self.agent = AgentProcess(
            host, workdir, bootstrap=bootstrap, topic=self.topic, poll=POLL, metrics_port=9477
        )
        host.write_libvirt_xml(self.agent.libvirt_xml)
        time.sleep(0.3)  # the VMs' UDP sinks are listening (the simulated hosts start them)
        self.traffic()  # before the agent: never billed
        time.sleep(0.5)  # datagrams queued behind ARP resolution leave after send() returned
        self.baseline = {nic.mac: nic.total() for vm in self.vms for nic in vm.nics}

    def traffic(self, scale: int = 1) -> None:
        self.vm1.send(HOST_BRIDGE_IP, 150_000 * scale)  # public, to the host's bridge address
        self.vm1.send(self.vm2.nics[0].ip, 90_000 * scale, nic=1)  # guest, VM to VM
        self.vm2.send(self.vm1.nics[1].ip, 40_000 * scale)

    def stream(self, seconds: float) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.vm1.ns,
                sys.executable,
                "-c",
                STREAM,
                self.vm1.nics[0].ip,
                HOST_BRIDGE_IP,
                str(seconds),
            ]
        )

    def verify(self, streams: int) -> list[pb.MeasureBatch]:
        batches = consume_streams(self.bootstrap, self.topic, finals=1)
        assert any(b.final for b in batches), self.agent.logs()
        check_streams(batches, streams)
        assert measured(batches) == vm_side(self.vms, self.baseline), self.agent.logs()
        return batches


@pytest.fixture
def site(netns_host: Callable[..., Host], lab_broker: str, tmp_path: Path) -> Iterator[Site]:
    s = Site(netns_host("h1"), tmp_path, lab_broker)
    yield s
    s.agent.stop()


def test_steady_traffic_is_measured_exactly(site: Site) -> None:
    site.agent.start()
    site.agent.wait_polled()
    for _ in range(3):
        site.traffic()
        time.sleep(POLL)
    assert "kvmeter_agent_polls_total" in site.host.run(
        sys.executable,
        "-c",
        "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:9477/metrics').read().decode())",
    )
    assert site.agent.terminate() == 0
    batches = site.verify(streams=1)
    types = {(m.mac, m.traffic_type) for b in batches for m in b.measures}
    assert ("02:00:4c:0f:00:10", pb.PUBLIC) in types
    assert ("02:00:0a:01:00:11", pb.GUEST) in types
    assert {m.domain_name for b in batches for m in b.measures} == {"i-2-10-VM", "i-2-11-VM"}

    # `--once` after the daemon stopped: what moved since its last (saved) poll, sent nowhere.
    before = {nic.mac: nic.total() for vm in site.vms for nic in vm.nics}
    on_disk = site.agent.spooled()
    site.traffic()
    time.sleep(0.5)
    out = site.host.run(
        site.agent.python,
        "-m",
        "kvmeter",
        "agent",
        "--config",
        str(site.agent.config),
        "--once",
        "--format",
        "json",
    )
    once = json.loads(out)
    got: dict[tuple[str, int], int] = defaultdict(int)
    for m in once["measures"]:
        got[(m["mac"], pb.Direction.Value(m["direction"]))] += int(m["bytes"])
    assert dict(got) == vm_side(site.vms, before)
    assert {d["name"] for d in once["inventory"]} == {"i-2-10-VM", "i-2-11-VM"}
    assert site.agent.spooled() == on_disk


def test_vm_reboot_between_polls_loses_nothing(site: Site) -> None:
    every = 4  # polls between batches carrying every domain's inventory record
    config = site.agent.config
    config.write_text(config.read_text().replace("[agent]\n", f"[agent]\ninventory_every = {every}\n", 1))
    site.agent.start()
    site.agent.wait_polled()
    site.traffic()
    site.agent.wait_polled()
    site.agent.wait_polled()  # a poll just happened: the next one is a whole interval away
    # The tail, between that poll and the delete, is traffic *to* vm1: a veth's RTM_DELLINK
    # reports rx 0 (the kernel sums a veth's rx from its peer, detached by then), so bytes vm1
    # itself sent in the tail would be invisible here; a KVM tap reports its own counters.
    site.vm2.send(site.vm1.nics[1].ip, 30_000)
    site.host.reboot(site.vm1)  # taps deleted and recreated: same names, new ifindexes
    site.traffic()
    time.sleep(POLL * 1.5)
    site.traffic()
    assert site.agent.terminate() == 0
    batches = site.verify(streams=1)
    tails = [m for b in batches for m in b.measures if m.final_at_delete]
    assert {(m.mac, m.direction) for m in tails if m.bytes >= 30_000} == {("02:00:0a:01:00:10", pb.VM_RX)}
    assert len({m.ifindex for b in batches for m in b.measures if m.mac == "02:00:0a:01:00:10"}) == 2
    # The inventory, poll by poll (a poll's batches share its time): every domain's record on the
    # first poll and every `every` polls (agent.toml); none between them, the reboot's too: libvirt's
    # test driver names the NICs testnetN, not after their taps, so a tap made again changes no
    # record (test_agent_daemon.py has the records of the domains that changed going alone).
    polls: dict[int, set[str]] = defaultdict(set)
    for b in sorted(batches, key=lambda b: b.seq):
        polls[b.poll_time].update(d.name for d in b.inventory)
    carried = list(polls.values())
    assert len(carried) > every, carried
    for i, names in enumerate(carried):
        assert names == ({"i-2-10-VM", "i-2-11-VM"} if i % every == 0 else set()), carried


def test_kill_9_mid_traffic_and_restart_loses_nothing_and_counts_nothing_twice(site: Site) -> None:
    site.agent.start()
    site.agent.wait_polled()
    sender = site.stream(seconds=4 * POLL)
    time.sleep(1.7 * POLL)
    site.agent.kill9()
    time.sleep(0.5 * POLL)
    site.agent.start()
    site.agent.wait_polled()
    sender.wait(30)
    site.traffic()
    time.sleep(POLL)
    assert site.agent.terminate() == 0
    site.verify(streams=2)


def test_broker_unreachable_for_30_seconds(site: Site) -> None:
    site.agent.start()
    site.agent.wait_polled()
    site.traffic()
    down_ms = time.time() * 1000
    site.host.mgmt_down()
    try:
        for _ in range(6):
            site.traffic()
            time.sleep(5)
    finally:
        site.host.mgmt_up()
    up_ms = time.time() * 1000
    site.traffic()
    time.sleep(POLL)
    assert site.agent.terminate() == 0
    batches = site.verify(streams=1)
    # The agent kept polling through the outage (a poll loop blocked by the unreachable broker
    # would make a few): its polls were spooled and delivered later. At least half the intervals,
    # as a loaded machine delays polls (each poll meters everything since the one before).
    during = [b for b in batches if down_ms <= b.poll_time < up_ms]
    assert len(during) >= (up_ms - down_ms) / (POLL * 1000) / 2, (len(during), len(batches))


def test_sigterm_while_the_broker_is_unreachable_keeps_everything_for_the_next_start(site: Site) -> None:
    site.agent.start()
    site.agent.wait_polled()
    site.traffic()
    site.host.mgmt_down()
    try:
        site.traffic()
        time.sleep(POLL)
        started = time.monotonic()
        assert site.agent.terminate() == 0  # last poll, a bounded flush, exit 0
        assert time.monotonic() - started < 30
    finally:
        site.host.mgmt_up()
    site.agent.start()  # replays the undelivered batches of the first run, in order
    site.agent.wait_polled()
    site.traffic()
    time.sleep(POLL)
    assert site.agent.terminate() == 0
    batches = consume_streams(site.bootstrap, site.topic, finals=2)
    check_streams(batches, 2)
    assert measured(batches) == vm_side(site.vms, site.baseline), site.agent.logs()


def test_sighup_reloads_traffic_rules_and_keeps_counting(site: Site) -> None:
    """New traffic rules take effect from the next poll on, in the same stream, every byte still
    counted once; a config with bad rules keeps the rules in force, and the agent runs on."""
    guest_mac = "02:00:0a:01:00:11"  # vm2 on brvx-5001: guest by CloudStack's defaults
    site.agent.start()
    site.agent.wait_polled()
    site.traffic()
    time.sleep(2 * POLL)
    assert site.agent.proc is not None
    rules = '\n[[traffic.rules]]\nbridge = "brvx-*"\ntype = "storage"\n'
    site.agent.config.write_text(site.agent.config.read_text() + rules)
    site.agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloaded traffic rules" in site.agent.logs(), 20, "the reload", site.agent.logs)
    time.sleep(2 * POLL)  # the poll after the reload classifies again
    site.traffic()
    time.sleep(2 * POLL)
    site.agent.config.write_text(site.agent.config.read_text().replace('"storage"', '"bulk"'))
    site.agent.proc.send_signal(signal.SIGHUP)
    wait_for(
        lambda: "reload of traffic rules refused" in site.agent.logs(), 20, "the refusal", site.agent.logs
    )
    assert "bulk" in site.agent.logs()  # the log says why
    site.traffic()
    time.sleep(2 * POLL)
    assert site.agent.alive()
    metrics = site.host.run(
        sys.executable,
        "-c",
        "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:9477/metrics').read().decode())",
    )
    assert 'kvmeter_agent_reload_failures_total{what="traffic rules"} 1.0' in metrics
    assert site.agent.terminate() == 0
    batches = site.verify(streams=1)  # one stream, no gap, every byte once
    seen = [(b.seq, m.traffic_type) for b in sorted(batches, key=lambda b: b.seq) for m in b.measures
            if m.mac == guest_mac]  # fmt: skip
    types = [t for _, t in seen]
    assert types[0] == pb.GUEST, seen
    assert types[-1] == pb.STORAGE, seen
    assert types == sorted(types, key=lambda t: t == pb.STORAGE), seen  # guest until the reload only


@pytest.mark.parametrize("where", ["producer", "topic"])
def test_polls_bigger_than_a_record_may_be_go_out_split_every_byte_once(site: Site, where: str) -> None:
    """A 1000-byte record limit (librdkafka's smallest message.max.bytes), set for the producer
    in [kafka.properties] or on the topic (max.message.bytes, which the agent asks the broker
    for at start), and four more VMs sending in a ring: a poll's measures (and the first poll's
    inventory) do not fit one record, so a poll goes out as consecutive batches that each do.
    Before, the producer refused such a batch (MSG_SIZE_TOO_LARGE) and it was never delivered;
    the test broker (Tansu) keeps a topic's max.message.bytes but does not enforce it, so the
    topic case checks the batches' sizes."""
    limit = 1000
    ring = [
        site.host.add_vm(f"i-2-{n}-VM", f"6d2a3c5e-0000-4000-8000-0000000000{n}",
                         [("brvx-5001", f"02:00:0a:01:00:{n}", f"10.1.0.{n}/24")])
        for n in (20, 21, 22, 23)
    ]  # fmt: skip
    site.vms += ring
    site.host.write_libvirt_xml(site.agent.libvirt_xml)
    time.sleep(0.3)  # their UDP sinks are listening
    for k, vm in enumerate(ring):
        vm.send(ring[(k + 1) % len(ring)].nics[0].ip, 1000)  # ARP resolved before the baseline
    time.sleep(0.5)
    site.baseline = {nic.mac: nic.total() for vm in site.vms for nic in vm.nics}  # their ARP too
    if where == "producer":
        site.agent.config.write_text(
            site.agent.config.read_text() + f'[kafka.properties]\n"message.max.bytes" = {limit}\n'
        )
    else:
        topic = f"small-{uuid.uuid4().hex[:8]}"
        create_topic(site.bootstrap, topic, config={"max.message.bytes": str(limit)})
        site.agent.config.write_text(site.agent.config.read_text().replace(site.topic, topic))
        site.topic = topic
    site.agent.start()
    site.agent.wait_polled()
    for _ in range(3):
        site.traffic()
        for k, vm in enumerate(ring):
            vm.send(ring[(k + 1) % len(ring)].nics[0].ip, 20_000 * (k + 1))
        time.sleep(POLL)
    assert site.agent.terminate() == 0
    batches = site.verify(streams=1)  # no gap in the stream, every byte once
    per_poll: dict[int, list[int]] = defaultdict(list)
    for b in batches:
        per_poll[b.poll_time].append(len(b.measures))
        assert len(b.SerializeToString()) <= limit - 200 - len("h1")
    assert any(sum(1 for n in sizes if n) > 1 for sizes in per_poll.values()), per_poll  # measures split
    assert "MSG_SIZE_TOO_LARGE" not in site.agent.logs()
    if where == "topic":
        assert f"topic {site.topic} takes records of up to {limit} bytes" in site.agent.logs()


def consume_available(bootstrap: str, topic: str, timeout: float = 30.0) -> list[pb.MeasureBatch]:
    """Every batch the topic holds now (read to the partition's end)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"g-{uuid.uuid4().hex}", "enable.partition.eof": True}
    )
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    got = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error() is None:
                got.append(pb.MeasureBatch.FromString(msg.value()))
            elif msg.error().code() == KafkaError._PARTITION_EOF:
                return got
        raise AssertionError(f"reading {topic} to its end took over {timeout} s")
    finally:
        consumer.close()


def test_a_broker_restarted_without_its_data_gets_every_batch_of_the_running_agent(
    netns_lab: Lab, netns_host: Callable[..., Host], tmp_path: Path
) -> None:
    """The real agent process while its broker comes back empty (memory storage, same address):
    the producer id is unknown there (UNKNOWN_PRODUCER_ID to every retry, nothing reported by
    librdkafka); the agent re-creates its producer and re-sends what it had not got through.
    What the first broker got (read before it went) and what the second got, each (stream, seq)
    once, is every byte the VMs' kernels counted."""
    broker = Broker(host=netns_lab.core_ip, port=9092, log_dir=tmp_path).start(prefix=netns_lab.in_core())
    site = Site(netns_host("h1"), tmp_path, broker.bootstrap)
    try:
        site.agent.start()
        site.agent.wait_polled()
        site.traffic()
        time.sleep(2 * POLL)
        site.host.mgmt_down()  # the agent's batches from now on stay with it
        site.traffic()
        time.sleep(2 * POLL)
        before = consume_available(site.bootstrap, site.topic)
        broker.stop()
        broker = Broker(host=netns_lab.core_ip, port=9092, log_dir=tmp_path).start(prefix=netns_lab.in_core())
        create_topic(site.bootstrap, site.topic)
        site.host.mgmt_up()
        wait_for(
            lambda: "kafka producer unusable" in site.agent.logs(), 90, "a new producer", site.agent.logs
        )
        site.traffic()
        time.sleep(2 * POLL)
        metrics = site.host.run(
            sys.executable,
            "-c",
            "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:9477/metrics').read().decode())",
        )
        recreated = [
            line
            for line in metrics.splitlines()
            if line.startswith("kvmeter_agent_producer_recreations_total{")
        ]
        # "fatal" when a batch had been sent to the first broker unanswered, else "unknown producer"
        assert sum(float(line.split()[-1]) for line in recreated) >= 1, recreated
        assert site.agent.terminate() == 0
        after = consume_streams(site.bootstrap, site.topic, finals=1)
        assert after, site.agent.logs()
        assert before, "nothing reached the first broker"
        batches = list({(b.stream_id, b.seq): b for b in before + after}.values())
        check_streams(batches, 1)
        assert min(b.seq for b in after) <= max(b.seq for b in before) + 1  # nothing skipped
        assert measured(batches) == vm_side(site.vms, site.baseline), site.agent.logs()
        assert "UNKNOWN_PRODUCER_ID" in site.agent.logs() or "does not know producer id" in site.agent.logs()
        assert "Traceback" not in site.agent.logs()
    finally:
        site.agent.stop()
        broker.stop()
