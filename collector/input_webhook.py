"""Webhook input: CloudStack 4.20+ webhook deliveries on POST /v1/webhook/cloudstack.

What CloudStack sends (plugins/event-bus/webhook, WebhookDeliveryThread): a POST whose body is
the event's JSON description, the same bytes as a Kafka record's value, with the headers
X-CS-Event-ID (the event's uuid), X-CS-Event (its type), User-Agent `CS-Hookshot/<account uuid>`
and, when the webhook has a secret key, X-CS-Signature = Base64(HMAC-SHA256(body, secret key)).
It counts only HTTP 200 as delivered and otherwise tries again (webhook.delivery.tries, 3;
webhook.delivery.timeout, 10 s). WebhookServiceImpl delivers action events only (the category
the lifecycle rules keep for audit, MACs and addresses: usage events come by Kafka or RabbitMQ).

Here: a delivery without a valid signature is refused (401) and stored nowhere; a signed one is
handed to the collector's loop and answered 200 only after the store committed it (so a crash
before that makes CloudStack deliver it again), a redelivery changes nothing (events are stored
once by their digest), and a body that is not an event is dead-lettered with its bytes and
answered 200 too (delivering it again would not make it one). When the store does not commit
within WAIT_S the answer is 503, and CloudStack's next try finds it stored or stores it.
Deliveries carry no order of their own, so the clock-skew rule leaves them to their stamps.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import queue
import threading
from typing import Any

from flask import Flask, Response, jsonify, request

from kvmeter.collector.inputs import LIFECYCLE, Delivery
from kvmeter.collector.model import Record

log = logging.getLogger(__name__)

PATH = "/v1/webhook/cloudstack"
WAIT_S = 8.0  # below CloudStack's default delivery timeout (10 s)
MAX_PENDING = 1000  # deliveries waiting for the loop; more are answered 503 at once
PER_POLL = 500


def signature(body: bytes, secret: str) -> str:
    """CloudStack's X-CS-Signature: Base64 of HMAC-SHA256 over the body with the secret key."""
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


class _Pending:
    def __init__(self, record: Record):
        self.record = record
        self.done = threading.Event()


class WebhookInput:
    def __init__(self, secret: str, *, wait_s: float = WAIT_S):
        if not secret:
            raise ValueError("a webhook input needs CloudStack's webhook secret key")
        self.secret = secret
        self.wait_s = wait_s
        self._queue: queue.Queue[_Pending] = queue.Queue(MAX_PENDING)
        self.received = self.refused = 0

    def register(self, app: Flask) -> None:
        app.add_url_rule(PATH, "cloudstack_webhook", self._receive, methods=["POST"])

    # -- the HTTP side (the API's threads) ----------------------------------------------------
    def _receive(self) -> Response:
        body = request.get_data(cache=False)
        given = request.headers.get("X-CS-Signature", "")
        # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError, a 500).
        expected = signature(body, self.secret).encode()
        if not given or not hmac.compare_digest(given.strip().encode(), expected):
            self.refused += 1
            log.warning("webhook delivery %s refused: no valid X-CS-Signature",
                        request.headers.get("X-CS-Event-ID", "?"))  # fmt: skip
            return _answer(401, "missing or wrong X-CS-Signature")
        event_id = request.headers.get("X-CS-Event-ID", "")
        kind = request.headers.get("X-CS-Event", "")
        pending = _Pending(Record(body, None, f"webhook:{event_id or '?'} {kind}".rstrip()))
        try:
            self._queue.put_nowait(pending)
        except queue.Full:
            return _answer(503, "too many deliveries waiting; deliver again later")
        self.received += 1
        if not pending.done.wait(self.wait_s):
            return _answer(503, "not stored yet; deliver again later")
        return _answer(200, "stored")

    # -- the loop's side ----------------------------------------------------------------------
    def start(self) -> None:
        pass

    def poll(self, timeout: float, *, measures: bool = True) -> list[Delivery]:
        taken: list[_Pending] = []
        try:
            taken.append(self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait())
            while len(taken) < PER_POLL:
                taken.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        if not taken:
            return []
        return [Delivery(LIFECYCLE, [p.record for p in taken], lambda: _release(taken))]

    def caught_up(self) -> bool:
        return True

    def status(self) -> dict[str, Any]:
        waiting = self._queue.qsize()
        return {"webhook": {"received": self.received, "refused": self.refused, "waiting": waiting}}

    def close(self) -> None:
        pass


def _release(taken: list[_Pending]) -> None:
    for pending in taken:
        pending.done.set()


def _answer(status: int, message: str) -> Response:
    response = jsonify({"status": status, "message": message})
    response.status_code = status
    if status == 503:
        response.headers["Retry-After"] = "10"
    return response
