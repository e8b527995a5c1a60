"""Where a counter that reads lower may have wrapped at 32 bits (some drivers keep 32-bit
counters), for the delta engine's rules and its fast paths alike."""

WRAP32 = 1 << 32
# A decrease can be a 32-bit wrap only from the top quarter of the range: at a fast line rate
# the ceiling alone would let any decrease pass for a wrap and bill gigabytes for a reset.
WRAP_NEAR = WRAP32 - WRAP32 // 4


def may_have_wrapped(old: int) -> bool:
    """A 32-bit counter this close to its top that reads lower may have wrapped."""
    return WRAP_NEAR <= old < WRAP32
