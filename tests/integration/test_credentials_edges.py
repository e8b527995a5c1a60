"""The API's credentials over their lifecycle: a domain scope never takes in a removed domain
that had the same path; an empty token file is refused (never "no token", which opens loopback),
at start and on reload; a refused signed request does not tell whether its key exists; a
refused file or config names a secret's key, never its value, and never crashes on one not
quoted; a credential removed on SIGHUP stops working at once, also while the loop retries."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from kvmeter.collector import config, reloading
from kvmeter.collector.api import authenticator, create_app
from kvmeter.collector.credentials import CredentialsError, CredentialSource, Grant, load_file
from kvmeter.collector.cs_snapshot import Account, Domain, Snapshot
from kvmeter.collector.feed import Feeder
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.model import Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store, reconciliation
from kvmeter.collector.store import credentials as store_credentials
from kvmeter.collector.store.credentials import MintedCredentials
from tests.collector_support import HOUR, T0, Clock, M, Stream

USAGE = "/v1/usage?start=2024-05-14&end=2024-05-15&type=4"
TOKEN = "operator-token-0123456789"


def _store(tmp_path: Path) -> Store:
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    return store


OLD_ACCT = "0a0a0000-0000-4000-8000-00000000000a"  # the customer who left (domain removed)
OLD_SUB_ACCT = "0b0b0000-0000-4000-8000-00000000000b"  # in the removed domain's subdomain
NEW_ACCT = "1a1a0000-0000-4000-8000-00000000001a"  # the new customer, a new domain of the same name
OLD_DOM = "d0d00000-0000-4000-8000-0000000000d0"
OLD_SUB = "d5d50000-0000-4000-8000-0000000000d5"
NEW_DOM = "d1d10000-0000-4000-8000-0000000000d1"


def test_domain_scope_never_takes_in_a_removed_domain_that_had_the_same_path(tmp_path: Path) -> None:
    """CloudStack: domain ROOT/acme (OLD_DOM, with subdomain ROOT/acme/dev) is removed; later a new
    customer gets a new domain ROOT/acme (NEW_DOM). The reconciler's names keep the removed
    domains (upserted, never deleted) with their paths. A credential scoped to NEW_DOM must see
    NEW_DOM's accounts only, never the former customer's."""
    store = _store(tmp_path)
    try:
        collector = Collector(store, Settings(), Clock(T0 + 5 * HOUR))
        vms = {
            "i-2-10-VM": (OLD_ACCT, 1000),
            "i-3-11-VM": (OLD_SUB_ACCT, 2000),
            "i-4-12-VM": (NEW_ACCT, 4000),
        }
        stream = Stream("s1", owners={name: {"ownerAccountUuid": a} for name, (a, _) in vms.items()})
        batch = [
            M(T0, T0 + 60_000, n, instance="", domain=name, mac=f"02:00:00:00:00:0{i}", address="")
            for i, (name, (_, n)) in enumerate(vms.items())
        ]
        assert collector.apply_batch(stream.batch(batch)).billed_bytes == 7000
        with store.write() as conn:  # the reconciler's pass while the old customer was there
            reconciliation.save_names(
                conn,
                Snapshot(
                    T0,
                    accounts={
                        OLD_ACCT: Account(OLD_ACCT, "old", OLD_DOM),
                        OLD_SUB_ACCT: Account(OLD_SUB_ACCT, "olddev", OLD_SUB),
                    },
                    domains={
                        OLD_DOM: Domain(OLD_DOM, "acme", "ROOT/acme"),
                        OLD_SUB: Domain(OLD_SUB, "dev", "ROOT/acme/dev"),
                    },
                ),
                T0,
            )
        with store.write() as conn:  # a later pass: the old domains are gone, a new ROOT/acme
            reconciliation.save_names(
                conn,
                Snapshot(
                    T0 + HOUR,
                    accounts={NEW_ACCT: Account(NEW_ACCT, "new", NEW_DOM)},
                    domains={NEW_DOM: Domain(NEW_DOM, "acme", "ROOT/acme")},
                ),
                T0 + HOUR,
            )
        _, secrets = MintedCredentials(store).create(
            store_credentials.TOKEN, "new acme", Grant("new acme", frozenset(), frozenset({NEW_DOM})), 0
        )
        client = create_app(store).test_client()
        answer = client.get(USAGE, headers={"Authorization": f"Bearer {secrets['token']}"})
        assert answer.status_code == 200, answer.json
        seen = {r["account"] for r in answer.json["usage"]}
        assert seen == {NEW_ACCT}, f"the new acme's credential sees the removed domains' accounts: {seen}"
    finally:
        store.close()


def test_an_empty_token_file_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "api.token").write_text("\n")
    with pytest.raises(config.ConfigError, match="token_file"):
        config.from_dict({"api": {"token_file": "api.token"}}, base=tmp_path)


def test_a_reload_with_an_emptied_token_file_keeps_the_token_and_never_opens_the_api(tmp_path: Path) -> None:
    """The operator's token is in token_file; the API listens on loopback (e.g. behind a TLS proxy).
    The file is caught empty (truncated while it is rotated, a config-management run) when SIGHUP
    comes: the reload is refused (with no credential at all the API would answer everyone as the
    operator), the token stays, anonymous requests stay 401."""
    token_file = tmp_path / "api.token"
    token_file.write_text(TOKEN + "\n")
    cfg_path = tmp_path / "collector.toml"
    cfg_path.write_text('[api]\ntoken_file = "api.token"\n')
    cfg = config.load(cfg_path)
    store = _store(tmp_path)
    try:
        source = CredentialSource(cfg.api.credentials, cfg.api.credentials_file)
        client = create_app(store, auth=authenticator(store, source, loopback=True)).test_client()
        assert client.get(USAGE).status_code == 401
        token_file.write_text("")
        reload = reloading.api_credentials(cfg_path, source)
        with pytest.raises(ValueError, match="token_file"):
            reload()
        assert client.get(USAGE).status_code == 401
        assert client.get(USAGE, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    finally:
        store.close()


def test_a_refused_signed_request_does_not_tell_whether_its_api_key_exists(tmp_path: Path) -> None:
    store = _store(tmp_path)
    try:
        _, pair = MintedCredentials(store).create(
            store_credentials.CLOUDSTACK, "tenant", Grant("tenant", frozenset({"acct"})), 0
        )
        client = create_app(store).test_client()
        base = {"command": "listUsageRecords", "startdate": "2024-05-14", "enddate": "2024-05-14",
                "response": "json", "signature": "bm90IGEgc2lnbmF0dXJl"}  # fmt: skip
        known = client.get("/client/api", query_string={**base, "apikey": pair["api_key"]})
        unknown = client.get("/client/api", query_string={**base, "apikey": "no-such-api-key"})
        assert known.status_code == unknown.status_code == 401
        text_known = known.json["listusagerecordsresponse"]["errortext"]
        text_unknown = unknown.json["listusagerecordsresponse"]["errortext"]
        assert text_known == text_unknown, (text_known, text_unknown)
    finally:
        store.close()


@pytest.mark.parametrize(
    ("entry", "secret"),
    [
        ('token = "hunter2-hunter2"', "hunter2-hunter2"),  # one character short of 16
        ('api_key = "k"\nsecret_key = 424242424242', "424242424242"),  # not quoted
    ],
)
def test_a_refused_credentials_file_never_logs_a_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, entry: str, secret: str
) -> None:
    path = tmp_path / "creds.toml"
    path.write_text('[[credentials]]\nname = "ok"\ntoken = "a-good-token-0123456789"\n')
    path.chmod(0o600)
    source = CredentialSource(path=path)
    path.write_text(f'[[credentials]]\nname = "tenant"\n{entry}\n')
    with pytest.raises(CredentialsError) as caught:
        load_file(path)
    with caplog.at_level(logging.ERROR):
        assert not source.reload()
    assert secret not in str(caught.value), str(caught.value)
    assert secret not in caplog.text, caplog.text


def test_a_refused_config_never_shows_the_operator_secret_key() -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.from_dict({"api": {"cloudstack_api_key": "ops", "cloudstack_secret_key": 987654321987654321}})
    assert "987654321987654321" not in str(caught.value), str(caught.value)


def test_a_credentials_file_with_a_token_not_quoted_is_a_problem_never_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "creds.toml"
    path.write_text('[[credentials]]\nname = "tenant"\ntoken = 1234567890123456789\n')
    path.chmod(0o600)
    with pytest.raises(CredentialsError, match=r"credentials\.0\.token"):
        load_file(path)


def test_a_config_with_a_token_not_quoted_is_a_config_error_never_a_crash() -> None:
    entry = {"name": "tenant", "token": 1234567890123456789}
    with pytest.raises(config.ConfigError, match=r"api\.credentials\.0\.token"):
        config.from_dict({"api": {"credentials": [entry]}})
    with pytest.raises(config.ConfigError, match=r"api\.credentials\.0\.accounts"):
        config.from_dict({"api": {"credentials": [{"name": "t", "token": "t" * 16, "accounts": 7}]}})


class _FailingTick:
    """The service whose store writes fail (a full disk, a read-only failover): the API still
    reads, the loop retries the tick with backoff."""

    def tick(self) -> object:
        raise RuntimeError("could not extend file: No space left on device")


def test_sighup_removes_a_credential_even_while_the_loop_retries(tmp_path: Path) -> None:
    cfg_path = tmp_path / "collector.toml"
    cfg_path.write_text(
        f'[api]\ntoken = "{TOKEN}"\n[[api.credentials]]\nname = "ops"\ntoken = "second-operator-token-0123"\n'
    )
    cfg = config.load(cfg_path)
    store = _store(tmp_path)
    source = CredentialSource(cfg.api.credentials, cfg.api.credentials_file)
    client = create_app(store, auth=authenticator(store, source, loopback=False)).test_client()
    leaver = {"Authorization": "Bearer second-operator-token-0123"}
    assert client.get(USAGE, headers=leaver).status_code == 200
    feeder = Feeder(_FailingTick(), [], Metrics(), tick_seconds=0.0)  # type: ignore[arg-type]
    feeder.reloads = reloading.collector_reloads(cfg_path, None, source, lambda _: None)  # type: ignore[arg-type]
    # only the credentials matter here: drop router owners and policy (they need a service)
    feeder.reloads._items = [(n, r) for n, r in feeder.reloads._items if n == "credentials"]
    ended: list[BaseException] = []

    def loop() -> None:
        try:
            feeder.run()
        except RuntimeError as exc:  # a stop while retrying re-raises what the loop retried
            ended.append(exc)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)  # the loop is in its tick's retries now
        cfg_path.write_text(f'[api]\ntoken = "{TOKEN}"\n')  # the leaver's token removed ...
        feeder.reloads.request()  # ... and SIGHUP (what Reloads.install's handler does)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and client.get(USAGE, headers=leaver).status_code == 200:
            time.sleep(0.1)
        assert client.get(USAGE, headers=leaver).status_code == 401, (
            f"5 s after SIGHUP the removed token still works (the loop is retrying: {feeder.failing!r})"
        )
    finally:
        feeder.stop()
        thread.join(40)
        store.close()
