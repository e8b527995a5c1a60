"""The balances core (collector/balances.py) and the [balances] section: a crossing is the change
to below, once; staying below is none; a credit re-arms; every bad threshold is listed."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from kvmeter.collector import config
from kvmeter.collector.balances import Balance, Thresholds, crossings

D = Decimal
TARIFF = {"tariff_file": str(Path(__file__).resolve().parents[2] / "packaging/config/tariff.toml.example")}


def bal(account: str, credits: str, costs: str, threshold: str | None = "5") -> Balance:
    return Balance(account, "EUR", D(credits), D(costs), None if threshold is None else D(threshold))


@pytest.mark.parametrize(
    ("balance", "below_before", "crosses"),
    [
        (bal("a", "10", "4"), None, False),  # 6 >= 5
        (bal("a", "10", "5"), None, False),  # exactly the threshold: not below
        (bal("a", "10", "5.01"), None, True),  # first evaluation, below: a crossing
        (bal("a", "10", "6"), False, True),
        (bal("a", "10", "6"), True, False),  # still below: no new alert
        (bal("a", "10", "60"), True, False),
        (bal("a", "10", "11", threshold="0"), False, True),  # a zero threshold: negative balance
        (bal("a", "10", "600", threshold=None), False, False),  # not watched
    ],
)
def test_crossing_is_the_change_to_below(balance: Balance, below_before: bool | None, crosses: bool) -> None:
    before = {} if below_before is None else {balance.account: below_before}
    assert bool(crossings([balance], before)) == crosses


def test_thresholds_own_over_default() -> None:
    t = Thresholds(D("5"), {"b": D("50")})
    assert (t.of("a"), t.of("b")) == (D("5"), D("50"))
    assert Thresholds(None, {"b": D("1")}).of("a") is None


def test_balances_section() -> None:
    cfg = config.from_dict(
        {
            "billing": TARIFF,
            "balances": {"threshold": "10.00", "evaluate_seconds": 5, "accounts": {"acct-b": "0"}},
        }
    ).balances
    assert cfg is not None
    assert cfg.thresholds == Thresholds(D("10.00"), {"acct-b": D("0")})
    assert cfg.evaluate_s == 5
    assert config.from_dict({}).balances is None


def test_every_bad_balances_setting_is_listed() -> None:
    with pytest.raises(config.ConfigError) as err:
        config.from_dict(
            {
                "balances": {
                    "threshold": "ten",
                    "accounts": {"a": 5, "b": "-1"},
                    "webhook_url": "ftp://x",
                    "x": 1,
                }
            }
        )
    text = "\n".join(err.value.problems)
    for part in ("balances.threshold", "balances.accounts.a", "balances.accounts.b", "balances.webhook_url",
                 "balances.x"):  # fmt: skip
        assert part in text, text
