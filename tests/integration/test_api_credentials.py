"""The API's credentials through the front door: `kvmeter collector --config FILE` and
`kvmeter run --all-in-one --config FILE` started from TOML files, asked over HTTP with a bearer
token and with the `cs` client (PyPI) signing CloudStack requests."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import sqlite3
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cs import CloudStack, CloudStackApiException

from kvmeter.collector.api import create_app, serve
from kvmeter.collector.api_auth import NoCredentials
from kvmeter.collector.credentials import Grant
from kvmeter.collector.cs_snapshot import Account, Domain, Snapshot
from kvmeter.collector.model import Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store, reconciliation
from kvmeter.collector.store import credentials as store_credentials
from kvmeter.collector.store.credentials import MintedCredentials
from tests.collector_support import HOUR, T0, Clock, M, Stream
from tests.harness.kafka import FAST_GROUP_TOML
from tests.harness.libvirt_node import CLOUDSTACK_HOST, write_node_xml
from tests.harness.ports import free_port, wait_for_port
from tests.harness.processes import KVMETER, Process

TOKEN = "operator-token-0123456789"
API_KEY, SECRET = "operator-api-key", "operator-secret-key"
# Five tenants: A and B in one CloudStack domain, C and D in another, E in a subdomain of that.
# The agents report the owner fields of CloudStack's <metadata>; D's and E's VMs run on a release
# without ownerDomainUuid, and only CloudStack's API (the reconciler's names) says which domain
# they are in, and the domain tree of the second domain.
ACCT_A = "aaaa0000-0000-4000-8000-00000000000a"
ACCT_B = "bbbb0000-0000-4000-8000-00000000000b"
ACCT_C = "cccc0000-0000-4000-8000-00000000000c"
ACCT_D = "dddd0000-0000-4000-8000-00000000000d"
ACCT_E = "eeee0000-0000-4000-8000-00000000000e"
DOMAIN_1 = "d1d10000-0000-4000-8000-0000000000d1"
DOMAIN_2 = "d2d20000-0000-4000-8000-0000000000d2"
DOMAIN_2_SUB = "d3d30000-0000-4000-8000-0000000000d3"
VMS = {  # libvirt domain name -> (account, CloudStack domain in its <metadata>, bytes sent)
    "i-2-10-VM": (ACCT_A, DOMAIN_1, 1000),
    "i-3-11-VM": (ACCT_B, DOMAIN_1, 2000),
    "i-4-12-VM": (ACCT_C, DOMAIN_2, 4000),
    "i-5-13-VM": (ACCT_D, None, 8000),
    "i-6-14-VM": (ACCT_E, None, 16000),
}


def fill_store(db_url: str) -> None:
    """One batch of public bytes per VM; owners come from the inventory's <metadata> only."""
    store = Store(db_url)
    store.migrate()
    collector = Collector(store, Settings(), Clock(T0 + 5 * HOUR))
    owners = {
        name: {"ownerAccountUuid": account, **({"ownerDomainUuid": domain} if domain else {})}
        for name, (account, domain, _) in VMS.items()
    }
    stream = Stream("stream-1", owners=owners)
    measures = [
        M(T0, T0 + 60_000, nbytes, instance="", domain=name, mac=f"02:00:00:00:00:0{i}", address="")
        for i, (name, (_, _, nbytes)) in enumerate(VMS.items())
    ]
    out = collector.apply_batch(stream.batch(measures))
    assert out.billed_bytes == 31000, out
    names = Snapshot(
        T0,
        accounts={ACCT_D: Account(ACCT_D, "dee", DOMAIN_2), ACCT_E: Account(ACCT_E, "eve", DOMAIN_2_SUB)},
        domains={
            DOMAIN_2: Domain(DOMAIN_2, "two", "ROOT/two"),
            DOMAIN_2_SUB: Domain(DOMAIN_2_SUB, "sub", "ROOT/two/sub"),
        },
    )
    with store.write() as conn:
        reconciliation.save_names(conn, names, T0)
    store.close()


