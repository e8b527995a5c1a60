"""The money path at its edges: a rebuild hands off every window it finalizes and every item the
live outbox had not delivered; pruning never refunds a prepaid account; the hand-off rates a
custom-size VM at the size it ran with, as /v1/costs does; the all-in-one prices the
adjustments of a policy change made at start; money is plain decimal text whatever the tariff's
decimals; adding a credit answers with what it added, however many the account holds."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

import kvmeter.agent.cli
from kvmeter.collector import billable, cost_report
from kvmeter.collector.api import authenticator, create_app
from kvmeter.collector.balance_watch import BalanceBook
from kvmeter.collector.balances import Thresholds
from kvmeter.collector.billing import months_costs, tariff_file
from kvmeter.collector.billing.costs import month_bounds, month_costs
from kvmeter.collector.billing.rating import Facts, Item
from kvmeter.collector.billing.reads import item_pricing
from kvmeter.collector.billing.tariff_file import TariffSource
from kvmeter.collector.credentials import CredentialSource, from_entries
from kvmeter.collector.model import RUNNING_VM, Record, Settings, UsageKey
from kvmeter.collector.policy_change import put_in_force_at_start
from kvmeter.collector.prune import Pruner
from kvmeter.collector.rebuild import rebuild
from kvmeter.collector.retention import DAY_MS, RetentionPolicy
from kvmeter.collector.schema import handoff_outbox
from kvmeter.collector.schema_credits import credits
from kvmeter.collector.service import Collector
from kvmeter.collector.store import credits as stored
from kvmeter.pipeline import allinone
from tests.billing_support import ACCT_A, GB, TARIFF_DOC, tariff
from tests.collector_support import HOUR, T0, VM1, Clock, M, Stream, usage_event
from tests.integration.test_handoff_ids import items as _items
from tests.integration.test_handoff_ids import opened as _opened
from tests.integration.test_outbox_store import _run


def test_rebuild_after_stop_hands_off_every_window_it_finalizes(tmp_path: Path) -> None:
    """Runbook: stop the collectors (live finalized through T0+5h at its last tick, T0+7h),
    rebuild into a new store (which takes time: now T0+10h), put the new store in service.
    Every final record must reach billing once as version 0 (from the live outbox or the new
    store's), windows final only in the rebuilt store among them."""
    live = _opened(f"sqlite:///{tmp_path}/live.db", outbox=True)
    _run(live)  # last tick at T0+7h: final through T0+5h
    with live.read() as conn:
        live_through = live.finalized_through(conn, lock=False)
    into_url = f"sqlite:///{tmp_path}/rebuilt.db"
    into = _opened(into_url, outbox=False)
    rebuild(Settings(), None, live, into, lambda: T0 + 10 * HOUR)  # the rebuild ends 3 h later
    into.close()
    into = _opened(into_url, outbox=True)  # in service, with [handoff]
    Collector(into, Settings(), Clock(T0 + 11 * HOUR)).tick()

    handed = {i["transaction_id"] for s in (live, into) for i in _items(s)}
    final_records = [r for r in into.usage(0, 2**62) if r.final and r.quantity != 0]
    missing = sorted(
        (r.key.usage_type, r.key.resource[-3:], (r.key.window_start_ms - T0) // HOUR)
        for r in final_records
        if billable.transaction_id(r.key, 0) not in handed
    )
    assert live_through == T0 + 5 * HOUR
    assert missing == [], f"final records never handed off to billing (type, resource, hour): {missing}"
    live.close()
    into.close()


def test_pruning_old_usage_does_not_raise_a_balance(tmp_path: Path) -> None:

    store = _opened(f"sqlite:///{tmp_path}/usage.db", outbox=False)
    clock = Clock(T0 + HOUR)
    collector = Collector(store, Settings(), clock)
    stream = Stream("stream-old", owners={"i-0-VM": {"ownerAccountUuid": ACCT_A}})
    m = M(
        T0 + 10 * 60_000,
        T0 + 11 * 60_000,
        3 * GB,
        instance="",
        domain="i-0-VM",
        mac="02:00:00:00:00:01",
        address="",
    )
    assert collector.apply_batch(stream.batch([m])).billed_bytes == 3 * GB
    clock.now = T0 + 4 * HOUR
    collector.tick()  # the window is final: billed
    with store.write() as conn:
        stored.add_credit(conn, ACCT_A, Decimal("10.00"), "EUR", "prepaid", "operator", T0 - 5000)

    now = T0 + 40 * DAY_MS
    book = BalanceBook(store, tariff, Thresholds(Decimal("5.00")))
    [before] = book.balances(None, now)
    assert (before.credits, before.costs, before.balance) == (
        Decimal("10.00"),
        Decimal("3.00"),
        Decimal("7.00"),
    )

    days = 30 * DAY_MS  # usage kept 30 days (lifecycle and parked no longer, as retention demands)
    Pruner(
        store, RetentionPolicy(usage_ms=days, lifecycle_events_ms=days, parked_measures_ms=days), lambda: now
    ).run()
    [after] = BalanceBook(store, tariff, Thresholds(Decimal("5.00"))).balances(None, now)
    assert after.balance == before.balance, (
        f"a retention pass moved the balance from {before.balance} to {after.balance}: "
        f"costs {before.costs} -> {after.costs}"
    )
    store.close()


def test_costs_are_written_as_plain_decimals_whatever_the_tariffs_decimals() -> None:

    doc = {**TARIFF_DOC, "decimals": 8}  # allowed: 0..12
    doc["rate"] = [dict(r) for r in TARIFF_DOC["rate"]]
    doc["rate"][3]["price"] = "0.01"  # 0.01 per GB sent
    tariff = tariff_file.from_dict(doc, "t", billable=["public"])
    start, end = month_bounds(T0)
    acct = "aaaaaaaa-0000-4000-8000-00000000000a"
    sent = UsageKey(acct, 4, "vm-1", "", "public", T0, T0 + HOUR)
    received = UsageKey(acct, 5, "vm-1", "", "public", T0, T0 + HOUR)
    items = [Item(sent, 12, at_ms=T0), Item(received, 5000, at_ms=T0)]  # 12 bytes: 1.2E-10 -> 0E-8
    month = month_costs(
        acct,
        [
            *items,
            Item(
                sent._replace(window_start_ms=T0 + HOUR, window_end_ms=T0 + 2 * HOUR), 12_000, at_ms=T0 + HOUR
            ),
        ],
        tariff,
        Facts(),
        T0 + 3 * HOUR,
        start,
        end,
        project=False,
    )
    body = cost_report.document([month], tariff.currency, start, end, T0 + 3 * HOUR, items=True)
    money = [body["accounts"][0]["cost"]]
    money += [line["cost"] for line in body["accounts"][0]["lines"]]
    money += [i["cost"] for i in body["accounts"][0]["items"]]
    csv_text = cost_report.render_csv([month])
    bad = [m for m in money if "E" in m or "e" in m]
    assert not bad, f"money in exponent notation in /v1/costs' JSON: {money}"
    assert "E-" not in csv_text, csv_text


def test_handoff_prices_a_custom_size_vm_at_the_size_in_its_record(tmp_path: Path) -> None:

    doc = {**TARIFF_DOC, "rate": [dict(r) for r in TARIFF_DOC["rate"]]}
    doc["rate"][0] = {"usage_type": "RUNNING_VM", "per_vcpu_hour": "0.01", "per_gib_hour": "0.02"}
    tariff = tariff_file.from_dict(doc, "t", billable=["public"])
    vm = "9b1f0000-0000-4000-8000-00000000cust"
    # The VM ran this hour with 2 vCPUs / 2 GiB (a custom offering: the size is in the record);
    # it has been scaled to 4 vCPUs / 8 GiB since, which is what the facts know now.
    facts = Facts(vm_sizes={vm: (4, 8192)})
    store = _opened(f"sqlite:///{tmp_path}/usage.db", outbox=True)
    store.pricing = lambda _conn: (tariff, facts)
    key = UsageKey(ACCT_A, RUNNING_VM, vm, "custom-offering", "2/2048", T0, T0 + HOUR)
    with store.write() as conn:
        store.set_time_values_many(conn, {vm: {key: HOUR}}, 0, T0 + 10)
        store.finalize(conn, T0 + HOUR, T0 + 3 * HOUR)
    [item] = _items(store)
    assert (item["cpunumber"], item["memory"]) == (2, 2048)  # the item says the size it ran with
    [month] = months_costs(store, tariff, frozenset({ACCT_A}), T0 + 3 * HOUR, facts=facts, project=False)
    assert month.cost == Decimal("0.06")  # /v1/costs: 2 x 0.01 + 2 GiB x 0.02
    assert Decimal(item["cost"]["amount"]) == month.cost, (
        f"hand-off item priced {item['cost']['amount']} for 2 vCPUs / 2 GiB; /v1/costs {month.cost}"
    )
    store.close()


def test_allinone_prices_the_adjustments_of_a_policy_change_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    doc = {**TARIFF_DOC, "rate": [dict(r) for r in TARIFF_DOC["rate"]]}
    doc["rate"][1] = {"usage_type": "ALLOCATED_VM", "per_hour": "0.10"}
    (tmp_path / "tariff.toml").write_text(
        'currency = "EUR"\ndecimals = 2\n'
        + "".join("[[rate]]\n" + "".join(f'{k} = "{v}"\n' for k, v in r.items()) for r in doc["rate"])
    )
    tariff = tariff_file.load(tmp_path / "tariff.toml", ["public"])
    url = f"sqlite:///{tmp_path}/usage.db"

    # Yesterday's run, default policy (ALLOCATED from the create), hand-off and tariff configured.
    store = _opened(url, outbox=True)
    store.pricing = item_pricing(store, TariffSource(tariff, tmp_path / "tariff.toml", ["public"]))
    clock = Clock(T0 + 6 * HOUR)
    collector = Collector(store, Settings(), clock)
    put_in_force_at_start(collector)
    for event, at in (("VM.CREATE", T0), ("VM.START", T0 + 2 * HOUR)):
        k, v = usage_event(event, VM1, ACCT_A, at)
        collector.apply_events([Record(v, k)])
    collector.tick()  # final through T0+4h: ALLOCATED T0..T0+4h handed off, with costs
    assert all("cost" in i for i in _items(store))
    store.close()

    # Restarted as an all-in-one with allocated_from = "first_start": ALLOCATED T0..T0+2h goes.
    config = tmp_path / "allinone.toml"
    config.write_text(
        f'[store]\nurl = "{url}"\n[billing]\ntariff_file = "tariff.toml"\n'
        '[handoff]\nwebhook_url = "http://127.0.0.1:9/items"\n'
        '[policy]\nallocated_from = "first_start"\n[api]\nenabled = false\n'
        f'[agent]\nstate_dir = "{tmp_path}/agent"\n'
    )
    monkeypatch.setattr(kvmeter.agent.cli, "build_agent", lambda *a, **k: None)
    pipeline = allinone.AllInOne(allinone.load(config), clock=lambda: T0 + 7 * HOUR)
    try:
        made = [i for i in _items(pipeline.store) if i["kind"] == "adjustment"]
        assert made, "the policy change adjusts the two final ALLOCATED windows before the start"
        assert all("cost" in i for i in made), (
            f"adjustments handed off without a cost although a tariff is configured: {made}"
        )
    finally:
        if pipeline.relay is not None:
            pipeline.relay.close()
        pipeline.store.close()


def test_rebuild_carries_items_the_live_outbox_has_not_delivered(tmp_path: Path) -> None:
    """Runbook: stop the collectors, rebuild, point [store] url at the new store. The live
    outbox still held items no sink had confirmed (the billing webhook was down): they must go
    out from the new store, since nothing else will ever send them."""
    live = _opened(f"sqlite:///{tmp_path}/live.db", outbox=True)
    _run(live)  # items made; no relay ran: all pending
    with live.read() as conn:
        pending = set(
            conn.execute(
                sa.select(handoff_outbox.c.transaction_id).where(handoff_outbox.c.sent_ms.is_(None))
            ).scalars()
        )
    assert pending
    into_url = f"sqlite:///{tmp_path}/rebuilt.db"
    into = _opened(into_url, outbox=False)
    rebuild(Settings(), None, live, into, lambda: T0 + 7 * HOUR)  # at once: no window in between
    into.close()
    into = _opened(into_url, outbox=True)
    carried = {i["transaction_id"] for i in _items(into)}
    lost = pending - carried
    assert not lost, f"{len(lost)} of {len(pending)} undelivered billable items are never handed off"
    live.close()
    into.close()


def test_adding_a_credit_to_an_account_with_many_credits_answers_what_it_added(tmp_path: Path) -> None:

    store = _opened(f"sqlite:///{tmp_path}/usage.db", outbox=False)
    rows = [{"account": ACCT_A, "amount": "0.01", "currency": "EUR", "note": "", "created_by": "ops",
             "created_ms": T0 + i} for i in range(10_000)]  # fmt: skip
    with store.write() as conn:
        conn.execute(sa.insert(credits), rows)
    token = "operator-token-0123456789"
    creds, _ = from_entries([{"name": "ops", "token": token}], "test")
    app = create_app(store, auth=authenticator(store, CredentialSource(creds)), tariffs=None)
    answer = app.test_client().post(
        "/v1/credits",
        json={"account": ACCT_A, "amount": "25.00", "currency": "EUR"},
        headers={"Authorization": f"Bearer {token}"},
    )
    with store.read() as conn:
        held = conn.execute(sa.select(sa.func.count()).select_from(credits)).scalar()
    assert answer.status_code == 201, (
        f"answered {answer.status_code} {answer.get_data(as_text=True)!r} with the credit committed "
        f"({held} credits): a client retrying the failed request credits the account twice"
    )
    store.close()
