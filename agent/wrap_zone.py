"""Where a counter that reads lower may have wrapped at 32 bits (some drivers keep 32-bit
counters), for the delta engine's rules and its fast paths alike, and what a reading moved
(`differences`)."""

from __future__ import annotations

WRAP32 = 1 << 32
# A decrease can be a 32-bit wrap only from the top quarter of the range: at a fast line rate
# the ceiling alone would let any decrease pass for a wrap and bill gigabytes for a reset.
WRAP_NEAR = WRAP32 - WRAP32 // 4


def may_have_wrapped(old: int) -> bool:
    """A 32-bit counter this close to its top that reads lower may have wrapped."""
    return WRAP_NEAR <= old < WRAP32


def differences(
    old: tuple[int, ...], cur: tuple[int, ...], limits: tuple[int, ...], *, final: bool = False
) -> tuple[tuple[int, int, int, int], bool, bool]:
    """(moved per counter, wrapped, reset). One implausible decrease means the interface's counters
    were reset (recreated, driver reload): then every counter counts from zero.

    A final sample is the same device as the last reading (same ifindex, taken as it was
    removed), so it cannot have been reset: a counter it reports lower (a veth's rx, which the
    kernel sums from the peer that is already detached at delete) is unknown and moves nothing."""
    moved: list[int] = []
    wrapped = False
    for o, c, limit in zip(old, cur, limits):
        if c >= o:
            moved.append(c - o)
        elif may_have_wrapped(o) and WRAP32 - o + c <= limit:
            moved.append(WRAP32 - o + c)
            wrapped = True
        elif final:
            moved.append(0)
        else:
            return (cur[0], cur[1], cur[2], cur[3]), False, True
    return (moved[0], moved[1], moved[2], moved[3]), wrapped, False
