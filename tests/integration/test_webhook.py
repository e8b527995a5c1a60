"""CloudStack 4.20+ webhook deliveries into `kvmeter collector --config FILE` with a [webhook]
section. The sender is a double that follows CloudStack's own code (plugins/event-bus/webhook,
WebhookDeliveryThread and WebhookServiceImpl): a POST of the event's JSON description with
X-CS-Event-ID, X-CS-Event, User-Agent CS-Hookshot/<account uuid> and X-CS-Signature =
Base64(HMAC-SHA256(payload, secret key)); only HTTP 200 counts as delivered, else it tries again
(webhook.delivery.tries, 3); only action events are delivered; the "test dispatch" payload is
`{ "CloudStack": "works!" }`."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvmeter.collector.store import Store
from tests.harness.ports import free_port, wait_for_port
from tests.harness.processes import Process

SECRET = "webhook-secret-ключ"  # CloudStack takes the key's UTF-8 bytes
TOKEN = "webhook-api-token-0123"
PATH = "/v1/webhook/cloudstack"
ACCOUNT = "3c5e0000-0000-4000-8000-0000000acct-a"
VM = "9b1f0000-0000-4000-8000-000000000vm1"


def action_event(event: str, status: str, at: str) -> str:
    """An action event's description as ActionEventUtils builds it (reference §1.4)."""
    return json.dumps(
        {
            "eventDateTime": at,
            "status": status,
            "event": event,
            "entity": "VirtualMachine",
            "entityuuid": VM,
            "account": ACCOUNT,
            "user": "7d2a0000-0000-4000-8000-00000000user",
            "VirtualMachine": VM,
            "description": f"Successfully completed {event.lower()}. Instance ID: {VM}",
        }
    )


