"""The API's page sizes through the front door: `kvmeter collector --config FILE` and
`kvmeter run --all-in-one --config FILE` started from TOML files whose [api] sets them; the `cs`
client and /v1/usage see them take effect."""

from __future__ import annotations

import subprocess

import pytest
from cs import CloudStackApiException

from tests.integration import test_api_credentials as front
from tests.integration.test_api_credentials import API_KEY, EVERYONE, SECRET, TOKEN, Launcher, Start

launcher, start = front.launcher, front.start  # the fixtures: both commands, from their files

PAGING = "cloudstack_page_size = 2\npage_size = 2\nmax_page_size = 3"
KEYS = f'token = "{TOKEN}"\ncloudstack_api_key = "{API_KEY}"\ncloudstack_secret_key = "{SECRET}"'
DAY = {"startdate": "2024-05-14", "enddate": "2024-05-14", "type": 4}


def test_page_sizes_from_the_config_file_take_effect(start: Start) -> None:
    service = start(f"{KEYS}\n{PAGING}")
    cs = service.client(API_KEY, SECRET)
    first = cs.listUsageRecords(**DAY)  # no pagesize: default.page.size, here 2
    assert (first["count"], len(first["usagerecord"])) == (len(EVERYONE), 2)
    every = cs.listUsageRecords(**DAY, fetch_list=True, pagesize=2)
    assert {r["accountid"]: int(r["rawusage"]) for r in every} == EVERYONE
    with pytest.raises(CloudStackApiException) as refused:
        cs.listUsageRecords(**DAY, page=1, pagesize=3)
    assert refused.value.error["errorcode"] == 431
    assert "max allowed page size value: 2" in refused.value.error["errortext"]
    status, body = service.get("/v1/usage", token=TOKEN, start="2024-05-14", end="2024-05-15", type="4")
    assert (status, body["count"]) == (200, 2)  # page_size
    assert body["next"]
    status, body = service.get("/v1/usage", token=TOKEN, start="2024-05-14", end="2024-05-15", limit="4")
    assert status == 400
    assert "between 1 and 3" in body["error"]  # max_page_size
    status, doc = service.get("/v1/openapi.json", token=TOKEN)
    limit = next(p for p in doc["paths"]["/v1/usage"]["get"]["parameters"] if p["name"] == "limit")
    assert limit["schema"]["maximum"] == 3


@pytest.mark.parametrize(
    ("api", "says"),
    [
        ("page_size = 5\nmax_page_size = 4", "api.page_size: 5 is above api.max_page_size (4)"),
        ("cloudstack_page_size = 0", "api.cloudstack_page_size"),
        ("max_page_size = 100001", "api.max_page_size"),
        ('page_size = "10"', "api.page_size"),
    ],
)
def test_bad_page_sizes_stop_the_command_at_start(launcher: Launcher, api: str, says: str) -> None:
    command = launcher(f'listen = "127.0.0.1:1"\n{KEYS}\n{api}')
    done = subprocess.run(command.args, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert says in done.stderr, done.stderr
