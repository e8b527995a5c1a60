"""The API's credentials through the front door: `kvmeter collector --config FILE` and
`kvmeter run --all-in-one --config FILE` started from TOML files, asked over HTTP with a bearer
token and with the `cs` client (PyPI) signing CloudStack requests."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cs import CloudStack, CloudStackApiException

from kvmeter.collector.service import Collector, Settings
from kvmeter.collector.store import Store
from tests.collector_support import HOUR, T0, Clock, M, Stream
from tests.harness.kafka import FAST_GROUP
from tests.harness.libvirt_node import CLOUDSTACK_HOST, write_node_xml
from tests.harness.ports import free_port, wait_for_port
from tests.harness.processes import KVMETER

TOKEN = "operator-token-0123456789"
API_KEY, SECRET = "operator-api-key", "operator-secret-key"
# Three tenants: A and B in one CloudStack domain, C in another (CloudStack's <metadata> owner
# fields, as the agents report them).
ACCT_A = "aaaa0000-0000-4000-8000-00000000000a"
ACCT_B = "bbbb0000-0000-4000-8000-00000000000b"
ACCT_C = "cccc0000-0000-4000-8000-00000000000c"
DOMAIN_1 = "d1d10000-0000-4000-8000-0000000000d1"
DOMAIN_2 = "d2d20000-0000-4000-8000-0000000000d2"
VMS = {  # libvirt domain name -> (account, CloudStack domain, bytes sent)
    "i-2-10-VM": (ACCT_A, DOMAIN_1, 1000),
    "i-3-11-VM": (ACCT_B, DOMAIN_1, 2000),
    "i-4-12-VM": (ACCT_C, DOMAIN_2, 4000),
}


def fill_store(db_url: str) -> None:
    """One batch of public bytes per VM; owners come from the inventory's <metadata> only."""
    store = Store(db_url)
    store.migrate()
    collector = Collector(store, Settings(), Clock(T0 + 5 * HOUR))
    owners = {
        name: {"ownerAccountUuid": account, "ownerDomainUuid": domain}
        for name, (account, domain, _) in VMS.items()
    }
    stream = Stream("stream-1", owners=owners)
    measures = [
        M(T0, T0 + 60_000, nbytes, instance="", domain=name, mac=f"02:00:00:00:00:0{i}", address="")
        for i, (name, (_, _, nbytes)) in enumerate(VMS.items())
    ]
    out = collector.apply_batch(stream.batch(measures))
    assert out.billed_bytes == 7000, out
    store.close()


class Service:
    """A kvmeter process started from a TOML file, its API's base URL, its log."""

    def __init__(self, args: list[str], workdir: Path, port: int):
        self.args = args
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log = workdir / "service.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port("127.0.0.1", self.port, 30, " ".join(self.args))
        except RuntimeError:
            self.stop()
            raise AssertionError(self.logs()) from None
        return self

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def get(self, path: str, token: str | None = None, **params: str) -> tuple[int, dict]:  # type: ignore[type-arg]
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        req = urllib.request.Request(url)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            body = err.read()
            err.close()
            return err.code, json.loads(body)

    def client(self, key: str, secret: str, **options: object) -> CloudStack:
        return CloudStack(endpoint=self.base + "/client/api", key=key, secret=secret, **options)  # type: ignore[arg-type]


def collector_toml(workdir: Path, bootstrap: str, topics: tuple[str, str], api: str) -> Path:
    db = f"sqlite:///{workdir / 'usage.db'}"
    options = "\n".join(f'"{k}" = {v}' for k, v in FAST_GROUP.items())
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
[kafka.options]
{options}
[usage]
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


Launcher = Callable[[str], tuple[list[str], Path]]  # [api] body -> (command, its workdir)


@pytest.fixture(params=["collector", "all-in-one"])
def launcher(request: pytest.FixtureRequest, tmp_path: Path) -> Launcher:
    """Writes the command's TOML file with the given [api] section; the store holds VMS' bytes."""
    fill_store(f"sqlite:///{tmp_path / 'usage.db'}")
    if request.param == "collector":
        bootstrap = request.getfixturevalue("kafka_bootstrap")
        unique_topic = request.getfixturevalue("unique_topic")
        topics = (unique_topic("measures"), unique_topic("cloudstack"))

        def collector(api: str) -> tuple[list[str], Path]:
            config = collector_toml(tmp_path, bootstrap, topics, api)
            return [*KVMETER, "collector", "--config", str(config)], tmp_path

        return collector

    def allinone(api: str) -> tuple[list[str], Path]:
        config = allinone_toml(tmp_path, api)
        return [*KVMETER, "run", "--all-in-one", "--config", str(config)], tmp_path

    return allinone


@pytest.fixture
def start(launcher: Launcher) -> Iterator[Callable[[str], Service]]:
    started: list[Service] = []

    def run(api: str) -> Service:
        port = free_port()
        args, workdir = launcher(f'listen = "127.0.0.1:{port}"\n{api}')
        service = Service(args, workdir, port).start()
        started.append(service)
        return service

    yield run
    for service in started:
        service.stop()


def usage_of(service: Service, token: str) -> dict[str, int]:
    status, body = service.get("/v1/usage", token=token, start="2024-05-14", end="2024-05-15", type="4")
    assert status == 200, body
    return {r["account"]: r["quantity"] for r in body["usage"]}


def records_of(client: CloudStack, **params: object) -> dict[str, int]:
    body = client.listUsageRecords(startdate="2024-05-14", enddate="2024-05-14", type=4, **params)
    return {r["accountid"]: int(r["rawusage"]) for r in body["usagerecord"]}


EVERYONE = {ACCT_A: 1000, ACCT_B: 2000, ACCT_C: 4000}


def test_token_and_cloudstack_key_pair_from_the_config_file_work_together(
    start: Callable[[str], Service],
) -> None:
    service = start(
        f'token = "{TOKEN}"\ncloudstack_api_key = "{API_KEY}"\ncloudstack_secret_key = "{SECRET}"'
    )
    assert usage_of(service, TOKEN) == EVERYONE
    assert records_of(service.client(API_KEY, SECRET)) == EVERYONE  # signed, expires in 10 min
    assert records_of(service.client(API_KEY, SECRET, expiration=-1)) == EVERYONE  # no expires
    # Nobody else gets in.
    assert service.get("/v1/usage", start="2024-05-14", end="2024-05-15")[0] == 401
    assert service.get("/v1/usage", token="guess", start="2024-05-14", end="2024-05-15")[0] == 401
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
    assert refused.value.response.status_code == 401
    assert "expired" in refused.value.error["errortext"]
    assert service.get("/health")[0] == 200  # open: load balancers probe it


def test_refuses_to_listen_beyond_loopback_without_a_credential(launcher: Launcher) -> None:
    args, _ = launcher(f'listen = "0.0.0.0:{free_port()}"')
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "no credential is configured" in done.stderr, done.stderr
