"""The collector's CLI at its edges: ids and types past 64 bits, an all-in-one's file for `costs`
and `reconcile`, a live store that is not there for `rebuild`, every correction listed, a
negative grace."""

from __future__ import annotations

import json
import time
from pathlib import Path

import sqlalchemy as sa
from click.testing import CliRunner

from kvmeter.cli import main
from kvmeter.collector.model import DeadLetter, Record, Settings
from kvmeter.collector.schema import corrections, lifecycle_events
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store, schema_version
from tests.collector_support import ACCT_A, HOUR, VM1, usage_event
from tests.harness import cloudstack_api as api
from tests.integration.test_costs_front import store_with_usage, write_tariff  # noqa: F401 - fixture

PASSWORD = "Tr0ub4dor-and-3"
UNREACHABLE = f"postgresql://kvmeter:{PASSWORD}@127.0.0.1:1/usage"  # port 1: refused at once


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output + (
        repr(result.exception) if result.exit_code not in (0, 1, 2) else ""
    )


def test_an_id_or_type_beyond_64_bits_is_a_usage_error_not_a_traceback(tmp_path: Path) -> None:
    """Integers the store cannot hold (ids, `--after`, `--type`) are refused as bad parameters
    (exit 2, the option named), as the API's parameters are, never an OverflowError from the
    database driver."""
    db = f"sqlite:///{tmp_path / 'usage.db'}"
    big = "99999999999999999999"
    for args in (
        ["usage", "--db", db, "--start", "2026-01-01", "--end", "2026-01-02", "--type", big],
        ["dead-letters", "list", "--db", db, "--after", big],
        ["dead-letters", "show", big, "--db", db],
        ["dead-letters", "retry", big, "--db", db],
        ["credentials", "revoke", big, "--db", db],
    ):
        code, out = run(*args)
        assert code == 2, (args, out)
        assert "Invalid value" in out, (args, out)
    code, out = run("dead-letters", "show", str(2**63 - 1), "--db", db)  # the largest id: simply none
    assert (code, out.strip()) == (1, f"Error: no dead letter {2**63 - 1}")


def test_costs_takes_an_all_in_one_config_as_the_other_store_commands_do(
    tmp_path: Path,
    store_with_usage: str,  # noqa: F811 - the fixture
) -> None:
    """`[billing] tariff_file` is a collector's or an all-in-one's setting: `kvmeter costs
    --config allinone.toml` rates the all-in-one's store under its tariff (as `prune`,
    `credits`, `credentials` and `dead-letters` take that file), the same as --db and --tariff."""
    write_tariff(tmp_path / "tariff.toml", "CHF")
    (tmp_path / "allinone.toml").write_text(
        f'[agent]\npoll_interval = 10.0\n\n[store]\nurl = "{store_with_usage}"\n\n'
        '[billing]\ntariff_file = "tariff.toml"\n'
    )
    code, out = run("costs", "--config", str(tmp_path / "allinone.toml"), "--format", "json")
    assert code == 0, out
    code2, out2 = run("costs", "--db", store_with_usage, "--tariff", str(tmp_path / "tariff.toml"),
                      "--format", "json")  # fmt: skip
    assert code2 == 0, out2
    got, want = json.loads(out), json.loads(out2)
    assert got["currency"] == "CHF"
    assert got["accounts"], got
    assert [(a["account"], a["cost"]) for a in got["accounts"]] == [
        (a["account"], a["cost"]) for a in want["accounts"]
    ]


def test_rebuild_from_a_live_store_that_is_not_there_is_a_clear_error(tmp_path: Path) -> None:
    """`kvmeter rebuild --live URL` with a store that cannot be reached, a SQLite path that does
    not exist (a typo) or a database without kvmeter's tables says so (exit 1, the URL without
    its password) before it makes and fills the new store: not a traceback after the replay,
    and no empty file made at the mistyped path."""
    (tmp_path / "empty.toml").write_text("")
    other = tmp_path / "other.db"
    sa.create_engine(f"sqlite:///{other}").connect().close()  # a database, not kvmeter's
    for live, says in (
        (UNREACHABLE, "cannot open the live store postgresql://kvmeter:***@127.0.0.1:1/usage"),
        (f"sqlite:///{tmp_path / 'typo.db'}", "does not exist"),
        (f"sqlite:///{other}", "holds no kvmeter usage"),
    ):
        into = tmp_path / "new.db"
        code, out = run("rebuild", "--config", str(tmp_path / "empty.toml"), "--live", live,
                        "--into", f"sqlite:///{into}")  # fmt: skip
        assert code == 1, (live, out)
        assert out.startswith("Error: "), (live, out)
        assert says in out, (live, out)
        assert PASSWORD not in out
        assert not into.exists()  # nothing made for a rebuild that cannot compare
    assert not (tmp_path / "typo.db").exists()


