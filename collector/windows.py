"""UTC usage windows and the exact, time-proportional split of a byte count across them.

Windows are aligned to the Unix epoch; a window length must divide a day, so every window lies
inside one UTC day and day (hence month) boundaries are window boundaries.

Signatures:
    check_window(window_ms: int) -> None                         # BadInput("bad_window")
    window_start(time_ms: int, window_ms: int) -> int
    windows_between(start_ms: int, end_ms: int, window_ms: int) -> list[tuple[int, int]]
    split_bytes(total: int, start_ms: int, end_ms: int, window_ms: int)
        -> list[tuple[int, int, int]]                             # (window_start, window_end, bytes)
"""

from __future__ import annotations

from kvmeter.collector.errors import BAD_WINDOW, INVERTED_INTERVAL, NEGATIVE_BYTES, BadInput

DAY_MS = 86_400_000
DEFAULT_WINDOW_MS = 3_600_000
# A guard against asking for millions of windows by mistake (about 68 years of 1 s windows
# is far beyond anything a measure or a lifecycle segment spans).
MAX_WINDOWS = 5_000_000


def check_window(window_ms: int) -> None:
    """Raise BadInput("bad_window") unless window_ms is a positive divisor of a day."""
    if not isinstance(window_ms, int) or window_ms <= 0 or DAY_MS % window_ms:
        raise BadInput(BAD_WINDOW, f"window length {window_ms!r} ms must be a positive divisor of a day")


def window_start(time_ms: int, window_ms: int) -> int:
    """Start of the window containing time_ms (floor, also for times before the epoch)."""
    return time_ms - time_ms % window_ms


def windows_between(start_ms: int, end_ms: int, window_ms: int) -> list[tuple[int, int]]:
    """The windows [ws, we) that overlap [start_ms, end_ms), in time order.

    A zero-length interval yields the one window containing start_ms.
    """
    check_window(window_ms)
    if end_ms < start_ms:
        raise BadInput(INVERTED_INTERVAL, f"interval end {end_ms} is before its start {start_ms}")
    first = window_start(start_ms, window_ms)
    last = window_start(end_ms - 1, window_ms) if end_ms > start_ms else first
    count = (last - first) // window_ms + 1
    if count > MAX_WINDOWS:
        raise BadInput(INVERTED_INTERVAL, f"interval [{start_ms}, {end_ms}) spans {count} windows")
    return [(ws, ws + window_ms) for ws in range(first, last + 1, window_ms)]


def split_bytes(total: int, start_ms: int, end_ms: int, window_ms: int) -> list[tuple[int, int, int]]:
    """Split `total` bytes moved over [start_ms, end_ms) across windows in proportion to time.

    Exact: the parts add up to `total`. Each window gets floor(total * overlap / duration); the
    bytes left over go one each to the windows with the largest remainders, the earlier window
    first on a tie (deterministic). A zero-length interval puts everything in the window
    containing start_ms. Windows that receive 0 bytes are left out; total 0 gives [].
    """
    if total < 0:
        raise BadInput(NEGATIVE_BYTES, f"byte count {total} is negative")
    windows = windows_between(start_ms, end_ms, window_ms)
    if total == 0:
        return []
    if len(windows) == 1:  # the common case: a poll interval inside one window
        ws, we = windows[0]
        return [(ws, we, total)]
    duration = end_ms - start_ms
    quotients: list[int] = []
    remainders: list[int] = []
    for ws, we in windows:
        overlap = min(we, end_ms) - max(ws, start_ms)
        q, r = divmod(total * overlap, duration)
        quotients.append(q)
        remainders.append(r)
    left = total - sum(quotients)  # < len(windows), since each remainder is < duration
    for i in sorted(range(len(windows)), key=lambda i: (-remainders[i], i))[:left]:
        quotients[i] += 1
    return [(ws, we, q) for (ws, we), q in zip(windows, quotients, strict=True) if q]
