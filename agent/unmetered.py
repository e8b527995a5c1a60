"""The NICs of running domains the agent cannot meter: no host link can carry their bytes here
(an SR-IOV VF passed through, user-mode networking, a socket or vDPA backend) and no counter
source counts them (or one would, but libvirt named no device to ask it about). They are logged
once each and counted in a gauge rather than left out without a word: their bytes are nobody's
on the bill. Pure apart from the log."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence, Set
from operator import is_

from kvmeter.agent.metered import INACTIVE_STATES
from kvmeter.agent.model import DomainInfo, NicInfo

log = logging.getLogger(__name__)

# libvirt interface types whose guest end has no host network device (<interface type=...>)
NO_HOST_LINK_NIC_TYPES = frozenset(
    {"hostdev", "user", "vdpa", "mcast", "udp", "server", "client", "null", "internal"}
)


class UnmeteredNics:
    """`update(domains, touched)` after each new plan; `count`: the NICs unmetered now."""

    def __init__(self, source_of: Callable[[NicInfo], int | None]) -> None:
        self._source_of = source_of
        self._by_uuid: dict[str, tuple[NicInfo, ...]] = {}  # domains with unmetered NICs
        self._seen: list[DomainInfo] = []  # the domains last looked at (a plan built again
        # after link events only has the same objects: nothing to look at again)
        self.count = 0

    def _unmetered(self, domain: DomainInfo) -> tuple[NicInfo, ...]:
        if domain.state in INACTIVE_STATES:
            return ()
        return tuple(nic for nic in domain.nics if self._cannot_meter(nic))

    def _cannot_meter(self, nic: NicInfo) -> bool:
        if nic.device is not None and nic.nic_type not in NO_HOST_LINK_NIC_TYPES:
            return False  # a link's (or a source's, by that name): nearly every NIC
        if self._source_of(nic) is not None:
            return not nic.device  # a source is asked by the device name libvirt gives
        return nic.nic_type in NO_HOST_LINK_NIC_TYPES

    def update(self, domains: Sequence[DomainInfo], touched: Set[str] | None) -> None:
        """The plan's domains; `touched`: the only ones that may have changed (None: any)."""
        if touched is None:
            if len(domains) == len(self._seen) and all(map(is_, domains, self._seen)):
                return
            self._seen = list(domains)
            wanted = None
        else:
            wanted = touched & self._by_uuid.keys()  # (a domain that came with one: a built plan)
            if not wanted:
                return
        by_uuid = dict(self._by_uuid) if wanted is not None else {}
        for uuid in wanted or ():
            del by_uuid[uuid]
        for domain in domains:
            if wanted is not None and domain.uuid not in wanted:
                continue
            nics = self._unmetered(domain)
            if not nics:
                continue
            by_uuid[domain.uuid] = nics
            known = {nic.mac for nic in self._by_uuid.get(domain.uuid, ())}
            for nic in nics:
                if nic.mac not in known:
                    log.warning(
                        "NIC %s (type %s, device %s) of domain %s (%s) is not metered: no host link "
                        "carries its bytes and no counter source counts it",
                        nic.mac,
                        nic.nic_type or "?",
                        nic.device or "none",
                        domain.name,
                        domain.uuid,
                    )
        self._by_uuid = by_uuid
        self.count = sum(map(len, by_uuid.values()))
