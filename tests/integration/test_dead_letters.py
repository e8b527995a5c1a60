"""Dead letters re-driven through the live path on both stores, after their cause is fixed: a
retry is idempotent (twice bills once), a letter that still fails stays with its new reason, one
that succeeds is resolved and kept. Then the `kvmeter dead-letters` command and the operator-only
API endpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from kvmeter.collector.api import authenticator, create_app
from kvmeter.collector.credentials import Credentials, CredentialSource, Grant, scoped, token_digest
from kvmeter.collector.model import ALLOCATED_VM, NETWORK_BYTES_SENT, DeadLetter, Record, Settings
from kvmeter.collector.redrive import ALREADY_RESOLVED, FAILED, RESOLVED, Redriver
from kvmeter.collector.service import Collector
from kvmeter.collector.store import MIGRATIONS, Store, schema_version
from tests.collector_support import ACCT_A, HOUR, T0, VM1, Clock, M, Stream, usage_event

NOW = T0 + 3 * HOUR
LIMIT = 2048
KVMETER = [sys.executable, "-m", "kvmeter"]


def oversized_create() -> tuple[bytes, bytes]:
    """VM1's VM.CREATE with a long description: over LIMIT, far under the 1 MiB default."""
    key, value = usage_event("VM.CREATE", VM1, ACCT_A, T0)
    return key, json.dumps({**json.loads(value), "description": "x" * LIMIT}).encode()


def allocated(store: Store) -> dict[int, int]:
    """{window start: ms} of VM1's ALLOCATED_VM usage."""
    return {k.window_start_ms: v for k, v in store.net_usage().items() if k.usage_type == ALLOCATED_VM}


def only_letter(store: Store) -> int:
    (letter,) = store.dead_letters(state="all")
    return letter.id


def test_an_oversized_event_is_retried_after_the_limit_is_raised(store: Store) -> None:
    key, value = oversized_create()
    out = Collector(store, Settings(max_event_bytes=LIMIT), Clock(NOW)).apply_events(
        [Record(value, key, "t/0@3")]
    )
    assert [d.reason for d in out.dead_letters] == ["oversized_event"]
    letter_id = only_letter(store)
    assert allocated(store) == {}

    # The limit unchanged: still refused, still open, counted.
    same = Redriver(store, Settings(max_event_bytes=LIMIT), Clock(NOW)).retry(letter_id)
    assert same is not None
    assert same.result == FAILED
    assert (same.letter.state, same.letter.reason, same.letter.retries) == ("open", "oversized_event", 1)

    # Raised: applied through the live path and resolved; the letter is kept, with its bytes and key.
    raised = Redriver(store, Settings(), Clock(NOW + 1000))
    done = raised.retry(letter_id)
    assert done is not None
    assert done.result == RESOLVED
    assert done.applied.events == 1
    assert (done.letter.state, done.letter.retries, done.letter.resolved_ms) == ("resolved", 2, NOW + 1000)
    billed = allocated(store)
    assert billed == {T0: HOUR, T0 + HOUR: HOUR, T0 + 2 * HOUR: HOUR, NOW: 1000}  # allocated since T0
    kept = store.dead_letter_by_id(letter_id)
    assert kept is not None
    assert (kept.raw, kept.key, kept.origin) == (value, key, "t/0@3")

    # Twice bills once: a resolved letter is not applied again, and neither is its event.
    again = raised.retry(letter_id)
    assert again is not None
    assert again.result == ALREADY_RESOLVED
    assert again.letter.retries == 2
    assert Collector(store, Settings(), Clock(NOW)).apply_events([Record(value, key)]).known_events == 1
    assert allocated(store) == billed
    assert store.dead_letters() == []  # none open
    assert store.stats(0)["dead_letters"] == 0
    assert raised.retry(letter_id + 1000) is None


