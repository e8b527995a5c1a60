"""Hostile input to the collector's measures and lifecycle paths, fed to the real decode,
service and webhook code: each is dead-lettered with its reason and bytes (or, for a measure's
informational mac, kept with its bytes escaped), the rest of its chunk is applied, and the loop
keeps running. Values the store cannot hold (past int64), strings that are not UTF-8 (protobuf's
upb runtime hands such a proto2 field back as bytes), lone UTF-16 surrogates in event JSON,
nesting too deep for json.loads, measures without a known direction, a chunk that must be
applied again record by record."""

from __future__ import annotations

import ipaddress
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmeter.collector import cloudstack
from kvmeter.collector.api import create_app
from kvmeter.collector.errors import BadInput
from kvmeter.collector.feed import Feeder
from kvmeter.collector.ingest import ingest_measures
from kvmeter.collector.input_webhook import PATH, WebhookInput, signature
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.model import NETWORK_BYTES_RECEIVED, NETWORK_BYTES_SENT, Record, Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from kvmeter.proto import pb
from tests.collector_support import ACCT_A, HOUR, MIN, ROUTER, T0, VM1, Clock, M, Stream, cs_time, usage_event

NOW = T0 + 3 * HOUR
INT64_MAX = 2**63 - 1


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path}/usage.db")
    s.migrate()
    yield s
    s.close()


def collector(store: Store, *, owned: bool = True) -> Collector:
    """A collector whose VM1 belongs to ACCT_A (created and started an hour before T0)."""
    c = Collector(store, Settings(), Clock(NOW))
    if owned:
        events = [
            usage_event("VM.CREATE", VM1, ACCT_A, T0 - HOUR),
            usage_event("VM.START", VM1, ACCT_A, T0 - HOUR),
        ]
        c.apply_events([Record(v, k, f"t/0@{i}") for i, (k, v) in enumerate(events)])
    return c


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def batch_with(measure: bytes, *, stream_id: str = "s1", seq: int = 1, tail: bytes = b"") -> bytes:
    """A MeasureBatch with one serialized IPMeasure (and raw fields appended to the batch)."""
    head = pb.MeasureBatch(schema=1, host_id="h1", boot_id="b1", seq=seq, poll_time=T0 + MIN)
    if stream_id:
        head.stream_id = stream_id
    return head.SerializeToString() + b"\x3a" + varint(len(measure)) + measure + tail


def one_measure(**fields: object) -> bytes:
    return M(T0, T0 + MIN, 100, **fields).to_pb().SerializeToString()  # type: ignore[arg-type]


def assert_dead_lettered(store: Store, c: Collector, raw: bytes, source: str = "measures") -> None:
    apply = c.apply_batches if source == "measures" else c.apply_events
    out = apply([Record(raw, None, "topic/0@7")])  # must not raise
    assert [d.raw for d in out.dead_letters] == [raw]
    (listed,) = store.dead_letters()
    letter = store.dead_letter_by_id(listed.id)  # the list leaves the bytes out
    assert letter is not None
    assert (letter.source, letter.raw, letter.origin) == (source, raw, "topic/0@7")


@pytest.mark.parametrize(
    ("owned", "fields"),
    [
        (True, {"nbytes": 2**64 - 1}),  # billed
        (True, {"nbytes": 2**63}),  # billed
        (False, {"nbytes": 2**64 - 1}),  # parked (no owner yet)
        (True, {"nbytes": 2**64 - 1, "quarantined": True}),  # quarantined
    ],
    ids=["bytes-u64max-billed", "bytes-2^63-billed", "bytes-u64max-parked", "bytes-u64max-quarantined"],
)
def test_a_measure_of_more_bytes_than_int64_is_dead_lettered(store: Store, owned: bool, fields: dict) -> None:
    nbytes = fields.pop("nbytes")
    raw = Stream("s1").batch([M(T0, T0 + MIN, nbytes, **fields)])
    assert_dead_lettered(store, collector(store, owned=owned), raw)


@pytest.mark.parametrize("seq", [2**63, 2**64 - 1])
def test_a_batch_whose_seq_overflows_int64_is_dead_lettered(store: Store, seq: int) -> None:
    raw = batch_with(one_measure(), seq=seq)
    assert_dead_lettered(store, collector(store), raw)


def test_one_overflowing_batch_does_not_hold_back_the_good_ones_in_its_chunk(store: Store) -> None:
    c = collector(store)
    good = Stream("good").batch([M(T0, T0 + MIN, 1234)])
    bad = Stream("bad").batch([M(T0, T0 + MIN, 2**64 - 1)])
    out = c.apply_batches([Record(good, None, "m/0@1"), Record(bad, None, "m/0@2")])
    assert out.billed_bytes == 1234
    assert [d.raw for d in out.dead_letters] == [bad]


