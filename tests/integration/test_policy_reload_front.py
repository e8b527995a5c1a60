"""SIGHUP re-reads [policy]: `kvmeter collector` started from a TOML file (CloudStack's events by
its webhook input, no broker; and `kvmeter run --all-in-one`, from its events file), the file's
[policy] changed and a real SIGHUP sent. The change is recorded (billing_policies) and logged as a
warning, and it is put in force over the whole store at once: every resource recomputed under it
from all its events, final windows adjusted, so the records never mix two policies (the net equals
what the new policy gives for the same events). A [policy] value it does not know is refused on
reload: the one in force stays."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from kvmeter.collector.model import ALLOCATED_VM, RUNNING_VM
from kvmeter.collector.schema import billing_policies
from kvmeter.collector.store import Store
from kvmeter.pipeline.sim.simlibvirt import write_node_xml
from tests.collector_support import ACCT_A, MIN, VM1, usage_event, wait_for
from tests.harness.ports import free_port, wait_for_port
from tests.harness.processes import Process

SECRET = "policy-reload-secret"


class WebhookCollector(Process):
    def __init__(self, workdir: Path, db: str, port: int):
        super().__init__("collector", workdir)
        self.config = workdir / "collector.toml"
        self.db, self.port = db, port
        self.write("")

    def write(self, policy: str) -> None:
        self.config.write_text(
            f"""
