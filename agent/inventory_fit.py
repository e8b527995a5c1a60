"""An inventory record too large for a batch, made to fit: the tenant sets a VM's resource tags,
which CloudStack writes into the domain's <metadata>, so a record may be any size, and a batch
bigger than a Kafka record would stop the host's stream behind it for ever.

    fitted_record(part, room) -> bytes   # the largest <metadata> entries left out, the owner's last
"""

from __future__ import annotations

from kvmeter.agent.varint import varint_size
from kvmeter.log_limit import limited_logger
from kvmeter.proto import pb

# Owner metadata the collector reads (the owner hint and its names): the last to be left out.
_OWNER_PREFIX = "owner"
# One line a minute about records trimmed (a full inventory repeats them every inventory_every polls).
TRIM_LOG = limited_logger("kvmeter.agent.inventory.trim", 60.0)


def fitted_record(part: bytes, room: int) -> bytes:
    """One inventory record (a part split_fields left alone because it is bigger than `room`)
    with its largest <metadata> entries left out until it fits, the owner's (the collector's
    owner hint) last."""
    batch = pb.MeasureBatch.FromString(part)
    record = batch.inventory[0]
    owner = dict(record.owner)
    sizes = {k: _entry_size(k, v) for k, v in owner.items()}
    order = sorted(owner, key=lambda k: (k.startswith(_OWNER_PREFIX), -sizes[k]))
    excess, left_out = len(part) - room, 0
    for key in order:
        if excess <= 0:
            break
        excess -= sizes[key]
        del record.owner[key]
        left_out += 1
    data = batch.SerializeToString()
    TRIM_LOG.warning(
        "inventory record of domain %s (%s) is %d bytes, more than a batch may hold (%d): %d of its %d "
        "<metadata> entries left out (the largest first, the owner's last)%s",
        record.name,
        record.uuid,
        len(part),
        room,
        left_out,
        len(owner),
        "" if len(data) <= room else "; still too large: raise kafka.max_batch_bytes / message.max.bytes",
    )
    return data


def _entry_size(key: str, value: str) -> int:
    """The bytes of one map entry of DomainInventory.owner on the wire."""
    k, v = len(key.encode()), len(value.encode())
    inner = 1 + varint_size(k) + k + 1 + varint_size(v) + v
    return 1 + varint_size(inner) + inner