class Service(Process):
    """A kvmeter command started from a TOML file, and its API's base URL."""

    def __init__(self, command: Command, port: int):
        super().__init__("service", command.workdir)
        self.command = command
        self.config = command.config
        self.port = port
        self.base = f"http://127.0.0.1:{port}"

    def args(self) -> list[str]:
        return self.command.args

    def start(self) -> None:
        """Started and listening."""
        super().start()
        try:
            wait_for_port("127.0.0.1", self.port, 30, " ".join(self.args()))
        except RuntimeError:
            self.stop()
            raise AssertionError(self.logs()) from None

    def get(self, path: str, token: str | None = None, **params: str) -> tuple[int, dict]:  # type: ignore[type-arg]
        """(status, JSON body); a body of another type as {"text": ...}."""
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        req = urllib.request.Request(url)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                status, ctype, body = resp.status, resp.headers.get("Content-Type", ""), resp.read()
        except urllib.error.HTTPError as err:
            status, ctype, body = err.code, err.headers.get("Content-Type", ""), err.read()
            err.close()
        return status, json.loads(body) if ctype.startswith("application/json") else {"text": body.decode()}

    def client(self, key: str, secret: str, **options: object) -> CloudStack:
        return CloudStack(endpoint=self.base + "/client/api", key=key, secret=secret, **options)  # type: ignore[arg-type]


def collector_toml(workdir: Path, bootstrap: str, topics: tuple[str, str], api: str) -> Path:
    db = f"sqlite:///{workdir / 'usage.db'}"
    path = workdir / "collector.toml"
    path.write_text(
        f"""
[store]
url = "{db}"
[kafka]
bootstrap = "{bootstrap}"
measures_topic = "{topics[0]}"
lifecycle_topic = "{topics[1]}"
group = "g-{workdir.name}"
{FAST_GROUP_TOML}[usage]
tick_seconds = 1
[api]
{api}
"""
    )
    return path


def allinone_toml(workdir: Path, api: str) -> Path:
    uri = write_node_xml(workdir / "node.xml", CLOUDSTACK_HOST)
    path = workdir / "allinone.toml"
    path.write_text(
        f"""
[agent]
host_id = "aio"
poll_interval = 1.0
state_dir = "{workdir / "agent"}"
[libvirt]
uri = "{uri}"
[metrics]
enabled = false
[store]
url = "sqlite:///{workdir / "usage.db"}"
[usage]
tick_seconds = 1
[api]
{api}
"""
    )
    return path


@dataclass(frozen=True)
class Command:
    args: list[str]
    workdir: Path
    config: Path


Launcher = Callable[[str], Command]  # [api] section's body -> the command started from that file


@pytest.fixture(
    params=[
        pytest.param("collector", marks=pytest.mark.broker),
        pytest.param("all-in-one", marks=pytest.mark.libvirt),
    ]
)
def launcher(request: pytest.FixtureRequest, tmp_path: Path) -> Launcher:
    """Writes the command's TOML file with the given [api] section; the store holds VMS' bytes."""
    fill_store(f"sqlite:///{tmp_path / 'usage.db'}")
    if request.param == "collector":
        bootstrap = request.getfixturevalue("kafka_bootstrap")
        unique_topic = request.getfixturevalue("unique_topic")
        topics = (unique_topic("measures"), unique_topic("cloudstack"))

        def collector(api: str) -> Command:
            config = collector_toml(tmp_path, bootstrap, topics, api)
            return Command([*KVMETER, "collector", "--config", str(config)], tmp_path, config)

        return collector

    def allinone(api: str) -> Command:
        config = allinone_toml(tmp_path, api)
        return Command([*KVMETER, "run", "--all-in-one", "--config", str(config)], tmp_path, config)

    return allinone


Start = Callable[..., Service]


