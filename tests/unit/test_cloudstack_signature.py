"""The API's CloudStack signature agrees with the `cs` client's, which signs as CloudStack
verifies (fields sorted by name as sent, then the whole request lower-cased)."""

from __future__ import annotations

import pytest
from cs.client import CloudStack

from kvmeter.collector.api_auth import cloudstack_signature

SECRET = "s3cr3t-key"


def _cs_signed(params: dict[str, str]) -> str:
    data = dict(params)
    CloudStack(endpoint="http://127.0.0.1/client/api", key="k", secret=SECRET)._sign(data)
    return data["signature"]


@pytest.mark.parametrize(
    "params",
    [
        {"command": "listUsageRecords", "apiKey": "k", "startdate": "2026-12-01", "response": "json"},
        # Names differing in case: "aB" sorts before "aa" as sent, after it once lower-cased.
        {"command": "listUsageRecords", "apiKey": "k", "aB": "1", "aa": "2"},
        {"command": "listUsageRecords", "apiKey": "k", "keyword": "a b*c-d_e.f/é"},
    ],
)
def test_signature_matches_the_cs_client(params: dict[str, str]) -> None:
    assert cloudstack_signature(params.items(), SECRET) == _cs_signed(params)


def test_the_signature_field_itself_is_not_signed() -> None:
    params = {"command": "listUsageTypes", "apiKey": "k"}
    signed = {**params, "Signature": "whatever"}
    assert cloudstack_signature(signed.items(), SECRET) == _cs_signed(params)


def test_values_are_encoded_as_javas_urlencoder_does() -> None:
    # URLEncoder encodes "~" (Python's quote keeps it): CloudStack signs "%7e".
    from kvmeter.collector.api_auth import _java_quote

    assert _java_quote("a b~*/é") == "a%20b%7E*%2F%C3%A9"