def test_a_measure_batch_dead_lettered_for_an_unknown_reason_is_re_driven_once(store: Store) -> None:
    """A batch a past version refused (the reason no longer applies): applied by the retry, and a
    crash between the apply and the marking only means the next retry finds it applied."""
    clock = Clock(NOW)
    live = Collector(store, Settings(), clock)
    live.apply_events([Record(value, key) for key, value in (
        usage_event("VM.CREATE", VM1, ACCT_A, T0), usage_event("VM.START", VM1, ACCT_A, T0))])  # fmt: skip
    stream = Stream("stream-h1", "h1")
    first, second = stream.batch([M(T0 + 60_000, T0 + 120_000, 700)]), stream.batch([M(T0, T0 + 60_000, 50)])
    assert live.apply_batches([Record(second)]).batches == 1  # the stream went on past the lost one
    with store.write() as conn:
        store.dead_letter(conn, [DeadLetter("measures", "kvmeter.measures/0@41", first, "unknown", "?")], NOW)
    letter_id = only_letter(store)

    def sent() -> int:
        return sum(v for k, v in store.net_usage().items() if k.usage_type == NETWORK_BYTES_SENT)

    assert sent() == 50
    redriver = Redriver(store, Settings(), clock)
    done = redriver.retry(letter_id)
    assert done is not None
    assert (done.result, done.applied.batches, done.applied.billed_bytes) == (
        RESOLVED,
        1,
        700,
    )
    assert sent() == 750
    # As if the marking had been lost: open again, retried, found applied, resolved, nothing billed.
    with store.write() as conn:
        conn.exec_driver_sql("UPDATE dead_letters SET resolved_ms = NULL")
    again = Redriver(store, Settings(), clock).retry(letter_id)
    assert again is not None
    assert (again.result, again.applied.duplicates) == (RESOLVED, 1)
    assert sent() == 750


def test_a_retry_that_fails_again_keeps_the_letter_with_its_new_reason(store: Store) -> None:
    _, value = usage_event("VM.CREATE", VM1, ACCT_A, T0)
    wrong = json.dumps({**json.loads(value), "account": 123}).encode()
    with store.write() as conn:
        letters = [DeadLetter("lifecycle", "f:1", wrong, "unknown", "?"),
                   DeadLetter("measures", "f:2", b"\xff\xfepoison", "unknown", "?")]  # fmt: skip
        store.dead_letter(conn, letters, NOW)
    redriver = Redriver(store, Settings(), Clock(NOW))
    reasons = {}
    for letter in store.dead_letters():
        done = redriver.retry(letter.id)
        assert done is not None
        assert done.result == FAILED
        reasons[done.letter.source] = (done.letter.reason, done.letter.state, done.letter.retries)
    assert reasons == {"lifecycle": ("wrong_type", "open", 1), "measures": ("malformed_protobuf", "open", 1)}
    assert len(store.dead_letters()) == 2
    assert allocated(store) == {}
    assert "123" not in {k.account for k in store.net_usage()}


def test_letters_of_a_store_before_retries_migrate_open(store: Store, store_url: str) -> None:
    with store.write() as conn:  # make it what a store before migration 12 looked like
        for column in ("record_key", "retries", "retried_ms", "resolved_ms"):
            conn.execute(sa.text(f"ALTER TABLE dead_letters DROP COLUMN {column}"))
        conn.execute(sa.delete(schema_version).where(schema_version.c.version == 12))
        conn.execute(
            sa.text("INSERT INTO dead_letters (digest, source, origin, raw, reason, message, created_ms) "
                    "VALUES ('d1', 'lifecycle', 'f:1', :raw, 'malformed_json', 'm', 1)"), {"raw": b"{"},
        )  # fmt: skip
    store.close()
    upgraded = Store(store_url)
    assert upgraded.migrate() == max(version for version, _ in MIGRATIONS)
    (letter,) = upgraded.dead_letters()
    assert (letter.reason, letter.retries, letter.state, letter.size, letter.key) == (
        "malformed_json",
        0,
        "open",
        1,
        None,
    )
    done = Redriver(upgraded, Settings(), Clock(NOW)).retry(letter.id)
    assert done is not None
    assert (done.result, done.letter.reason, done.letter.retries) == (FAILED, "malformed_json", 1)
    upgraded.close()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KVMETER, "dead-letters", *args], capture_output=True, text=True, timeout=120)


