"""The `[balances]` section of the collector's (and the all-in-one's) TOML: low-balance alerts.

    [balances]
    threshold = "10.00"          # default for every account with credits; none: only those below
    evaluate_seconds = 60        # how often balances are compared with their thresholds
    webhook_url = "https://billing.example.com/hooks/kvmeter"   # optional: each alert POSTed
    webhook_timeout_seconds = 10
    [balances.accounts]          # an account's own threshold (CloudStack account uuid)
    "5f3e...-uuid" = "50.00"

Amounts are strings (money is never a float), in the tariff's currency. Balances need costs,
so the section needs a tariff ([billing] tariff_file): without one it is refused. No section: no
alerts; credits and /v1/balances work all the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from kvmeter.collector.balances import Thresholds
from kvmeter.collector.money_input import credit_amount
from kvmeter.tomlconfig import url_userinfo_problems

_AMOUNT = {"type": "string", "minLength": 1, "maxLength": 40}

BALANCES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "threshold": _AMOUNT,
        "evaluate_seconds": {"type": "number", "exclusiveMinimum": 0},
        "webhook_url": {"type": "string", "pattern": "^https?://[^\\s/]+"},  # a host, as [handoff]
        "webhook_timeout_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 300},
        "accounts": {"type": "object", "additionalProperties": _AMOUNT},
    },
}


@dataclass(frozen=True)
class BalancesConfig:
    thresholds: Thresholds = field(default_factory=Thresholds)
    evaluate_s: float = 60.0
    webhook_url: str = ""
    webhook_timeout_s: float = 10.0


def balances_config(section: Any, problems: list[str], *, priced: bool) -> BalancesConfig | None:
    """The section's settings (problems appended, the schema's own already listed); None: none.
    priced: [billing] names a tariff file."""
    if not isinstance(section, dict):
        return None
    if not priced:  # nothing rated, no balance known: an evaluation would re-arm every crossing
        problems.append("balances: needs a tariff ([billing] tariff_file): a balance is credits minus costs")

    def amount(value: Any, at: str) -> Decimal | None:
        if not isinstance(value, str):
            return None  # the schema says so
        try:
            return credit_amount(value, zero=True)  # zero: alert when the balance goes negative
        except ValueError as exc:
            problems.append(f"{at}: {exc}")
            return None

    problems += url_userinfo_problems(section.get("webhook_url", ""), "balances.webhook_url")
    default = amount(section["threshold"], "balances.threshold") if "threshold" in section else None
    accounts = section.get("accounts", {})
    own = {}
    if isinstance(accounts, dict):
        for account, value in accounts.items():
            found = amount(value, f"balances.accounts.{account}")
            if found is not None:
                own[account] = found
    return BalancesConfig(
        thresholds=Thresholds(default, own),
        evaluate_s=float(section.get("evaluate_seconds", 60.0)),
        webhook_url=str(section.get("webhook_url", "")),
        webhook_timeout_s=float(section.get("webhook_timeout_seconds", 10.0)),
    )
