"""Accounts, domains, projects and VMs as CloudStack named them to kvmeter.

The event bus carries account uuids only. Names, domains, projects, zones, sizes and tags reach
kvmeter through the VMs' <metadata> (the owner hints the store keeps), and account and domain
names and domain paths through the reconciler's reads of CloudStack's API (which win where both
speak). This directory answers the API's questions from them: which accounts carry a name, sit
in a domain (and its subdomains) or belong to a project, and what to show beside a record. What
nobody told stays unknown: a filter on it matches nothing, a field of it is left out.

Pure: the hints and names in, lookups out.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace

from kvmeter.collector.cloudstack_render import (
    NO_INSTANCE,
    NO_OFFERING,
    NO_OWNER,
    Instance,
    Owner,
    ServiceOffering,
)
from kvmeter.collector.cs_snapshot import Snapshot

_UNKNOWN = frozenset({"", "unknown", "null", "none"})
_TAG = re.compile(r"tag(?:\[(\d+)\])?\.(key|value)")  # tag[i].key, or tag.key when alone
_LATIN_ACCENTS = re.compile(r"(?<=[a-z])[\u0300-\u036f]+")  # é = e + U+0301 once decomposed


@dataclass(frozen=True)
class OwnerDirectory:
    owners: Mapping[str, Owner] = field(default_factory=dict)  # by account uuid
    instances: Mapping[str, Instance] = field(default_factory=dict)  # by VM uuid
    domain_paths: Mapping[str, str] = field(default_factory=dict)  # by domain uuid: ROOT/a/b
    # CloudStack's API listed its accounts / domains (the reconciler ran): what is in neither
    # that list nor the hints does not exist, rather than being merely unknown to kvmeter.
    accounts_listed: bool = False
    domains_listed: bool = False
    offerings: Mapping[str, ServiceOffering] = field(default_factory=dict)  # by offering uuid
    domains_listed_ms: Mapping[str, int] = field(default_factory=dict)  # by domain uuid: its last listing
    # by account uuid: when CloudStack last told of it (its API listed it, or <metadata> named it)
    accounts_seen_ms: Mapping[str, int] = field(default_factory=dict)

    def with_names(
        self,
        accounts: Mapping[str, tuple[str, str]],
        domains: Mapping[str, tuple[str, str]],
        listed_ms: Mapping[str, int] | None = None,
        accounts_listed_ms: Mapping[str, int] | None = None,
    ) -> OwnerDirectory:
        """Add what CloudStack's API said (the reconciler's names): accounts {uuid: (name,
        domain uuid)}, domains {uuid: (name, path)}, listed_ms {domain uuid: when the listing
        that last gave it was read}, accounts_listed_ms the same by account uuid."""
        owners = dict(self.owners)
        for uuid, (name, domain) in accounts.items():
            known = owners.get(uuid, Owner())
            domain_name, path = domains.get(domain, (known.domain_name, ""))
            owners[uuid] = replace(
                known, account_name=name, domain_id=domain, domain_name=domain_name, domain_path=path
            )
        paths = {**self.domain_paths, **{d: path for d, (_, path) in domains.items() if path}}
        return replace(
            self,
            owners=owners,
            domain_paths=paths,
            accounts_listed=self.accounts_listed or bool(accounts),
            domains_listed=self.domains_listed or bool(domains),
            domains_listed_ms={**self.domains_listed_ms, **(listed_ms or {})},
            accounts_seen_ms=_latest(self.accounts_seen_ms, accounts_listed_ms or {}),
        )

    def with_snapshot(self, snapshot: Snapshot | None, offering_names: Mapping[str, str]) -> OwnerDirectory:
        """Add what the reconciler's last pass read of VMs, routers, addresses and offerings
        (what <metadata> said wins where both speak); offering_names: every offering CloudStack's
        API ever listed (a removed one keeps its name)."""
        offerings = {uuid: ServiceOffering(name=name) for uuid, name in offering_names.items()}
        instances = dict(self.instances)
        if snapshot is not None:
            for o in snapshot.offerings.values():
                if o.customized:  # each VM chooses its size: no size of the offering's own
                    offerings[o.uuid] = ServiceOffering(o.name)
                else:
                    offerings[o.uuid] = ServiceOffering(o.name, o.cpu, o.memory, o.cpu_speed)
            for vm in snapshot.vms.values():
                owner = snapshot.account_uuid(vm.account, vm.domain_id, vm.project_id) or ""
                _fill(instances, vm.uuid, zone_id=vm.zone, cpu_cores=vm.cpu, memory_mb=vm.memory,
                      name=vm.name, template_id=vm.template, cpu_speed=vm.cpu_speed, owner=owner)  # fmt: skip
            for r in snapshot.routers.values():
                net = snapshot.networks.get(r.network_id)
                network_name = net.name if net is not None else ""
                _fill(instances, r.uuid, name=r.name, network_id=r.network_id, network_name=network_name,
                      vpc_id=r.vpc_id)  # fmt: skip
            for ip in snapshot.ips.values():
                _fill(instances, ip.uuid, zone_id=ip.zone, name=ip.address)
        return replace(self, instances=instances, offerings=offerings)

    @classmethod
    def from_hints(
        cls, hints: Mapping[str, Mapping[str, str]], learned_ms: Mapping[str, int] | None = None
    ) -> OwnerDirectory:
        """hints: the store's owner hints, flattened <metadata> by domain uuid and by name;
        learned_ms: when each was learned (by the same keys)."""
        owners: dict[str, Owner] = {}
        instances: dict[str, Instance] = {}
        seen: dict[str, int] = {}
        for key, fields in hints.items():
            account = _known(fields.get("ownerAccountUuid"))
            if account:
                seen[account] = max(seen.get(account, -1), (learned_ms or {}).get(key, -1))
                owners[account] = Owner(
                    account_name=_known(fields.get("ownerAccountName")),
                    domain_id=_known(fields.get("ownerDomainUuid")),
                    domain_name=_known(fields.get("ownerDomainName")),
                    project_id=_known(fields.get("ownerProjectUuid")),
                    project_name=_known(fields.get("ownerProjectName")),
                )
            vm = _known(fields.get("instanceUuid")).lower()
            if vm:
                instances[vm] = Instance(
                    zone_id=_known(fields.get("zoneUuid")),
                    cpu_cores=_number(fields.get("cpuCores")),
                    memory_mb=_number(fields.get("memory")),
                    tags=_tags(fields),
                    owner=account,
                )
        return cls(owners, instances, accounts_seen_ms=seen)

    def owner(self, account: str) -> Owner:
        return self.owners.get(account, NO_OWNER)

    def instance(self, resource: str, account: str | None = None) -> Instance:
        """What is known of the resource; for a record of `account`, what its current owner
        named, tagged or chose (name, tags, template, size) only when that account owns it now:
        a VM assigned to another account (VM.ASSIGN) never shows its new owner's name or tags
        on its previous owner's records."""
        found = self.instances.get(resource.lower(), NO_INSTANCE)
        if account is None or not found.owner or found.owner.lower() == account.lower():
            return found
        return Instance(zone_id=found.zone_id, cpu_speed=found.cpu_speed, network_id=found.network_id,
                        network_name=found.network_name, vpc_id=found.vpc_id)  # fmt: skip

    def offering(self, uuid: str) -> ServiceOffering:
        return self.offerings.get(uuid, NO_OFFERING) if uuid else NO_OFFERING

    def knows_account(self, account: str) -> bool:
        return account in self.owners

    def knows_domain(self, domain_id: str) -> bool:
        return domain_id in self.domain_paths or any(o.domain_id == domain_id for o in self.owners.values())

    def accounts_named(self, name: str, domain_id: str | None = None) -> frozenset[str]:
        """The account named `name` in each domain (in `domain_id` alone when given), as
        CloudStack's lookup finds it: names compare as its database compares them (name_key),
        and of namesakes, the one it made last (UsageServiceImpl: AccountDao.listAccounts,
        removed ones included, newest id first). Names are unique among live accounts only: a
        removed account's name may be taken again, and its records are not the new owner's.
        Their lives never overlap, so the one made last is the one CloudStack told of last;
        when kvmeter cannot tell (told of both at once), both."""
        key = name_key(name)
        found: dict[str, dict[str, int]] = defaultdict(dict)
        for a, o in self.owners.items():
            if name_key(o.account_name) == key and (domain_id is None or o.domain_id == domain_id):
                found[o.domain_id][a] = self.accounts_seen_ms.get(a, -1)
        newest: set[str] = set()
        for seen in found.values():
            last = max(seen.values())
            newest |= {a for a, ms in seen.items() if ms == last}
        return frozenset(newest)

    def known_id(self, uuid: str, *, domain: bool = False) -> str:
        """The account (domain: the domain) uuid as kvmeter knows it, for one given in another
        case (CloudStack's uuid columns compare without case and are unique so); else as given."""
        known: Collection[str] = self.owners.keys()
        if domain:
            known = {*self.domain_paths, *(o.domain_id for o in self.owners.values())}
        if uuid in known:
            return uuid
        folded = uuid.casefold()
        return next((k for k in known if k and k.casefold() == folded), uuid)

    def accounts_in_domain(self, domain_id: str, *, recursive: bool = False) -> frozenset[str] | None:
        """The domain's accounts; recursive: its subdomains' too (None when the domain's path,
        hence its subdomains, is unknown). Subdomains as the listing that gave the domain gave
        them: a removed domain keeps its path, which a later domain (another customer's) may
        take again, and neither one's tree holds the other (CloudStack searches the paths of
        domains not removed)."""
        if not recursive:
            return self._by_domain().get(domain_id, frozenset())
        path = self.domain_paths.get(domain_id)
        if path is None:
            return None
        when = self.domains_listed_ms.get(domain_id)
        inside = {domain_id} | {
            d
            for d, p in self.domain_paths.items()
            if p.startswith(path + "/") and self.domains_listed_ms.get(d) == when
        }
        return frozenset(a for a, o in self.owners.items() if o.domain_id in inside)

    def is_subdomain(self, domain_id: str, of: Iterable[str]) -> bool:
        """Whether the domain lies below one of `of`, as the listing that gave it gave them."""
        path, when = self.domain_paths.get(domain_id), self.domains_listed_ms.get(domain_id)
        tops = (self.domain_paths.get(d) for d in of if self.domains_listed_ms.get(d) == when)
        return path is not None and any(top is not None and path.startswith(top + "/") for top in tops)

    def accounts_of_project(self, project_id: str) -> frozenset[str]:
        folded = project_id.casefold()  # a uuid: any case, as CloudStack's lookup
        return frozenset(a for a, o in self.owners.items() if o.project_id.casefold() == folded)

    def _by_domain(self) -> dict[str, frozenset[str]]:
        grouped: dict[str, set[str]] = defaultdict(set)
        for account, owner in self.owners.items():
            if owner.domain_id:
                grouped[owner.domain_id].add(account)
        return {d: frozenset(a) for d, a in grouped.items()}


