"""The name of /client/api's refusal of a command kvmeter does not serve: CloudStack names a 401
after the command (ApiServer.getSerializedApiError), `errorresponse` only for a name that is no
command."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cs import CloudStack, CloudStackApiException

from kvmeter.collector.api import create_app, serve
from kvmeter.collector.store import Store
from tests.api_support import running

API_KEY, SECRET = "billing-key", "billing-secret"
UNAUTHORIZED = "unable to verify user credentials and/or request signature"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path}/usage.db")
    s.migrate()
    yield s
    s.close()


def test_a_refused_command_kvmeter_does_not_serve_is_named_after_the_command(store: Store) -> None:
    """CloudStack's ApiServlet refuses a request it cannot authenticate with
    ApiServer.getSerializedApiError(401, ...), which names the answer after the command
    (getCmdClass(command).getCommandName(): `listvirtualmachinesresponse`) and uses
    `errorresponse` only for a name that is no command (CloudStack's command map is
    case-sensitive: `listusagerecords` is none). kvmeter answered every command but its two as
    `errorresponse`, in JSON and XML."""
    client = create_app(store, cloudstack_keys={API_KEY: SECRET}).test_client()
    params = {"command": "listVirtualMachines", "apikey": API_KEY, "signature": "forged"}
    resp = client.get("/client/api", query_string={**params, "response": "json"})
    expected = {"listvirtualmachinesresponse": {"uuidList": [], "errorcode": 401, "errortext": UNAUTHORIZED}}
    assert (resp.status_code, json.loads(resp.data)) == (401, expected)
    xml = client.get("/client/api", query_string=params).get_data(as_text=True)
    assert "<listvirtualmachinesresponse cloud-stack-version=" in xml, xml
    assert xml.endswith(
        f"<errorcode>401</errorcode><errortext>{UNAUTHORIZED}</errortext></listvirtualmachinesresponse>"
    )
    for no_command in ("listusagerecords", "", "list VMs"):
        resp = client.get("/client/api", query_string={"command": no_command, "response": "json"})
        assert resp.status_code == 401
        assert list(json.loads(resp.data)) == ["errorresponse"], no_command


def test_the_cs_client_reads_the_refusal_under_the_commands_name(store: Store) -> None:
    """The real `cs` client, signing listAccounts with a wrong secret against kvmeter, gets
    CloudStack's refusal: HTTP 401 under `listaccountsresponse`, as a management server answers."""
    server = serve(store, "127.0.0.1", 0, cloudstack_keys={API_KEY: SECRET})
    with running(server) as url:
        client = CloudStack(endpoint=f"{url}/client/api", key=API_KEY, secret="wrong", method="get")
        with pytest.raises(CloudStackApiException) as refused:
            client.listAccounts(listall=True)
    assert refused.value.error == {"uuidList": [], "errorcode": 401, "errortext": UNAUTHORIZED}
    assert list(refused.value.response.json()) == ["listaccountsresponse"]