[store]
url = "{self.db}"
[webhook]
secret_key = "{SECRET}"
[usage]
window_seconds = 60
grace_seconds = 60
tick_seconds = 0.5
[api]
listen = "127.0.0.1:{self.port}"
token = "policy-token-0123456"
{policy}"""
        )

    def args(self) -> list[str]:
        return [sys.executable, "-m", "kvmeter", "collector", "--config", str(self.config)]

    def hup(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)


def deliver(port: int, body: bytes) -> int:
    mac = base64.b64encode(hmac.new(SECRET.encode(), body, hashlib.sha256).digest()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/webhook/cloudstack", body=body, headers={"X-CS-Signature": mac})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def net(db: str) -> dict[int, int]:
    """Net quantity (records + adjustments) per usage type of VM1; every window of it final."""
    store = Store(db)
    try:
        out: dict[int, int] = {}
        for row in store.usage(0, 2**62, resource=VM1):
            out[row.key.usage_type] = out.get(row.key.usage_type, 0) + row.quantity
        return {k: v for k, v in out.items() if v}
    except sa.exc.OperationalError:  # not migrated yet: nothing
        return {}
    finally:
        store.close()


def policies(db: str) -> list[str]:
    store = Store(db)
    try:
        with store.read() as conn:
            bp = billing_policies.c
            return [str(r[0]) for r in conn.execute(sa.select(bp.policy).order_by(bp.id))]
    finally:
        store.close()


DEFAULT = {RUNNING_VM: 5 * MIN, ALLOCATED_VM: 15 * MIN}  # ALLOCATED from the create; RUNNING 5


@contextmanager
def collector_billing_vm1(tmp_path: Path) -> Iterator[tuple[WebhookCollector, str]]:
    """A collector started on a new store, VM1 created, started, stopped and destroyed half an
    hour ago by its webhook (whole minutes, long final), billed under the default policy."""
    port, db = free_port(), f"sqlite:///{tmp_path}/usage.db"
    at = (int(time.time() * 1000) // MIN - 30) * MIN
    proc = WebhookCollector(tmp_path, db, port)
    proc.start()
    try:
        wait_for_port("127.0.0.1", port, 60, "the collector's API")
        for kind, minutes in (("VM.CREATE", 0), ("VM.START", 5), ("VM.STOP", 10), ("VM.DESTROY", 15)):
            assert deliver(port, usage_event(kind, VM1, ACCT_A, at + minutes * MIN)[1]) == 200, proc.logs()
        wait_for(lambda: net(db) == DEFAULT, 60, "records", proc.logs)
        yield proc, db
    finally:
        proc.stop()


def test_sighup_puts_a_changed_policy_in_force_over_the_whole_store(tmp_path: Path) -> None:
    with collector_billing_vm1(tmp_path) as (proc, db):
        wait_for(lambda: len(policies(db)) == 1, 10, "the policy at start", proc.logs)

        proc.write('[policy]\nallocated_from = "first_start"\n')
        proc.hup()
        # ALLOCATED from the first start: 10 minutes, the 5 final windows before it adjusted to 0.
        want = {RUNNING_VM: 5 * MIN, ALLOCATED_VM: 10 * MIN}
        # The change is recorded once the last resource is recomputed: then every record follows it.
        wait_for(lambda: len(policies(db)) == 2, 30, "the new policy recorded", proc.logs)
        assert net(db) == want, proc.logs()
        [_, now] = policies(db)
        assert "allocated_from=first_start" in now
        assert "running=usage_and_state" in now
        wait_for(
            lambda: "billing policy changed on reload" in proc.logs(20_000), 10, "the warning", proc.logs
        )

        proc.write('[policy]\nallocated_from = "never"\n')  # unknown: refused, the one in force stays
        proc.hup()
        wait_for(lambda: "reload of policy refused" in proc.logs(20_000), 10, "the refusal", proc.logs)
        proc.write('[policy]\nallocated_from = "first_start"\n')  # the same again: nothing to do
        proc.hup()
        wait_for(lambda: "reloaded policy: unchanged" in proc.logs(20_000), 10, "unchanged", proc.logs)
        assert net(db) == want
        assert len(policies(db)) == 2
        assert proc.terminate() == 0, proc.logs()


def allinone_config(tmp_path: Path) -> tuple[Path, str, str]:
    """(the config file, its text without [policy], the store's URL) of an all-in-one whose events
    file creates, starts, stops and destroys VM1 (5 minutes running, 15 allocated) half an hour ago."""
    db = f"sqlite:///{tmp_path}/usage.db"
    at = (int(time.time() * 1000) // MIN - 30) * MIN
    events = tmp_path / "events.jsonl"
    events.write_bytes(
        b"\n".join(
            usage_event(kind, VM1, ACCT_A, at + minutes * MIN)[1]
            for kind, minutes in (("VM.CREATE", 0), ("VM.START", 5), ("VM.STOP", 10), ("VM.DESTROY", 15))
        )
        + b"\n"
    )
    config = tmp_path / "allinone.toml"
    base = f"""
[agent]
host_id = "aio"
poll_interval = 1
state_dir = "{tmp_path}/agent"
[libvirt]
uri = "{write_node_xml(tmp_path / "node.xml", [])}"
[metrics]
enabled = false
[store]
url = "{db}"
[usage]
window_seconds = 60
grace_seconds = 60
tick_seconds = 0.5
[api]
enabled = false
[lifecycle]
events_file = "{events}"
"""
    config.write_text(base)
    return config, base, db


def start_allinone(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kvmeter", "run", "--all-in-one", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop_allinone(proc: subprocess.Popen[bytes], log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(30)
    assert code == 0, log.read_text()[-3000:]


def test_the_all_in_one_puts_a_changed_policy_in_force_on_sighup(tmp_path: Path) -> None:
    config, base, db = allinone_config(tmp_path)
    log = tmp_path / "allinone.log"
    proc = start_allinone(config, log)
    try:
        wait_for(lambda: net(db) == DEFAULT, 60, "records", log.read_text)
        config.write_text(base + '[policy]\nallocated_from = "first_start"\n')
        proc.send_signal(signal.SIGHUP)
        want = {RUNNING_VM: 5 * MIN, ALLOCATED_VM: 10 * MIN}
        # The change is recorded once the last resource is recomputed: then every record follows it.
        recorded = lambda: "allocated_from=first_start" in policies(db)[-1]  # noqa: E731
        wait_for(recorded, 30, "the new policy recorded", log.read_text)
        assert net(db) == want, log.read_text()
        warned = lambda: "billing policy changed on reload" in log.read_text()  # noqa: E731
        wait_for(warned, 10, "the warning", log.read_text)
    finally:
        stop_allinone(proc, log)
