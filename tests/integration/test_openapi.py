"""The served OpenAPI description is true: it names exactly the app's routes and methods, and
the live server's answers to requests generated from it (schemathesis, bounded) are never a 5xx
and conform to it (status codes, content types, headers, body schemas)."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import BaseSchema, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from kvmeter.collector import api_dead_letters
from kvmeter.collector.api import ApiServer, create_app
from kvmeter.collector.billing import tariff_file
from kvmeter.collector.billing.tariff_file import TariffSource
from kvmeter.collector.input_webhook import WebhookInput
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.openapi import LETTER_ID_MAX, LETTERS_MAX, document
from tests.api_support import NOW, filled_store, running
from tests.integration.test_corrections_pages import CORRECTIONS, add_corrections

TOKEN = "openapi-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 60  # per operation and mode: a few hundred requests in all, in seconds
TARIFF = Path(__file__).parents[2] / "packaging" / "config" / "tariff.toml.example"
NOT_DESCRIBED = {"/client/api"}  # CloudStack's own API, described by CloudStack
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,  # what the document rules out is refused (4xx), not served
]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, object]]:
    store, _ = filled_store(tmp_path_factory.mktemp("openapi"))
    add_corrections(store, CORRECTIONS, NOW)  # /v1/corrections answers pages with rows
    tariffs = TariffSource(tariff_file.load(TARIFF), TARIFF)
    app = create_app(
        store, token=TOKEN, metrics=Metrics(), webhook=WebhookInput("webhook-secret"), tariffs=tariffs
    )
    with running(ApiServer(app, "127.0.0.1", 0)) as base:
        yield base, app
    store.close()


@pytest.fixture(scope="module")
def api_schema(api: tuple[str, object]) -> BaseSchema:
    base, _ = api
    return schemathesis.openapi.from_url(f"{base}/v1/openapi.json", headers=AUTH)


def test_the_document_names_exactly_the_routes_and_methods(api: tuple[str, object]) -> None:
    base, app = api
    with urllib.request.urlopen(urllib.request.Request(f"{base}/v1/openapi.json", headers=AUTH)) as resp:
        served = json.loads(resp.read())
    assert served == json.loads(json.dumps(document(webhook=True)))
    assert served["openapi"].startswith("3.")
    routes = {
        (re.sub(r"<(?:[^:>]*:)?([^>]+)>", r"{\1}", rule.rule), method.lower())  # <int:x> is {x} there
        for rule in app.url_map.iter_rules()  # type: ignore[attr-defined]
        if rule.rule not in NOT_DESCRIBED
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    described = {(path, method) for path, item in served["paths"].items() for method in item}
    assert routes == described


def test_every_query_parameter_the_code_reads_is_described(api: tuple[str, object]) -> None:
    """Parameters a /v1 handler reads (request.args.get("...")) appear in the document."""
    collector = Path(__file__).parents[2] / "collector"
    modules = ("api_usage.py", "api_corrections.py", "api_dead_letters.py", "api_costs.py", "api_credits.py")
    source = "".join((collector / name).read_text() for name in modules)
    described = {p["name"] for item in document()["paths"].values() for op in item.values()
                 for p in op.get("parameters", [])}  # fmt: skip
    read = {part.split('"')[1] for part in source.split("args.get(")[1:]}
    assert read
    assert read <= described, read - described
    assert (LETTERS_MAX, LETTER_ID_MAX) == (api_dead_letters.MAX_PAGE, api_dead_letters.MAX_ID)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_get_conforming_answers(api_schema: BaseSchema, mode: GenerationMode) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    # schemathesis leaves out the document's own path; every other one is exercised.
    assert {op.path for op in operations} == set(document(webhook=True)["paths"]) - {"/v1/openapi.json"}
    calls = 0
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and not operation.definition.raw.get("parameters"):
            continue  # nothing to get wrong

        @given(operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def conforms(case: schemathesis.Case) -> None:
            nonlocal calls
            calls += 1
            case.call_and_validate(headers=AUTH, checks=CHECKS)

        conforms()
    assert calls >= EXAMPLES * 2  # the two /v1 listings at least got their share
