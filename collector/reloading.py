"""What `kvmeter collector` re-reads on SIGHUP (kvmeter.reload runs them between two rounds).

- router owners: the config file's usage.router_owners_file, read again (also a file newly
  named there, or none: an empty map); measures attributed after it use the new map.
- credentials: the config file's [api] token / token_file / key pair / [[api.credentials]] and
  the credentials file it names.
- tariff: the tariff file [billing] tariff_file names (also a file newly named there); costs
  asked for from then on are rated under it.
- policy: the [policy] section (the defaults where it is gone). A changed policy is put in force
  over the whole store at once (collector/policy_change.py): every resource recomputed under it
  from all its events, then recorded (billing_policies) and logged as a warning.

Each reads the config file again but takes only its own section: a mistake in one section, or
in one file, refuses that reload alone. The rest of the config (store, inputs, windows) is read
at start only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvmeter.collector import config as config_mod
from kvmeter.collector import credentials
from kvmeter.collector.billing.tariff_file import TariffSource
from kvmeter.collector.credentials import CredentialSource
from kvmeter.collector.policy import policy_from
from kvmeter.collector.policy_change import put_in_force
from kvmeter.collector.service import Collector
from kvmeter.reload import Reloads
from kvmeter.tomlconfig import ConfigError, read_toml, schema_problems

log = logging.getLogger(__name__)


def _section(path: Path, name: str) -> dict[str, Any]:
    """One table of the config file, checked against its part of the schema."""
    doc = read_toml(path)
    section = doc.get(name, {})
    problems = [p for p in schema_problems(config_mod.SCHEMA, doc) if p.split(".")[0].split(":")[0] == name]
    if problems or not isinstance(section, dict):
        raise ConfigError(str(path), problems or [f"{name}: not a table"])
    return section


def router_owners(path: Path, service: Collector) -> Callable[[], str]:
    def reload() -> str:
        name = _section(path, "usage").get("router_owners_file", "")
        routers = config_mod.load_router_owners(path.parent / name) if name else {}
        service.set_routers(routers)
        return f"{len(routers)} router owner(s)" + (f" from {path.parent / name}" if name else "")

    return reload


def api_credentials(path: Path, source: CredentialSource) -> Callable[[], str]:
    def reload() -> str:
        inline, file, problems = credentials.from_api_section(_section(path, "api"), path.parent)
        if problems:
            raise ConfigError(str(path), problems)
        current = source.replace(inline, file)
        return f"{len(current.tokens)} token(s), {len(current.keys)} key pair(s)" + (
            f" (with {file})" if file else ""
        )

    return reload


def tariff(path: Path, source: TariffSource) -> Callable[[], str]:
    def reload() -> str:
        name = _section(path, "billing").get("tariff_file")
        if not name:
            raise ConfigError(
                str(path), ["billing.tariff_file: costs cannot be switched off without a restart"]
            )
        return source.reload(path.parent / name)

    return reload


def billing_policy(path: Path, service: Collector) -> Callable[[], str]:
    def reload() -> str:
        return put_in_force(service, policy_from(_section(path, "policy")))

    return reload


def collector_reloads(
    path: Path,
    service: Collector,
    source: CredentialSource | None,
    on_failure: Callable[[str], None],
    tariffs: TariffSource | None = None,
) -> Reloads:
    reloads = Reloads(on_failure)
    reloads.add("router owners", router_owners(path, service))
    reloads.add("policy", billing_policy(path, service))
    if source is not None:
        reloads.add("credentials", api_credentials(path, source))
        reloads.apart("credentials")  # a removed credential must not wait for the loop's next round
    if tariffs is not None:
        reloads.add("tariff", tariff(path, tariffs))
    return reloads