@dataclass
class CloudStackWebhook:
    """WebhookDeliveryThread, as far as the receiver can tell."""

    port: int
    secret: str
    tries: int = 3
    timeout: float = 10.0
    answers: list[int] = field(default_factory=list)

    def deliver(self, payload: str, event_type: str, event_uuid: str | None = None) -> bool:
        body = payload.encode("utf-8")
        headers = {
            "X-CS-Event-ID": event_uuid or str(uuid.uuid4()),
            "X-CS-Event": event_type,
            "User-Agent": f"CS-Hookshot/{ACCOUNT}",
            "Content-Type": "application/json; charset=UTF-8",  # StringEntity, APPLICATION_JSON
        }
        if self.secret:
            mac = hmac.new(self.secret.encode("utf-8"), body, hashlib.sha256).digest()
            headers["X-CS-Signature"] = base64.b64encode(mac).decode().strip()
        for _ in range(self.tries):
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                conn.request("POST", PATH, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                self.answers.append(response.status)
                if response.status == 200:  # HttpStatus.SC_OK only
                    return True
            finally:
                conn.close()
        return False


class WebhookCollector(Process):
    def __init__(self, workdir: Path, db: str, port: int):
        super().__init__("collector", workdir)
        self.config = workdir / "collector.toml"
        (workdir / "webhook.key").write_text(SECRET + "\n")
        self.config.write_text(
            f"""
[store]
url = "{db}"
[webhook]
secret_key_file = "webhook.key"
[usage]
tick_seconds = 0.5
[api]
listen = "127.0.0.1:{port}"
token = "{TOKEN}"
"""
        )

    def args(self) -> list[str]:
        return [sys.executable, "-m", "kvmeter", "collector", "--config", str(self.config)]


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[tuple[WebhookCollector, Store, int]]:
    port, db = free_port(), f"sqlite:///{tmp_path}/usage.db"
    proc = WebhookCollector(tmp_path, db, port)
    proc.start()
    try:
        wait_for_port("127.0.0.1", port, 60, "the collector's API")
        store = Store(db)
        yield proc, store, port
        store.close()
    finally:
        proc.stop()


def request(
    port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def stored(store: Store) -> list[str]:
    """The resource of every stored event, in the order stored."""
    with store.read() as conn:
        return [resource for _, resource, _, _ in store.events_since(conn, 0, 1000)]


def test_signed_deliveries_are_stored_once_and_answered_200(
    collector: tuple[WebhookCollector, Store, int],
) -> None:
    proc, store, port = collector
    cloudstack = CloudStackWebhook(port, SECRET)
    start = action_event("VM.START", "Completed", "2024-05-14 10:21:07 +0000")
    assert cloudstack.deliver(start, "VM.START", "6f1e-event-1"), proc.logs()
    assert cloudstack.deliver(start, "VM.START", "6f1e-event-1")  # a redelivery: known, still 200
    assert cloudstack.deliver(action_event("VM.STOP", "Scheduled", "2024-05-14 11:02:40 +0000"), "VM.STOP")
    assert cloudstack.answers == [200, 200, 200]
    assert stored(store) == [VM, VM]  # two events, the redelivered one stored once
    with store.read() as conn:
        raws = [bytes(r[0]) for r in conn.exec_driver_sql("SELECT raw FROM lifecycle_events ORDER BY id")]
    assert raws[0] == start.encode()  # the bytes CloudStack signed
    health = json.loads(_get(port, "/health"))
    assert health["consumer"]["webhook"]["received"] == 3


def test_a_wrong_or_missing_signature_is_refused_and_stores_nothing(
    collector: tuple[WebhookCollector, Store, int],
) -> None:
    _proc, store, port = collector
    event = action_event("VM.START", "Completed", "2024-05-14 10:21:07 +0000")
    wrong = CloudStackWebhook(port, "another key")
    assert not wrong.deliver(event, "VM.START")
    assert wrong.answers == [401, 401, 401]  # CloudStack tried three times, then gave up
    unsigned = CloudStackWebhook(port, "")
    assert not unsigned.deliver(event, "VM.START")
    assert unsigned.answers == [401, 401, 401]
    assert stored(store) == []
    assert store.dead_letter_rows() == []


def test_cloudstacks_test_dispatch_and_garbage_are_dead_lettered_never_a_5xx(
    collector: tuple[WebhookCollector, Store, int],
) -> None:
    _proc, store, port = collector
    cloudstack = CloudStackWebhook(port, SECRET, tries=1)
    assert cloudstack.deliver('{ "CloudStack": "works!" }', "WEBHOOK.TEST")  # getManualDeliveryJob's
    assert cloudstack.deliver("not json at all", "VM.START")
    assert cloudstack.deliver("", "VM.START")
    letters = sorted((r["reason"], bytes(r["raw"])) for r in store.dead_letter_rows())
    assert letters == [
        ("malformed_json", b""),
        ("malformed_json", b"not json at all"),
        ("unknown_event", b'{ "CloudStack": "works!" }'),
    ]
    assert {r["origin"].split()[0].split(":")[0] for r in store.dead_letter_rows()} == {"webhook"}
    # other methods and hostile headers: clear 4xx answers, never a 5xx
    for method, headers in [
        ("GET", {}),
        ("PUT", {"X-CS-Signature": "x"}),
        ("POST", {"X-CS-Signature": "%%%", "Content-Type": "text/plain"}),
    ]:
        status = request(port, method, PATH, b"{}", headers)
        assert 400 <= status < 500, (method, status)


def test_the_api_token_still_guards_everything_else(collector: tuple[WebhookCollector, Store, int]) -> None:
    _, _, port = collector
    assert request(port, "GET", "/v1/usage?start=2024-05-14&end=2024-05-15") == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert request(port, "GET", "/v1/usage?start=2024-05-14&end=2024-05-15", headers=auth) == 200


def _get(port: int, path: str) -> bytes:
    deadline = time.monotonic() + 10
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", path)
            return conn.getresponse().read()
        except OSError:
            if time.monotonic() > deadline:
                raise
        finally:
            conn.close()
