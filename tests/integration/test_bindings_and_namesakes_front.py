"""Two behaviours through their front doors: `binding_keys` narrowed between two starts of the
real `kvmeter collector` from a TOML file against a real RabbitMQ node; and a removed account's
name taken again, seen through the real HTTP API and the real `cs` client with the tenants' own
API keys (minted in the store, as `kvmeter credentials create` does)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
from cs import CloudStack, CloudStackApiException

from kvmeter.collector.api import serve
from kvmeter.collector.config import load
from kvmeter.collector.credentials import Credentials, CredentialSource, scoped
from kvmeter.collector.input_rabbitmq import RabbitInput
from kvmeter.collector.store import Store
from kvmeter.collector.store.credentials import CLOUDSTACK, MintedCredentials
from kvmeter.proto import pb
from tests.api_support import running
from tests.collector_support import ACCT_A, HOUR, T0, routing_key, usage_event, wait_for
from tests.harness.collector_command import CollectorCommand
from tests.harness.rabbitmq import Node
from tests.integration.test_account_name_reuse import (
    DOMAIN,
    NEW,
    OLD,
    OTHER,
    T1,
    T3,
    VMS,
    hinted,
    listed,
    with_records,
)
from tests.integration.test_rabbitmq import publish

START = "management-server.UsageEvent.VM-START.#"  # A: kept
STOP = "management-server.UsageEvent.VM-STOP.#"  # B: taken out


def _toml(tmp_path: Path, node: Node, exchange: str, queue: str, keys: list[str]) -> Path:
    """The collector's TOML file: a [rabbitmq] section (the default stream queue), no API."""
    config = tmp_path / "collector.toml"
    config.write_text(
        f"""
[store]
url = "sqlite:///{tmp_path}/usage.db"
[rabbitmq]
url = "{node.url}"
exchange = "{exchange}"
queue = "{queue}"
binding_keys = {json.dumps(keys)}
[usage]
tick_seconds = 0.5
[api]
enabled = false
"""
    )
    return config


def _started_from(config: Path, queue: str) -> CollectorCommand:
    """`kvmeter collector --config FILE`, once its queue is bound (it logs so once the input's
    connection is the loop's)."""
    proc = CollectorCommand(config, config.with_suffix(".log"))
    try:
        wait_for(lambda: f"queue {queue} (stream) bound" in proc.log() or proc.proc.poll() is not None, 30,
                 "the collector bound its queue")  # fmt: skip
        assert proc.proc.poll() is None, proc.log()
    except BaseException:
        proc.stop()
        raise
    return proc


def _stored(store: Store) -> set[str]:
    """The events the store holds, as type:resource."""
    with store.read() as conn:
        rows = store.events_since(conn, 0, 1000)
    return {
        f"{ev.event_type}:{ev.resource_uuid}" for ev in (pb.LifecycleEvent.FromString(r[2]) for r in rows)
    }


def _in_stream(node: Node, queue: str) -> list[str]:
    """The routing keys the stream holds, from its first message (a stream keeps what it was
    given: reading it takes nothing away)."""
    connection = pika.BlockingConnection(pika.URLParameters(node.url))
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=100)
        keys: list[str] = []
        for method, _props, _body in channel.consume(
            queue, arguments={"x-stream-offset": "first"}, inactivity_timeout=0.3
        ):
            if method is None:
                break
            keys.append(method.routing_key)
            channel.basic_ack(method.delivery_tag)
        channel.cancel()
        return keys
    finally:
        connection.close()


def test_a_key_taken_out_of_binding_keys_in_the_toml_file_is_unbound_at_the_next_start(
    rabbitmq_node: Node, tmp_path: Path
) -> None:
    """binding_keys A and B in the collector's TOML file, then A alone and the real `kvmeter
    collector` started again from it: an event CloudStack then publishes on B's routing key is
    not routed to the queue (the exchange drops it: it is neither in the stream nor in the
    store), while A's is stored. What the queue received on B before the restart is still read,
    as the README says. Without the unbinding the durable queue kept B's binding and the
    collector kept storing what the operator had taken out. (The first start is the input
    in-process, with the settings the same file gave: one command start keeps the test cheap.)"""
    uid = uuid.uuid4().hex[:8]
    exchange, queue = f"cloudstack-events-{uid}", f"kvmeter-{uid}"
    config = _toml(tmp_path, rabbitmq_node, exchange, queue, [START, STOP])
    first = RabbitInput(load(config).rabbitmq)  # what `kvmeter collector` starts from this file
    first.start()
    wait_for(lambda: first.poll(0.1) == [] and first.connection is not None, 30, "the first start bound")
    first.close()
    before = usage_event("VM.STOP", "vm-zero", ACCT_A, T0)[1]  # on B while stopped: queued
    publish(rabbitmq_node, exchange, [(routing_key(before), before)])
    _toml(tmp_path, rabbitmq_node, exchange, queue, [START])  # B taken out, then the restart
    proc = _started_from(config, queue)
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    stop = usage_event("VM.STOP", "vm-one", ACCT_A, T0 + HOUR)[1]  # B's key
    start = usage_event("VM.START", "vm-two", ACCT_A, T0 + HOUR)[1]  # A's key
    try:
        publish(rabbitmq_node, exchange, [(routing_key(stop), stop), (routing_key(start), start)])
        # One publisher, one channel: had B's event been routed, it would be read before A's.
        wait_for(lambda: "VM.START:vm-two" in _stored(store), 30, "A's event stored", proc.log)
        assert _stored(store) == {"VM.STOP:vm-zero", "VM.START:vm-two"}
    finally:
        proc.proc.kill()  # what it stored is committed: no need to wait for its shutdown
        proc.stop()
        store.close()
    assert _in_stream(rabbitmq_node, queue) == [routing_key(before), routing_key(start)]


