"""kvmeter's own /v1 API at its edges: a domain credential's cursor while its domain gains an
account, more credits than a page (API and CLI), a credit added by a long-named credential."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from flask.testing import FlaskClient

from kvmeter.cli import main
from kvmeter.collector.api import authenticator, create_app
from kvmeter.collector.credentials import Credentials, CredentialSource, Grant, token_digest
from kvmeter.collector.schema_credits import credits
from kvmeter.collector.store import Store
from kvmeter.collector.store.credentials import TOKEN as TOKEN_KIND
from kvmeter.collector.store.credentials import MintedCredentials
from tests.api_support import NOW, filled_store
from tests.collector_support import ACCT_A, ACCT_B
from tests.integration.test_corrections_pages import CORRECTIONS, add_corrections

DOMAIN = "5d0d0000-0000-4000-8000-00000000dom1"
TOKEN = "domain-token"
VM1_OWNER = {"i-2-10-VM": {"ownerAccountUuid": ACCT_A, "ownerDomainUuid": DOMAIN}}  # VM1's libvirt name
VM2_OWNER = {"i-3-11-VM": {"ownerAccountUuid": ACCT_B, "ownerDomainUuid": DOMAIN}}
BEARER = {"Authorization": f"Bearer {TOKEN}"}
DAY = {"start": "2024-05-14", "end": "2024-05-15"}


def _page(client: FlaskClient, path: str, **params: str) -> dict[str, Any]:
    resp = client.get(path, query_string=params, headers=BEARER)
    assert resp.status_code == 200, resp.data
    return json.loads(resp.data)


def test_a_domain_credentials_cursor_survives_an_account_joining_its_domain(tmp_path: Path) -> None:
    """A cursor continues its query while rows are added: a domain-scoped credential paging
    /v1/usage or /v1/corrections must be able to follow `next` after another account of its
    domain shows up (a new customer's VM reports its owner), not get a 400 "cursor is not one
    this API gave for this query" and have to start the walk again (a reseller's domain gains
    accounts all the time). Every page is narrowed to the domain's accounts as they are then."""
    store, _ = filled_store(tmp_path)
    add_corrections(store, CORRECTIONS, NOW)
    with store.write() as conn:  # VM1 is account A's, in the domain
        store.save_owner_hints(conn, VM1_OWNER, NOW)
    configured = Credentials({token_digest(TOKEN): Grant("reseller", frozenset(), frozenset({DOMAIN}))})
    auth = authenticator(store, CredentialSource(configured), loopback=False)
    auth.DOMAIN_CACHE_S = 0  # the domain's accounts read on every request
    client = create_app(store, auth=auth).test_client()

    usage = _page(client, "/v1/usage", **DAY, limit="2")
    corrections = _page(client, "/v1/corrections", limit="1")
    assert {r["account"] for r in usage["usage"]} == {ACCT_A}
    assert {r["accountid"] for r in corrections["corrections"]} == {ACCT_A}
    assert usage["next"]
    assert corrections["next"]

    with store.write() as conn:  # account B's VM2 reports the same domain: B joined it
        store.save_owner_hints(conn, VM2_OWNER, NOW)
    more = _page(client, "/v1/usage", **DAY, limit="2", cursor=usage["next"])["usage"]
    assert more
    assert more[0]["start_ms"] >= usage["usage"][-1]["start_ms"]
    assert _page(client, "/v1/corrections", limit="1", cursor=corrections["next"])["corrections"]
    # Still narrowed: another account is a 403, and its cursor another query's.
    assert client.get("/v1/usage", query_string={**DAY, "account": "x"}, headers=BEARER).status_code == 403
    other = {**DAY, "account": ACCT_A, "cursor": usage["next"]}
    assert client.get("/v1/usage", query_string=other, headers=BEARER).status_code == 400
    store.close()


def test_every_credit_is_listed_however_many_there_are(tmp_path: Path) -> None:
    """GET /v1/credits lists every credit of the caller's accounts: past 10,000 credits (a public
    cloud's top-ups over a few years) the answer must not silently stop at the oldest 10,000 with
    no sign that more exist; it pages like the other lists (`next` until the last page), so the
    newest credit, the one an operator looks for, is reachable."""
    store, _ = filled_store(tmp_path)
    many = 10_001
    with store.write() as conn:  # one insert: cheap even for ten thousand rows
        rows = [{"account": ACCT_A if i % 2 else ACCT_B, "amount": "1.00", "currency": "EUR", "note": f"n{i}",
                 "created_by": "ops", "created_ms": NOW + i} for i in range(many)]  # fmt: skip
        conn.execute(credits.insert(), rows)
    client = create_app(store).test_client()  # loopback, no credential: the operator
    seen: list[dict[str, Any]] = []
    params: dict[str, str] = {}
    for _ in range(many):
        body = json.loads(client.get("/v1/credits", query_string=params).data)
        assert body["count"] == len(body["credits"])
        seen += body["credits"]
        if not body.get("next"):
            break
        params["cursor"] = body["next"]
    assert len(seen) == many
    assert [c["note"] for c in seen] == [f"n{i}" for i in range(many)]  # oldest first, none twice
    listed = CliRunner().invoke(main, ["credits", "list", "--db", str(store.engine.url), "--format", "json"])
    assert listed.exit_code == 0, listed.output
    assert [c["note"] for c in json.loads(listed.output)] == [f"n{i}" for i in range(many)]  # the CLI too
    store.close()


def test_a_credit_added_by_a_minted_operator_credential_with_a_long_name(store: Store) -> None:
    """POST /v1/credits records who added the credit (`created_by`, the credential's name and
    id). A minted operator credential may have a name of up to 128 characters, and the label
    `<name> (credential <id>)` is longer than the 128 the column holds: the credit must still be
    added (201, on PostgreSQL too, which refuses an over-long value), not be lost in a 500."""
    name = "billing-automation " + "x" * 109  # 128 characters: the most `credentials create` takes
    _, secrets = MintedCredentials(store).create(TOKEN_KIND, name, Grant(name), NOW)
    client = create_app(store).test_client()
    headers = {"Authorization": f"Bearer {secrets['token']}"}
    resp = client.post(
        "/v1/credits", json={"account": ACCT_A, "amount": "5.00", "currency": "EUR"}, headers=headers
    )
    assert resp.status_code == 201, resp.data
    added = json.loads(resp.data)
    assert added["created_by"].startswith("billing-automation ")
    assert len(added["created_by"]) <= 128  # what the column holds, on any database
    assert added["created_by"].endswith("(credential 1)")  # which credential it was stays known
    listed = json.loads(client.get("/v1/credits", headers=headers).data)["credits"]
    assert [c["amount"] for c in listed] == ["5.00"]
