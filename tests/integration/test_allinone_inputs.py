"""`kvmeter run --all-in-one` from a TOML file reads the same lifecycle inputs as `kvmeter
collector` (collector/inputs.py): CloudStack's RabbitMQ event bus ([rabbitmq], a real RabbitMQ
node, messages as RabbitMQEventBus publishes them) and its webhook deliveries ([webhook], real
signed HTTP POSTs to the all-in-one's API). The records come out of what those inputs carried.

CloudStack's webhooks send action events (kept for audit); a usage event delivered the same way
takes the same path to records, shown here with an IP's assignment."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import signal
import subprocess
import sys
import time
from pathlib import Path

from kvmeter.collector.model import ALLOCATED_VM, IP_ADDRESS, RUNNING_VM
from kvmeter.collector.store import Store
from kvmeter.pipeline.sim.simlibvirt import write_node_xml
from tests.collector_support import ACCT_A, ACCT_B, IP1, MIN, VM1, routing_key, usage_event, wait_for
from tests.harness.ports import free_port, wait_for_port
from tests.harness.rabbitmq import Node
from tests.integration.test_rabbitmq import names, publish

SECRET = "aio-webhook-secret"
TOKEN = "allinone-token-0123456"


def deliver(port: int, body: bytes, event: str) -> int:
    """One delivery as WebhookDeliveryThread posts it (X-CS-Signature: HMAC-SHA256, base64)."""
    mac = base64.b64encode(hmac.new(SECRET.encode(), body, hashlib.sha256).digest()).decode()
    headers = {"X-CS-Event": event, "X-CS-Event-ID": f"evt-{event}", "X-CS-Signature": mac,
               "User-Agent": f"CS-Hookshot/{ACCT_B}",
               "Content-Type": "application/json; charset=UTF-8"}  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/webhook/cloudstack", body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def action_event(at: str) -> bytes:
    return (
        f'{{"eventDateTime":"{at}","status":"Completed","event":"VM.REBOOT","entity":"VirtualMachine",'
        f'"entityuuid":"{VM1}","account":"{ACCT_A}","VirtualMachine":"{VM1}"}}'
    ).encode()


def quantities(db: str) -> dict[tuple[str, int, str], int]:
    store = Store(db)
    try:
        out: dict[tuple[str, int, str], int] = {}
        for row in store.usage(0, 2**62):
            if row.key.usage_type in (RUNNING_VM, ALLOCATED_VM, IP_ADDRESS) and row.quantity:
                k = (row.key.account, row.key.usage_type, row.key.resource)
                out[k] = out.get(k, 0) + row.quantity
        return out
    finally:
        store.close()


def test_the_all_in_one_reads_rabbitmq_and_the_webhook(rabbitmq_node: Node, tmp_path: Path) -> None:
    cfg = names()
    port, db = free_port(), f"sqlite:///{tmp_path}/usage.db"
    now = int(time.time() * 1000)
    at = (now // MIN - 30) * MIN  # whole minutes, all in the past
    config = tmp_path / "allinone.toml"
    config.write_text(
        f"""
[agent]
host_id = "aio"
poll_interval = 1
state_dir = "{tmp_path}/agent"
[libvirt]
uri = "{write_node_xml(tmp_path / "node.xml", [])}"
[metrics]
enabled = false
[store]
url = "{db}"
[usage]
window_seconds = 60
tick_seconds = 0.5
[api]
listen = "127.0.0.1:{port}"
token = "{TOKEN}"
[rabbitmq]
url = "{rabbitmq_node.url}"
exchange = "{cfg.exchange}"
queue = "{cfg.queue}"
[webhook]
secret_key = "{SECRET}"
"""
    )
    bus = [
        usage_event("VM.CREATE", VM1, ACCT_A, at)[1],
        usage_event("VM.START", VM1, ACCT_A, at + MIN)[1],
        usage_event("VM.STOP", VM1, ACCT_A, at + 11 * MIN)[1],
        usage_event("VM.DESTROY", VM1, ACCT_A, at + 20 * MIN)[1],
    ]
    log = tmp_path / "allinone.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvmeter", "run", "--all-in-one", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port("127.0.0.1", port, 60, "the all-in-one's API")
        # Its queue bound first: what the exchange gets before a queue is bound goes nowhere.
        wait_for(lambda: f"bound to {cfg.exchange}" in log.read_text(), 60, "the queue bound", log.read_text)
        publish(rabbitmq_node, cfg.exchange, [(routing_key(v), v) for v in bus])
        assign = usage_event("NET.IPASSIGN", IP1, ACCT_B, at + 2 * MIN)[1]
        release = usage_event("NET.IPRELEASE", IP1, ACCT_B, at + 7 * MIN)[1]
        reboot = action_event("2024-05-14 10:00:00 +0000")
        for body, event in ((assign, "NET.IPASSIGN"), (reboot, "VM.REBOOT"), (release, "NET.IPRELEASE"),
                            (assign, "NET.IPASSIGN")):  # fmt: skip
            assert deliver(port, body, event) == 200, log.read_text()[-3000:]  # the last: a redelivery
        bad = base64.b64encode(b"x" * 20).decode()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/webhook/cloudstack", body=assign, headers={"X-CS-Signature": bad})
        assert conn.getresponse().status == 401  # unsigned: refused, stored nowhere
        conn.close()
        want = {
            (ACCT_A, ALLOCATED_VM, VM1): 20 * MIN,
            (ACCT_A, RUNNING_VM, VM1): 10 * MIN,
            (ACCT_B, IP_ADDRESS, IP1): 5 * MIN,
        }
        wait_for(
            lambda: quantities(db) == want,
            60,
            "records from both inputs",
            lambda: f"{quantities(db)}\n{log.read_text()[-3000:]}",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0, log.read_text()[-3000:]
    assert quantities(db) == want
    store = Store(db)
    try:
        with store.read() as conn:
            events = conn.exec_driver_sql("SELECT count(*) FROM lifecycle_events").scalar()
        assert events == 4 + 3  # the bus's four, the webhook's three (redeliveries stored once)
    finally:
        store.close()
