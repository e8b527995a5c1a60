"""Reading a tariff file (TOML): schema and meaning checked at once, every problem listed.

    currency = "EUR"            # ISO 4217 code: one currency per tariff
    decimals = 6                # places costs are rounded to (money.rounded: half-even, once)

    [[rate]]
    usage_type = "RUNNING_VM"   # CloudStack's name of the usage type
    per_vcpu_hour = "0.0100"    # prices are strings (exact decimals), or integers
    per_gib_hour = "0.0050"
    # per_hour, offering = "<service offering uuid>", zone = "<zone uuid>",
    # from = 2026-01-01T00:00:00Z, until = ... (TOML date-times with an offset)

    [[rate]]
    usage_type = "NETWORK_BYTES_SENT"
    traffic_type = "public"
    unit = "GB"                 # GB = 10**9 bytes, GiB = 2**30 bytes (money.BYTE_UNITS)
    tiers = [{ up_to = 1000, price = "0.09" }, { price = "0.05" }]   # or: price = "0.09"

Every usage type kvmeter meters must have a rate (a free one says price "0": an explicit zero),
and bytes of every billable traffic type too; usage no rate covers at some instant (before a
rate's `from`, a VM whose size is unknown under a per-vCPU rate) is listed as unpriced with the
reason wherever costs are shown, never dropped.

The collector's config names the file in [billing] tariff_file (billing_section); TariffSource
holds the tariff in force and reload() reads the file again (SIGHUP, through kvmeter.reload): a
file that fails keeps the tariff in force, and the log says why; so does one its guard refuses
(the collector's: a currency other than the credits held, credit_keys.tariff_guard).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from kvmeter.collector.billing.money import BYTE_UNITS
from kvmeter.collector.billing.tariff import BYTE_TYPES, FOREVER_MS, Rate, Tariff, Tier
from kvmeter.collector.model import ALLOCATED_VM, RUNNING_VM, USAGE_TYPE_NAMES
from kvmeter.tomlconfig import ConfigError, read_toml, schema_problems

USAGE_TYPE_IDS = {name: ident for ident, name in USAGE_TYPE_NAMES.items()}
VM_TYPES = frozenset({RUNNING_VM, ALLOCATED_VM})
MAX_DECIMALS = 12
_HOURLY = ("per_hour", "per_vcpu_hour", "per_gib_hour")
_NAMES = ("usage_type", "traffic_type", "unit")  # looked up as dict or set keys: text only
_ANY: dict[str, Any] = {}  # checked by _price / _instant, which say more than a schema can
_ID = {"type": "string", "minLength": 1, "maxLength": 128}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["currency", "rate"],
    "properties": {
        "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "decimals": {"type": "integer", "minimum": 0, "maximum": MAX_DECIMALS},
        "rate": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["usage_type"],
                "properties": {
                    "usage_type": {"enum": sorted(USAGE_TYPE_IDS)},
                    "offering": _ID,
                    "zone": _ID,
                    "traffic_type": _ID,
                    "from": _ANY,
                    "until": _ANY,
                    "per_hour": _ANY,
                    "per_vcpu_hour": _ANY,
                    "per_gib_hour": _ANY,
                    "unit": {"enum": list(BYTE_UNITS)},
                    "price": _ANY,
                    "tiers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["price"],
                            "properties": {"up_to": _ANY, "price": _ANY},
                        },
                    },
                },
            },
        },
    },
}


class TariffError(ConfigError):
    """A tariff file that cannot be used; `problems` lists every reason."""

    def config_problems(self) -> list[str]:
        """Its problems as the config that names the file lists them."""
        return [f"billing.tariff_file: {self.source}: {p}" for p in self.problems]


def load(path: str | Path, billable: Iterable[str] = ()) -> Tariff:
    """The tariff in `path`; billable: the traffic types the collector bills (each needs a rate
    for bytes sent and received)."""
    source = str(path)
    doc = read_toml(path, TariffError)
    return from_dict(doc, source, billable)


def from_dict(doc: dict[str, Any], source: str = "tariff", billable: Iterable[str] = ()) -> Tariff:
    problems = schema_problems(SCHEMA, doc)
    rates: list[Rate] = []
    entries = doc.get("rate", [])
    declared = [_named(e) for e in (entries if isinstance(entries, list) else []) if isinstance(e, dict)]
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        named = _named(entry) if isinstance(entry, dict) else {}
        if named.get("usage_type") in USAGE_TYPE_IDS:
            rate = _rate(named, f"rate.{i}", problems)
            if rate is not None:
                rates.append(rate)
    problems += _overlaps(rates)
    problems += _coverage(declared, frozenset(billable))
    if problems:
        raise TariffError(source, problems)
    return Tariff(doc["currency"], int(doc.get("decimals", 6)), tuple(rates), source)


def _named(entry: dict[str, Any]) -> dict[str, Any]:
    """The entry less the names that are not text (the schema lists each): a list or table
    where a name goes (traffic_type = ["public", "guest"]) is a problem listed, not a TypeError
    when the name is looked up."""
    return {k: v for k, v in entry.items() if k not in _NAMES or isinstance(v, str)}


def _rate(entry: dict[str, Any], at: str, problems: list[str]) -> Rate | None:
    usage_type = USAGE_TYPE_IDS[entry["usage_type"]]
    name = entry["usage_type"]
    found: list[str] = []
    start = _instant(entry.get("from"), f"{at}.from", found, default=0)
    end = _instant(entry.get("until"), f"{at}.until", found, default=FOREVER_MS)
    if start >= end and not found:
        found.append(f"{at}: from ({entry.get('from')}) must be before until ({entry.get('until')})")
    prices = {k: _price(entry[k], f"{at}.{k}", found) for k in _HOURLY if k in entry}
    unit_bytes = 0
    tiers: tuple[Tier, ...] = ()
    if usage_type in BYTE_TYPES:
        wrong = [k for k in ("offering", *prices) if k in entry]
        found += [f"{at}.{k}: not for {name} (bytes are priced per unit)" for k in wrong]
        if "traffic_type" not in entry:
            found.append(f"{at}: {name} needs traffic_type (public, guest, ...)")
        if "unit" not in entry:
            found.append(f"{at}: {name} needs unit ({', '.join(BYTE_UNITS)}): GB and GiB differ")
        unit_bytes = BYTE_UNITS.get(entry.get("unit", ""), 0)
        if ("price" in entry) == ("tiers" in entry):
            found.append(f"{at}: {name} needs exactly one of price or tiers")
        elif "price" in entry:
            tiers = (Tier(None, _price(entry["price"], f"{at}.price", found)),)
        elif unit_bytes and isinstance(entry["tiers"], list):
            tiers = _tiers(entry["tiers"], unit_bytes, f"{at}.tiers", found)
    else:
        wrong = [k for k in ("traffic_type", "unit", "price", "tiers") if k in entry]
        found += [f"{at}.{k}: not for {name} (time is priced per hour)" for k in wrong]
        if usage_type not in VM_TYPES:
            found += [
                f"{at}.{k}: only VM time has it"
                for k in ("offering", "per_vcpu_hour", "per_gib_hour")
                if k in entry
            ]
        if not prices:
            found.append(f'{at}: {name} needs per_hour, per_vcpu_hour or per_gib_hour ("0" for free)')
    problems += found
    if found:
        return None
    zero = Decimal(0)
    return Rate(
        usage_type=usage_type,
        where=at,
        start_ms=start,
        end_ms=end,
        offering=entry.get("offering", ""),
        traffic_type=entry.get("traffic_type", ""),
        zone=entry.get("zone", ""),
        per_hour=prices.get("per_hour", zero),
        per_vcpu_hour=prices.get("per_vcpu_hour", zero),
        per_gib_hour=prices.get("per_gib_hour", zero),
        unit=entry.get("unit", ""),
        unit_bytes=unit_bytes,
        tiers=tiers,
    )


def _price(value: Any, at: str, found: list[str]) -> Decimal:
    """A price: a decimal string or an integer, >= 0, at most MAX_DECIMALS places. Never a TOML
    float: it is binary, and 0.1 is not one tenth."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        hint = f' (write "{value}")' if isinstance(value, float) else ""
        found.append(f"{at}: a price is a string or an integer, not {type(value).__name__}{hint}")
        return Decimal(0)
    try:
        price = Decimal(value)
    except InvalidOperation:
        found.append(f"{at}: {value!r} is not a decimal number")
        return Decimal(0)
    exponent = price.as_tuple().exponent
    if not price.is_finite() or price < 0:
        found.append(f"{at}: {value!r} must be a finite number >= 0")
    elif isinstance(exponent, int) and -exponent > MAX_DECIMALS:
        found.append(f"{at}: {value!r} has more than {MAX_DECIMALS} decimal places")
    return price


