"""The balance alerts' webhook through the front door: `kvmeter run --all-in-one` started from a
TOML file whose [balances] webhook points at a loopback receiver that trickles its first answer
(a byte of a header every 0.2 s, within any per-read timeout). The pieces are those of the
hand-off's trickling test (test_deadline_prune_reason_edges) and of the balances' front-door test
(test_balances_front)."""

from __future__ import annotations

import subprocess
import time
from decimal import Decimal
from pathlib import Path

import pytest

from kvmeter.collector.balance_watch import BalanceBook
from kvmeter.collector.balances import Thresholds
from kvmeter.collector.store import Store
from kvmeter.collector.store import credits as stored
from kvmeter.pipeline import allinone
from kvmeter.tomlconfig import ConfigError
from tests.billing_support import ACCT_A, GB, Cloud, tariff
from tests.harness.http_receiver import serving
from tests.harness.ports import free_port, wait_for_port
from tests.harness.processes import KVMETER
from tests.integration.test_balances_front import TARIFF, AllInOne, allinone_toml, eventually, request
from tests.integration.test_deadline_prune_reason_edges import TRICKLE_S, trickling

TIMEOUT_S = 0.5  # [balances] webhook_timeout_seconds: each POST is over within it


def _applied(base: str) -> float:
    """kvmeter_batches_applied_total: the agent's polls the collector part applied."""
    for line in request(base, "/metrics")[1].splitlines():
        if line.startswith("kvmeter_batches_applied_total "):
            return float(line.split()[1])
    raise AssertionError("kvmeter_batches_applied_total not served")


def _undelivered(store: Store) -> list[dict[str, object]]:
    with store.read() as conn:
        return stored.undelivered(conn)


@pytest.mark.libvirt
def test_the_all_in_one_from_toml_ends_a_trickled_alert_post_at_webhook_timeout_seconds(
    tmp_path: Path,
) -> None:
    """`[balances] webhook_timeout_seconds` read from the all-in-one's TOML bounds each alert
    POST as a whole: against a receiver trickling its first answer for TRICKLE_S (5 s), the
    next attempt comes within about the timeout plus the first backoff (0.5 s), under the same
    Idempotency-Key, and its prompt 204 marks the alert delivered once (no POST after it).
    Meanwhile the process meters on (its agent's batches applied, /health 200), and SIGTERM
    stops it at once with exit 0. Coverage of the setting's plumbing from TOML: it passes on
    the code as it is and fails when the timeout is not handed to AlertWebhook (the default
    10 s outlasts the trickle: one POST, taken as delivered after 5 s)."""
    posts: list[tuple[float, str]] = []

    class FirstTrickles(trickling()):  # type: ignore[misc]
        def do_POST(self) -> None:
            posts.append((time.monotonic(), self.headers.get("Idempotency-Key", "")))
            if len(posts) == 1:
                super().do_POST()
                return
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(204)
            self.end_headers()

    db = tmp_path / "usage.db"
    store = Store(f"sqlite:///{db}")
    store.migrate()
    cloud = Cloud(store)
    cloud.send(ACCT_A, 9 * GB)  # 9.00 EUR of usage
    cloud.credit(ACCT_A, "10.00")  # 1.00 left: below 5.00 at the first evaluation
    (tmp_path / "tariff.toml").write_text(TARIFF)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with serving(FirstTrickles, "/alerts") as url:
        config = allinone_toml(
            tmp_path,
            db,
            f"""
[usage]
tick_seconds = 0.2
[api]
listen = "127.0.0.1:{port}"
[billing]
tariff_file = "tariff.toml"
[balances]
threshold = "5.00"
evaluate_seconds = 0.2
webhook_url = "{url}"
webhook_timeout_seconds = {TIMEOUT_S}
""",
            poll=0.2,
        )
        daemon = AllInOne(tmp_path, config)
        daemon.start()
        try:
            wait_for_port("127.0.0.1", port, 30, f"kvmeter run --all-in-one\n{daemon.logs()}")
            eventually(lambda: len(posts) >= 1, f"the alert POSTed\n{daemon.logs()}", timeout=10)
            # While the alert is being tried, the process meters on and is healthy.
            applied = _applied(base)
            assert request(base, "/health")[0] == 200
            eventually(
                lambda: len(posts) >= 2,
                f"a second attempt before the trickle ({TRICKLE_S} s) ends\n{daemon.logs()}",
                timeout=TIMEOUT_S + 2.5,
            )
            gap = posts[1][0] - posts[0][0]
            assert gap < TIMEOUT_S + 0.5 + 1.0, f"a POST was held {gap:.1f} s"
            eventually(lambda: not _undelivered(store), "the alert marked delivered")
            with store.read() as conn:
                [alert] = stored.alerts(conn, None)
            assert alert["delivered_ms"] is not None
            assert {key for _, key in posts} == {alert["idempotency_key"]}
            eventually(lambda: _applied(base) > applied, f"the agent's batches applied\n{daemon.logs()}")
            assert request(base, "/health")[0] == 200
            stopping = time.monotonic()
            assert daemon.terminate(timeout=10) == 0, daemon.logs()
            assert time.monotonic() - stopping < 3, f"SIGTERM took {time.monotonic() - stopping:.1f} s"
        finally:
            daemon.stop()
            store.close()
    assert len(posts) == 2, "delivered: nothing more was sent"


