"""Where billable items go: a Kafka topic (keyed by account) and a webhook (one POST per item,
its transaction id as the idempotency key). A sink returns the rows it got confirmed: the
broker's delivery report, or a 2xx answer. Anything else is not confirmed and is tried again.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import logging
import threading
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from kvmeter.collector.config_handoff import HandoffConfig
from kvmeter.collector.http_deadline import Rejected, post_status, refuses_item
from kvmeter.collector.store.outbox import OutboxRow

log = logging.getLogger(__name__)

IDEMPOTENCY_HEADER = "Idempotency-Key"
SIGNATURE_HEADER = "X-Kvmeter-Signature"  # sha256=<hex HMAC-SHA256 of the body with the secret>
TRANSACTION_HEADER = "transaction_id"  # the Kafka record header naming the item's id


class DeliveryError(Exception):
    """A delivery the receiver did not acknowledge."""


class Sink(Protocol):
    name: str

    def deliver(self, rows: Sequence[OutboxRow]) -> tuple[list[int], str]:
        """Ids of the rows confirmed, and the error that stopped the rest ("" if none)."""

    def close(self) -> None: ...


class KafkaSink:
    """An idempotent producer (acks=all): a row is confirmed by its own delivery report."""

    name = "topic"

    def __init__(self, cfg: HandoffConfig, on_error: Callable[[str], None], producer: Any = None):
        self.topic = cfg.topic
        self.timeout_s = cfg.timeout_s
        self.on_error = on_error
        self.cfg = cfg
        self._fatal = False  # the producer hit a fatal error: unusable, a new one is made
        self._own = producer is None  # made here: may be made again
        self.producer = self._make() if producer is None else producer

    def _make(self) -> Any:
        from confluent_kafka import Producer

        return Producer(
            {
                "bootstrap.servers": self.cfg.bootstrap,
                "linger.ms": 5,
                "message.timeout.ms": int(self.cfg.timeout_s * 1000),
                **self.cfg.kafka_options,
                # after the options: a row is marked sent on the broker's acknowledgement only
                "enable.idempotence": True,
                "acks": "all",
                "error_cb": self._on_client_error,
            }
        )

    def _on_client_error(self, err: Any) -> None:
        if getattr(err, "fatal", lambda: False)():
            self._fatal = True
            self.on_error(f"fatal producer error: {err}")

    def _check_fatal(self, exc: Exception) -> None:
        from confluent_kafka import KafkaError

        err = exc.args[0] if exc.args else None
        if isinstance(err, KafkaError) and (err.fatal() or err.code() == KafkaError._FATAL):
            self._fatal = True

    def deliver(self, rows: Sequence[OutboxRow]) -> tuple[list[int], str]:
        if self._fatal and self._own:  # a fatal error leaves the instance unusable for ever
            log.warning("hand-off: a new Kafka producer after a fatal error")
            self._fatal = False
            self.producer = self._make()
        try:
            return self._deliver(rows)
        except Exception as exc:  # KafkaException: a fatal error, a message refused at once
            self._check_fatal(exc)
            self.on_error(f"{type(exc).__name__}: {exc}")
            return [], f"{type(exc).__name__}: {exc}"

    def _deliver(self, rows: Sequence[OutboxRow]) -> tuple[list[int], str]:
        confirmed: list[int] = []
        errors: list[str] = []

        def report(row_id: int) -> Callable[[Any, Any], None]:
            def on_delivery(err: Any, _msg: Any) -> None:
                if err is None:
                    confirmed.append(row_id)
                else:
                    errors.append(str(err))

            return on_delivery

        for row in rows:
            while True:
                try:
                    self.producer.produce(
                        self.topic,
                        key=row.account.encode(),
                        value=row.item.encode(),
                        headers=[(TRANSACTION_HEADER, row.transaction_id.encode())],
                        on_delivery=report(row.id),
                    )
                    break
                except BufferError:  # the local queue is full: let deliveries drain it
                    self.producer.poll(0.1)
            self.producer.poll(0)
        left = self.producer.flush(self.timeout_s)
        if left:
            errors.append(f"{left} message(s) not confirmed within {self.timeout_s} s")
        for error in errors[:1]:
            self.on_error(error)
        return confirmed, errors[0] if errors else ""

    def close(self) -> None:
        self.producer.flush(self.timeout_s)


class WebhookSink:
    """One POST per item, retried with exponential backoff until a 2xx (or the round's attempts
    run out: the item waits for the next round). The first item that stays unacknowledged stops
    the round, so a receiver that is down is not hammered with the rest; an item the receiver
    refuses (a 4xx about the item) waits without stopping the others (on_refused: it is offered
    again after a growing pause, after every other item, store/outbox.py claim_outbox). A 3xx
    is not followed, and a POST is over within timeout_seconds whatever the receiver does."""

    name = "webhook"

    def __init__(
        self,
        cfg: HandoffConfig,
        on_error: Callable[[str], None],
        stop: threading.Event,
        on_refused: Callable[[int, str], None] = lambda _id, _why: None,
    ):
        self.cfg = cfg
        self.on_error = on_error
        self.stop = stop
        self.on_refused = on_refused  # (row id, answer): the relay puts it behind the others

    def deliver(self, rows: Sequence[OutboxRow]) -> tuple[list[int], str]:
        confirmed: list[int] = []
        rejected = ""
        for row in rows:
            if self.stop.is_set():
                return confirmed, "stopping"
            retrying = Retrying(
                stop=stop_after_attempt(self.cfg.retry_attempts),
                wait=wait_exponential(multiplier=self.cfg.retry_initial_s, max=self.cfg.retry_max_s),
                retry=retry_if_exception_type(DeliveryError),
                sleep=self._sleep,
            )
            try:
                retrying(self._post, row)
            except RetryError as exc:
                return confirmed, str(exc.last_attempt.exception())
            except Rejected as exc:  # this item waits for the next round; the others go on
                rejected = rejected or str(exc)
                self.on_refused(row.id, str(exc))
                continue
            confirmed.append(row.id)
        return confirmed, rejected

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise DeliveryError("stopping")

    def _post(self, row: OutboxRow) -> None:
        body = row.item.encode()
        headers = {
            **self.cfg.webhook_headers,
            "Content-Type": "application/json",
            IDEMPOTENCY_HEADER: row.transaction_id,
        }
        if self.cfg.webhook_secret:
            digest = hmac.new(self.cfg.webhook_secret.encode(), body, hashlib.sha256).hexdigest()
            headers[SIGNATURE_HEADER] = f"sha256={digest}"
        request = urllib.request.Request(self.cfg.webhook_url, data=body, headers=headers, method="POST")
        try:
            status = post_status(request, self.cfg.timeout_s)
        except (OSError, ValueError, http.client.HTTPException) as exc:  # refused, reset, late, not HTTP
            self.on_error(f"{type(exc).__name__}: {exc}")
            raise DeliveryError(f"{row.transaction_id}: {exc}") from None
        if refuses_item(status):  # not a failed delivery: the relay counts and logs refusals
            # (as failures, one item refused for good fired KvmeterHandoffDeliveryFailing hourly)
            raise Rejected(f"{row.transaction_id}: HTTP {status}")
        if not 200 <= status < 300:
            self.on_error(f"HTTP {status}")
            raise DeliveryError(f"{row.transaction_id}: HTTP {status}")

    def close(self) -> None:
        return