@pytest.mark.parametrize(
    ("owned", "extra"),
    [
        (True, b"\x7a\x02\xff\xfe"),  # instance_uuid (15), billed path
        (False, b"\x7a\x02\xff\xfe"),  # instance_uuid, parked path
        (False, b"\x82\x01\x02\xff\xfe"),  # domain_name (16), parked
        (True, b"\xa0\x01\x01\xaa\x01\x02\xff\xfe"),  # quarantined + quarantine_reason (21)
    ],
    ids=["uuid-billed", "uuid-parked", "domain-parked", "quarantine-reason"],
)
def test_a_measure_with_a_non_utf8_string_field_is_dead_lettered(
    store: Store, owned: bool, extra: bytes
) -> None:
    raw = batch_with(one_measure() + extra)
    assert_dead_lettered(store, collector(store, owned=owned), raw)


@pytest.mark.parametrize("owned", [True, False], ids=["billed", "parked"])
def test_a_mac_or_device_that_is_not_utf8_is_kept_with_its_bytes_escaped(store: Store, owned: bool) -> None:
    """Informational fields, read only for the measures parked, quarantined or taken one by one:
    the measure is applied (billed or parked), those fields shown with \\xNN escapes."""
    c = collector(store, owned=owned)
    raw = batch_with(one_measure() + b"\x72\x02\xff\xfe" + b"\x6a\x03v\xff1")  # mac (14), device (13)
    out = c.apply_batches([Record(raw, None, "m/0@1")])
    assert out.dead_letters == []
    assert out.billed_bytes == (100 if owned else 0)
    if not owned:
        (parked,) = store.parked_rows()
        assert (parked.mac, parked.device) == ("\\xff\\xfe", "v\\xff1")


def test_a_batch_with_a_non_utf8_stream_id_is_dead_lettered_not_applied(store: Store) -> None:
    """Not applied (its stream mark would be a BLOB), and the good batch beside it in the chunk is
    (sorting (bytes, int) against (str, int) would raise TypeError)."""
    c = collector(store)
    good = Stream("good").batch([M(T0, T0 + MIN, 1234)])
    bad = batch_with(one_measure(), stream_id="", tail=b"\x22\x02\xff\xfe")
    out = c.apply_batches([Record(good, None, "m/0@1"), Record(bad, None, "m/0@2")])
    assert out.billed_bytes == 1234
    assert [d.raw for d in out.dead_letters] == [bad]


@pytest.mark.parametrize("field", ["account", "id", "description_extra"])
def test_an_event_with_a_lone_surrogate_escape_is_dead_lettered(store: Store, field: str) -> None:
    _, value = usage_event("VM.CREATE", VM1, ACCT_A, T0)
    doc = json.loads(value)
    name = "foo" if field == "description_extra" else field
    raw = json.dumps({**doc, name: "x\ud800"}).encode()  # '\\ud800' on the wire: valid JSON, valid UTF-8
    assert b"\\ud800" in raw
    with pytest.raises(BadInput):  # what the service catches and dead-letters
        cloudstack.parse_event(raw)
    assert_dead_lettered(store, collector(store, owned=False), raw, source="lifecycle")


def test_an_async_job_event_whose_job_result_string_nests_too_deep_does_not_stop_the_loop(
    store: Store,
) -> None:
    """A jobResult string that is not JSON is ignored (the event kept for audit), also when it is
    nested too deep for json.loads (a RecursionError, not a ValueError)."""
    job = {
        "jobId": "1", "commandEventType": "VM.CREATE", "instanceUuid": VM1, "instanceType": "VirtualMachine",
        "account": ACCT_A, "status": "SUCCEEDED", "eventDateTime": cs_time(T0),
        "jobResult": "[" * 100_000 + "]" * 100_000,  # 200 KB: under the 1 MiB event limit
    }  # fmt: skip
    raw = json.dumps(job).encode()
    out = collector(store, owned=False).apply_events([Record(raw, None, "topic/0@7")])  # must not raise
    assert out.events + len(out.dead_letters) == 1  # stored like any unreadable jobResult, or dead-lettered


SECRET = "webhook-secret"


def post(client, body: bytes):  # type: ignore[no-untyped-def]
    return client.post(PATH, data=body, headers={"X-CS-Signature": signature(body, SECRET),
                                                 "Content-Type": "application/json"})  # fmt: skip


def test_a_signed_webhook_delivery_with_a_lone_surrogate_is_dead_lettered_and_answered_200(
    store: Store,
) -> None:
    hook = WebhookInput(SECRET, wait_s=2.0)
    app = create_app(store, webhook=hook)
    feeder = Feeder(collector(store, owned=False), [hook], Metrics(), tick_seconds=3600, poll_timeout=0.05)
    failures: list[BaseException] = []

    def loop() -> None:
        try:
            while not feeder.stop_event.is_set():
                feeder.step()
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        client = app.test_client()
        _, value = usage_event("VM.CREATE", VM1, ACCT_A, T0)
        bad = json.dumps({**json.loads(value), "description": "\ud800"}).encode()
        first = post(client, bad)
        _, good = usage_event("VM.START", VM1, ACCT_A, T0)
        second = post(client, good)  # a good event after it
        status = feeder.status()
    finally:
        feeder.stop()
        thread.join(10)
    assert (first.status_code, second.status_code, status["failing"]) == (200, 200, "")
    assert [store.dead_letter_by_id(letter.id).raw for letter in store.dead_letters()] == [bad]  # type: ignore[union-attr]


