"""Steady polls written as wire bytes (agent/wire.py) decode exactly like build_batch's messages."""

from __future__ import annotations

import random
from itertools import compress

import pytest
from google.protobuf.internal.encoder import _VarintBytes

from kvmeter.agent.inventory_records import InventoryRecords
from kvmeter.agent.measures import Attribution, Templates, build_batch, domain_inventory
from kvmeter.agent.model import ColumnDeltas, CounterKey, Delta, DomainInfo, LinkPlacement, NicInfo
from kvmeter.agent.wire import (
    _JOIN_PIECES,
    _ONE_JOIN_PIECES,
    _PIECES,
    SteadyEncoder,
    packed_varints,
    split_fields,
    varint,
)
from kvmeter.proto import pb
from tests.unit.test_inventory_records import encoded

BOOT = "boot-1"
START, END = 1_764_000_000_000, 1_764_000_010_000
EDGES = [0, 1, 127, 128, 16_383, 16_384, 40_000, 2**21 - 1, 2**21, 2**32 - 1, 2**32, 2**63, 2**64 - 1]


@pytest.mark.parametrize("value", EDGES)
def test_varint_is_protobufs(value: int) -> None:
    assert varint(value) == _VarintBytes(value)


def test_packed_varints_are_the_values_back_to_back() -> None:
    values = EDGES + [random.Random(3).randrange(2**64) for _ in range(200)]
    assert packed_varints(values) == b"".join(map(_VarintBytes, values))
    assert packed_varints([]) == b""


def counters(kinds: list[tuple[str, str]]) -> tuple[tuple[CounterKey, ...], dict[CounterKey, Attribution]]:
    """One domain NIC per (nic_type, traffic type), with long and short names alike."""
    keys, attribution = [], {}
    for i, (nic_type, traffic) in enumerate(kinds):
        key = CounterKey(BOOT, 20 + i * 977, f"{'macvtap' if nic_type == 'direct' else 'vnet'}{i}")
        nic = NicInfo(mac=f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}", device=key.name, nic_type=nic_type)
        domain = DomainInfo(
            uuid=f"uuid-{i}", name=f"i-2-{i}-VM" + "x" * (i % 90), state="running", kind="user_vm"
        )
        placement = LinkPlacement(
            bridge=f"br{i}", vlan_id=i if traffic == "public" else None, traffic_type=traffic
        )
        keys.append(key)
        attribution[key] = Attribution(domain, nic, placement)
    return tuple(keys), attribution


def steady(keys: tuple[CounterKey, ...], seed: int) -> ColumnDeltas:
    """Deltas of every size, with whole counters and single directions standing still."""
    rng = random.Random(seed)

    def value() -> int:
        return rng.choice([0, 0, 1, 127, 128, rng.randrange(2**20), rng.randrange(2**40), 2**62])

    columns = [[value() for _ in keys] for _ in range(4)]
    return ColumnDeltas(keys, START, END, *columns)


def rows(cd: ColumnDeltas) -> list[Delta]:
    moved = zip(cd.keys, cd.rx_bytes, cd.tx_bytes, cd.rx_packets, cd.tx_packets, strict=True)
    return [
        Delta(k, cd.start_ms, cd.end_ms, rb, tb, rp, tp)
        for k, rb, tb, rp, tp in moved
        if rb or tb or rp or tp
    ]


