"""Traffic-type rules: CloudStack defaults, operator overrides, range parsing, config errors."""

from __future__ import annotations

from typing import Any

import pytest

from kvmeter.agent.traffic import (
    DEFAULT_RULES,
    TrafficRule,
    TrafficRules,
    TrafficRulesError,
    parse_ranges,
)

DEFAULT_CASES = [
    # bridge, vlan, vni, expected
    ("cloud0", None, None, "control"),
    ("brvx-1001", None, 1001, "guest"),
    ("brvx-1001", None, None, "guest"),
    ("cloudbr0", None, None, "public"),
    ("cloudbr1", None, None, "management"),
    ("breth1-100", 100, None, "guest"),
    ("brbond0-2001", 2001, None, "guest"),
    ("cloudVirBr50", 50, None, "guest"),
    ("virbr0", None, None, "unknown"),
    ("cloudbr2", None, None, "unknown"),
    ("CLOUD0", None, None, "unknown"),  # globs are case-sensitive, like interface names
    (None, None, None, "unknown"),
    (None, 100, None, "unknown"),
]


@pytest.mark.parametrize(("bridge", "vlan", "vni", "expected"), DEFAULT_CASES)
def test_cloudstack_defaults(bridge: str | None, vlan: int | None, vni: int | None, expected: str) -> None:
    assert DEFAULT_RULES.classify(bridge, vlan, vni) == expected


OPERATOR_CONFIG: dict[str, Any] = {
    "rules": [
        {"vlan": "100-199,300", "type": "public"},
        {"vni": [5000, "6000-6099"], "type": "private_gateway"},
        {"bridge": "brbond1-*", "type": "storage"},
        {"bridge": "cloudbr9", "vlan": 42, "type": "management"},
    ]
}

OPERATOR_CASES = [
    # a VLAN rule beats the br<pif>-<vlan> guest default
    ("breth1-150", 150, None, "public"),
    ("breth1-300", 300, None, "public"),
    ("breth1-200", 200, None, "guest"),
    # macvtap on eth1.100: no bridge, but the VLAN is known
    (None, 100, None, "public"),
    ("brvx-5000", None, 5000, "private_gateway"),
    ("brvx-6050", None, 6050, "private_gateway"),
    ("brvx-6100", None, 6100, "guest"),
    ("brbond1-77", 77, None, "storage"),
    # a rule with two conditions needs both
    ("cloudbr9", 42, None, "management"),
    ("cloudbr9", 43, None, "unknown"),
    ("cloudbr9", None, None, "unknown"),
    # defaults still apply after the operator's rules
    ("cloud0", None, None, "control"),
    ("cloudbr0", None, None, "public"),
]


@pytest.mark.parametrize(("bridge", "vlan", "vni", "expected"), OPERATOR_CASES)
def test_operator_rules_come_first(
    bridge: str | None, vlan: int | None, vni: int | None, expected: str
) -> None:
    rules = TrafficRules.from_config(OPERATOR_CONFIG)
    assert rules.classify(bridge, vlan, vni) == expected


def test_defaults_can_be_switched_off_and_fallback_set() -> None:
    rules = TrafficRules.from_config(
        {"defaults": False, "fallback": "guest", "rules": [{"bridge": "pub*", "type": "public"}]}
    )
    assert rules.classify("pub0", None, None) == "public"
    assert rules.classify("cloud0", None, None) == "guest"
    assert rules.classify(None, None, None) == "guest"


def test_empty_config_is_the_defaults() -> None:
    assert TrafficRules.from_config({}).rules == DEFAULT_RULES.rules
    assert TrafficRules.from_config(None).rules == DEFAULT_RULES.rules


def test_every_bad_entry_is_reported_at_once() -> None:
    bad = {
        "colour": "blue",
        "defaults": "yes",
        "fallback": "internet",
        "rules": [
            {"bridge": "x", "type": "bogus"},
            {"type": "public"},
            {"vlan": "0-10", "type": "public"},
            {"vlan": "20-10", "type": "public"},
            {"vni": "abc", "type": "guest"},
            {"vni": 2**24, "type": "guest"},
            {"bridge": "", "type": "guest"},
            {"bridge": "y", "type": "guest", "speed": 10},
            "cloud0=control",
            {"vlan": True, "type": "public"},
        ],
    }
    with pytest.raises(TrafficRulesError) as caught:
        TrafficRules.from_config(bad)
    problems = caught.value.problems
    expected_fragments = [
        "unknown key 'colour'",
        "'defaults' must be true or false",
        "'fallback' must be one of",
        "rules[0]: 'type' must be one of",
        "rules[1]: needs at least one of",
        "rules[2]: 'vlan': 0-10 is outside 1-4094",
        "rules[3]: 'vlan': range 20-10 runs backwards",
        "rules[4]: 'vni': 'abc' is not a number or range",
        "rules[5]: 'vni': 16777216-16777216 is outside 0-16777215",
        "rules[6]: 'bridge' must be a non-empty glob string",
        "rules[7]: unknown key 'speed'",
        "rules[8]: must be a table",
        "rules[9]: 'vlan': True is not a number or range",
    ]
    assert len(problems) == len(expected_fragments), problems
    for fragment, problem in zip(expected_fragments, problems, strict=True):
        assert fragment in problem
    assert isinstance(caught.value, ValueError)


def test_rules_must_be_a_list() -> None:
    with pytest.raises(TrafficRulesError, match="'rules' must be a list"):
        TrafficRules.from_config({"rules": {"bridge": "x", "type": "guest"}})


def test_constructor_rejects_unknown_types() -> None:
    with pytest.raises(TrafficRulesError, match="unknown traffic type 'web'"):
        TrafficRules([TrafficRule("web", bridge="x")])
    with pytest.raises(TrafficRulesError, match="fallback"):
        TrafficRules([], fallback="web")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (7, ((7, 7),)),
        ("7", ((7, 7),)),
        ("100-199", ((100, 199),)),
        (" 1-2 , 5 ", ((1, 2), (5, 5))),
        ([3, "10-12"], ((3, 3), (10, 12))),
    ],
)
def test_parse_ranges(value: Any, expected: tuple[tuple[int, int], ...]) -> None:
    assert parse_ranges(value, (1, 4094)) == expected


@pytest.mark.parametrize("value", ["", "a", "1-", "-5", [], [1.5], None, "1-2-3"])
def test_parse_ranges_rejects(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_ranges(value, (1, 4094))
