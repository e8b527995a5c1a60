"""Exact amounts, byte units and the one rounding rule.

Rating never rounds: every amount is kept exact as a Decimal *scaled* by the 3,600,000 ms of an
hour (`Scaled`), because that is the only divisor in rating whose quotient does not terminate in
decimal (byte units are powers of 10 or of 2, and a GiB of memory is 1024 MiB). So a price per
hour times milliseconds, a price per GB times bytes times 3,600,000 / 10**9, and their sums are
exact Decimals, computed under `exact()`, a context that raises the day anything is not.

THE ROUNDING RULE, applied in `rounded` and nowhere else: a scaled amount is divided by
3,600,000 and rounded half-even to the tariff's `decimals` places, in integer arithmetic. Rating
applies it to an account's running total over the month, so an item's cost is the step of the
rounded running total: costs add up to the rounded total to the last digit, and the total does
not depend on how the usage was split into records or windows.
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


def exact() -> AbstractContextManager[decimal.Context]:
    """`with exact():` arithmetic that raises rather than round."""
    return decimal.localcontext(_EXACT)


def rounded(amount: Scaled, decimals: int) -> Decimal:
    """amount / HOUR_MS, half-even to `decimals` places: the one rounding rule."""
    sign, digits, exponent = amount.as_tuple()
    if not isinstance(exponent, int):
        raise ValueError(f"not a finite amount: {amount}")
    numerator = int("".join(map(str, digits)) or "0")
    # value = numerator * 10**exponent / HOUR_MS; wanted: round(value * 10**decimals)
    power = exponent + decimals
    top, bottom = (numerator * 10**power, HOUR_MS) if power >= 0 else (numerator, HOUR_MS * 10**-power)
    quotient, remainder = divmod(top, bottom)
    if 2 * remainder > bottom or (2 * remainder == bottom and quotient % 2):
        quotient += 1
    return Decimal((sign if quotient else 0, tuple(int(d) for d in str(quotient)), -decimals))
