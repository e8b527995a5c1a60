"""`kvmeter run --all-in-one` from a TOML file with [handoff]: the items waiting in its store's
outbox reach a real local webhook receiver, and a clean stop leaves nothing pending."""

from __future__ import annotations

import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

from kvmeter.collector.model import UsageKey
from kvmeter.collector.store import Store
from kvmeter.pipeline.sim.simlibvirt import write_node_xml
from tests.collector_support import HOUR, T0, VM1, wait_for
from tests.handoff_support import Receiver, net_per_key
from tests.integration.test_handoff_front import final_net, outbox
from tests.integration.test_handoff_relay import fill

ACCT = "acct-priced"
TARIFF = """
currency = "EUR"
decimals = 2
[[rate]]
usage_type = "RUNNING_VM"
per_hour = "0"
[[rate]]
usage_type = "ALLOCATED_VM"
per_hour = "0"
[[rate]]
usage_type = "IP_ADDRESS"
per_hour = "0"
[[rate]]
usage_type = "NETWORK_BYTES_SENT"
traffic_type = "public"
unit = "B"
price = "0.001"
[[rate]]
usage_type = "NETWORK_BYTES_RECEIVED"
traffic_type = "public"
unit = "B"
price = "0"
"""


def config_head(tmp_path: Path, uri: str, db: str) -> str:
    """The sections both tests share: a host with no VM, no metrics, no API."""
    return f"""
[agent]
host_id = "aio"
poll_interval = 1
state_dir = "{tmp_path}/agent"
[libvirt]
uri = "{uri}"
[metrics]
enabled = false
[store]
url = "{db}"
[usage]
tick_seconds = 0.5
[api]
enabled = false
"""


def start_all_in_one(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kvmeter", "run", "--all-in-one", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def test_the_all_in_one_hands_items_off_to_a_webhook(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/usage.db"
    fill(db).close()  # final records and adjustments, their items pending in the outbox
    made, pending = outbox(db)
    assert pending == len(made) == 18
    uri = write_node_xml(tmp_path / "node.xml", [])  # a host with no VM: only the hand-off works
    with Receiver(fail_first=1) as receiver:
        config = tmp_path / "allinone.toml"
        config.write_text(
            config_head(tmp_path, uri, db)
            + f"""
[handoff]
webhook_url = "{receiver.url}"
webhook_headers = {{ Authorization = "Bearer aio" }}
retry_initial_seconds = 0.05
retry_max_seconds = 0.2
poll_seconds = 0.2
"""
        )
        log = tmp_path / "allinone.log"
        proc = start_all_in_one(config, log)
        try:
            wait_for(lambda: set(receiver.deduplicated()) == made, 60, "every item posted", log.read_text)
            wait_for(lambda: outbox(db)[1] == 0, 30, "the outbox drained", log.read_text)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
        assert code == 0, log.read_text()[-3000:]
        assert receiver.duplicates() == len(made)  # each refused once, then acknowledged
        assert net_per_key(receiver.deduplicated()) == final_net(db)[0]
        assert {h["authorization"] for _, _, h in receiver.posts} == {"Bearer aio"}


def test_the_all_in_one_prices_the_items_it_makes_under_its_tariff(tmp_path: Path) -> None:
    """With [billing] as well: records the all-in-one finalizes reach the receiver with their cost."""
    db = f"sqlite:///{tmp_path}/usage.db"
    store = Store(db)
    store.migrate()
    keys = [UsageKey(ACCT, 4, VM1, "", "public", T0 + w * HOUR, T0 + (w + 1) * HOUR) for w in range(3)]
    with store.write() as conn:  # open records of windows long past: the first tick finalizes them
        store.add_bytes(conn, {k: 1500 + w for w, k in enumerate(keys)}, {}, 0, 1)
    store.close()
    (tmp_path / "tariff.toml").write_text(TARIFF)
    uri = write_node_xml(tmp_path / "node.xml", [])
    with Receiver() as receiver:
        config = tmp_path / "allinone.toml"
        config.write_text(
            config_head(tmp_path, uri, db)
            + f"""
[billing]
tariff_file = "tariff.toml"
[handoff]
webhook_url = "{receiver.url}"
poll_seconds = 0.2
"""
        )
        log = tmp_path / "allinone.log"
        proc = start_all_in_one(config, log)
        try:
            wait_for(lambda: len(receiver.deduplicated()) == 3, 60, "the three records posted", log.read_text)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
        assert code == 0, log.read_text()[-3000:]
    posted = sorted(receiver.deduplicated().values(), key=lambda i: i["start_ms"])
    # 1500, 1501, 1502 bytes at 0.001 a byte, 2 decimals: 1.50, then the rounded total's steps.
    assert [i["cost"]["amount"] for i in posted] == ["1.50", "1.50", "1.50"]
    assert {i["cost"]["currency"] for i in posted} == {"EUR"}
    assert sum(Decimal(i["cost"]["amount"]) for i in posted) == Decimal("4.50")  # 4.503 rounded