@pytest.fixture
def start(launcher: Launcher) -> Iterator[Start]:
    """start(api, host="127.0.0.1"): the command listening on host, started from its file."""
    started: list[Service] = []

    def run(api: str, host: str = "127.0.0.1") -> Service:
        port = free_port()
        command = launcher(f'listen = "{host}:{port}"\n{api}')
        service = Service(command, port)
        started.append(service)
        service.start()
        return service

    yield run
    for service in started:
        service.stop()


def usage_of(service: Service, token: str) -> dict[str, int]:
    status, body = service.get("/v1/usage", token=token, start="2024-05-14", end="2024-05-15", type="4")
    assert status == 200, body
    return {r["account"]: r["quantity"] for r in body["usage"]}


def status_of(service: Service, token: str | None) -> int:
    return service.get("/v1/usage", token=token, start="2024-05-14", end="2024-05-15")[0]


def records_of(client: CloudStack, **params: object) -> dict[str, int]:
    body = client.listUsageRecords(startdate="2024-05-14", enddate="2024-05-14", type=4, **params)
    return {r["accountid"]: int(r["rawusage"]) for r in body["usagerecord"]}


EVERYONE = {ACCT_A: 1000, ACCT_B: 2000, ACCT_C: 4000, ACCT_D: 8000, ACCT_E: 16000}


def test_token_and_cloudstack_key_pair_from_the_config_file_work_together(start: Start) -> None:
    service = start(
        f'token = "{TOKEN}"\ncloudstack_api_key = "{API_KEY}"\ncloudstack_secret_key = "{SECRET}"'
    )
    assert usage_of(service, TOKEN) == EVERYONE
    assert records_of(service.client(API_KEY, SECRET)) == EVERYONE  # signed, expires in 10 min
    assert records_of(service.client(API_KEY, SECRET, expiration=-1)) == EVERYONE  # no expires
    # Nobody else gets in.
    assert status_of(service, None) == 401
    assert status_of(service, "guess") == 401
    status, body = service.get("/client/api", command="listUsageRecords", startdate="2024-05-14",
                               enddate="2024-05-14", response="json")  # fmt: skip
    assert status == 401, body
    for client in (service.client(API_KEY, "bogus-secret"), service.client("unknown-key", SECRET)):
        with pytest.raises(CloudStackApiException) as refused:
            records_of(client)
        assert refused.value.response.status_code == 401
    expired = service.client(API_KEY, SECRET)
    with pytest.raises(CloudStackApiException) as refused:
        records_of(expired, signatureVersion="3", expires="2020-01-01T00:00:00+0000")
    assert refused.value.response.status_code == 401  # signed right, but expired: why is in the log
    assert refused.value.error["errortext"] == "unable to verify user credentials and/or request signature"
    assert service.get("/health")[0] == 200  # open: load balancers probe it