def test_corrections_lists_every_correction_not_the_first_thousand(tmp_path: Path) -> None:
    """`kvmeter corrections` lists every applied correction (as /v1/corrections pages through
    them all), not silently the oldest 1000 with a count of 1000."""
    db = f"sqlite:///{tmp_path / 'usage.db'}"
    store = Store(db)
    store.migrate()
    n = 1005
    with store.write() as conn:
        conn.execute(
            sa.insert(lifecycle_events),
            [{"event_id": f"e{i}", "resource_uuid": f"vm-{i}", "time_ms": i, "raw": b"{}",
              "normalized": b"{}", "received_ms": i} for i in range(n)],
        )  # fmt: skip
        conn.execute(
            sa.insert(corrections),
            [{"event_id": f"e{i}", "resource": f"vm-{i}", "resource_type": "VM", "event_type": "VM.STOP",
              "time_ms": 1_000 + i, "account": "acct", "offering": "", "source": "listVirtualMachines",
              "reason": "stopped in CloudStack", "created_ms": 5_000} for i in range(n)],
        )  # fmt: skip
    store.close()
    code, out = run("corrections", "--db", db, "--format", "json")
    assert code == 0, out
    listed = json.loads(out)
    assert [r["resource"] for r in listed] == [f"vm-{i}" for i in range(n)]
    code, out = run("corrections", "--db", db)
    assert code == 0, out
    assert out.rstrip().endswith(f"{n} correction(s)"), out[-200:]
    assert "vm-1004 " in out


def test_ingest_refuses_a_negative_grace(tmp_path: Path) -> None:
    """`kvmeter ingest --grace-seconds` takes what the config's `grace_seconds` takes (>= 0): a
    negative grace is a usage error (exit 2), never final records of windows still open (a
    running VM's current hour made final with the minutes so far)."""
    now = int(time.time() * 1000)
    start = now - now % 3_600_000 - 3_600_000
    events = [usage_event(e, "11111111-1111-4111-8111-111111111111", "acct-a", start)
              for e in ("VM.CREATE", "VM.START")]  # fmt: skip
    (tmp_path / "events.jsonl").write_bytes(b"\n".join(v for _, v in events) + b"\n")
    db = f"sqlite:///{tmp_path / 'usage.db'}"
    code, out = run(
        "ingest", "--db", db, "--events", str(tmp_path / "events.jsonl"), "--grace-seconds", "-86400"
    )
    assert code == 2, out
    assert "--grace-seconds" in out
    code, out = run("usage", "--db", db, "--start", "1970-01-01", "--end", "9999-12-31", "--format", "json")
    assert code == 0, out
    assert [r for r in json.loads(out) if r["final"]] == []


def test_reconcile_takes_an_all_in_one_config(tmp_path: Path) -> None:
    """The all-in-one reconciles against CloudStack's API under its [cloudstack] section:
    `kvmeter reconcile --dry-run --config allinone.toml` runs that pass once over the all-in-one's
    store (as `prune`, `credits`, `dead-letters` take that file), not "agent: unknown key"."""
    db = f"sqlite:///{tmp_path}/usage.db"
    start = (int(time.time() * 1000) // HOUR - 1) * HOUR
    store = Store(db)
    store.migrate()
    events = [usage_event(e, VM1, ACCT_A, start) for e in ("VM.CREATE", "VM.START")]
    Collector(store, Settings(), lambda: start + HOUR).apply_events([Record(v, k) for k, v in events])
    store.close()
    with api.CloudStackApiDouble() as double:
        double.cloud["listAccounts"] = [api.account(ACCT_A, "alice")]
        double.cloud["listVirtualMachines"] = [api.vm(VM1, "web-1", "alice", "Running", "small", start)]
        config = tmp_path / "allinone.toml"
        config.write_text(
            f'[agent]\npoll_interval = 10.0\n\n[store]\nurl = "{db}"\n\n[cloudstack]\n'
            f'endpoint = "{double.endpoint}"\napi_key = "{api.API_KEY}"\nsecret_key = "{api.SECRET}"\n'
        )
        code, out = run("reconcile", "--dry-run", "--config", str(config))
    assert code == 0, out
    assert "would be made" in out


def test_dead_letter_shown_with_its_control_characters_escaped(tmp_path: Path) -> None:
    """`kvmeter dead-letters show` prints a letter's bytes as text, but its control characters
    escaped: whoever published the bytes (anyone on the bus) must not drive the operator's
    terminal with escape sequences. Newlines and tabs stay; `list` escapes them too."""
    db = f"sqlite:///{tmp_path / 'usage.db'}"
    store = Store(db)
    store.migrate()
    hostile = DeadLetter("lifecycle", "file:1\x1b[2J", b'{"a":\n\t"\x1b]0;owned\x07"}', "unknown_event", "?")
    with store.write() as conn:
        store.dead_letter(conn, [hostile], 1_000)
    store.close()
    code, out = run("dead-letters", "show", "1", "--db", db)
    assert code == 0, out
    assert '{"a":\n\t"\\x1b]0;owned\\x07"}' in out
    assert "file:1\\x1b[2J" in out
    code, out = run("dead-letters", "list", "--db", db)
    assert code == 0, out
    assert "\x1b" not in out
    assert "file:1\\x1b[2J" in out


def test_rebuild_from_a_live_store_an_older_release_wrote_says_to_migrate_it_first(tmp_path: Path) -> None:
    """`kvmeter rebuild` reads the live store with this release's queries and never migrates it:
    one an older release wrote (its schema behind) is refused with both versions and what to do,
    before the new store is made, not a traceback (`no such column`) after the replay."""
    (tmp_path / "empty.toml").write_text("")
    live = tmp_path / "live.db"
    store = Store(f"sqlite:///{live}")
    store.migrate()
    with store.write() as conn:
        conn.execute(sa.delete(schema_version).where(schema_version.c.version > 12))
    store.close()
    into = tmp_path / "new.db"
    code, out = run("rebuild", "--config", str(tmp_path / "empty.toml"), "--live", f"sqlite:///{live}",
                    "--into", f"sqlite:///{into}")  # fmt: skip
    assert code == 1, out
    assert "is at schema version 12, older than" in out, out
    assert not into.exists()
