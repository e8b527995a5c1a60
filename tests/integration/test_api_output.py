"""What the API and the CLI write: CloudStack's XML stays well-formed XML 1.0 whatever it echoes
or a tag holds; the CLI's table shows an adjustment in its quantity's unit; the CLI's cloudstack
format is what /client/api answers for the same records."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvmeter.collector.api import create_app
from kvmeter.collector.cli import usage as usage_cli
from kvmeter.collector.ingest import ingest_measures
from kvmeter.collector.model import ALLOCATED_VM, RUNNING_VM
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from tests.api_support import NOW, filled_store
from tests.collector_support import ACCT_A, HOUR, T0, VM1, VM2, M, Stream, delimited, set_time_values

DOMAIN_A = "d0000000-0000-4000-8000-00000000dom-a"
DAY = {"command": "listUsageRecords", "startdate": "2024-05-14", "enddate": "2024-05-14"}


Filled = tuple[Store, Collector, Path]


@pytest.fixture
def filled(tmp_path: Path) -> Iterator[Filled]:
    store, collector = filled_store(tmp_path)
    yield store, collector, tmp_path
    store.close()


def _inventory(collector: Collector, tmp_path: Path, owner: dict[str, str]) -> None:
    """One more agent batch whose inventory carries VM1's CloudStack <metadata> (the live path:
    decode_batch -> owner hints in the store)."""
    stream = Stream("stream-audit", "h-audit", owners={"i-2-10-VM": owner})
    path = tmp_path / "inventory.pb"
    path.write_bytes(delimited([stream.batch([M(T0 + 3 * HOUR, T0 + 3 * HOUR + 60_000, 100)])]))
    ingest_measures(collector, path)
    collector.tick()


def test_an_xml_error_echoing_a_control_character_is_well_formed(filled: Filled) -> None:
    """A refused listUsageRecords parameter is echoed into <errortext>: a control character in it
    (startdate=%01) is replaced (XML 1.0 forbids it even as a reference), so a CloudStack XML
    client (CloudMonkey, cs, a billing tool) can read the 431."""
    store, _, _ = filled
    client = create_app(store).test_client()
    for name, value in (("startdate", "\x01"), ("page", "\x02"), ("isrecursive", "\x1b")):
        args = {**DAY, name: value, **({"pagesize": "10"} if name == "page" else {})}
        resp = client.get("/client/api", query_string=args)
        assert resp.status_code == 431
        assert resp.headers["Content-Type"] == "text/xml; charset=UTF-8"
        assert ET.fromstring(resp.data).findtext("errorcode") == "431"


def test_xml_usage_records_with_a_tag_holding_a_control_character_are_well_formed(filled: Filled) -> None:
    """A VM tag (CloudStack <metadata>, through the agent's inventory: any UTF-8 string is
    accepted by decode_batch) holding ESC: JSON escapes it (\\u001b), XML replaces it, so one
    tenant's tag does not make a page of every account's records unreadable."""
    store, collector, tmp_path = filled
    _inventory(collector, tmp_path, {
        "instanceUuid": VM1, "ownerAccountUuid": ACCT_A, "ownerAccountName": "alice",
        "ownerDomainUuid": DOMAIN_A, "tag[0].key": "note", "tag[0].value": "built \x1b[0m\x0c",
    })  # fmt: skip
    client = create_app(store).test_client()
    as_json = client.get("/client/api", query_string={**DAY, "includetags": "true", "response": "json"})
    tags = [t for r in as_json.get_json()["listusagerecordsresponse"]["usagerecord"] for t in r["tags"]]
    assert {"key": "note", "value": "built \x1b[0m\x0c"}.items() <= tags[0].items()  # stored, served
    resp = client.get("/client/api", query_string={**DAY, "includetags": "true"})
    assert resp.status_code == 200
    values = [e.text for e in ET.fromstring(resp.data).iter("value")]
    assert "built \ufffd[0m\ufffd" in values


def test_cli_table_shows_a_time_adjustment_in_the_quantitys_unit(filled: Filled) -> None:
    """`kvmeter usage --format table` prints a VM-time quantity in hours ("0.5 h") and its
    adjustment in the same unit ("(adj -0.5)", as rawusage renders hours), not in ms."""
    store, _, tmp_path = filled
    with store.write() as conn:  # a late lifecycle correction of a final window of VM2
        final_through = store.finalized_through(conn)
        current = {r.key: r.quantity for r in store.usage(0, 2**62, resource=VM2)
                   if r.key.usage_type in (RUNNING_VM, ALLOCATED_VM)}  # fmt: skip
        key = next(
            k for k in sorted(current) if k.usage_type == RUNNING_VM and k.window_end_ms <= final_through
        )
        set_time_values(store, conn, VM2, {**current, key: HOUR // 2}, final_through, NOW)
    row = next(r for r in store.usage(0, 2**62, resource=VM2) if r.key == key)
    assert (row.recorded, row.adjustment, row.quantity) == (HOUR, -HOUR // 2, HOUR // 2)
    db = f"sqlite:///{tmp_path}/usage.db"
    args = [
        "--db",
        db,
        "--start",
        "2024-05-14",
        "--end",
        "2024-05-14",
        "--resource",
        VM2,
        "--format",
        "table",
    ]
    out = CliRunner().invoke(usage_cli, args)
    assert out.exit_code == 0, out.output
    line = next(x for x in out.output.splitlines() if "RUNNING_VM" in x and "(adj" in x)
    assert "(adj -1800000)" not in line, line
    assert "(adj -0.5)" in line, line


def test_cli_cloudstack_format_agrees_with_the_api(filled: Filled) -> None:
    """The CLI renders with the same owner directory as /client/api: `account` is the account's
    name (CloudStack: UsageRecordResponse.accountName), and domainid, domain, zoneid, cpunumber and
    memory are there as the store knows them."""
    store, collector, tmp_path = filled
    _inventory(collector, tmp_path, {
        "instanceUuid": VM1, "ownerAccountUuid": ACCT_A, "ownerAccountName": "alice",
        "ownerDomainUuid": DOMAIN_A, "ownerDomainName": "ROOT", "zoneUuid": "zone-1",
        "cpuCores": "2", "memory": "2048",
    })  # fmt: skip
    api = (
        create_app(store)
        .test_client()
        .get("/client/api", query_string={**DAY, "response": "json", "type": "2", "usageid": VM1})
    )
    (api_rec,) = [r for r in api.get_json()["listusagerecordsresponse"]["usagerecord"]
                  if r["startdate"] == "2024-05-14T09:00:00+0000"]  # fmt: skip
    out = CliRunner().invoke(usage_cli, ["--db", f"sqlite:///{tmp_path}/usage.db", "--start",
                                         "2024-05-14 09:00", "--end", "2024-05-14 10:00", "--type", "2",
                                         "--resource", VM1, "--format", "cloudstack"])  # fmt: skip
    assert out.exit_code == 0, out.output
    (cli_rec,) = json.loads(out.output)["listusagerecordsresponse"]["usagerecord"]
    assert api_rec["account"] == "alice"
    assert cli_rec == api_rec