def name_key(name: str) -> str:
    """An account name as every collation CloudStack's account_name has had compares it:
    without case, and a Latin letter without its accents (`JOSÉ` is `jose`). utf8(mb4)_general_ci
    (before 4.20; on MariaDB) and utf8mb4_0900_ai_ci (4.20+ on MySQL 8) both fold these; they
    disagree on the rest (ß is s or ss, æ is æ or ae, trailing spaces count or not), which is
    left as it is: kvmeter then finds less than CloudStack, never an account it would not find.
    Hence lower(), not casefold() (which makes ß ss)."""
    decomposed = unicodedata.normalize("NFD", name.lower())
    return unicodedata.normalize("NFC", _LATIN_ACCENTS.sub("", decomposed))


def _latest(seen: Mapping[str, int], more: Mapping[str, int]) -> dict[str, int]:
    return {**seen, **{k: max(ms, seen.get(k, ms)) for k, ms in more.items()}}


def _fill(instances: dict[str, Instance], uuid: str, **facts: object) -> None:
    """Set the facts the instance does not have yet (None and "" are no fact)."""
    known = instances.get(uuid.lower(), NO_INSTANCE)
    missing = {k: v for k, v in facts.items() if v not in (None, "") and getattr(known, k) in (None, "")}
    if missing:
        instances[uuid.lower()] = replace(known, **missing)  # type: ignore[arg-type]


def _known(value: str | None) -> str:
    return "" if value is None or value.strip().lower() in _UNKNOWN else value.strip()


def _number(value: str | None) -> int | None:
    text = _known(value)
    return int(text) if text.isascii() and text.isdigit() and len(text) < 19 else None


def _tags(fields: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """`tag[i].key` / `tag[i].value` pairs (CloudStack's resourceTags), in their order."""
    found: dict[int, dict[str, str]] = defaultdict(dict)
    for name, value in fields.items():
        match = _TAG.fullmatch(name)
        if match:
            found[int(match.group(1) or 0)][match.group(2)] = value
    return tuple((t["key"], t.get("value", "")) for _, t in sorted(found.items()) if "key" in t)