def test_the_kvmeter_command_lists_shows_and_retries(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/usage.db"
    tight, raised = tmp_path / "tight.toml", tmp_path / "collector.toml"
    tight.write_text(f'[store]\nurl = "{db}"\n[lifecycle]\nmax_event_bytes = {LIMIT}\n')
    raised.write_text(f'[store]\nurl = "{db}"\n[lifecycle]\nmax_event_bytes = {LIMIT * 4}\n')
    _key, value = oversized_create()
    events = tmp_path / "events.jsonl"
    events.write_bytes(value + b"\n")
    ingest = subprocess.run([*KVMETER, "ingest", "--db", db, "--config", str(tight), "--events", str(events)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert ingest.returncode == 0, ingest.stderr
    assert "1 dead-lettered" in ingest.stderr

    listed = run("list", "--config", str(tight), "--format", "json")
    assert listed.returncode == 0, listed.stderr
    (doc,) = json.loads(listed.stdout)
    assert (doc["state"], doc["source"], doc["reason"], doc["size"]) == (
        "open",
        "lifecycle",
        "oversized_event",
        len(value),
    )
    letter_id = str(doc["id"])
    table = run("list", "--db", db)
    assert table.stdout.split("\n")[0].split() == [
        "id",
        "state",
        "source",
        "reason",
        "bytes",
        "created",
        "retries",
        "origin",
    ]
    assert table.stdout.split("\n")[1].split()[:4] == [letter_id, "open", "lifecycle", "oversized_event"]
    shown = run("show", letter_id, "--db", db, "--format", "json")
    assert json.loads(shown.stdout)["raw_text"] == value.decode()
    assert value.decode()[:100] in run("show", letter_id, "--db", db).stdout

    still = run("retry", letter_id, "--config", str(tight))
    assert still.returncode == 1
    assert still.stdout.split("\n")[1].split()[:3] == [letter_id, "failed", "oversized_event"]
    fixed = run("retry", letter_id, "--config", str(raised), "--format", "json")
    assert fixed.returncode == 0, fixed.stderr
    (result,) = json.loads(fixed.stdout)
    assert (result["result"], result["letter"]["state"], result["applied"]["events"]) == (
        "resolved",
        "resolved",
        1,
    )
    twice = run("retry", letter_id, "--config", str(raised))
    assert twice.returncode == 0
    assert twice.stdout.split("\n")[1].split()[:2] == [
        letter_id,
        "already_resolved",
    ]
    assert run("list", "--db", db, "--format", "json").stdout.strip() == "[]"
    resolved = json.loads(run("list", "--db", db, "--state", "resolved", "--format", "json").stdout)
    assert [(r["id"], r["retries"]) for r in resolved] == [(int(letter_id), 2)]
    missing = run("show", "999", "--db", db)
    assert missing.returncode == 1
    assert "no dead letter 999" in missing.stderr
    store = Store(db)
    assert len(allocated(store)) >= 1
    store.close()


OPERATOR, TENANT = "operator-token", "tenant-token"


def test_the_api_lists_shows_and_retries_for_operators_only(store: Store) -> None:
    key, value = oversized_create()
    Collector(store, Settings(max_event_bytes=LIMIT), Clock(NOW)).apply_events([Record(value, key, "t/0@3")])
    grants = {token_digest(OPERATOR): Grant("ops"), token_digest(TENANT): scoped("tenant", [ACCT_A])}
    auth = authenticator(store, CredentialSource(Credentials(grants)), loopback=False)
    client = create_app(store, auth=auth, settings=Settings()).test_client()
    letter_id = only_letter(store)
    for method, path in (("GET", "/v1/dead-letters"), ("GET", f"/v1/dead-letters/{letter_id}"),
                         ("POST", f"/v1/dead-letters/{letter_id}/retry")):  # fmt: skip
        refused = client.open(path, method=method, headers={"Authorization": f"Bearer {TENANT}"})
        assert refused.status_code == 403, path
        assert "operator" in refused.get_json()["error"]
        assert client.open(path, method=method).status_code == 401
    assert store.dead_letters()[0].retries == 0  # the refused retry did nothing

    ops = {"Authorization": f"Bearer {OPERATOR}"}
    listed = client.get("/v1/dead-letters", headers=ops).get_json()
    assert [(d["id"], d["reason"]) for d in listed["dead_letters"]] == [(letter_id, "oversized_event")]
    shown = client.get(f"/v1/dead-letters/{letter_id}", headers=ops).get_json()
    assert shown["raw_text"] == value.decode()
    done = client.post(f"/v1/dead-letters/{letter_id}/retry", headers=ops)
    assert done.status_code == 200
    assert done.get_json()["result"] == "resolved"
    again = client.post(f"/v1/dead-letters/{letter_id}/retry", headers=ops).get_json()
    assert again["result"] == "already_resolved"
    assert client.get("/v1/dead-letters", headers=ops).get_json()["dead_letters"] == []
    assert client.get("/v1/dead-letters?state=resolved", headers=ops).get_json()["count"] == 1
    for path in ("/v1/dead-letters/99", f"/v1/dead-letters/{2**70}"):
        assert client.get(path, headers=ops).status_code == 404
    for query in ("state=bogus", "limit=0", "after=-1", "source=x"):
        assert client.get(f"/v1/dead-letters?{query}", headers=ops).status_code == 400, query
