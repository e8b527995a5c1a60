"""A credit's amount as people type it: a plain decimal, positive, exact, of a sane size."""

from __future__ import annotations

import re
from decimal import Decimal

MAX_PLACES = 12  # a tariff's prices have at most 12 decimal places
MAX_DIGITS = 15  # before the point: beyond any account's credit
AMOUNT = re.compile(rf"[0-9]{{1,{MAX_DIGITS}}}(\.[0-9]{{1,{MAX_PLACES}}})?")
CURRENCY = re.compile("[A-Za-z]{3,8}")
MAX_NOTE = 500  # characters of a credit's note


def credit_amount(text: object, *, zero: bool = False) -> Decimal:
    """The amount (zero allowed only when asked), or ValueError saying why not. Only plain
    decimal text ("25", "25.00"): a JSON number is refused (money is never a float), and so is
    what Decimal alone would take (exponents, underscores, "Infinity")."""
    if not isinstance(text, str) or not AMOUNT.fullmatch(text):
        raise ValueError(
            f"amount must be a decimal written as a string, at most {MAX_DIGITS} digits before the point "
            f'and {MAX_PLACES} after (e.g. "25.00"), not {str(text)[:40]!r}'
        )
    amount = Decimal(text)
    if amount == 0 and not zero:
        raise ValueError(f"amount must be positive, not {text!r}")
    return amount


def currency_code(text: object) -> str:
    if not isinstance(text, str) or not CURRENCY.fullmatch(text):
        raise ValueError(f"currency must be a code of 3 to 8 letters (e.g. EUR), not {text!r}")
    return text.upper()