# -- A removed account's name taken again, as its tenants see it --------------------------------


@pytest.fixture
def tenants(tmp_path: Path) -> Iterator[tuple[str, dict[str, tuple[str, str]]]]:
    """The real HTTP API over a store where carol (OLD) was removed and her name taken again
    (NEW) in the same domain, a carol of another domain beside them; each carol's own tenant
    key pair, minted in the store (`kvmeter credentials create --account`): OLD's was never
    revoked. Yields the endpoint and {account: (api key, secret key)}."""
    store = with_records(Store(f"sqlite:///{tmp_path}/usage.db"))
    listed(store, T1, OLD, OTHER)
    hinted(store, T1, OLD)
    listed(store, T3, NEW, OTHER)
    minted = MintedCredentials(store)
    pairs = {}
    for account, made in ((OLD, T1), (NEW, T3)):
        _, shown = minted.create(CLOUDSTACK, f"carol {account[:3]}", scoped("carol", [account]), made)
        pairs[account] = (shown["api_key"], shown["secret_key"])
    server = serve(store, "127.0.0.1", 0, credentials=CredentialSource(Credentials()))
    with running(server) as url:
        yield f"{url}/client/api", pairs
    store.close()


def _listed(cs: CloudStack, **params: str) -> set[str]:
    found = cs.listUsageRecords(startdate="2024-05-14", enddate="2024-05-14", fetch_list=True, **params)
    return {r["accountid"] for r in found}


def _refused(cs: CloudStack, **params: str) -> tuple[int, int]:
    with pytest.raises(CloudStackApiException) as refused:
        _listed(cs, **params)
    return refused.value.error["errorcode"], refused.value.error["cserrorcode"]


DENIED = (531, 4365)  # CloudStack's PermissionDeniedException


def test_the_live_namesakes_own_key_never_sees_the_removed_namesakes_records(
    tenants: tuple[str, dict[str, tuple[str, str]]],
) -> None:
    """The new carol's own tenant key, signed, through the real `cs` client: by her name (with
    her domain, without it, in another case), with no account, and listing her domain, she gets
    her records only; naming the removed carol's id (as accountid, or as account) is CloudStack's
    531, and the removed carol's VM finds nothing: the previous customer's usage is never shown
    to, nor billed on, the account that took the name again."""
    endpoint, pairs = tenants
    key, secret = pairs[NEW]
    cs = CloudStack(endpoint=endpoint, key=key, secret=secret)
    assert _listed(cs, account="carol", domainid=DOMAIN) == {NEW}
    assert _listed(cs, account="carol") == {NEW}
    assert _listed(cs, account="CAROL") == {NEW}
    assert _listed(cs) == {NEW}
    assert _listed(cs, domainid=DOMAIN) == {NEW}
    assert _listed(cs, usageid=VMS[OLD], type="4") == set()
    assert _refused(cs, accountid=OLD) == DENIED
    assert _refused(cs, accountid=OLD, domainid=DOMAIN) == DENIED
    assert _refused(cs, accountid=OLD.upper()) == DENIED
    assert _refused(cs, account=OLD) == DENIED
    assert _refused(cs, domainid=DOMAIN, isrecursive="true") == DENIED  # a tenant: never its domain's tree


def test_the_removed_namesakes_old_key_sees_only_its_own_records(
    tenants: tuple[str, dict[str, tuple[str, str]]],
) -> None:
    """The removed carol's tenant key, still in kvmeter (an account's removal revokes nothing):
    with no account, its own id, or listing its domain, her own records only; her name now
    finds the new carol (as CloudStack's lookup does), so naming it, or the new carol's id, is
    531: never the new customer's records."""
    endpoint, pairs = tenants
    key, secret = pairs[OLD]
    cs = CloudStack(endpoint=endpoint, key=key, secret=secret)
    assert _listed(cs) == {OLD}
    assert _listed(cs, accountid=OLD) == {OLD}
    assert _listed(cs, domainid=DOMAIN) == {OLD}
    assert _listed(cs, usageid=VMS[NEW], type="4") == set()
    assert _refused(cs, account="carol", domainid=DOMAIN) == DENIED
    assert _refused(cs, account="carol") == DENIED
    assert _refused(cs, accountid=NEW) == DENIED
