"""What a replica holds while it is in use, and lets go of when it is not: two generations, the
current and the previous one; a get() or a write puts an entry in the current one, and each
rotation drops the previous one (entries untouched for a whole period) and starts a new current.
Pure: the caller rotates (every `age`), and keeps or reloads what left from the store.

    Recent()                 # a MutableMapping
    .rotate() -> dict        # the entries that left
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Recent(MutableMapping[K, V], Generic[K, V]):
    def __init__(self) -> None:
        self._now: dict[K, V] = {}
        self._before: dict[K, V] = {}

    def __getitem__(self, key: K) -> V:
        """Without touching it: reading the whole map (a reconciler pass) keeps nothing."""
        if key in self._now:
            return self._now[key]
        return self._before[key]

    def get(self, key: K, default: V | None = None) -> V | None:  # type: ignore[override]
        """The value, touched: it stays another period."""
        if key in self._now:
            return self._now[key]
        if key in self._before:
            value = self._now[key] = self._before.pop(key)
            return value
        return default

    def __setitem__(self, key: K, value: V) -> None:
        self._before.pop(key, None)
        self._now[key] = value

    def __delitem__(self, key: K) -> None:
        if key in self._now:
            del self._now[key]
        else:
            del self._before[key]

    def __contains__(self, key: object) -> bool:
        return key in self._now or key in self._before

    def __iter__(self) -> Iterator[K]:
        yield from list(self._now)
        yield from list(self._before)

    def __len__(self) -> int:
        return len(self._now) + len(self._before)

    def rotate(self) -> dict[K, V]:
        """Drop what was not touched since the last rotation; returns it."""
        gone, self._before, self._now = self._before, self._now, {}
        return gone
