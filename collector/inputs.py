"""The collector's one input seam: every source of records (Kafka, RabbitMQ, the webhook, files)
is an `Input`, and one loop (feed.Feeder) applies what they deliver and acknowledges it.

    Input.start()                         connect, subscribe, declare (or begin to: RabbitMQ's
                                          connection is opened beside the loop, never in it)
    Input.poll(timeout, measures=True)    -> [Delivery]: records ready now (lifecycle only when
                                          measures is False), waiting at most `timeout` seconds
    Input.caught_up()                     lifecycle read to the end the source had at start
    Input.status()                        what it is doing, for /health
    Input.close()

A Delivery is a batch of `Record`s of one kind (measures or lifecycle) and its `ack`: the loop
calls `ack()` only after the store committed what the records produced, so a crash in between
re-delivers them and the store's dedupe (stream marks, event digests) makes that change nothing.
An input with more to store about a lifecycle delivery (the reconciler: its corrections' reasons,
names, the snapshot) gives `within`: written in the records' own transaction, idempotent (a
chunk the database refuses is applied again record by record), never in `ack`.
An input never applies records itself: the service is not thread-safe and has one writer.

    event_inputs(rabbitmq, webhook_secret) -> EventInputs   # CloudStack's RabbitMQ bus and webhook
Both `kvmeter collector` and `kvmeter run --all-in-one` build these two inputs here, from the same
[rabbitmq] / [webhook] sections; the webhook's deliveries come through the API (`register`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.engine import Connection

from kvmeter.collector.model import Record
from kvmeter.collector.service import LIFECYCLE, MEASURES

if TYPE_CHECKING:
    from kvmeter.collector.config import RabbitConfig
    from kvmeter.collector.input_webhook import WebhookInput

__all__ = [
    "LIFECYCLE",
    "MEASURES",
    "Delivery",
    "EventInputs",
    "Input",
    "InputUnavailable",
    "event_inputs",
    "no_ack",
]


def no_ack() -> None:
    """For sources re-read from their start (a file, Kafka's lifecycle topic): nothing to tell."""


@dataclass(frozen=True)
class Delivery:
    kind: str  # MEASURES or LIFECYCLE: which path of the service applies the records
    records: Sequence[Record]
    ack: Callable[[], None] = field(default=no_ack)
    within: Callable[[Connection], None] | None = None  # LIFECYCLE only: stored with the records


class Input(Protocol):
    def start(self) -> None: ...

    def poll(self, timeout: float, *, measures: bool = True) -> list[Delivery]: ...

    def caught_up(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class InputUnavailable(RuntimeError):
    """A configured input cannot run here (its client library is missing)."""


@dataclass(frozen=True)
class EventInputs:
    inputs: list[Input]
    webhook: WebhookInput | None  # for the API to serve its path


def event_inputs(rabbitmq: RabbitConfig, webhook_secret: str) -> EventInputs:
    """The lifecycle inputs of the [rabbitmq] (url set) and [webhook] (secret set) sections."""
    from kvmeter.collector.input_webhook import WebhookInput

    webhook = WebhookInput(webhook_secret) if webhook_secret else None
    inputs: list[Input] = [webhook] if webhook is not None else []
    if rabbitmq.url:
        try:  # pika only where RabbitMQ is used (packages: a Recommends)
            from kvmeter.collector.input_rabbitmq import RabbitInput
        except ImportError as exc:
            raise InputUnavailable(f"[rabbitmq] needs pika (python3-pika): {exc}") from None
        inputs.append(RabbitInput(rabbitmq))
    return EventInputs(inputs, webhook)
