"""Exact amounts, byte units and the one rounding rule.

Rating never rounds: every amount is kept exact as a Decimal *scaled* by the 3,600,000 ms of an
hour (`Scaled`), because that is the only divisor in rating whose quotient does not terminate in
decimal (byte units are powers of 10 or of 2, and a GiB of memory is 1024 MiB). So a price per
hour times milliseconds, a price per GB times bytes times 3,600,000 / 10**9, and their sums are
exact Decimals, computed under `exact()`, a context that raises the day anything is not.

THE ROUNDING RULE, applied in `rounded` (`rounded_here` is its body) and nowhere else: a scaled
amount is divided by 3,600,000 and rounded half-even to the tariff's `decimals` places, exactly
(the tie decided on the whole quotient and remainder). Rating applies it to an account's running
total over the month, so an item's cost is the step of the rounded running total: costs add up
to the rounded total to the last digit, and the total does not depend on how the usage was split
into records or windows.
"""

from __future__ import annotations

import decimal
from contextlib import AbstractContextManager
from decimal import Decimal

HOUR_MS = 3_600_000
MIB_PER_GIB = 1024
# Bytes per unit: SI units are powers of 10, IEC units powers of 2 (a tariff names its unit).
BYTE_UNITS = {
    "B": 1,
    "kB": 10**3,
    "KiB": 2**10,
    "MB": 10**6,
    "MiB": 2**20,
    "GB": 10**9,
    "GiB": 2**30,
    "TB": 10**12,
    "TiB": 2**40,
}
ZERO = Decimal(0)
# Enough digits for any product rating makes (prices have at most 12 decimal places, quantities
# fit 63 bits, a TiB divisor adds 40 digits); Inexact and Rounded trap the day that is not so.
_EXACT = decimal.Context(
    prec=200, traps=[decimal.Inexact, decimal.Rounded, decimal.InvalidOperation, decimal.DivisionByZero]
)

Scaled = Decimal  # an exact amount times HOUR_MS (see above)
_HOUR = Decimal(HOUR_MS)


def as_text(amount: Decimal) -> str:
    """An amount as plain decimal text, never an exponent: "0.00000012", not "1.2E-7"."""
    return format(amount, "f")


def exact() -> AbstractContextManager[decimal.Context]:
    """`with exact():` arithmetic that raises rather than round."""
    return decimal.localcontext(_EXACT)


def rounded(amount: Scaled, decimals: int) -> Decimal:
    """amount / HOUR_MS, half-even to `decimals` places: the one rounding rule."""
    with decimal.localcontext(_EXACT):
        return rounded_here(amount, decimals)


def rounded_here(amount: Scaled, decimals: int) -> Decimal:
    """rounded(), inside `with exact():` (rating's loop, once per item). Exact: the quotient and
    remainder of the division are whole Decimals, and the tie is decided on them."""
    quotient, remainder = divmod(amount.scaleb(decimals), _HOUR)  # toward zero, remainder's sign
    twice = abs(remainder) * 2
    if twice > _HOUR or (twice == _HOUR and quotient % 2):
        quotient += 1 if amount > 0 else -1
    return (quotient if quotient else ZERO).scaleb(-decimals)
