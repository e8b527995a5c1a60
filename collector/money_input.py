"""A credit's amount as people type it: a plain decimal, positive, exact, of a sane size."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

MAX_PLACES = 12  # a tariff's prices have at most 12 decimal places
MAX_DIGITS = 15  # before the point: beyond any account's credit


def credit_amount(text: object, *, zero: bool = False) -> Decimal:
    """The amount (zero allowed only when asked), or ValueError saying why not (a float is
    refused: money is typed as text)."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ValueError(f'amount must be a decimal number written as a string, e.g. "25.00", not {text!r}')
    raw = str(text).strip()
    try:
        amount = Decimal(raw)
    except InvalidOperation:
        raise ValueError(f"amount must be a decimal number, not {raw[:40]!r}") from None
    if not amount.is_finite() or amount < 0 or (amount == 0 and not zero):
        kind = "zero or a positive" if zero else "a positive"
        raise ValueError(f"amount must be {kind} decimal number, not {raw[:40]!r}")
    exponent = amount.as_tuple().exponent
    assert isinstance(exponent, int)
    if -exponent > MAX_PLACES or amount.adjusted() >= MAX_DIGITS:
        raise ValueError(
            f"amount must have at most {MAX_DIGITS} digits before the point and {MAX_PLACES} after"
        )
    return amount


def currency_code(text: object) -> str:
    if not isinstance(text, str) or not (3 <= len(text) <= 8 and text.isascii() and text.isalpha()):
        raise ValueError(f"currency must be a code of 3 to 8 letters (e.g. EUR), not {text!r}")
    return text.upper()