@pytest.mark.libvirt
def test_the_all_in_one_refuses_balances_without_a_tariff(tmp_path: Path) -> None:
    """A [balances] section needs the tariff ([billing] tariff_file): a balance is credits minus
    costs. Without one nothing is rated and every evaluation took each watched account for "no
    longer watched", re-arming its crossing (a second alert for the same fall once the tariff is
    back, or one every period beside a replica that has it). `kvmeter run --all-in-one` from
    such a file is refused at start (exit 2, saying what is missing), as `kvmeter collector` is
    (the same loader), instead of running with alerts that cannot work."""
    config = allinone_toml(
        tmp_path,
        tmp_path / "usage.db",
        f"""
[api]
enabled = false
[balances]
threshold = "5.00"
webhook_url = "http://127.0.0.1:{free_port()}/alerts"
""",
    )
    with pytest.raises(ConfigError, match=r"balances: needs a tariff \(\[billing\] tariff_file\)"):
        allinone.load(config)  # its collector part: the loader of `kvmeter collector`
    proc = subprocess.Popen(
        [*KVMETER, "run", "--all-in-one", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        out, _ = proc.communicate(timeout=8)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"started without a tariff:\n{out.decode(errors='replace')[-2000:]}") from None
    assert proc.returncode == 2, out
    assert b"balances: needs a tariff ([billing] tariff_file)" in out


def test_an_evaluation_without_a_tariff_does_not_re_arm_a_crossing(tmp_path: Path) -> None:
    """One crossing, one alert, whichever replica evaluates (README, Credits, balances): a
    balance book with no tariff (a replica or a run without [billing]) knows no balance, so it
    leaves the stored states alone; the next evaluation with the tariff still sees the same
    fall and raises nothing (it raised a second alert: the tariff-less evaluation had marked
    every account not below)."""
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    cloud = Cloud(store)
    cloud.credit(ACCT_A, "10.00")
    cloud.send(ACCT_A, 9 * GB)  # 1.00 left, below 5.00
    thresholds = Thresholds(Decimal("5.00"), {})
    priced, unpriced = BalanceBook(store, tariff, thresholds), BalanceBook(store, lambda: None, thresholds)
    assert len(priced.evaluate(cloud.now)) == 1
    assert unpriced.evaluate(cloud.now + 1000) == []
    assert priced.evaluate(cloud.now + 2000) == []
    with store.read() as conn:
        assert len(stored.alerts(conn, None)) == 1
        assert [s["below"] for s in stored.states(conn)] == [True]
    store.close()


@pytest.mark.parametrize("url", ["https:///kvmeter/alerts", "http:// billing.example.com/alerts"])
def test_a_balances_webhook_url_without_a_host_is_refused_at_start(tmp_path: Path, url: str) -> None:
    """A webhook URL with no host after the scheme (a stray slash or space) can never deliver:
    [handoff] refuses it when the config is read, and so must [balances]. It was accepted, and
    every alert then failed at each round for ever ("no host given", or "answered no HTTP" for
    urllib's InvalidURL), the operator told only by warnings and a failure counter."""
    (tmp_path / "tariff.toml").write_text(TARIFF)
    config = tmp_path / "allinone.toml"
    config.write_text(
        f'[store]\nurl = "sqlite:///{tmp_path / "usage.db"}"\n[billing]\ntariff_file = "tariff.toml"\n'
        f'[balances]\nthreshold = "5.00"\nwebhook_url = "{url}"\n'
    )
    with pytest.raises(ConfigError, match=r"balances\.webhook_url"):
        allinone.load(config)
