"""RabbitMQ input: CloudStack's RabbitMQ event bus (reference §1.3).

CloudStack publishes every event to a durable topic exchange (docs: `cloudstack-events`) with the
routing key `management-server.<Category>.<Type>.<ResourceType>.<uuid>` and the same JSON body as
on Kafka, persistent. The collector declares that exchange (the same way CloudStack does, so
either may start first), declares its own durable queue and binds it with the configured keys,
unbinding those it bound before and no longer configured (rabbit_bindings: remembered in the
durable queue `<queue>.bindings`).

- queue_type "stream" (the default): a RabbitMQ stream, read from its first message at every
  start, like the Kafka lifecycle topic: every replica reads everything and the store dedupes
  events by their digest. Each message's `x-stream-offset` is its stored, replayable place in
  the stream: the clock-skew rule's delivery order (lifecycle.py). Retention is RabbitMQ's
  (a policy with max-age or max-length-bytes); events already stored stay stored.
- queue_type "classic": a classic durable queue, drained; messages shared among the replicas.
  It keeps no order to replay, so the events carry none and their stamps decide.

Either way a message is acknowledged only after the store committed what it produced (a crash
or a lost connection re-delivers it, and the dedupe makes that change nothing), at most
`prefetch` messages are in flight, a body that is not an event is dead-lettered by the service
with its bytes and acknowledged, and a lost broker is reconnected with exponential backoff
without blocking the collector's other inputs: each attempt connects on a thread of its own
(`_Attempt`) and the loop takes the connection when it is there, so a broker that accepts the
socket and never answers (pika waits up to its socket and stack timeouts, 10 s and 15 s by
default) holds neither the loop's measures, its tick, SIGHUP nor the shutdown.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils.connection_workflow import AMQPConnectorException
from pika.exceptions import AMQPError
from pika.spec import Basic, BasicProperties

from kvmeter.collector.config import RabbitConfig
from kvmeter.collector.inputs import LIFECYCLE, Delivery
from kvmeter.collector.model import Record
from kvmeter.collector.rabbit_bindings import rebind

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
DEGRADED_AFTER_S = 60.0  # /health says degraded when the broker was unreachable this long
CLOSE_WAIT_S = 2.0  # close(): how long the shutdown waits for the broker's Close-Ok
RETRIED = (AMQPError, AMQPConnectorException, OSError)  # the broker's failures: tried again

# What an attempt opened: the connection, its channel consuming, the classic queue's backlog.
Opened = tuple[pika.BlockingConnection, BlockingChannel, "int | None"]


def resource_key(routing_key: str | bytes) -> bytes | None:
    """The resource uuid CloudStack put last in the routing key, as Kafka's record key ("*": none).
    A key that is not UTF-8 comes from pika as bytes (AMQP's shortstr is bytes): split as such."""
    raw = routing_key if isinstance(routing_key, bytes) else routing_key.encode()
    last = raw.rsplit(b".", 1)[-1] if raw.count(b".") >= 4 else b""
    return last if last and last != b"*" else None


class RabbitInput:
    def __init__(self, cfg: RabbitConfig, *, monotonic: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.monotonic = monotonic
        self.stream = cfg.queue_type == "stream"
        self.connection: pika.BlockingConnection | None = None
        self.channel: BlockingChannel | None = None
        self._attempt: _Attempt | None = None  # a connection being opened, on its own thread
        self._received: list[tuple[Basic.Deliver, BasicProperties, bytes]] = []
        self._retry_at = 0.0
        self._backoff = BACKOFF_FIRST_S
        self._backlog: int | None = None  # messages in the queue at connect (classic) / stream end
        self._read = 0
        self.down_since: float | None = self.monotonic()  # until the first connect
        self.last_error = ""
        self._cancelled = False  # the broker cancelled our consumer (Basic.Cancel)

    # -- connection ---------------------------------------------------------------------------
    def start(self) -> None:
        self._attempt = _Attempt(self._open)

    def _open(self) -> Opened:
        """Connect, declare, bind and consume (on the attempt's thread); nothing left open on failure."""
        connection: pika.BlockingConnection | None = None
        try:
            connection = pika.BlockingConnection(pika.URLParameters(self.cfg.url))
            channel = connection.channel()
            channel.exchange_declare(self.cfg.exchange, exchange_type="topic", durable=True)
            arguments = {"x-queue-type": "stream"} if self.stream else {}
            declared = channel.queue_declare(self.cfg.queue, durable=True, arguments=arguments)
            # Exactly the configured keys: those bound before and removed since are unbound.
            rebind(channel, self.cfg.queue, self.cfg.exchange, self.cfg.binding_keys)
            channel.basic_qos(prefetch_count=self.cfg.prefetch)
            # The queue deleted, or the node holding it gone: the broker cancels the consumer
            # (Basic.Cancel) and pika raises nothing, the connection stays open, idle forever.
            # Both callbacks run inside process_data_events: on the loop's thread.
            channel.add_on_cancel_callback(self._on_cancel)
            channel.basic_consume(
                self.cfg.queue,
                self._on_message,
                auto_ack=False,
                arguments={"x-stream-offset": "first"} if self.stream else None,
            )
        except BaseException:
            _close(connection)  # e.g. the queue exists with other arguments: no connection left behind
            raise
        return connection, channel, None if self.stream else declared.method.message_count

    def _connected_within(self, timeout: float) -> bool:
        """Not connected: an attempt started once the backoff is over, its outcome taken when it
        is there. Waits at most `timeout`, whatever the broker does."""
        if self._attempt is None:
            wait = self._retry_at - self.monotonic()
            if wait > 0:
                time.sleep(min(timeout, wait))
                return False
            self._attempt = _Attempt(self._open)
        if not self._attempt.done.wait(timeout):
            return False
        attempt, self._attempt = self._attempt, None
        return self._adopt(attempt)

    def _adopt(self, attempt: _Attempt) -> bool:
        """A finished attempt: its connection is the loop's from now on; or, on failure, the
        next try scheduled (backoff)."""
        exc = attempt.error
        if exc is not None:
            # A broker that accepts the socket but never finishes the handshake (still booting,
            # overloaded, a balancer without backend) raises pika's connector errors, not AMQPError.
            if not isinstance(exc, RETRIED):
                raise exc  # not the broker: the collector's own error, as when it connected here
            self.last_error = f"{type(exc).__name__}: {exc}".rstrip(": ")
            self._retry_at = self.monotonic() + self._backoff
            log.warning("RabbitMQ %s: %s; next try in %.1fs", self._where(), self.last_error, self._backoff)
            self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
            return False
        assert attempt.opened is not None
        self.connection, self.channel, self._backlog = attempt.opened
        self._received = []
        self._cancelled = False
        self._read = 0
        self._backoff = BACKOFF_FIRST_S
        self.down_since = None
        self.last_error = ""
        log.info("RabbitMQ %s: queue %s (%s) bound to %s", self._where(), self.cfg.queue,
                 self.cfg.queue_type, self.cfg.exchange)  # fmt: skip
        return True

    def _where(self) -> str:
        params = pika.URLParameters(self.cfg.url)
        return f"{params.host}:{params.port}{params.virtual_host}"

    def _lost(self, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}".rstrip(": ")
        log.warning("RabbitMQ connection lost: %s; unacknowledged messages come again", self.last_error)
        self._drop()
        self._retry_at = self.monotonic() + self._backoff

    def _drop(self, wait: float = 0.0) -> None:
        """Forget the connection; it is closed aside (Connection.Close waits for the broker's
        Close-Ok, which a broker that stopped answering never sends), waiting at most `wait`."""
        connection, self.connection, self.channel = self.connection, None, None
        self._received = []
        if self.down_since is None:
            self.down_since = self.monotonic()
        _close_aside(connection, wait)

    def _on_cancel(self, _frame: Any) -> None:
        """Called by pika inside process_data_events: only noted here (closing the connection
        from its own callback is not allowed); poll and caught_up reconnect."""
        self._cancelled = True

    def _check_cancelled(self) -> bool:
        """The consumer was cancelled by the broker: drop the connection (what was delivered and
        not acknowledged comes again) and reconnect, declaring and binding again."""
        if not self._cancelled:
            return False
        self._lost(RuntimeError("consumer cancelled by the broker (queue deleted or its node gone)"))
        return True

    # -- deliveries ---------------------------------------------------------------------------
    def _on_message(
        self, _channel: BlockingChannel, method: Basic.Deliver, props: BasicProperties, body: bytes
    ) -> None:
        self._received.append((method, props, body))

    def poll(self, timeout: float, *, measures: bool = True) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        if self.connection is None and not self._connected_within(timeout):
            return []
        assert self.connection is not None
        try:
            self.connection.process_data_events(time_limit=max(0.0, deadline - time.monotonic()))
        except (AMQPError, OSError) as exc:
            self._lost(exc)
            return []
        if self._check_cancelled() or not self._received:
            return []
        received, self._received = self._received, []
        self._read += len(received)
        records = [self._record(method, props, body) for method, props, body in received]
        channel, last_tag = self.channel, received[-1][0].delivery_tag
        return [Delivery(LIFECYCLE, records, lambda: self._acknowledge(channel, last_tag))]

    def _record(self, method: Basic.Deliver, props: BasicProperties, body: bytes) -> Record:
        key = method.routing_key or ""
        if isinstance(key, bytes):  # not UTF-8: shown escaped in the origin
            key = key.decode("utf-8", "backslashreplace")
        offset = (props.headers or {}).get("x-stream-offset") if self.stream else None
        resource = resource_key(method.routing_key or "")
        if isinstance(offset, int):
            origin = f"rabbitmq:{self.cfg.queue}@{offset}"
            return Record(body, resource, origin, (f"rabbitmq:{self.cfg.queue}", offset))
        return Record(body, resource, f"rabbitmq:{self.cfg.queue}#{method.delivery_tag} {key}")

    def _acknowledge(self, channel: BlockingChannel | None, last_tag: int) -> None:
        """Everything delivered on this channel up to the delivery's last message."""
        if channel is None or channel is not self.channel:
            return  # that channel is gone: the broker delivers those messages again
        try:
            channel.basic_ack(delivery_tag=last_tag, multiple=True)
        except (AMQPError, OSError) as exc:
            self._lost(exc)

    def caught_up(self) -> bool:
        """A classic queue: the messages it held at connect are read, or (replicas sharing it
        read a part each) nothing came for a moment and the queue holds none ready. A stream (no
        end to compare with over AMQP 0.9.1): the broker, which pushes up to `prefetch`
        unacknowledged messages at once, had nothing more for a moment. Unreachable (an attempt
        failed): nothing to wait for; the first attempt still going: what the queue holds may
        come yet."""
        if self.connection is None:
            return self._attempt is None or self.last_error != ""
        if self._backlog is not None and self._read >= self._backlog:
            return True
        quiet = not self._received and self._quiet()
        return quiet if self._backlog is None else quiet and self._none_ready()

    def _quiet(self) -> bool:
        assert self.connection is not None
        try:
            self.connection.process_data_events(time_limit=0.2)
        except (AMQPError, OSError) as exc:
            self._lost(exc)
            return True
        return self._check_cancelled() or not self._received

    def _none_ready(self) -> bool:
        """The classic queue holds no message ready for a consumer (a passive declare): the rest
        of its backlog is read, or in another replica's hands. Lost: nothing to wait for."""
        assert self.channel is not None
        try:
            return self.channel.queue_declare(self.cfg.queue, passive=True).method.message_count == 0
        except (AMQPError, OSError) as exc:
            self._lost(exc)
            return True

    def status(self) -> dict[str, Any]:
        down = 0.0 if self.down_since is None else self.monotonic() - self.down_since
        degraded = (
            f"RabbitMQ unreachable for {down:.0f} s: {self.last_error}" if down >= DEGRADED_AFTER_S else ""
        )
        return {
            "degraded": degraded,
            "rabbitmq": {
                "connected": self.connection is not None,
                "queue": self.cfg.queue,
                "read": self._read,
                "last_error": self.last_error,
            },
        }

    def close(self) -> None:
        if self._attempt is not None:
            self._attempt.abandon()  # what it opens is closed, by its thread if still going
            self._attempt = None
        self._drop(CLOSE_WAIT_S)


class _Attempt:
    """One connection attempt on a thread of its own: pika's BlockingConnection blocks until the
    broker answered or pika's own timeouts ran out, which must not hold the collector's loop.
    The connection is used by one thread at a time: this one until `done`, then the loop's."""

    def __init__(self, open_connection: Callable[[], Opened]):
        self.done = threading.Event()
        self.opened: Opened | None = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._abandoned = False
        threading.Thread(
            target=self._run, args=(open_connection,), name="rabbitmq-connect", daemon=True
        ).start()

    def _run(self, open_connection: Callable[[], Opened]) -> None:
        opened: Opened | None = None
        try:
            opened = open_connection()
        except BaseException as exc:  # judged by the loop (_adopt): retried or raised
            self.error = exc
        with self._lock:
            abandoned, self.opened = self._abandoned, opened
        self.done.set()
        if abandoned and opened is not None:
            _close(opened[0])  # the input closed meanwhile: nobody takes it

    def abandon(self) -> None:
        """The input closes: what this attempt opened (or opens yet) is closed, not left open."""
        with self._lock:
            self._abandoned = True
            opened, self.opened = self.opened, None
        if opened is not None:
            _close_aside(opened[0], CLOSE_WAIT_S)


def _close(connection: pika.BlockingConnection | None) -> None:
    if connection is not None and connection.is_open:
        try:
            connection.close()
        except (AMQPError, OSError):
            pass


def _close_aside(connection: pika.BlockingConnection | None, wait: float) -> None:
    """_close on a thread of its own (nothing else uses the connection any more), waited for at
    most `wait` seconds."""
    if connection is None or not connection.is_open:
        return
    closing = threading.Thread(target=_close, args=(connection,), name="rabbitmq-close", daemon=True)
    closing.start()
    closing.join(wait)
