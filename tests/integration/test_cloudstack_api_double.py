"""The CloudStack API double answers as CloudStack's source does (tests/harness/cloudstack_api.py
names the classes): paging rules, listall / projectid / allocatedonly / state, the errors and
their envelope, and signatures, through the real `cs` client and raw HTTP."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from cs import CloudStack, CloudStackApiException

from tests.harness import cloudstack_api as api

T0 = 1_715_680_800_000


@pytest.fixture
def double() -> Iterator[api.CloudStackApiDouble]:
    with api.CloudStackApiDouble() as d:
        d.cloud["listAccounts"] = [api.account(f"acct-{i:04d}", f"user{i}") for i in range(1203)]
        d.cloud["listVirtualMachines"] = [
            api.vm("vm-mine", "a", api.CALLER, "Running", "small", T0),
            api.vm("vm-alice", "b", "alice", "Stopped", "small", T0),
            api.vm("vm-proj", "c", "PrjAcct-p", "Running", "small", T0, project_id="proj-1"),
            api.vm("vm-hidden", "d", "alice", "Running", "small", T0, display=False),
        ]
        d.cloud["listPublicIpAddresses"] = [
            api.public_ip("ip-held", "203.0.113.7", "alice", T0),
            api.public_ip("ip-free", "203.0.113.8", "", None, state="Free"),
        ]
        yield d


def client(double: api.CloudStackApiDouble, secret: str = api.SECRET) -> Any:
    return CloudStack(endpoint=double.endpoint, key=api.API_KEY, secret=secret)


def signed_get(double: api.CloudStackApiDouble, **params: str) -> requests.Response:
    """A request signed as CloudStack checks it (cs adds a pagesize to a page on its own)."""
    pairs = [("response", "json"), ("apiKey", api.API_KEY), *params.items()]
    pairs.append(("signature", api.signature(pairs, api.SECRET)))
    return requests.get(double.endpoint, params=pairs, timeout=5)


def refused(call: Any) -> dict[str, Any]:
    with pytest.raises(CloudStackApiException) as exc:
        call()
    return exc.value.error


def test_paging_follows_base_list_cmd(double: api.CloudStackApiDouble) -> None:
    cs = client(double)
    assert len(cs.listAccounts(listall=True, fetch_list=True)) == 1203
    first = cs.listAccounts(listall=True)  # no paging: the default page of 500
    assert (first["count"], len(first["account"])) == (1203, 500)
    last = cs.listAccounts(listall=True, page=3, pagesize=500)
    names = [a["name"] for a in last["account"]]
    assert (len(names), names[0], names[-1]) == (203, "user1000", "user1202")
    assert len(cs.listAccounts(listall=True, pagesize=-1)["account"]) == 1203
    assert cs.listAccounts(listall=True, page=4, pagesize=500) == {}  # past the end: an empty list
    for args, text in [
        ({"page": "1"}, '"pagesize" parameter is required when "page" is specified'),
        ({"pagesize": "10"}, '"page" parameter is required when "pagesize" is specified'),
        ({"page": "1", "pagesize": "501"}, "Page size can't exceed max allowed page size value: 500"),
        ({"page": "1", "pagesize": "-1"}, "Can't specify page parameter when pagesize is -1 (Unlimited)"),
    ]:
        answer = signed_get(double, command="listAccounts", listall="true", **args)
        assert answer.status_code == 431
        error = answer.json()["listaccountsresponse"]
        assert (error["errorcode"], error["errortext"]) == (431, text)
        assert error["cserrorcode"] in (api.CS_SERVER_API_EXCEPTION, api.CS_INVALID_PARAMETER)
    assert double.refused == []  # signed right: refused for the paging alone


def test_whose_resources(double: api.CloudStackApiDouble) -> None:
    cs = client(double)
    ids = lambda doc: sorted(v["id"] for v in doc.get("virtualmachine", []))  # noqa: E731
    assert ids(cs.listVirtualMachines()) == ["vm-mine"]  # without listall: the caller's own
    assert ids(cs.listVirtualMachines(listall=True)) == ["vm-alice", "vm-mine"]
    assert ids(cs.listVirtualMachines(listall=True, projectid=-1)) == ["vm-proj"]
    assert ids(cs.listVirtualMachines(listall=True, state="stopped")) == ["vm-alice"]
    # displayed VMs only unless displayvm is given, to a root admin too
    assert ids(cs.listVirtualMachines(listall=True, displayvm="false")) == ["vm-hidden"]
    assert ids(cs.listVirtualMachines(listall=True, displayvm="true")) == ["vm-alice", "vm-mine"]
    ips = lambda doc: sorted(v["id"] for v in doc.get("publicipaddress", []))  # noqa: E731
    assert ips(cs.listPublicIpAddresses(listall=True)) == ["ip-held"]  # allocatedonly by default
    assert ips(cs.listPublicIpAddresses(listall=True, allocatedonly=False)) == ["ip-free", "ip-held"]


def test_errors_and_signatures(double: api.CloudStackApiDouble) -> None:
    error = refused(lambda: client(double, secret="wrong").listVirtualMachines(listall=True))
    assert (error["errorcode"], error["errortext"]) == (
        401,
        "unable to verify user credentials and/or request signature",
    )
    assert double.refused[-1] == "signature mismatch"
    # An unknown command is refused before any signature is looked at, under "errorresponse".
    raw = requests.get(double.endpoint, params={"command": "listNothing", "response": "json"}, timeout=5)
    assert raw.status_code == 432
    assert raw.json() == {
        "errorresponse": {
            "uuidList": [],
            "errorcode": 432,
            "cserrorcode": api.CS_SERVER_API_EXCEPTION,
            "errortext": "The given command does not exist or it is not available for user",
        }
    }
    unsigned = requests.get(
        double.endpoint, params={"command": "listVirtualMachines", "apiKey": api.API_KEY}, timeout=5
    )
    assert unsigned.status_code == 401
    assert unsigned.json()["listvirtualmachinesresponse"]["errorcode"] == 401
    # signatureVersion 3 with an expiry in the past
    expired = CloudStack(endpoint=double.endpoint, key=api.API_KEY, secret=api.SECRET, expiration=-1)
    old = {"signatureVersion": "3", "expires": "2020-01-01T00:00:00+0000"}
    assert refused(lambda: expired.listVirtualMachines(listall=True, **old))["errorcode"] == 401
    assert double.refused[-1] == "request expired"


def test_the_signature_is_computed_over_names_as_sent() -> None:
    """verifyRequest sorts the names as sent (upper case before lower), then lower-cases."""
    pairs = [("command", "listVirtualMachines"), ("apiKey", "k"), ("zKey", "x y"), ("aa", "~"), ("aB", "1")]
    text = "ab=1&aa=%7e&apikey=k&command=listvirtualmachines&zkey=x%20y"  # aB before aa
    mac = hmac.new(b"s", text.encode(), hashlib.sha1).digest()
    assert api.signature(pairs, "s") == base64.b64encode(mac).decode()
