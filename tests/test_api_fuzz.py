"""Property-based fuzzing of every operation of the HTTP API from its own OpenAPI document.

Schemathesis generates requests that fit the document (positive) and requests
that break it (negative: missing fields, wrong types, ids that are
not UUIDs). No request may get a 5xx response. The server runs against the real
local stack, without a worker, so an enqueued checkout only waits in the
queue.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from environment_provider.api.app import create_app
from environment_provider.settings import Settings

from test_api import ApiServer, start_api_server

MAX_EXAMPLES = 50
REQUEST_TIMEOUT = 15.0

# Only generated requests, not the document's own examples: the examples name
# real-looking provider ids and a testrun id, and could configure or stream a
# testrun that another test uses.
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),
)

POSITIVE = schemathesis.GenerationMode.POSITIVE
NEGATIVE = schemathesis.GenerationMode.NEGATIVE


def fuzz_cases() -> list[Any]:
    """One case per operation and generation mode.

    Negative requests need a body or a query parameter to break: /health has
    no input, and the events route takes only a path segment and a header,
    which hold any string.
    """
    cases = []
    for path, item in create_app(Settings()).openapi()["paths"].items():
        for method, operation in item.items():
            has_query = any(parameter["in"] == "query" for parameter in operation.get("parameters", []))
            modes = [POSITIVE, NEGATIVE] if "requestBody" in operation or has_query else [POSITIVE]
            cases += [pytest.param(method.upper(), path, mode, id=f"{method.upper()} {path} {mode.value}") for mode in modes]
    return cases


@pytest.fixture(scope="module")
def fuzzed_api(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ApiServer, Any]]:
    server = start_api_server(Path(tmp_path_factory.mktemp("fuzzed-api")) / "api.log")
    try:
        yield server, schemathesis.openapi.from_url(server.url + "/openapi.json")
    finally:
        server.stop()


@pytest.mark.parametrize("method, path, mode", fuzz_cases())
def test_fuzzed_requests_get_no_server_error(fuzzed_api, method, path, mode):
    server, schema = fuzzed_api
    operation = schema[path][method]

    @FUZZ_SETTINGS
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: Any) -> None:
        response = case.call(base_url=server.url, timeout=REQUEST_TIMEOUT)

        assert response.status_code < 500, f"{response.status_code} {response.text[:500]}\n{case.as_curl_command()}"

    check()
    assert "Traceback" not in server.log()
