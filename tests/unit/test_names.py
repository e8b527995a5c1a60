"""CloudStack domain names -> kind and ids, one row per naming rule."""

from __future__ import annotations

import pytest

from kvmeter.agent.names import DomainName, parse_domain_name

CASES = [
    ("i-2-10-VM", "VM", DomainName("user_vm", account_id="2", vm_id="10")),
    ("i-2-179-VM", "VM", DomainName("user_vm", account_id="2", vm_id="179")),
    ("i-1234-987654-VM", "VM", DomainName("user_vm", account_id="1234", vm_id="987654")),
    ("r-5-VM", "VM", DomainName("virtual_router", vm_id="5")),
    ("s-1-VM", "VM", DomainName("system_vm", vm_id="1", role="secondary_storage")),
    ("v-3-VM", "VM", DomainName("system_vm", vm_id="3", role="console_proxy")),
    # a non-default instance.name
    ("i-2-10-CLOUD", "CLOUD", DomainName("user_vm", account_id="2", vm_id="10")),
    ("r-7-CLOUD", "CLOUD", DomainName("virtual_router", vm_id="7")),
    # suffix with regex metacharacters is literal
    ("i-2-10-a.b", "a.b", DomainName("user_vm", account_id="2", vm_id="10")),
    ("i-2-10-axb", "a.b", DomainName("other")),
    # another installation's suffix, or no CloudStack name at all
    ("i-2-10-VM", "CLOUD", DomainName("other")),
    ("i-2-10-vm", "VM", DomainName("other")),
    ("i-2-VM", "VM", DomainName("other")),
    ("i-x-10-VM", "VM", DomainName("other")),
    ("r-5-VM-extra", "VM", DomainName("other")),
    ("x-5-VM", "VM", DomainName("other")),
    ("ubuntu22", "VM", DomainName("other")),
    ("", "VM", DomainName("other")),
]


@pytest.mark.parametrize(("name", "suffix", "expected"), CASES)
def test_parse_domain_name(name: str, suffix: str, expected: DomainName) -> None:
    assert parse_domain_name(name, suffix) == expected


def test_default_suffix_is_vm() -> None:
    assert parse_domain_name("i-2-10-VM").kind == "user_vm"


def test_empty_suffix_is_an_error() -> None:
    with pytest.raises(ValueError, match="instance_suffix"):
        parse_domain_name("i-2-10-", "")