def measure_set(measures: object) -> list[bytes]:
    return sorted(m.SerializeToString(deterministic=True) for m in measures)  # type: ignore[attr-defined]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    "kinds",
    [
        [("bridge", "guest")] * 40,
        [("bridge", "guest"), ("direct", "public"), ("bridge", "public"), ("bridge", "control")] * 9,
        [("direct", "guest")],
    ],
)
def test_steady_records_decode_as_build_batch_measures(kinds: list[tuple[str, str]], seed: int) -> None:
    keys, attribution = counters(kinds)
    templates = Templates()
    encoder = SteadyEncoder([templates.pair(k, attribution[k]) for k in keys])
    cd = steady(keys, seed)
    parts, count, totals = encoder.encode(cd)

    expected_totals: dict[str, list[int]] = {}
    expected, unattributed = build_batch(
        host_id="h",
        boot_id=BOOT,
        stream_id="s",
        seq=1,
        poll_ms=END,
        deltas=rows(cd),
        attribution=attribution,
        totals=expected_totals,
    )
    (records,) = parts
    got = pb.MeasureBatch.FromString(records)
    assert unattributed == []
    assert count == len(got.measures) == len(expected.measures)
    assert measure_set(got.measures) == measure_set(expected.measures)
    assert {t: v for t, v in totals.items() if any(v)} == {t: v for t, v in expected_totals.items() if any(v)}
    # the same encoder serves the next poll, with other times and values
    later = steady(keys, seed + 100)._replace(start_ms=END, end_ms=END + 3)
    again, _, _ = SteadyEncoder([templates.pair(k, attribution[k]) for k in keys]).encode(later)
    assert encoder.encode(later)[0] == again
    # in parts of at most N bytes, the same records in the same order
    for limit in (200, 1000, 5000):
        split, split_count, _ = encoder.encode(cd, limit)
        assert split_count == count
        assert all(len(part) <= limit for part in split)
        assert b"".join(split) == records


