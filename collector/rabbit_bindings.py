"""The bindings of kvmeter's RabbitMQ queue, kept to `binding_keys` across restarts.

A binding outlives the connection that made it: a key taken out of `binding_keys` stayed bound to
the durable queue, which kept receiving (and the collector consuming) what the operator removed.
AMQP 0.9.1 cannot list a queue's bindings (only the management plugin's HTTP API can), so the
keys kvmeter binds are remembered on the broker, beside the queue: a persistent message in the
durable queue `<queue>.bindings`, a JSON object {exchange: [keys]}. At every connect the keys
remembered for the configured exchange and no longer configured are unbound, the configured ones
bound, and the new record published (confirmed) before the records read are acknowledged: a crash
in between leaves both, and their union is read the next time (unbinding a key that is not bound
changes nothing). With no record for the exchange (a kvmeter before this one, or a new queue),
the default key `management-server.#` is taken as bound: a narrowed list removes it too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence

import pika
from pika.adapters.blocking_connection import BlockingChannel

from kvmeter.collector.config import RabbitConfig

log = logging.getLogger(__name__)

MEMO_SUFFIX = ".bindings"
Remembered = Mapping[str, frozenset[str]]  # exchange -> the keys kvmeter bound the queue with


def memo_queue(queue: str) -> str:
    return queue + MEMO_SUFFIX


def remembered(bodies: Iterable[bytes]) -> dict[str, frozenset[str]]:
    """The keys the records name, by exchange, all records together. A body that is no such
    record (not kvmeter's) is skipped."""
    out: dict[str, frozenset[str]] = {}
    for body in bodies:
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not all(
            isinstance(keys, list) and all(isinstance(k, str) for k in keys) for keys in doc.values()
        ):
            log.warning("RabbitMQ: a message in the bindings record is not one, skipped: %r", body[:200])
            continue
        for exchange, keys in doc.items():
            out[exchange] = out.get(exchange, frozenset()) | frozenset(keys)
    return out


def stale_keys(before: Remembered, exchange: str, configured: Sequence[str]) -> tuple[str, ...]:
    """The keys to unbind: bound to `exchange` before and not configured now (no record for the
    exchange: the default key, what kvmeter bound when it remembered nothing)."""
    bound = before.get(exchange, frozenset(RabbitConfig.binding_keys))
    return tuple(sorted(bound - set(configured)))


def record(before: Remembered, exchange: str, configured: Sequence[str]) -> bytes:
    """The new record: the configured keys for `exchange`, the other exchanges' as they were
    (kvmeter leaves the bindings to an exchange it no longer reads alone)."""
    doc = {e: sorted(keys) for e, keys in before.items()}
    doc[exchange] = sorted(set(configured))
    return json.dumps(doc, sort_keys=True).encode()


def rebind(channel: BlockingChannel, queue: str, exchange: str, keys: Sequence[str]) -> tuple[str, ...]:
    """Bind `queue` to `exchange` with exactly `keys` (see the module); the keys unbound."""
    memo = memo_queue(queue)
    channel.queue_declare(memo, durable=True)
    bodies: list[bytes] = []
    last_tag = None
    while True:  # every record; unacknowledged, they return to the queue if anything fails
        method, _props, body = channel.basic_get(memo, auto_ack=False)
        if method is None:
            break
        bodies.append(body)
        last_tag = method.delivery_tag
    before = remembered(bodies)
    stale = stale_keys(before, exchange, keys)
    for key in stale:
        channel.queue_unbind(queue, exchange, routing_key=key)
    for key in keys:
        channel.queue_bind(queue, exchange, routing_key=key)
    channel.confirm_delivery()
    persistent = pika.BasicProperties(content_type="application/json", delivery_mode=2)
    channel.basic_publish("", memo, record(before, exchange, keys), persistent)
    if last_tag is not None:
        channel.basic_ack(last_tag, multiple=True)
    if stale:
        log.info("RabbitMQ: queue %s unbound from %s: %s (no longer in binding_keys)", queue, exchange,
                 ", ".join(stale))  # fmt: skip
    return stale