def bare_measure(**fields: object) -> pb.IPMeasure:
    m = pb.IPMeasure(
        header=2, saddr=int(ipaddress.IPv4Address("203.0.113.10")), bytes=100, start=T0, end=T0 + MIN,
        instance_uuid=VM1, domain_name="i-2-10-VM", mac="02:00:3a:7b:00:01",
    )  # fmt: skip
    m.address = ipaddress.ip_address("203.0.113.10").packed
    for name, value in fields.items():
        setattr(m, name, value)
    return m


@pytest.mark.parametrize(
    "measure",
    [
        bare_measure(traffic_type=pb.PUBLIC).SerializeToString(),  # no direction field
        bare_measure(traffic_type=pb.PUBLIC, direction=pb.DIRECTION_UNSPECIFIED).SerializeToString(),
        bare_measure(traffic_type=pb.PUBLIC).SerializeToString() + b"\x30\x07",  # direction 7: unknown enum
    ],
    ids=["absent", "unspecified", "unknown-7"],
)
def test_a_kvmeter_measure_without_a_known_direction_is_not_billed_as_sent(
    store: Store, measure: bytes
) -> None:
    c = collector(store)
    raw = batch_with(measure)
    out = c.apply_batches([Record(raw, None, "m/0@1")])
    sent = {
        k: v
        for k, v in store.net_usage().items()
        if k.usage_type in (NETWORK_BYTES_SENT, NETWORK_BYTES_RECEIVED)
    }
    assert (out.billed_bytes, sent) == (0, {}), "its direction was guessed"
    assert [d.raw for d in out.dead_letters] == [raw]


def test_ingest_of_a_deeply_nested_json_measures_file_dead_letters_it(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "measures.json"
    path.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    out = ingest_measures(collector(store), path)
    assert len(out.dead_letters) == 1


def test_bytes_added_to_a_window_past_int64_are_not_silently_rounded(store: Store) -> None:
    """SQLite would turn `quantity + excluded.quantity` past int64 into a REAL (2**63 exactly, not
    the bytes added); the sum past int64 is refused instead, as PostgreSQL's `bigint out of range`
    is, and dead-lettered. Each measure alone is a valid int64."""
    c = collector(store)
    stream = Stream("s1")
    added = 0
    for nbytes in (INT64_MAX, 5):
        out = c.apply_batches([Record(stream.batch([M(T0, T0 + MIN, nbytes)]), None, "m/0@1")])
        added += out.billed_bytes
    stored = sum(v for k, v in store.net_usage().items() if k.usage_type == NETWORK_BYTES_SENT)
    assert stored == added, f"billed {added} bytes, the window holds {stored}"


ROUTER_OWNER = {"ownerAccountUuid": ACCT_A, "ownerAccountName": "alice"}


def router_bytes(start: int, nbytes: int) -> M:
    return M(start, start + 1000, nbytes, direction=pb.VM_TX, instance=ROUTER, domain="r-5-VM",
             mac="02:00:05:00:00:03")  # fmt: skip


def test_owner_hints_of_a_chunk_isolated_record_by_record_reach_the_store(store: Store) -> None:
    """PostgreSQL refuses a stream_id over varchar(128) (DataError): isolation.py applies the
    chunk again record by record. The owner hints the first attempt learned are not kept in
    memory as if stored, so the second stores them: another replica (or this one restarted)
    bills the router's bytes instead of parking them. SQLite does not enforce varchar lengths: a
    trigger stands in for PostgreSQL's refusal."""
    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER pg_varchar BEFORE INSERT ON stream_marks WHEN length(NEW.stream_id) > 128 "
            "BEGIN SELECT RAISE(ABORT, 'value too long for type character varying(128)'); END"
        )
    clock = Clock(T0 + MIN)
    a = Collector(store, Settings(), clock)
    good = Stream("s1", owners={"r-5-VM": ROUTER_OWNER})
    long = Stream("s" * 200)
    out = a.apply_batches([Record(good.batch([router_bytes(T0, 100)]), None, "m/0@1"),
                           Record(long.batch([router_bytes(T0, 5)]), None, "m/0@2")])  # fmt: skip
    assert [d.reason for d in out.dead_letters] == ["unstorable"]
    good.owners = {}
    other = Collector(store, Settings(), clock)  # another replica, or this one restarted
    other.apply_batches([Record(good.batch([router_bytes(T0 + 1000, 200)]), None, "m/0@3")])
    billed = sum(
        q for k, q in store.net_usage().items() if k.account == ACCT_A and k.usage_type == NETWORK_BYTES_SENT
    )
    assert (billed, store.stats(0)["parked_bytes"]) == (300, 0)
