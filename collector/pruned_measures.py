"""Late measures of a pruned resource: what an operator gets instead of an unattributed report.

    pruned_letters(parked, tombstones, origins) -> (still_parked, letters, bytes)

Retention deletes a closed resource's lifecycle events whole and leaves its tombstone
(schema_retention.pruned_resources: the resource and the time its pruned history ran through).
A measure naming that resource's instance uuid, from that pruned past, and with no owner found
otherwise (no operator map, no hint) would park and, past the horizon, be billed to
UNATTRIBUTED forever: no event can come to name its owner (an old event delivered again is
dropped as of the pruned past), and its windows were billed and pruned as they were. So it is
dead-lettered instead, reason `resource-pruned`, with its bytes: kept for an operator, counted
(kvmeter_dead_letters{reason="resource-pruned"}, kvmeter_pruned_resource_bytes), never billed
into a pruned window, and not re-driven (redrive.py). A measure of the same uuid from after the
tombstone parks as any other waiting for its lifecycle. Pure.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from kvmeter.collector.model import DeadLetter, Measure

RESOURCE_PRUNED = "resource-pruned"
MEASURES = "measures"


def pruned_letters(
    parked: Sequence[Measure], tombstones: Mapping[str, int], origins: Mapping[tuple[str, int], str]
) -> tuple[list[Measure], list[DeadLetter], int]:
    """The measures still to park; one dead letter per batch and pruned resource (its raw: the
    measures as JSON); the bytes dead-lettered. `origins`: (stream id, seq) -> the record's origin."""
    keep: list[Measure] = []
    gone: dict[tuple[str, int, str], list[Measure]] = {}
    for m in parked:
        through = tombstones.get(m.instance_uuid) if m.instance_uuid else None
        if through is not None and m.start_ms <= through:
            gone.setdefault((m.stream_id, m.seq, m.instance_uuid), []).append(m)
        else:
            keep.append(m)
    letters = []
    total = 0
    for (stream, seq, resource), measures in sorted(gone.items()):
        nbytes = sum(m.bytes for m in measures)
        total += nbytes
        doc = {
            "resource": resource,
            "pruned_through_ms": tombstones[resource],
            "host_id": measures[0].host_id,
            "stream_id": stream,
            "seq": seq,
            "bytes": nbytes,
            "measures": [
                {
                    "index": m.index, "start_ms": m.start_ms, "end_ms": m.end_ms, "direction": m.direction,
                    "bytes": m.bytes, "packets": m.packets, "traffic_type": m.traffic_type, "mac": m.mac,
                    "address": m.address, "domain_name": m.domain_name, "device": m.device,
                }
                for m in measures
            ],
        }  # fmt: skip
        message = (
            f"{len(measures)} measure(s), {nbytes} bytes, of {resource} from before its lifecycle "
            f"events were pruned (through {tombstones[resource]}): no owner can be found for them"
        )
        raw = json.dumps(doc, sort_keys=True).encode()
        letters.append(DeadLetter(MEASURES, origins.get((stream, seq), ""), raw, RESOURCE_PRUNED, message))
    return keep, letters, total