def test_parts_come_as_bounded_runs_of_whole_records_made_when_taken() -> None:
    """A big poll's parts, made one by one as they are taken: a part of more records than one
    join takes comes as runs of whole records; joined, they are what `encode` returns."""
    keys, attribution = counters([("bridge", "guest"), ("direct", "public")] * 3000)
    encoder = SteadyEncoder([Templates().pair(k, attribution[k]) for k in keys])
    cd = steady(keys, 11)
    limit = 1_000_000
    whole, count, totals = encoder.encode(cd, limit)
    assert len(whole) > 1
    assert all(len(part) <= limit for part in whole)
    parts, lazy_count, lazy_totals = encoder.encode_parts(cd, limit)
    assert (lazy_count, lazy_totals) == (count, totals)
    first = next(parts)  # the later parts are not made yet: the iterator hands them out
    runs = [first, *parts]
    assert [b"".join(part) for part in runs] == whole
    sizes = [[len(pb.MeasureBatch.FromString(run).measures) for run in part] for part in runs]
    assert sum(map(sum, sizes)) == count
    big = [part for part in sizes if sum(part) > _ONE_JOIN_PIECES // _PIECES]
    small = [part for part in sizes if sum(part) <= _ONE_JOIN_PIECES // _PIECES]
    assert big
    assert small
    assert all(len(part) > 1 and max(part) <= _JOIN_PIECES // _PIECES for part in big)
    assert all(len(part) == 1 for part in small)
    with pytest.raises(StopIteration):
        next(parts)


MIXED_KINDS = [("bridge", "guest"), ("direct", "public"), ("bridge", "public"), ("bridge", "control")]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("used", [False, True])
@pytest.mark.parametrize("palette", ["mixed", "one", "new_ones_mixed", "mixed_kept_one"])
def test_an_encoder_followed_by_new_counters_encodes_as_one_built_from_their_pairs(
    seed: int, used: bool, palette: str
) -> None:
    """A VM storm's encoder: the last one's counters that stayed, in their order, then the new
    ones; the same records and totals as an encoder built from those pairs (whether or not the
    last one had encoded a poll and so knew its records' lengths; whether the counters are of
    several traffic types and directions, of one, or become so)."""
    rng = random.Random(seed)
    one = [("bridge", "guest")]
    first, then = {
        "mixed": (MIXED_KINDS, MIXED_KINDS),
        "one": (one, one),
        "new_ones_mixed": (one, MIXED_KINDS),
        "mixed_kept_one": (MIXED_KINDS, one),
    }[palette]
    keys, attribution = counters(
        [rng.choice(first) for _ in range(40)] + [rng.choice(then) for _ in range(20)]
    )
    templates = Templates()
    pairs = [templates.pair(k, attribution[k]) for k in keys]
    last = SteadyEncoder(pairs[:40])
    if used:
        last.encode(steady(keys[:40], seed))
    kept = [rng.choice([0, 1, 1]) for _ in range(40)]
    if palette == "mixed_kept_one":  # only the guest bridges stay
        kept = [k * (pairs[i].traffic_type == "guest" and not pairs[i].unswapped) for i, k in enumerate(kept)]
    tail = pairs[40 : 40 + rng.randrange(21)]
    now = [*compress(pairs, kept), *tail]
    now_keys = (*compress(keys, kept), *keys[40 : 40 + len(tail)])
    followed = last.followed_by(kept, tail)
    built = SteadyEncoder(now)
    for round_ in range(2):
        cd = steady(now_keys, seed + round_)._replace(start_ms=START + round_, end_ms=END + 10**6 * round_)
        assert followed.encode(cd) == built.encode(cd)
        assert followed.encode(cd, 700) == built.encode(cd, 700)


def test_an_encoder_refuses_counters_it_was_not_built_for() -> None:
    keys, attribution = counters([("bridge", "guest")] * 3)
    encoder = SteadyEncoder([Templates().pair(k, attribution[k]) for k in keys])
    with pytest.raises(ValueError, match="2 counters for an encoder of 3"):
        encoder.encode(steady(keys[:2], 1))


def test_split_fields_cuts_between_records_only() -> None:
    keys, attribution = counters([("bridge", "guest"), ("direct", "public")] * 30)
    (records,), count, _ = SteadyEncoder([Templates().pair(k, attribution[k]) for k in keys]).encode(
        steady(keys, 5)
    )
    who = attribution[keys[0]]
    inventory = pb.MeasureBatch(inventory=[domain_inventory(who.domain, {}, {})] * 7).SerializeToString()
    data = inventory + records
    for limit in (1, 150, 700, 4096, len(data)):
        parts = split_fields(data, limit)
        assert b"".join(parts) == data
        decoded = [pb.MeasureBatch.FromString(part) for part in parts]  # each part stands alone
        assert sum(len(b.measures) for b in decoded) == count
        assert sum(len(b.inventory) for b in decoded) == 7
        assert all(
            len(part) <= limit or len(b.measures) + len(b.inventory) == 1
            for part, b in zip(parts, decoded, strict=True)
        )
    assert split_fields(b"", 100) == []
    with pytest.raises(ValueError, match="offset 0"):
        split_fields(b"\x08\x01" + records, 10)  # a varint field: not a record


def test_inventory_records_are_the_inventory_message_and_follow_every_change() -> None:
    domains = [
        DomainInfo(
            uuid=f"uuid-{d}",
            name=f"i-2-{d}-VM",
            state="running",
            kind="user_vm",
            nics=tuple(
                NicInfo(mac=f"02:00:00:00:{d:02x}:{k:02x}", device=f"vnet{2 * d + k}", nic_type="bridge")
                for k in range(2)
            ),
            account_id="2",
            owner={"zone": "z1"},
        )
        for d in range(5)
    ]
    placements = {
        f"vnet{i}": LinkPlacement(bridge=f"br{i % 3}", vlan_id=i, traffic_type="guest") for i in range(10)
    }
    links = {f"vnet{i}": 100 + i for i in range(10)}
    records = InventoryRecords()

    def expected() -> bytes:
        return pb.MeasureBatch(
            inventory=[domain_inventory(d, placements, links) for d in domains]
        ).SerializeToString()

    assert encoded(records, domains, placements, links) == expected()
    # a VM's tap replaced (new ifindex), another moved to a new bridge, a third VM gone, one new
    links["vnet3"] = 999
    placements["vnet4"] = LinkPlacement(bridge="br9", vxlan_vni=5009, traffic_type="public")
    del domains[4]
    domains.append(DomainInfo(uuid="uuid-9", name="i-3-9-VM", state="paused", kind="user_vm"))
    assert encoded(records, domains, placements, links) == expected()
    # a domain object replaced by an equal-looking one with a new state
    domains[0] = DomainInfo(
        uuid="uuid-0", name="i-2-0-VM", state="shutoff", kind="user_vm", nics=domains[0].nics
    )
    assert encoded(records, domains, placements, links) == expected()
    assert encoded(records, [], placements, links) == b""
