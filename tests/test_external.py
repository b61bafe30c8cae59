"""External providers on the real stack: HTTP services on 127.0.0.1 that implement start, status and stop.

Every failure test checks the service's own record (nothing still checked
out) and etcd (no sub-suite keys left).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

import pytest

from environment_provider import keys
from environment_provider.registry import register_definition
from environment_provider.release import release_environment, release_testrun
from environment_provider.validation import InvalidDocumentError

from conftest import EXAMPLE_CONFIG, EXAMPLE_DATASET
from external_service import Behaviour, ExternalService, external, external_definition  # noqa: F401 - `external` is a fixture


def sub_suites(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [sub_suite for suite in result["suites"] for sub_suite in suite["sub_suites"]]


def smoke_only(tercc: dict[str, Any]) -> dict[str, Any]:
    """Keep only the second test suite: 2 recipes for 2 test runners, so exactly 2 IUTs."""
    tercc["data"]["batches"] = tercc["data"]["batches"][1:]
    return tercc


def register(database: Any, service: ExternalService, name: str) -> str:
    register_definition(database, service.definition(name))
    return name


def progress_messages(database: Any, testrun_id: str) -> list[str]:
    events = [json.loads(value) for value in database.get_prefix(keys.sse_prefix(testrun_id)).values()]
    return [event["data"].get("message") or event["data"].get("error") or "" for event in sorted(events, key=lambda e: e["id"])]


def assert_nothing_left(database: Any, testrun_id: str, *services: ExternalService) -> None:
    assert database.keys_prefix(keys.suites_prefix(testrun_id)) == []
    for service in services:
        assert service.state.checked_out == {}
        assert service.state.unknown_stops == []


# Checkouts that succeed.


def test_external_iuts_with_jsontas_spaces_and_logs(configure, checkout, database, settings, tercc, external, unique, providers):
    service = external("iut")
    name = register(database, service, f"ext-iut-{unique}")
    testrun_id = configure(tercc, iut=name)

    _, result = checkout(testrun_id)

    assert result["error"] is None
    checked_out = sub_suites(result)
    assert len(checked_out) == 6
    assert sorted(sub_suite["iut"]["id"] for sub_suite in checked_out) == sorted(service.state.checked_out)
    for sub_suite in checked_out:
        assert sub_suite["iut"]["provider_id"] == name
        assert sub_suite["iut"]["identity"] == EXAMPLE_CONFIG["identity"]
        assert sub_suite["executor"]["provider_id"] == providers["execution-space"]
        assert sub_suite["executor"]["instructions"]["environment"]["ENVIRONMENT_ID"] == sub_suite["sub_suite_id"]
        assert sub_suite["log_area"]["provider_id"] == providers["log-area"]
    assert set(service.state.etos_ids) == {testrun_id}

    report = release_testrun(database, settings, testrun_id)

    assert report.complete
    assert set(service.state.etos_ids) == {testrun_id}
    assert_nothing_left(database, testrun_id, service)


def test_start_body_follows_the_protocol(configure, checkout, database, tercc, external, unique):
    service = external("iut")
    testrun_id = configure(tercc, iut=register(database, service, f"ext-iut-{unique}"))

    checkout(testrun_id)

    functional, smoke = service.state.start_bodies
    assert (functional["minimum_amount"], functional["maximum_amount"]) == (2, 4)
    assert (smoke["minimum_amount"], smoke["maximum_amount"]) == (2, 2)
    assert functional["identity"] == EXAMPLE_CONFIG["identity"]
    assert functional["artifact_id"] == EXAMPLE_CONFIG["artifact_id"]
    assert functional["context"] == EXAMPLE_CONFIG["context"]
    assert functional["dataset"] == EXAMPLE_DATASET
    assert functional["tercc"]["meta"]["id"] == testrun_id
    assert "test_runner" not in functional


def test_all_three_kinds_external(configure, checkout, database, settings, tercc, external, unique):
    iuts, spaces, logs = external("iut"), external("execution-space"), external("log-area")
    testrun_id = configure(
        smoke_only(tercc),
        iut=register(database, iuts, f"ext-iut-{unique}"),
        execution_space=register(database, spaces, f"ext-es-{unique}"),
        log_area=register(database, logs, f"ext-la-{unique}"),
    )

    _, result = checkout(testrun_id)

    checked_out = sub_suites(result)
    assert len(checked_out) == 2
    assert sorted(sub["executor"]["id"] for sub in checked_out) == sorted(spaces.state.checked_out)
    assert sorted(sub["log_area"]["id"] for sub in checked_out) == sorted(logs.state.checked_out)
    space_bodies = spaces.state.start_bodies
    assert [(body["minimum_amount"], body["maximum_amount"]) for body in space_bodies] == [(1, 1), (1, 1)]
    assert sorted(body["test_runner"] for body in space_bodies) == sorted(sub["test_runner"] for sub in checked_out)
    assert sorted(body["environment"]["environment_id"] for body in space_bodies) == sorted(sub["sub_suite_id"] for sub in checked_out)
    for body in space_bodies:
        assert body["environment"]["sub_suite_key"].endswith(f"/subsuite/{body['environment']['environment_id']}/suite")
    for service in (iuts, spaces, logs):
        assert set(service.state.etos_ids) == {testrun_id}

    report = release_testrun(database, settings, testrun_id)

    assert report.complete
    assert_nothing_left(database, testrun_id, iuts, spaces, logs)


def test_slow_provider_is_polled_until_done(configure, checkout, database, settings, tercc, external, unique):
    service = external("iut", Behaviour(pending_seconds=0.8, description="flashing 2 gateways"))
    testrun_id = configure(smoke_only(tercc), iut=register(database, service, f"ext-iut-{unique}"))

    started = time.monotonic()
    _, result = checkout(testrun_id)

    assert result["error"] is None
    assert time.monotonic() - started >= 0.8
    assert 2 <= service.state.status_polls <= 12
    assert any("flashing 2 gateways" in message for message in progress_messages(database, testrun_id))
    release_testrun(database, settings, testrun_id)
    assert_nothing_left(database, testrun_id, service)


def test_busy_responses_are_retried(configure, checkout, database, settings, tercc, external, unique):
    busy = {"start": [503, 429], "status": [503, 503], "stop": [503, 429]}
    service = external("iut", Behaviour(retry_statuses=busy))
    testrun_id = configure(smoke_only(tercc), iut=register(database, service, f"ext-iut-{unique}"))

    _, result = checkout(testrun_id)

    assert result["error"] is None
    assert len(service.state.checked_out) == 2
    report = release_testrun(database, settings, testrun_id)
    assert report.complete
    assert busy == {"start": [], "status": [], "stop": []}
    assert_nothing_left(database, testrun_id, service)


def test_refused_connections_are_retried(configure, checkout, database, settings, tercc, external, unique):
    service = external("iut", up_after=0.5)
    testrun_id = configure(smoke_only(tercc), iut=register(database, service, f"ext-iut-{unique}"))

    _, result = checkout(testrun_id)

    assert result["error"] is None
    assert len(service.state.start_bodies) == 1
    release_testrun(database, settings, testrun_id)
    assert_nothing_left(database, testrun_id, service)


def test_extra_items_are_stopped_at_once(configure, checkout, database, settings, tercc, external, unique):
    service = external("iut", Behaviour(extra=2))
    testrun_id = configure(smoke_only(tercc), iut=register(database, service, f"ext-iut-{unique}"))

    _, result = checkout(testrun_id)

    checked_out = sub_suites(result)
    assert len(checked_out) == 2
    assert len(service.state.stopped) == 2
    assert sorted(service.state.checked_out) == sorted(sub["iut"]["id"] for sub in checked_out)
    stored = database.get_prefix(keys.suites_prefix(testrun_id))
    assert len([key for key in stored if key.endswith("/iut")]) == 2
    report = release_testrun(database, settings, testrun_id)
    assert report.complete
    assert_nothing_left(database, testrun_id, service)


def test_release_one_external_environment(configure, checkout, database, settings, tercc, external, unique):
    service = external("iut")
    testrun_id = configure(smoke_only(tercc), iut=register(database, service, f"ext-iut-{unique}"))
    _, result = checkout(testrun_id)
    first, second = sub_suites(result)

    report = release_environment(database, settings, first["sub_suite_id"])

    assert report.released == [first["sub_suite_id"]]
    assert list(service.state.checked_out) == [second["iut"]["id"]]
    release_testrun(database, settings, testrun_id)
    assert_nothing_left(database, testrun_id, service)


# Checkouts that fail: a clear error, and nothing stays checked out.


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        ((500, "internal server error"), "HTTP 500"),
        ((200, "<html>maintenance</html>"), "is not JSON"),
        ((200, {"request": "accepted"}), "has no 'id'"),
        ((200, {"id": ""}), "has no 'id'"),
        ((400, {"error": "unknown identity"}), "HTTP 400"),
    ],
)
def test_bad_start_response_fails(configure, checkout, database, tercc, external, unique, response, reason):
    service = external("iut", Behaviour(start_response=response))
    name = register(database, service, f"ext-iut-{unique}")
    testrun_id = configure(tercc, iut=name)

    _, result = checkout(testrun_id)

    assert f"provider '{name}' failed in stage 'start'" in result["error"]
    assert reason in result["error"]
    assert len(service.state.start_bodies) == 1
    assert_nothing_left(database, testrun_id, service)


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        ((200, ["DONE"]), "is not an object"),
        ((200, {"status": "WAITING"}), "unknown status 'WAITING'"),
        ((200, {"status": "DONE", "iuts": "all of them"}), "DONE without a list of objects in 'iuts'"),
        ((200, {"status": "DONE", "iuts": ["SN0001"]}), "DONE without a list of objects in 'iuts'"),
        ((500, {"error": "database down"}), "HTTP 500"),
        ((200, "plain text"), "is not JSON"),
    ],
)
def test_bad_status_response_fails(configure, checkout, database, tercc, external, unique, response, reason):
    service = external("iut", Behaviour(status_response=response))
    name = register(database, service, f"ext-iut-{unique}")
    testrun_id = configure(tercc, iut=name)

    _, result = checkout(testrun_id)

    assert f"provider '{name}' failed in stage 'status'" in result["error"]
    assert reason in result["error"]
    assert_nothing_left(database, testrun_id, service)


def test_failed_status_description_reaches_user(configure, checkout, database, tercc, external, unique):
    description = "no gateway with firmware 5.2.0 is in the pool"
    service = external("iut", Behaviour(failed=description))
    name = register(database, service, f"ext-iut-{unique}")
    testrun_id = configure(tercc, iut=name)

    _, result = checkout(testrun_id)

    assert f"provider '{name}' failed in stage 'status'" in result["error"]
    assert f"FAILED: {description}" in result["error"]
    assert any(description in message for message in progress_messages(database, testrun_id))
    assert json.loads(database.get(keys.testrun(testrun_id)))["status"] == "failed"
    assert_nothing_left(database, testrun_id, service)


def test_pending_past_timeout_fails(configure, checkout, database, tercc, external, unique):
    service = external("iut", Behaviour(pending_seconds=math.inf, description="all gateways are busy"))
    name = register(database, service, f"ext-iut-{unique}")
    testrun_id = configure(tercc, iut=name, timeouts={"iut": 1, "total": 30})

    started = time.monotonic()
    _, result = checkout(testrun_id)

    assert time.monotonic() - started >= 1
    assert f"provider '{name}' failed in stage 'status'" in result["error"]
    assert "still PENDING when the 'iut' timeout of 1 s ran out" in result["error"]
    assert "all gateways are busy" in result["error"]
    assert_nothing_left(database, testrun_id, service)


def test_too_few_items_fail_and_are_stopped(configure, checkout, database, tercc, external, unique):
    service = external("iut", Behaviour(short=1))
    name = register(database, service, f"ext-iut-{unique}")
    testrun_id = configure(tercc, iut=name)

    _, result = checkout(testrun_id)

    assert f"provider '{name}' failed in stage 'status'" in result["error"]
    assert "returned 1 IUTs but at least 2 are needed" in result["error"]
    assert len(service.state.stopped) == 1
    assert_nothing_left(database, testrun_id, service)


def test_failing_execution_space_checks_in_external_iuts(configure, checkout, database, tercc, external, unique):
    iuts = external("iut")
    spaces = external("execution-space", Behaviour(failed="runner pool is empty"))
    testrun_id = configure(
        tercc,
        iut=register(database, iuts, f"ext-iut-{unique}"),
        execution_space=register(database, spaces, f"ext-es-{unique}"),
    )

    _, result = checkout(testrun_id)

    assert f"provider 'ext-es-{unique}' failed in stage 'status'" in result["error"]
    assert "runner pool is empty" in result["error"]
    assert len(iuts.state.stopped) == 4
    assert_nothing_left(database, testrun_id, iuts, spaces)


def test_connection_refused_until_timeout_fails(configure, checkout, database, tercc, external, unique):
    service = external("iut", listening=False)
    name = register(database, service, f"ext-iut-{unique}")
    testrun_id = configure(tercc, iut=name, timeouts={"iut": 1, "total": 30})

    _, result = checkout(testrun_id)

    assert f"provider '{name}' failed in stage 'start'" in result["error"]
    assert "still failed when the 'iut' timeout of 1 s ran out" in result["error"]
    assert_nothing_left(database, testrun_id, service)


# Release against a stop endpoint that fails.


def test_stop_down_keeps_keys_until_later_release(configure, checkout, database, settings, tercc, external, unique):
    service = external("iut")
    name = register(database, service, f"ext-iut-{unique}")
    testrun_id = configure(smoke_only(tercc), iut=name)
    _, result = checkout(testrun_id)
    environments = sorted(sub["sub_suite_id"] for sub in sub_suites(result))
    service.down()
    quick = dataclasses.replace(settings, request_timeout=0.5)

    report = release_testrun(database, quick, testrun_id)

    assert not report.complete
    assert report.released == []
    assert len(report.failures) == 2
    for sub_suite in sub_suites(result):
        failure = next(failure for failure in report.failures if sub_suite["sub_suite_id"] in failure)
        assert f"IUT id='{sub_suite['iut']['id']}' was not checked in" in failure
        assert f"provider '{name}' failed in stage 'stop'" in failure
    left = database.keys_prefix(keys.suites_prefix(testrun_id))
    assert sorted(key.rsplit("/", 1)[1] for key in left) == ["iut", "iut", "suite", "suite"]
    for environment_id in environments:
        assert database.get(keys.environment_testrun(environment_id)) == testrun_id
    assert json.loads(database.get(keys.testrun(testrun_id)))["status"] == "release incomplete"
    assert len(service.state.checked_out) == 2

    service.up()
    again = release_testrun(database, quick, testrun_id)

    assert again.complete
    assert sorted(again.released) == environments
    assert_nothing_left(database, testrun_id, service)
    for environment_id in environments:
        assert database.keys_prefix(keys.environment_prefix(environment_id)) == []


def test_stop_error_body_is_reported(configure, checkout, database, settings, tercc, external, unique):
    behaviour = Behaviour(stop_error="gateway EXT0001 is still running a test")
    service = external("iut", behaviour)
    testrun_id = configure(smoke_only(tercc), iut=register(database, service, f"ext-iut-{unique}"))
    checkout(testrun_id)

    report = release_testrun(database, settings, testrun_id)

    assert len(report.failures) == 2
    assert all("gateway EXT0001 is still running a test" in failure for failure in report.failures)
    assert len(service.state.checked_out) == 2
    behaviour.stop_error = None
    assert release_testrun(database, settings, testrun_id).complete
    assert_nothing_left(database, testrun_id, service)


# Registration.


@pytest.mark.parametrize("endpoint", ["start", "status", "stop"])
def test_external_definition_needs_every_endpoint(database, unique, endpoint):
    definition = external_definition(keys.IUT, "http://127.0.0.1:9", f"ext-{unique}")
    del definition["iut"][endpoint]

    with pytest.raises(InvalidDocumentError, match=rf"\$\.iut.*'{endpoint}' is a required property"):
        register_definition(database, definition)

    assert database.get(keys.provider(keys.IUT, f"ext-{unique}")) is None


def test_external_endpoint_must_be_http_url(database, unique):
    definition = external_definition(keys.IUT, "http://127.0.0.1:9", f"ext-{unique}")
    definition["iut"]["status"]["host"] = "ftp://127.0.0.1/status"

    with pytest.raises(InvalidDocumentError, match=r"\$\.iut\.status\.host"):
        register_definition(database, definition)