def test_refuses_to_listen_beyond_loopback_without_a_credential(launcher: Launcher) -> None:
    command = launcher(f'listen = "0.0.0.0:{free_port()}"')
    done = subprocess.run(command.args, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "no credential is configured" in done.stderr, done.stderr


TOKEN_A = "tenant-a-token-0123456789"
TOKEN_B = "billing-b-token-0123456789"
TOKEN_NEW = "tenant-a-second-token-0123456789"
KEY_D1, SECRET_D1 = "domain-1-api-key", "domain-1-secret-key"
KEY_C, SECRET_C = "tenant-c-api-key", "tenant-c-secret-key"


def write_credentials(path: Path, text: str, mode: int = 0o600) -> None:
    """Replace the file whole (a new inode, as editors and config managers do)."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)


CREDENTIALS = f"""
[[credentials]]
name = "operator"
token_sha256 = "{hashlib.sha256(TOKEN.encode()).hexdigest()}"
[[credentials]]
name = "tenant A"
token = "{TOKEN_A}"
accounts = ["{ACCT_A}"]
[[credentials]]
name = "domain 1"
api_key = "{KEY_D1}"
secret_key = "{SECRET_D1}"
domains = ["{DOMAIN_1}"]
[[credentials]]
name = "tenant C"
api_key = "{KEY_C}"
secret_key = "{SECRET_C}"
accounts = ["{ACCT_C}"]
"""


def wait_until(check: Callable[[], bool], what: str, service: Service, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s:\n{service.logs()}")
        time.sleep(0.2)


def denied(call: Callable[[], object]) -> CloudStackApiException:
    with pytest.raises(CloudStackApiException) as refused:
        call()
    return refused.value


def test_credentials_file_scoped_credentials_and_sighup(start: Start, tmp_path: Path) -> None:
    creds = tmp_path / "api-credentials.toml"
    write_credentials(creds, CREDENTIALS)
    service = start(
        f"""credentials_file = "{creds.name}"
[[api.credentials]]
name = "billing for B"
token = "{TOKEN_B}"
accounts = ["{ACCT_B}"]
"""
    )
    assert usage_of(service, TOKEN) == EVERYONE  # the file's operator token, kept as its SHA-256
    assert usage_of(service, TOKEN_A) == {ACCT_A: 1000}
    assert usage_of(service, TOKEN_B) == {ACCT_B: 2000}  # the config file's own
    domain_1 = service.client(KEY_D1, SECRET_D1)
    assert records_of(domain_1) == {ACCT_A: 1000, ACCT_B: 2000}  # the domain's accounts
    assert records_of(service.client(KEY_C, SECRET_C)) == {ACCT_C: 4000}
    # A filter cannot widen what a scoped credential sees.
    status, body = service.get(
        "/v1/usage", token=TOKEN_A, start="2024-05-14", end="2024-05-15", account=ACCT_C
    )
    assert status == 403  # asking for another account is refused, never answered
    assert "may not read account" in body["error"]
    refused = denied(lambda: records_of(domain_1, accountid=ACCT_C))
    assert refused.response.status_code == 531  # CloudStack's PermissionDenied
    assert service.get("/metrics", token=TOKEN_A)[0] == 403
    assert service.get("/metrics", token=TOKEN)[0] == 200

    # SIGHUP: the file is read again; tenant A's first token is replaced by another.
    write_credentials(creds, CREDENTIALS.replace(TOKEN_A, TOKEN_NEW))
    assert service.proc is not None
    service.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: status_of(service, TOKEN_A) == 401, "the replaced token refused", service)
    assert usage_of(service, TOKEN_NEW) == {ACCT_A: 1000}
    assert usage_of(service, TOKEN_B) == {ACCT_B: 2000}  # the config file's own stay
    if "--all-in-one" in service.args():  # its agent's traffic rules and collector's router map too
        # (at the loop's next round: the credentials are reloaded on a thread of their own, at once)
        wait_until(lambda: "reloaded traffic rules" in service.logs(), "the traffic rules reloaded", service)
        wait_until(
            lambda: "reloaded router owners: 0 router owner(s)" in service.logs(), "router owners", service
        )

    # A broken file on reload changes nothing, and the log says why: each SIGHUP's pass refuses
    # the credentials (the collector's kvmeter.reload or the all-in-one's CredentialSource.reload),
    # after the other reloadables of the same pass, which read the same file.
    refused = "reload of credentials refused|credentials file not reloaded"
    cases = ((CREDENTIALS + "\n[[credentials]\n", "not valid TOML"), (CREDENTIALS, "chmod 600"))
    for n, (broken, why) in enumerate(cases, start=1):
        write_credentials(creds, broken.replace(TOKEN_NEW, "another-token-0123456789"),
                          mode=0o600 if why != "chmod 600" else 0o644)  # fmt: skip
        service.proc.send_signal(signal.SIGHUP)
        wait_until(lambda why=why: why in service.logs(), f"the reload refused ({why})", service)
        wait_until(
            lambda n=n: len(re.findall(refused, service.logs())) >= n, "the credentials refused", service
        )
        assert usage_of(service, TOKEN_NEW) == {ACCT_A: 1000}
        assert status_of(service, "another-token-0123456789") == 401
    assert service.proc.poll() is None


def test_credentials_file_others_may_read_is_refused_at_start(launcher: Launcher, tmp_path: Path) -> None:
    creds = tmp_path / "api-credentials.toml"
    write_credentials(creds, CREDENTIALS, mode=0o640)
    command = launcher(f'listen = "127.0.0.1:{free_port()}"\ncredentials_file = "{creds.name}"')
    done = subprocess.run(command.args, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "mode 0640" in done.stderr, done.stderr
    assert "chmod 600" in done.stderr


def kvmeter_credentials(config: Path, *args: str, warns: str = "") -> str:
    done = subprocess.run(
        [*KVMETER, "credentials", *args, "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert warns in done.stderr
    return done.stdout


def test_minted_credentials_scoped_and_revoked_without_restart(launcher: Launcher) -> None:
    # Only minted credentials, none in the file: enough to listen beyond loopback.
    port = free_port()
    command = launcher(f'listen = "0.0.0.0:{port}"')
    operator = json.loads(kvmeter_credentials(command.config, "create", "--name", "ops", "--operator",
                                              "--kind", "token", "--format", "json"))  # fmt: skip
    store_file = command.workdir / "usage.db"
    store_file.chmod(0o644)  # a key pair's secret is kept as it is: creating one says who may read it
    readable = f"{store_file} (mode 0644)"
    tenant = json.loads(kvmeter_credentials(command.config, "create", "--name", "acme", "--account", ACCT_A,
                                            "--format", "json", warns=readable))  # fmt: skip
    store_file.chmod(0o600)
    domain = json.loads(kvmeter_credentials(command.config, "create", "--name", "domain 1", "--domain",
                                            DOMAIN_1, "--kind", "token", "--format", "json"))  # fmt: skip
    domain_2 = json.loads(kvmeter_credentials(command.config, "create", "--name", "domain 2", "--domain",
                                              DOMAIN_2, "--kind", "token", "--format", "json"))  # fmt: skip
    service = Service(command, port)
    service.start()
    try:
        assert usage_of(service, operator["token"]) == EVERYONE
        assert usage_of(service, domain["token"]) == {ACCT_A: 1000, ACCT_B: 2000}
        # Its own accounts and its subdomain's: the domain tree is known from CloudStack's API.
        assert usage_of(service, domain_2["token"]) == {ACCT_C: 4000, ACCT_D: 8000, ACCT_E: 16000}
        acme = service.client(tenant["api_key"], tenant["secret_key"])
        assert records_of(acme) == {ACCT_A: 1000}
        assert records_of(service.client(tenant["api_key"], tenant["secret_key"], method="post")) == {
            ACCT_A: 1000
        }
        assert denied(lambda: records_of(acme, accountid=ACCT_B)).response.status_code == 531
        assert status_of(service, None) == 401  # no credential

        # Stored: the token as its SHA-256, the key pair's secret as it is (the HMAC needs it).
        db = sqlite3.connect(command.workdir / "usage.db")
        stored = dict(db.execute("SELECT name, lookup FROM api_credentials").fetchall())
        db.close()
        assert stored["ops"] == hashlib.sha256(operator["token"].encode()).hexdigest()
        assert stored["acme"] == tenant["api_key"]

        listing = json.loads(kvmeter_credentials(command.config, "list", "--format", "json"))
        assert [(c["id"], c["name"], c["accounts"], c["domains"]) for c in listing] == [
            (operator["id"], "ops", None, []),
            (tenant["id"], "acme", [ACCT_A], []),
            (domain["id"], "domain 1", [], [DOMAIN_1]),
            (domain_2["id"], "domain 2", [], [DOMAIN_2]),
        ]
        assert "secret_key" not in json.dumps(listing)
        kvmeter_credentials(command.config, "revoke", str(tenant["id"]))
        refused = denied(lambda: records_of(acme))  # the next request, no restart
        assert refused.response.status_code == 401
        assert usage_of(service, domain["token"]) == {ACCT_A: 1000, ACCT_B: 2000}
        kvmeter_credentials(command.config, "revoke", str(domain["id"]))
        assert status_of(service, domain["token"]) == 401
        listing = json.loads(kvmeter_credentials(command.config, "list", "--revoked", "--format", "json"))
        assert [c["revoked"] is not None for c in listing] == [False, True, True, False]
    finally:
        service.stop()


USAGE = "/v1/usage?start=2024-05-14&end=2024-05-15"


def test_anyone_is_the_operator_only_on_loopback_while_no_credential_exists(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    try:
        with pytest.raises(NoCredentials, match="no credential is configured"):
            serve(store, "0.0.0.0", 0)
        client = create_app(store).test_client()
        assert client.get(USAGE).status_code == 200
        minted = MintedCredentials(store)
        cred, secrets = minted.create(store_credentials.TOKEN, "ops", Grant("ops"), 0)
        assert client.get(USAGE).status_code == 401
        auth = {"Authorization": f"Bearer {secrets['token']}"}
        assert client.get(USAGE, headers=auth).status_code == 200
        assert (
            client.get(
                "/v1/usage?start=2024-05-14&end=2024-05-15", headers={"Authorization": "Basic x"}
            ).status_code
            == 401
        )
        serve(store, "0.0.0.0", 0).close()  # a minted credential is a credential
        minted.revoke(cred.id, 1)
        # Revoked: anyone on loopback is the operator again, beyond loopback nobody is.
        assert client.get(USAGE).status_code == 200
        with pytest.raises(NoCredentials):
            serve(store, "0.0.0.0", 0)
        _, pair = minted.create(store_credentials.CLOUDSTACK, "tenant", Grant("tenant", frozenset({"a"})), 2)
        assert len(pair["api_key"]) >= 64
        assert len(pair["secret_key"]) >= 64
    finally:
        store.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/usage.db"
    return str(request.getfixturevalue("pg_database"))


def test_hostile_credentials_are_refused_never_a_5xx(store_url: str) -> None:
    store = Store(store_url)
    store.migrate()
    try:
        MintedCredentials(store).create(store_credentials.TOKEN, "ops", Grant("ops"), 0)
        client = create_app(store, cloudstack_keys={API_KEY: SECRET}).test_client()
        signed = {
            "command": "listUsageRecords",
            "startdate": "2024-05-14",
            "enddate": "2024-05-14",
            "response": "json",
        }
        for params in (
            {**signed, "apikey": "\x00", "signature": "x"},
            {**signed, "apikey": "k" * 100_000, "signature": "x"},
            {**signed, "apikey": "ключ", "signature": "x"},
            {**signed, "apikey": API_KEY, "signature": "подпись"},
            {**signed, "apikey": API_KEY, "signature": "\x00"},
            {**signed, "apikey": API_KEY, "signatureversion": "3", "expires": "\x00", "signature": "x"},
        ):
            answer = client.get("/client/api", query_string=params)
            assert answer.status_code == 401, (params, answer.data)
            assert answer.json is not None
            assert "errortext" in answer.json["listusagerecordsresponse"]
        for header in ("Bearer ", "Bearer " + "x" * 100_000, "Bearer \u00e9\u00e9", "Basic abc", "bearer"):
            answer = client.get(USAGE, headers={"Authorization": header})
            assert answer.status_code == 401, header
            assert answer.json is not None
    finally:
        store.close()


@pytest.mark.parametrize("api", ['token = "change-me"', 'token_file = "api.token"'])
def test_refuses_an_operator_token_shorter_than_16_characters(launcher: Launcher, api: str) -> None:
    """The operator's token opens every account's records: a guessable one (the example's
    placeholder) is refused at start, inline or in its file, and never shown."""
    command = launcher(api)
    (command.config.parent / "api.token").write_text("change-me\n")
    done = subprocess.run(command.args, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "api.token" in done.stderr, done.stderr
    assert "change-me" not in done.stderr, done.stderr