def _instant(value: Any, at: str, found: list[str], *, default: int) -> int:
    if value is None:
        return default
    if not isinstance(value, dt.datetime) or value.tzinfo is None:
        found.append(f"{at}: a TOML date-time with an offset, e.g. 2026-01-01T00:00:00Z, not {value!r}")
        return default
    delta = value - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def _tiers(entries: list[Any], unit_bytes: int, at: str, found: list[str]) -> tuple[Tier, ...]:
    tiers: list[Tier] = []
    last = 0
    for i, tier in enumerate(entries):
        if not isinstance(tier, dict) or "price" not in tier:
            continue  # the schema said so
        price = _price(tier["price"], f"{at}.{i}.price", found)
        final = i == len(entries) - 1
        if "up_to" not in tier:
            if not final:
                found.append(f"{at}.{i}: only the last tier has no up_to")
            tiers.append(Tier(None, price))
            continue
        if final:
            found.append(f"{at}.{i}: the last tier has no up_to (it prices the rest of the month)")
        up_to = _price(tier["up_to"], f"{at}.{i}.up_to", found)
        if not up_to.is_finite():  # "inf", "NaN": listed by _price, and no number of bytes
            continue
        bound = up_to * unit_bytes
        if bound != bound.to_integral_value():
            found.append(f"{at}.{i}.up_to: {tier['up_to']} units is not a whole number of bytes")
        elif int(bound) <= last:
            found.append(f"{at}.{i}.up_to: tiers must go up ({tier['up_to']} after {last} bytes)")
        last = max(last, int(bound))
        tiers.append(Tier(int(bound), price))
    return tuple(tiers)


