"""The delta engine: kernel counter readings in, billable deltas out.

Pure: no I/O, no clock reads. The caller passes the wall-clock time (ms since the epoch, used for
the measure intervals) and a monotonic time (ms, CLOCK_MONOTONIC: comparable across agent restarts
within one boot, used for rate plausibility) with every call.

Rules (each has a table test in tests/unit/test_delta.py):
- Identity is CounterKey(boot_id, ifindex, name); `vnetN` names are reused, so the name alone is not.
- A key first seen by the engine counts from zero when its creation happened while the engine was
  accounting (a link "new" event, or absent from every host-link set since the engine started or
  from the saved state); a key that already existed at a fresh start without saved state is only
  baselined, so bytes moved before kvmeter ran are never billed.
- A decrease is a 32-bit wrap only when the previous value was near 2^32 (its top quarter) and
  the wrapped amount fits the line-rate ceiling over the elapsed time; otherwise the counter was
  reset and the new value counts from zero.
- A delta above the line-rate ceiling over the elapsed time is quarantined with a reason: counted,
  never billed.
- Intervals per counter are contiguous and never inverted, even when the wall clock steps back.
- A final sample (RTM_DELLINK's stats) closes its counter; later samples of that key are ignored
  and the same name with a new ifindex is a new counter.
- A link renamed (the same ifindex) goes on as the same counter under its new key (`renamed`).
- A link that left its bridge (RTM_NEWLINK's stats at the move) is read there and goes on
  (`moved`): the bytes before are its old place's, those after its new one's. One born since the
  last poll and not read yet counts from zero up to the move, as its first poll would have.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from dataclasses import dataclass
from itertools import compress, repeat
from operator import attrgetter, eq, sub

from kvmeter.agent.counter_rows import CounterRow, SteadyColumns
from kvmeter.agent.delta_columns import ColumnPolls
from kvmeter.agent.delta_finals import ColumnFinals
from kvmeter.agent.delta_state import STATE_VERSION, EngineState
from kvmeter.agent.model import CounterKey, CounterSample, Delta, new_tuple
from kvmeter.agent.wrap_zone import differences, may_have_wrapped

__all__ = ["STATE_VERSION", "DeltaConfig", "DeltaEngine"]

# A tracked key missing from this many consecutive polls without a final sample is forgotten
# (its DELLINK was missed); until then a late final event still finds its last values.
ABSENT_POLLS_BEFORE_FORGET = 3
# The smallest Ethernet frame on the wire bounds packets per byte of line rate.
MIN_FRAME_BYTES = 60
# (rx_bytes, rx_packets, tx_bytes, tx_packets): one interface's reading, in /proc/net/dev's order
Stats = tuple[int, int, int, int]


@dataclass(frozen=True)
class DeltaConfig:
    line_rate_ceiling_bps: int = 100_000_000_000  # bits/s: above this a jump is quarantined
    # Elapsed time below this is treated as this (a poll right after another still allows bursts).
    min_elapsed_ms: int = 1000


_BOOT_ID = attrgetter("boot_id")


def _values(sample: CounterSample) -> tuple[int, int, int, int]:
    return (sample.rx_bytes, sample.tx_bytes, sample.rx_packets, sample.tx_packets)


class DeltaEngine(ColumnPolls, ColumnFinals, EngineState):
    """Per-counter state and the rules above. One engine per host boot."""

    def __init__(self, boot_id: str, config: DeltaConfig | None = None) -> None:
        self.boot_id = boot_id
        self.config = config or DeltaConfig()
        self._counters: dict[CounterKey, CounterRow] = {}
        self._steady: SteadyColumns | None = None  # see ColumnPolls
        self._lifted: set[CounterKey] = set()
        self._steady_index: dict[CounterKey, int] | None = None
        # Tracked keys missing from the last polls (neither read nor present) -> polls missed.
        self._absent: dict[CounterKey, int] = {}
        # Keys that existed before the engine could account for them: baselined, never counted.
        self._preexisting: set[CounterKey] = set()
        # "new" link events seen while running -> polls since (the event may precede the read)
        self._created: dict[CounterKey, int] = {}
        self._closed: set[CounterKey] = set()  # keys finished by a final sample
        # Untracked keys not read this poll: a closed key born again (the same name and
        # ifindex), or one the agent holds (ownership: its owner not known yet). Each counts
        # from zero at a later poll, under the attribution known by then.
        self._held: set[CounterKey] = set()
        self._last_poll: tuple[int, int] | None = None  # (wall ms, mono ms) of the last poll
        self._fresh = True  # no poll yet and no saved state
        # The last `present` frozenset and its key set: a caller that passes the same frozenset
        # from poll to poll spares rebuilding the set of every host link's key.
        self._present_arg: object = None
        self._present_keys: Set[CounterKey] = frozenset()

    # -- inputs -------------------------------------------------------------------------------

    def link_created(self, key: CounterKey) -> None:
        """A link "new" event: this identity was born while we were accounting."""
        self.links_created((key,))

    def links_created(self, keys: Iterable[CounterKey]) -> None:
        """link_created for each of `keys` (a VM storm's new taps), in any order: whether a
        key is tracked does not depend on another's birth."""
        keys = list(keys)
        born = self.untracked(compress(keys, map(eq, map(_BOOT_ID, keys), repeat(self.boot_id))))
        self._created.update(dict.fromkeys(born, 0))
        self._preexisting -= born
        if self._closed and not self._closed.isdisjoint(born):
            # A link born again under a key its deleted incarnation closed (the kernel gave the
            # new tap the old one's ifindex): a new counter, counted from zero from the next
            # poll on; this poll's reading may still be the old incarnation's.
            reborn = self._closed & born
            self._closed -= reborn
            self._held |= reborn

    def hold(self, keys: Iterable[CounterKey]) -> None:
        """Leave these untracked counters unread this poll: they count from zero later."""
        self._held.update(self.untracked(keys))

    def renamed(self, old: CounterKey, new: CounterKey) -> None:
        """A link renamed (the same device and kernel counters, under a new name): its counter
        goes on as `new`, neither counted again from zero nor baselined (its bytes since the
        last poll kept); one not tracked keeps what it was (born while accounting, or not)."""
        if old.boot_id != self.boot_id or new.boot_id != self.boot_id:
            return
        self._lift(old)  # out of the steady columns, if there
        row = self._counters.pop(old, None)
        self._absent.pop(old, None)
        if row is not None:
            self._counters[new] = row._replace(name=new.name)
        elif old in self._created:
            self._created[new] = self._created.pop(old)
        elif old in self._preexisting:
            self._preexisting.add(new)
        self._preexisting.discard(old)

    def moved(self, now_ms: int, mono_ms: int, sample: CounterSample) -> Delta | None:
        """A counter's reading as its link left its bridge: the delta up to it (the old place's
        bytes), the counter going on from it. A counter born while accounting and not read yet
        (a tap made and moved between two polls) counts from zero up to it, as its first poll
        would. None, with nothing changed, for another counter not tracked (its next poll's
        rules apply) or a reading before the last one's (taken before the last poll read the
        counter: nothing to split). A reading stamped as the last one is split still: two
        moves of one read are stamped alike, the counters order them."""
        key = sample.key
        if key.boot_id != self.boot_id or key in self._closed:
            return None
        self._lift(key)  # out of the steady columns, if there: its row goes on from this reading
        prev = self._counters.get(key)
        if prev is None:
            return self._advance(sample, now_ms, mono_ms, final=False) if self._unread_newborn(key) else None
        if mono_ms < prev.mono_ms or min(map(sub, _values(sample), prev[2:6])) < 0:
            return None
        return self._advance(sample, now_ms, mono_ms, final=False)

    def _unread_newborn(self, key: CounterKey) -> bool:
        """Whether an untracked key is one poll_readings would count from zero now: born while
        accounting, not held this poll, no older incarnation of its name still open."""
        if key not in self._created or key in self._held:
            return False
        return all(k.name != key.name for k in self.tracked_keys())

    def poll(
        self,
        now_ms: int,
        mono_ms: int,
        samples: Iterable[CounterSample],
        present: Iterable[CounterKey] | None = None,
    ) -> list[Delta]:
        """One poll: `samples` are the metered interfaces' readings, `present` every host link's key
        (defaults to the samples' keys). Returns one Delta per sample that moved or was reset."""
        readings = [(s.key, (s.rx_bytes, s.rx_packets, s.tx_bytes, s.tx_packets)) for s in samples]
        return self.poll_readings(now_ms, mono_ms, readings, present)

    def poll_readings(
        self,
        now_ms: int,
        mono_ms: int,
        readings: Iterable[tuple[CounterKey, Stats]],
        present: Iterable[CounterKey] | None = None,
    ) -> list[Delta]:
        """`poll` for (key, (rx_bytes, rx_packets, tx_bytes, tx_packets)) pairs, the order of
        /proc/net/dev: no sample object per interface on the hot path. `present` may be a
        frozenset the caller passes again while the host's links are unchanged."""
        self._settle()
        return self._poll_rows(now_ms, mono_ms, readings, present)

    def _poll_rows(
        self,
        now_ms: int,
        mono_ms: int,
        readings: Iterable[tuple[CounterKey, Stats]],
        present: Iterable[CounterKey] | None,
    ) -> list[Delta]:
        """poll_readings over the per-key dict (steady columns, if any, left as they are)."""
        boot_id = self.boot_id
        if not isinstance(readings, list):
            readings = list(readings)  # read twice: here and when ageing absent keys
        present_keys = self._present_set(present, [key for key, _ in readings])
        if self._fresh:
            read_keys = {key for key, _ in readings if key.boot_id == boot_id}
            self._preexisting = (set(present_keys) | read_keys) - set(self._created)
            self._fresh = False
        deltas: list[Delta] = []
        append = deltas.append
        counters = self._counters
        min_elapsed = self.config.min_elapsed_ms
        ceiling = self.config.line_rate_ceiling_bps
        tracked_names: dict[str, CounterKey] | None = None
        for key, stats in readings:
            prev = counters.get(key)
            if prev is not None:
                # Fast path (nearly every counter, every poll): all four grew within the ceiling.
                rx_bytes, rx_packets, tx_bytes, tx_packets = stats
                ifindex, name, old_rxb, old_txb, old_rxp, old_txp, start, old_mono = prev
                rxb = rx_bytes - old_rxb
                txb = tx_bytes - old_txb
                rxp = rx_packets - old_rxp
                txp = tx_packets - old_txp
                elapsed = mono_ms - old_mono
                max_bytes = ceiling * (elapsed if elapsed > min_elapsed else min_elapsed) // 8000
                if rxb >= 0 and txb >= 0 and rxp >= 0 and txp >= 0 and rxb <= max_bytes and txb <= max_bytes:
                    end = now_ms if now_ms > start else start + 1
                    counters[key] = new_tuple(
                        CounterRow, (ifindex, name, rx_bytes, tx_bytes, rx_packets, tx_packets, end, mono_ms)
                    )
                    if rxb or txb or rxp or txp:
                        append(new_tuple(Delta, (key, start, end, rxb, txb, rxp, txp, False, False, None)))
                    continue
            elif key.boot_id != boot_id:
                continue  # another boot's counter: not ours to account
            elif self._closed and key in self._closed:
                continue  # a reading older than the final sample that closed it
            elif self._held and key in self._held:
                continue  # counted from zero at a later poll (see _held)
            else:
                if tracked_names is None:
                    tracked_names = {k.name: k for k in counters}
                older = tracked_names.get(key.name)
                if older is not None and older != key:
                    # The name's previous incarnation is still open: its final sample (or its
                    # forgetting) comes first, then this one counts from zero.
                    continue
            sample = CounterSample(key, stats[0], stats[2], stats[1], stats[3])
            delta = self._advance(sample, now_ms, mono_ms, final=False)
            if delta is not None:
                append(delta)
        self._age_absent(present_keys, [key for key, _ in readings])
        self._last_poll = (now_ms, mono_ms)
        return deltas

    def final(self, now_ms: int, mono_ms: int, sample: CounterSample) -> Delta | None:
        """RTM_DELLINK's final counters: the tail since the last poll, then the counter is closed."""
        if sample.key.boot_id != self.boot_id or sample.key in self._closed:
            return None
        self._lift(sample.key)
        untracked = sample.key not in self._counters and sample.key not in self._created
        if untracked and (self._fresh or sample.key in self._preexisting):
            # Existed before we ran and was never metered: nothing of it is ours to bill.
            self._preexisting.discard(sample.key)
            return None
        delta = self._grown(sample, now_ms, mono_ms) or self._advance(sample, now_ms, mono_ms, final=True)
        self._counters.pop(sample.key, None)
        self._created.pop(sample.key, None)
        self._closed.add(sample.key)
        return delta

    def restarted(self, key: CounterKey) -> None:
        """The counter behind `key` was made again unseen (a NIC without a host link, whose
        identity is its name, under a new QEMU process): the next reading counts from zero,
        never from the last incarnation's values."""
        self._lift(key)
        self._counters.pop(key, None)
        self._absent.pop(key, None)
        self._preexisting.discard(key)

    # -- rules --------------------------------------------------------------------------------

    def _grown(self, sample: CounterSample, now_ms: int, mono_ms: int) -> Delta | None:
        """A final sample's delta when all four counters grew within the ceiling (nearly every
        one: poll_readings' fast path) or one reported lower cannot have wrapped (it moves
        nothing: see differences), else None for _advance's rules."""
        prev = self._counters.get(sample.key)
        if prev is None:
            return None
        _i, _n, old_rxb, old_txb, old_rxp, old_txp, start, old_mono = prev
        rxb = sample.rx_bytes - old_rxb
        txb = sample.tx_bytes - old_txb
        rxp = sample.rx_packets - old_rxp
        txp = sample.tx_packets - old_txp
        if min(rxb, txb, rxp, txp) < 0:
            moved = ((old_rxb, rxb), (old_txb, txb), (old_rxp, rxp), (old_txp, txp))
            if any(m < 0 and may_have_wrapped(o) for o, m in moved):
                return None  # the full rules decide
            rxb, txb, rxp, txp = max(rxb, 0), max(txb, 0), max(rxp, 0), max(txp, 0)
        limit = (
            self.config.line_rate_ceiling_bps * max(mono_ms - old_mono, self.config.min_elapsed_ms) // 8000
        )
        if max(rxb, txb) > limit:
            return None
        end = now_ms if now_ms > start else start + 1
        return new_tuple(Delta, (sample.key, start, end, rxb, txb, rxp, txp, False, True, None))

    def _advance(self, sample: CounterSample, now_ms: int, mono_ms: int, *, final: bool) -> Delta | None:
        key = sample.key
        cur = _values(sample)
        prev = self._counters.get(key)
        if prev is None:
            if key in self._preexisting and key not in self._created:
                self._preexisting.discard(key)
                self._counters[key] = CounterRow(key.ifindex, key.name, *cur, now_ms, mono_ms)
                return None  # baseline: existed before kvmeter could account for it
            # Born while running: it counts from zero since (at the latest) the previous poll.
            start_ms, start_mono = self._last_poll if self._last_poll else (now_ms, mono_ms)
            start_ms = min(start_ms, now_ms)
            prev = CounterRow(key.ifindex, key.name, 0, 0, 0, 0, start_ms, start_mono)
            self._created.pop(key, None)
        elapsed_ms = max(mono_ms - prev.mono_ms, self.config.min_elapsed_ms)
        max_bytes = self.config.line_rate_ceiling_bps * elapsed_ms // 8000
        max_packets = max_bytes // MIN_FRAME_BYTES
        limits = (max_bytes, max_bytes, max_packets, max_packets)
        old = (prev.rx_bytes, prev.tx_bytes, prev.rx_packets, prev.tx_packets)
        moved, wrapped, reset = differences(old, cur, limits, final=final)
        start_ms = prev.end_ms
        end_ms = max(now_ms, start_ms + 1)  # contiguous, never inverted: the clock may step back
        self._counters[key] = CounterRow(key.ifindex, key.name, *cur, end_ms, mono_ms)
        reason = None
        over = [n for n, m, lim in zip(("rx", "tx"), moved[:2], limits[:2]) if m > lim]
        if over:
            reason = (
                f"{'/'.join(over)} jump of {max(moved[:2])} bytes in {elapsed_ms} ms exceeds the "
                f"line-rate ceiling of {self.config.line_rate_ceiling_bps} bit/s"
            )
            if reset:
                reason += " (after a counter reset)"
        if not any(moved) and not final:
            return None
        return Delta(
            key=key,
            start_ms=start_ms,
            end_ms=end_ms,
            rx_bytes=moved[0],
            tx_bytes=moved[1],
            rx_packets=moved[2],
            tx_packets=moved[3],
            wrapped=wrapped,
            final_at_delete=final,
            quarantine_reason=reason,
        )

    def _present_set(
        self, present: Iterable[CounterKey] | None, read: Iterable[CounterKey]
    ) -> Set[CounterKey]:
        """This boot's keys of every host link (`present`; when None, the keys read)."""
        boot_id = self.boot_id
        if present is None:
            return {key for key in read if key.boot_id == boot_id}
        if present is self._present_arg:
            return self._present_keys
        if not isinstance(present, frozenset):
            return frozenset(k for k in present if k.boot_id == boot_id)
        # All of this boot, as always: checked on the keys the last set lacks when that one was
        # (a VM storm's new taps), the others found by the hashes the sets hold; no copy
        last = self._present_arg
        unseen = present - last if isinstance(last, frozenset) and self._present_keys is last else present
        if set(map(_BOOT_ID, unseen)) <= {boot_id}:
            present_keys = present
        else:
            present_keys = frozenset(k for k in present if k.boot_id == boot_id)
        self._present_arg, self._present_keys = present, present_keys  # immutable: known by identity
        return present_keys

    def _age_absent(self, present: Set[CounterKey], read: Iterable[CounterKey]) -> None:
        """Count the polls each tracked key has been missing (neither read nor a present link);
        forget it after ABSENT_POLLS_BEFORE_FORGET. Usually every tracked key is present: one
        set difference, nothing per key."""
        missing = self._counters.keys() - present
        if missing:
            missing -= set(read)
        for key in [k for k in self._absent if k not in missing]:
            del self._absent[key]
        for key in missing:
            polls = self._absent[key] = self._absent.get(key, 0) + 1
            if polls >= ABSENT_POLLS_BEFORE_FORGET:
                del self._counters[key]
                del self._absent[key]
        # Closed, created and pre-existing keys only matter while the link exists.
        if self._closed:
            self._closed &= present
        self._held = set()  # for one poll
        if self._preexisting:
            self._preexisting &= present
        for key in list(self._created):
            self._created[key] = 0 if key in present else self._created[key] + 1
            if self._created[key] >= ABSENT_POLLS_BEFORE_FORGET:
                del self._created[key]
