"""The agents' witness of each domain, from the inventories in the measure batches: running or
not, since when, last seen when. The reconciler's second witness beside CloudStack's API. Pure.

    observe(witness, batches)   # fold the batches' inventories into the witness
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from kvmeter.proto import pb


@dataclass(frozen=True)
class Witness:
    """The agents' view of one domain: running or not, since the first poll that saw it so,
    last seen at seen_ms."""

    running: bool
    since_ms: int
    seen_ms: int = 0


_RUNNING_STATES = {pb.RUNNING: True, pb.SHUTOFF: False, pb.CRASHED: False, pb.GONE: False}


def observe(witness: MutableMapping[str, Witness], batches: Iterable[Any]) -> None:
    """Fold the agents' inventories (decode.DecodedBatch: poll_time_ms, inventory) into the
    witness; an older poll than the last one seen of a domain changes nothing."""
    for batch in batches:
        at = batch.poll_time_ms
        for dom in batch.inventory:
            running = _RUNNING_STATES.get(dom.state)
            if not dom.uuid or running is None:
                continue
            old = witness.get(dom.uuid)
            if old is not None and at < old.seen_ms:
                continue
            since = old.since_ms if old is not None and old.running == running else at
            witness[dom.uuid] = Witness(running, since, at)