def _overlaps(rates: list[Rate]) -> list[str]:
    problems = []
    for i, a in enumerate(rates):
        for b in rates[i + 1 :]:
            if a.match == b.match and a.start_ms < b.end_ms and b.start_ms < a.end_ms:
                problems.append(f"{b.where}: in force at the same time as {a.where} for the same usage")
    return problems


def _coverage(entries: list[dict[str, Any]], billable: frozenset[str]) -> list[str]:
    """A usage type with no rate is an error, never a silent zero (price "0" is the zero).
    Judged on every entry given, valid or not, so that one bad rate is one problem."""
    priced = {USAGE_TYPE_IDS.get(e.get("usage_type", "")) for e in entries}
    problems = [
        f'no rate for {name}: add one (price "0" if it is free)'
        for ident, name in sorted(USAGE_TYPE_NAMES.items())
        if ident not in priced
    ]
    for usage_type in sorted(BYTE_TYPES):
        name = USAGE_TYPE_NAMES[usage_type]
        types = {e.get("traffic_type") for e in entries if e.get("usage_type") == name and "zone" not in e}
        for traffic in sorted(billable - types):
            problems.append(f"no rate for {name} of billable traffic {traffic!r} in every zone")
    return problems


BILLING_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"tariff_file": {"type": "string", "minLength": 1}},
}  # the collector's (and the all-in-one's) [billing] table


def billing_section(
    section: Any, base: Path | None, billable: Iterable[str], problems: list[str]
) -> tuple[Tariff | None, Path | None]:
    """[billing] (schema-checked by the config) -> the tariff and its file, None when no
    tariff_file is named; a tariff that does not load adds every one of its problems."""
    name = section.get("tariff_file") if isinstance(section, dict) else None
    if not isinstance(name, str) or not name:
        return None, None
    path = Path(name) if base is None else base / name
    try:
        return load(path, billable), path
    except TariffError as exc:
        problems += exc.config_problems()
        return None, path


class TariffSource:
    """The tariff in force, for readers in other threads (the API): `current` is one reference,
    so a request rates under the old tariff or the new one, never a mix."""

    def __init__(self, tariff: Tariff, path: Path, billable: Iterable[str] = ()):
        self.current = tariff
        self.path = path
        self.billable = frozenset(billable)
        self.guard: Callable[[Tariff], None] | None = None
        self._lock = threading.Lock()

    def guarded(self, guard: Callable[[Tariff], None]) -> None:
        """Check the tariff in force with `guard` now (it raises TariffError), and each tariff
        read again before it is put in force (credit_keys.tariff_guard: the credits' currency)."""
        guard(self.current)
        self.guard = guard

    def reload(self, path: Path | None = None) -> str:
        """Read the tariff file again (or `path`, newly named) and put it in force; TariffError,
        and the tariff in force stays, when it does not load."""
        with self._lock:
            tariff = load(path or self.path, self.billable)
            if self.guard is not None:
                self.guard(tariff)
            self.current, self.path = tariff, path or self.path
        return f"{tariff.currency}, {len(tariff.rates)} rate(s) from {self.path}"
