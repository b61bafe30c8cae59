"""The HTTP API as a client sees it: a real server process on 127.0.0.1, the real local stack and a real worker."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from httpx_sse import ServerSentEvent, connect_sse

from environment_provider import keys
from environment_provider.local import free_port
from environment_provider.registry import register_definition

from conftest import EXAMPLE_CONFIG, EXAMPLE_DATASET, load_definition

API_SETTINGS = (
    "ENVIRONMENT_PROVIDER_API_TOKEN",
    "IUT_PROVIDERS",
    "EXECUTION_SPACE_PROVIDERS",
    "LOG_AREA_PROVIDERS",
)
START_TIMEOUT = 30.0
CHECKOUT_TIMEOUT = 90.0


# The server.


@dataclass
class ApiServer:
    """An `environment-provider api` process and its log file."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def start_api_server(log_path: Path, **environment: str) -> ApiServer:
    """Start the API through the CLI with the test stack's settings plus `environment`; wait until it serves."""
    env = {name: value for name, value in os.environ.items() if name not in API_SETTINGS}
    env.update(environment)
    port = free_port()
    command = [sys.executable, "-m", "environment_provider.cli", "api", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    server = ApiServer(f"http://127.0.0.1:{port}", process, log_path)

    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the API exited with status {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/openapi.json", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"the API did not serve within {START_TIMEOUT:g} s:\n{server.log()}")


@pytest.fixture(scope="module")
def api(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """The API with default settings: no token, no provider folders."""
    server = start_api_server(tmp_path_factory.mktemp("api") / "api.log")
    yield server
    server.stop()


@pytest.fixture
def client(api: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, timeout=30) as http:
        yield http


TOKEN = secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def token_api(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    server = start_api_server(tmp_path_factory.mktemp("token-api") / "api.log", ENVIRONMENT_PROVIDER_API_TOKEN=TOKEN)
    yield server
    server.stop()


@pytest.fixture
def token_client(token_api: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=token_api.url, timeout=30) as http:
        yield http


# Request bodies and helpers.


def definitions(unique: str) -> dict[str, dict[str, Any]]:
    return {
        "iut_provider": load_definition("iut/static-devices.json", f"iut-{unique}"),
        "execution_space_provider": load_definition("execution-space/local-runners.json", f"execution-space-{unique}"),
        "log_area_provider": load_definition("log-area/file-server.json", f"log-area-{unique}"),
    }


def configure_body(testrun_id: str, providers: dict[str, str], tercc: dict[str, Any] | None) -> dict[str, Any]:
    """A POST /configure body for providers given as kind -> name."""
    body = {
        "suite_id": testrun_id,
        "iut_provider": providers["iut"],
        "execution_space_provider": providers["execution-space"],
        "log_area_provider": providers["log-area"],
        "dataset": dict(EXAMPLE_DATASET),
        "config": dict(EXAMPLE_CONFIG),
        "timeouts": {"iut": 20, "execution-space": 20, "log-area": 20, "total": 60},
    }
    if tercc is not None:
        body["tercc"] = tercc
    return body


def wait_for_task(client: httpx.Client, task_id: str, timeout: float = CHECKOUT_TIMEOUT) -> dict[str, Any]:
    """Poll GET /?id=<task> until the task is SUCCESS or FAILURE; return the last body."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get("/", params={"id": task_id})
        assert response.status_code == 200, response.text
        body = response.json()
        if body["status"] in ("SUCCESS", "FAILURE") or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


def environment_ids(result: dict[str, Any]) -> list[str]:
    return [sub_suite["sub_suite_id"] for suite in result["suites"] for sub_suite in suite["sub_suites"]]


def read_events(client: httpx.Client, testrun_id: str, last_event_id: str | None = None, limit: int | None = None) -> list[ServerSentEvent]:
    """Read the testrun's event stream until it ends, or until `limit` events arrived."""
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    events: list[ServerSentEvent] = []
    with connect_sse(client, "GET", f"/v1/testrun/{testrun_id}/events", headers=headers) as source:
        for event in source.iter_sse():
            events.append(event)
            if limit is not None and len(events) >= limit:
                break
    return events


def sub_suite_keys(database: Any, testrun_id: str) -> list[str]:
    return database.keys_prefix(keys.suites_prefix(testrun_id))


def record_of(database: Any, testrun_id: str) -> dict[str, Any]:
    return json.loads(database.get(keys.testrun(testrun_id)))


# The full flow.


def test_full_flow_checks_out_and_releases(client, database, worker, tercc, unique):
    testrun_id = tercc["meta"]["id"]
    submitted = definitions(unique)
    submitted["execution_space_provider"] = json.dumps(submitted["execution_space_provider"])  # a string of JSON works too

    registered = client.post("/register", json=submitted)

    assert registered.status_code == 204
    assert json.loads(database.get(keys.provider(keys.IUT, f"iut-{unique}"))) == submitted["iut_provider"]
    assert json.loads(database.get(keys.provider(keys.EXECUTION_SPACE, f"execution-space-{unique}"))) == json.loads(
        submitted["execution_space_provider"]
    )
    assert json.loads(database.get(keys.provider(keys.LOG_AREA, f"log-area-{unique}"))) == submitted["log_area_provider"]

    names = {"iut": f"iut-{unique}", "execution-space": f"execution-space-{unique}", "log-area": f"log-area-{unique}"}
    configured = client.post("/configure", json=configure_body(testrun_id, names, tercc))

    assert configured.status_code == 200
    assert configured.json()["iut_provider"] == f"iut-{unique}"
    assert record_of(database, testrun_id)["status"] == "configured"
    assert json.loads(database.get(keys.tercc(testrun_id))) == tercc
    assert json.loads(database.get(keys.dataset(testrun_id))) == EXAMPLE_DATASET
    assert json.loads(database.get(keys.config(testrun_id))) == EXAMPLE_CONFIG
    assert database.get(keys.timeout(testrun_id, "total")) == "60.0"
    assert json.loads(database.get(keys.testrun_provider(testrun_id, keys.IUT))) == submitted["iut_provider"]
    assert client.get("/configure", params={"suite_id": testrun_id}).json() == configured.json()

    suite_ids = [str(uuid.uuid4()), str(uuid.uuid4())]
    enqueued = client.post("/", json={"suite_id": testrun_id, "suite_runner_ids": ",".join(suite_ids)})

    assert enqueued.status_code == 200
    assert enqueued.json()["result"] == "success"
    task_id = enqueued.json()["data"]["id"]
    assert database.get(keys.task_id(testrun_id)) == task_id
    assert database.get(keys.task_testrun(task_id)) == testrun_id

    status = wait_for_task(client, task_id)

    assert status["status"] == "SUCCESS"
    assert status["result"]["error"] is None
    assert [suite["suite_name"] for suite in status["result"]["suites"]] == ["Gateway functional", "Gateway smoke"]
    assert record_of(database, testrun_id)["status"] == "checked out"
    environments = environment_ids(status["result"])
    assert len(environments) >= 2
    for suite, suite_id in zip(status["result"]["suites"], suite_ids):
        for sub_suite in suite["sub_suites"]:
            stored = database.get(keys.sub_suite_item(testrun_id, suite_id, sub_suite["sub_suite_id"], "suite"))
            assert json.loads(stored) == sub_suite

    reconfigured = client.post("/configure", json=configure_body(testrun_id, names, tercc))

    assert reconfigured.status_code == 409
    assert reconfigured.json()["field"] == "suite_id"
    assert record_of(database, testrun_id)["status"] == "checked out"

    first = environments[0]
    single = client.get("/", params={"single_release": first})

    assert single.status_code == 200
    assert single.json()["released"] == [first]
    assert database.get(keys.environment_testrun(first)) is None
    assert not [key for key in sub_suite_keys(database, testrun_id) if first in key]
    assert all(database.get(keys.environment_testrun(other)) == testrun_id for other in environments[1:])

    again = client.get("/", params={"single_release": first})

    assert again.status_code == 404
    assert again.json()["field"] == "single_release"

    released = client.get("/", params={"release": task_id})

    assert released.status_code == 200
    assert sorted(released.json()["released"]) == sorted(environments[1:])
    assert sub_suite_keys(database, testrun_id) == []
    assert all(database.get(keys.environment_testrun(other)) is None for other in environments)
    assert record_of(database, testrun_id)["status"] == "released"

    released_twice = client.get("/", params={"release": task_id})

    assert released_twice.status_code == 200
    assert released_twice.json()["released"] == []


def test_failed_checkout_status_is_failure(client, database, worker, providers, tercc, unique):
    """A checkout that ends with an error result is reported as FAILURE, as ETOS suite runners expect."""
    register_definition(database, {"log": {"id": f"no-logs-{unique}", "list": {"possible": [], "available": []}}})
    body = configure_body(tercc["meta"]["id"], providers, tercc)
    body["log_area_provider"] = f"no-logs-{unique}"
    assert client.post("/configure", json=body).status_code == 200
    task_id = client.post("/", json={"suite_id": tercc["meta"]["id"], "suite_runner_ids": []}).json()["data"]["id"]

    status = wait_for_task(client, task_id)

    assert status["status"] == "FAILURE"
    assert "no possible log areas" in status["result"]["error"]
    assert sub_suite_keys(database, tercc["meta"]["id"]) == []


def test_configure_rejects_unusable_maximum_amount(client, database, providers, tercc):
    body = configure_body(tercc["meta"]["id"], providers, tercc)
    body["dataset"] = {**EXAMPLE_DATASET, "maximum_amount": 0}

    response = client.post("/configure", json=body)

    assert response.status_code == 422
    assert response.json()["field"] == "dataset"
    assert "maximum_amount=0" in response.json()["error"]
    assert database.keys_prefix(keys.testrun(tercc["meta"]["id"])) == []


# Server-sent events.


def test_events_stream_a_running_checkout(api, client, worker, providers, tercc):
    testrun_id = tercc["meta"]["id"]
    assert client.post("/configure", json=configure_body(testrun_id, providers, tercc)).status_code == 200
    events: list[ServerSentEvent] = []
    connected = threading.Event()

    def follow() -> None:
        with httpx.Client(base_url=api.url, timeout=CHECKOUT_TIMEOUT) as reader:
            with connect_sse(reader, "GET", f"/v1/testrun/{testrun_id}/events") as source:
                connected.set()
                events.extend(source.iter_sse())

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    assert connected.wait(10)
    task_id = client.post("/", json={"suite_id": testrun_id, "suite_runner_ids": []}).json()["data"]["id"]
    follower.join(CHECKOUT_TIMEOUT)

    assert not follower.is_alive(), "the stream did not end after the checkout finished"
    assert wait_for_task(client, task_id)["status"] == "SUCCESS"
    assert [int(event.id) for event in events] == list(range(1, len(events) + 1))
    assert events[-1].event == "finished"
    assert json.loads(events[-1].data)["status"] == "checked out"
    assert all(event.event == "message" for event in events[:-1])
    assert any("sub-suite" in json.loads(event.data)["message"] for event in events[:-1])


def test_events_resume_after_last_event_id(api, client, worker, providers, tercc):
    testrun_id = tercc["meta"]["id"]
    assert client.post("/configure", json=configure_body(testrun_id, providers, tercc)).status_code == 200
    first: list[ServerSentEvent] = []
    connected = threading.Event()

    def follow_one() -> None:
        with httpx.Client(base_url=api.url, timeout=CHECKOUT_TIMEOUT) as reader:
            with connect_sse(reader, "GET", f"/v1/testrun/{testrun_id}/events") as source:
                connected.set()
                for event in source.iter_sse():
                    first.append(event)
                    break

    follower = threading.Thread(target=follow_one, daemon=True)
    follower.start()
    assert connected.wait(10)
    task_id = client.post("/", json={"suite_id": testrun_id, "suite_runner_ids": []}).json()["data"]["id"]
    follower.join(CHECKOUT_TIMEOUT)
    rest = read_events(client, testrun_id, last_event_id=first[0].id)

    assert first[0].id == "1"
    assert [int(event.id) for event in rest] == list(range(2, len(rest) + 2))
    assert rest[-1].event == "finished"
    assert wait_for_task(client, task_id)["status"] == "SUCCESS"


def test_finished_events_are_replayed(client, checkout, configure, tercc):
    testrun_id = configure(tercc)
    checkout(testrun_id)

    everything = read_events(client, testrun_id)
    after_third = read_events(client, testrun_id, last_event_id="3")
    after_last = read_events(client, testrun_id, last_event_id=everything[-1].id)

    assert everything[-1].event == "finished"
    assert [event.id for event in after_third] == [event.id for event in everything[3:]]
    assert after_last == []


def test_idle_stream_sends_keepalive(api, configure, tercc):
    """A configured testrun whose checkout has not started keeps the stream open with `: ping` comment lines."""
    testrun_id = configure(tercc)
    received = b""
    with httpx.Client(base_url=api.url, timeout=30) as reader:
        with reader.stream("GET", f"/v1/testrun/{testrun_id}/events") as response:
            for chunk in response.iter_raw():
                received += chunk
                if b": ping" in received:
                    break

    assert response.headers["content-type"].startswith("text/event-stream")
    assert received.startswith(b": ping\n")


def test_events_of_unknown_testrun_are_not_found(client):
    response = client.get(f"/v1/testrun/{uuid.uuid4()}/events")

    assert response.status_code == 404
    assert response.json()["field"] == "testrun"


def test_events_of_invalid_testrun_id_are_rejected(client):
    response = client.get("/v1/testrun/not-a-uuid/events")

    assert response.status_code == 400
    assert response.json()["field"] == "testrun"


@pytest.mark.parametrize("last_event_id", ["abc", "-1", "1.5", "9" * 40])
def test_invalid_last_event_id_is_rejected(client, configure, tercc, last_event_id):
    testrun_id = configure(tercc)

    response = client.get(f"/v1/testrun/{testrun_id}/events", headers={"Last-Event-ID": last_event_id})

    assert response.status_code == 400
    assert response.json()["field"] == "Last-Event-ID"


def test_server_stop_ends_event_streams(configure, tercc, tmp_path):
    testrun_id = configure(tercc)
    server = start_api_server(tmp_path / "api.log")
    stream_ended = threading.Event()

    def follow() -> None:
        try:
            with httpx.Client(base_url=server.url, timeout=60) as reader:
                read_events(reader, testrun_id)
        except httpx.TransportError:
            pass
        stream_ended.set()

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    time.sleep(0.5)
    started = time.monotonic()
    try:
        server.process.terminate()
        server.process.wait(timeout=30)
    finally:
        server.stop()

    assert time.monotonic() - started < 10
    assert stream_ended.wait(5)
    assert "Application shutdown complete" in server.log()


# Bad input: enqueue.


def check_rejected(response: httpx.Response, status_code: int, field: str | None) -> dict[str, Any]:
    """Check the status and the named field of an error response; return its body."""
    assert response.status_code == status_code, response.text
    body = response.json()
    assert body["field"] == field, body
    assert body["error"], body
    return body


ENQUEUE_BAD_BODIES = [
    pytest.param({"suite_runner_ids": []}, "suite_id", id="missing suite_id"),
    pytest.param({"suite_id": "TESTRUN"}, "suite_runner_ids", id="missing suite_runner_ids"),
    pytest.param({"suite_id": 42, "suite_runner_ids": []}, "suite_id", id="suite_id not a string"),
    pytest.param({"suite_id": "TESTRUN", "suite_runner_ids": {"a": 1}}, "suite_runner_ids", id="suite_runner_ids an object"),
    pytest.param({"suite_id": "TESTRUN", "suite_runner_ids": [1, 2]}, "suite_runner_ids", id="suite_runner_ids of numbers"),
    pytest.param({"suite_id": "TESTRUN", "suite_runner_ids": None}, "suite_runner_ids", id="suite_runner_ids null"),
    pytest.param({"suite_id": "not-a-uuid", "suite_runner_ids": []}, "suite_id", id="suite_id not a UUID"),
    pytest.param({"suite_id": "TESTRUN", "suite_runner_ids": ["x"]}, "suite_runner_ids", id="suite runner id not a UUID"),
    pytest.param({"suite_id": "TESTRUN", "suite_runner_ids": "a,b"}, "suite_runner_ids", id="comma string of non-UUIDs"),
]


@pytest.mark.parametrize("body, field", ENQUEUE_BAD_BODIES)
def test_enqueue_rejects_bad_body(client, database, configure, tercc, body, field):
    testrun_id = configure(tercc)
    body = {name: testrun_id if value == "TESTRUN" else value for name, value in body.items()}

    response = client.post("/", json=body)

    check_rejected(response, 400, field)
    assert database.get(keys.task_id(testrun_id)) is None


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b'{"suite_id": ', id="invalid JSON"),
        pytest.param(b"[]", id="a list"),
        pytest.param(b'"text"', id="a string"),
        pytest.param(b"", id="empty"),
    ],
)
def test_enqueue_rejects_non_object_body(client, content):
    response = client.post("/", content=content, headers={"Content-Type": "application/json"})

    check_rejected(response, 400, "body")


def test_non_json_content_type_is_rejected(client):
    response = client.post("/", content=b'{"suite_id": "x", "suite_runner_ids": []}', headers={"Content-Type": "text/plain"})

    body = check_rejected(response, 400, "body")
    assert "Content-Type: application/json" in body["error"]


def test_deeply_nested_body_is_rejected(client):
    response = client.post("/", content=b"[" * 5000 + b"]" * 5000, headers={"Content-Type": "application/json"})

    check_rejected(response, 400, "body")


def test_enqueue_of_unconfigured_testrun_is_not_found(client, database):
    testrun_id = str(uuid.uuid4())

    response = client.post("/", json={"suite_id": testrun_id, "suite_runner_ids": []})

    check_rejected(response, 404, "suite_id")
    assert database.keys_prefix(keys.testrun(testrun_id)) == []


def test_enqueue_rejects_extra_suite_runner_ids(client, database, configure, tercc):
    testrun_id = configure(tercc)

    response = client.post("/", json={"suite_id": testrun_id, "suite_runner_ids": [str(uuid.uuid4()) for _ in range(3)]})

    check_rejected(response, 422, "suite_runner_ids")
    assert database.get(keys.task_id(testrun_id)) is None


# Bad input: status and release.


@pytest.mark.parametrize(
    "params, status_code, field",
    [
        pytest.param({}, 400, "id", id="no parameter"),
        pytest.param({"id": "UUID", "release": "UUID"}, 400, "id", id="two parameters"),
        pytest.param({"id": "not-a-uuid"}, 400, "id", id="task id not a UUID"),
        pytest.param({"id": "UUID"}, 404, "id", id="unknown task id"),
        pytest.param({"release": "not-a-uuid"}, 400, "release", id="release id not a UUID"),
        pytest.param({"release": "UUID"}, 404, "release", id="release of unknown task"),
        pytest.param({"single_release": "not-a-uuid"}, 400, "single_release", id="environment id not a UUID"),
        pytest.param({"single_release": "UUID"}, 404, "single_release", id="environment never checked out"),
    ],
)
def test_get_rejects_bad_query(client, params, status_code, field):
    params = {name: str(uuid.uuid4()) if value == "UUID" else value for name, value in params.items()}

    response = client.get("/", params=params)

    check_rejected(response, status_code, field)


def test_task_id_in_braces_is_rejected(client):
    response = client.get("/", params={"id": "{%s}" % uuid.uuid4()})

    body = check_rejected(response, 400, "id")
    assert "canonical form" in body["error"]


# Bad input: register.


def test_register_is_all_or_nothing(client, database, unique):
    submitted = definitions(unique)
    del submitted["log_area_provider"]["log"]["list"]["available"]

    response = client.post("/register", json=submitted)

    body = check_rejected(response, 422, "log_area_provider")
    assert "$.log.list" in body["error"]
    assert database.get(keys.provider(keys.IUT, f"iut-{unique}")) is None
    assert database.get(keys.provider(keys.EXECUTION_SPACE, f"execution-space-{unique}")) is None


EMPTY_LIST = {"possible": [], "available": []}


@pytest.mark.parametrize(
    "body, status_code, field",
    [
        pytest.param({}, 400, "iut_provider", id="no definition"),
        pytest.param({"iut_provider": 5}, 400, "iut_provider", id="definition a number"),
        pytest.param({"iut_provider": "{not json"}, 422, "iut_provider", id="string of invalid JSON"),
        pytest.param({"iut_provider": {"iut": {"id": "x"}}}, 422, "iut_provider", id="definition without list"),
        pytest.param({"iut_provider": {"iut": {"id": "../x", "list": EMPTY_LIST}}}, 422, "iut_provider", id="bad provider id"),
        pytest.param(
            {"execution_space_provider": {"log": {"id": "x", "list": EMPTY_LIST}}},
            422,
            "execution_space_provider",
            id="definition of another kind",
        ),
        pytest.param(
            {"log_area_provider": {"log": {"id": "x", "type": "no-such-type"}}}, 422, "log_area_provider", id="unknown provider type"
        ),
    ],
)
def test_register_rejects_bad_definition(client, body, status_code, field):
    response = client.post("/register", json=body)

    check_rejected(response, status_code, field)


def test_register_error_names_the_json_path(client, unique):
    definition = load_definition("iut/static-devices.json", f"iut-{unique}")
    definition["iut"]["list"] = "everything"

    response = client.post("/register", json={"iut_provider": definition})

    body = check_rejected(response, 422, "iut_provider")
    assert "$.iut.list" in body["error"]


# Bad input: configure.


CONFIGURE_BAD_BODIES = [
    pytest.param(lambda body: body.pop("iut_provider"), 400, "iut_provider", id="missing iut_provider"),
    pytest.param(lambda body: body.pop("dataset"), 400, "dataset", id="missing dataset"),
    pytest.param(lambda body: body.update(suite_id="nope"), 400, "suite_id", id="suite_id not a UUID"),
    pytest.param(lambda body: body.update(execution_space_provider=7), 400, "execution_space_provider", id="provider id not a string"),
    pytest.param(lambda body: body.update(log_area_provider="../etc"), 400, "log_area_provider", id="invalid provider id"),
    pytest.param(lambda body: body.update(iut_provider="no-such-provider"), 422, "iut_provider", id="unknown provider"),
    pytest.param(lambda body: body.update(dataset=3), 400, "dataset", id="dataset a number"),
    pytest.param(lambda body: body.update(dataset="{oops"), 422, "dataset", id="dataset string of invalid JSON"),
    pytest.param(lambda body: body.update(dataset=[{}, {}, {}]), 422, "dataset", id="dataset list of wrong length"),
    pytest.param(lambda body: body.update(tercc=[1]), 400, "tercc", id="tercc not an object"),
    pytest.param(lambda body: body["tercc"]["data"].pop("batches"), 422, "tercc", id="tercc without batches"),
    pytest.param(lambda body: body["tercc"]["data"]["batches"][0].pop("recipes"), 422, "tercc", id="test suite without recipes"),
    pytest.param(lambda body: body.update(config={"identity": "not a purl"}), 422, "config", id="identity not a purl"),
    pytest.param(lambda body: body.update(config="x"), 400, "config", id="config not an object"),
    pytest.param(lambda body: body.update(timeouts={"iut": -1}), 422, "timeouts", id="negative timeout"),
    pytest.param(lambda body: body.update(timeouts={"lunch": 5}), 422, "timeouts", id="unknown timeout kind"),
    pytest.param(lambda body: body.pop("tercc"), 422, "tercc", id="no tercc given or stored"),
]


@pytest.mark.parametrize("change, status_code, field", CONFIGURE_BAD_BODIES)
def test_configure_rejects_bad_body(client, database, providers, tercc, change, status_code, field):
    testrun_id = tercc["meta"]["id"]
    body = configure_body(testrun_id, providers, json.loads(json.dumps(tercc)))
    change(body)

    response = client.post("/configure", json=body)

    check_rejected(response, status_code, field)
    assert database.keys_prefix(keys.testrun(testrun_id)) == []


def test_configure_rejects_deeply_nested_dataset(client, database, providers, tercc):
    testrun_id = tercc["meta"]["id"]
    body = configure_body(testrun_id, providers, tercc)
    nested: dict[str, Any] = {}
    for _ in range(100):
        nested = {"next": nested}
    body["dataset"] = nested

    response = client.post("/configure", json=body)

    check_rejected(response, 422, "dataset")
    assert database.keys_prefix(keys.testrun(testrun_id)) == []


def test_configure_too_large_for_etcd_is_rejected(client, database, providers, tercc):
    testrun_id = tercc["meta"]["id"]
    body = configure_body(testrun_id, providers, tercc)
    body["dataset"] = {"padding": "x" * (1700 * 1024)}

    response = client.post("/configure", json=body)

    body = check_rejected(response, 413, "body")
    assert "too large" in body["error"]
    assert database.keys_prefix(keys.testrun(testrun_id)) == []


def test_configure_reuses_stored_tercc(client, providers, configure, tercc):
    testrun_id = configure(tercc)
    body = configure_body(testrun_id, providers, None)
    body["dataset"] = json.dumps({"runner_pool": "weekly"})

    response = client.post("/configure", json=body)

    assert response.status_code == 200
    assert response.json()["tercc"] == tercc
    assert response.json()["dataset"] == {"runner_pool": "weekly"}


@pytest.mark.parametrize(
    "params, status_code",
    [
        pytest.param({}, 400, id="no suite_id"),
        pytest.param({"suite_id": "x"}, 400, id="suite_id not a UUID"),
        pytest.param({"suite_id": "UUID"}, 404, id="testrun never configured"),
    ],
)
def test_read_configuration_rejects_bad_query(client, params, status_code):
    params = {name: str(uuid.uuid4()) if value == "UUID" else value for name, value in params.items()}

    response = client.get("/configure", params=params)

    check_rejected(response, status_code, "suite_id")


def test_unknown_path_gets_a_json_error(client):
    response = client.get("/no/such/path")

    check_rejected(response, 404, None)


def test_too_large_body_is_rejected(client):
    response = client.post("/register", content=b" " * (10 * 1024 * 1024), headers={"Content-Type": "application/json"})

    check_rejected(response, 413, "body")


def test_too_large_chunked_body_is_rejected(client):
    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b" " * (1024 * 1024)

    response = client.post("/register", content=chunks(), headers={"Content-Type": "application/json"})

    check_rejected(response, 413, "body")


# Access control.


def test_register_needs_no_token_by_default(client, database, unique):
    response = client.post("/register", json={"iut_provider": definitions(unique)["iut_provider"]})

    assert response.status_code == 204
    assert database.get(keys.provider(keys.IUT, f"iut-{unique}")) is not None


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no header"),
        pytest.param({"Authorization": "Bearer wrong"}, id="wrong token"),
        pytest.param({"Authorization": f"Basic {TOKEN}"}, id="not a bearer token"),
    ],
)
def test_register_with_bad_token_is_unauthorized(token_client, database, unique, headers):
    response = token_client.post("/register", json={"iut_provider": definitions(unique)["iut_provider"]}, headers=headers)

    check_rejected(response, 401, "Authorization")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert database.get(keys.provider(keys.IUT, f"iut-{unique}")) is None


def test_register_with_token_is_allowed(token_client, database, unique):
    response = token_client.post(
        "/register", json={"iut_provider": definitions(unique)["iut_provider"]}, headers={"Authorization": f"Bearer {TOKEN}"}
    )

    assert response.status_code == 204
    assert database.get(keys.provider(keys.IUT, f"iut-{unique}")) is not None


def test_configure_without_token_is_unauthorized(token_client, database, providers, tercc):
    response = token_client.post("/configure", json=configure_body(tercc["meta"]["id"], providers, tercc))

    check_rejected(response, 401, "Authorization")
    assert database.keys_prefix(keys.testrun(tercc["meta"]["id"])) == []


@pytest.mark.parametrize("body", [{}, [], "not json"], ids=["empty object", "array", "text"])
def test_token_is_checked_before_the_body(token_client, body):
    content = body if isinstance(body, str) else json.dumps(body)

    response = token_client.post("/configure", content=content, headers={"Content-Type": "application/json"})

    check_rejected(response, 401, "Authorization")


def test_configure_with_token_is_allowed(token_client, providers, tercc):
    response = token_client.post(
        "/configure", json=configure_body(tercc["meta"]["id"], providers, tercc), headers={"Authorization": f"Bearer {TOKEN}"}
    )

    assert response.status_code == 200


@pytest.mark.parametrize("parameter", ["release", "single_release"])
def test_release_without_token_is_unauthorized(token_client, parameter):
    response = token_client.get("/", params={parameter: str(uuid.uuid4())})

    check_rejected(response, 401, "Authorization")


@pytest.mark.parametrize("parameter", ["release", "single_release"])
def test_release_with_token_is_allowed(token_client, parameter):
    response = token_client.get("/", params={parameter: str(uuid.uuid4())}, headers={"Authorization": f"Bearer {TOKEN}"})

    check_rejected(response, 404, parameter)


def test_reading_needs_no_token(token_client, configure, tercc):
    testrun_id = configure(tercc)

    status = token_client.get("/", params={"id": str(uuid.uuid4())})
    configuration = token_client.get("/configure", params={"suite_id": testrun_id})
    health = token_client.get("/health")

    assert status.status_code == 404
    assert configuration.status_code == 200
    assert health.status_code == 200


# Health and unavailable services.


def test_health_reports_etcd_and_broker_up(client):
    response = client.get("/health")

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "etcd": "ok", "broker": "ok"}


@pytest.fixture(scope="module")
def brokerless_api(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """The API with the real etcd but a broker and result backend on a port where nothing listens."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    server = start_api_server(
        tmp_path_factory.mktemp("brokerless-api") / "api.log", CELERY_BROKER_URL=dead, CELERY_RESULT_BACKEND=dead
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def etcdless_api(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """The API with the real broker but etcd on a port where nothing listens."""
    server = start_api_server(
        tmp_path_factory.mktemp("etcdless-api") / "api.log",
        ETOS_ETCD_HOST="127.0.0.1",
        ETOS_ETCD_PORT=str(free_port()),
        ETOS_ETCD_TIMEOUT="1",
    )
    yield server
    server.stop()


def test_health_names_down_broker(brokerless_api):
    response = httpx.get(brokerless_api.url + "/health", timeout=30)

    assert response.status_code == 503
    assert response.json()["etcd"] == "ok"
    assert "CELERY_BROKER_URL" in response.json()["broker"]
    assert response.json()["error"] == "broker is down"


def test_health_names_down_etcd(etcdless_api):
    response = httpx.get(etcdless_api.url + "/health", timeout=30)

    assert response.status_code == 503
    assert response.json()["broker"] == "ok"
    assert "etcd is not reachable" in response.json()["etcd"]
    assert response.json()["error"] == "etcd is down"


def test_enqueue_without_broker_is_unavailable(brokerless_api, database, configure, tercc):
    testrun_id = configure(tercc)

    response = httpx.post(brokerless_api.url + "/", json={"suite_id": testrun_id, "suite_runner_ids": []}, timeout=30)

    check_rejected(response, 503, None)
    assert database.get(keys.task_id(testrun_id)) is None


def test_status_without_result_backend_is_unavailable(brokerless_api):
    response = httpx.get(brokerless_api.url + "/", params={"id": str(uuid.uuid4())}, timeout=30)

    check_rejected(response, 503, None)


def test_register_without_etcd_is_unavailable(etcdless_api, unique):
    response = httpx.post(etcdless_api.url + "/register", json={"iut_provider": definitions(unique)["iut_provider"]}, timeout=30)

    body = check_rejected(response, 503, None)
    assert "ETOS_ETCD_HOST" in body["error"]


# Provider folders at start-up.


def test_start_up_registers_provider_folders(database, tmp_path, unique):
    iut_folder = tmp_path / "iut"
    execution_space_folder = tmp_path / "execution-space"
    iut_folder.mkdir()
    execution_space_folder.mkdir()
    (iut_folder / "good.json").write_text(json.dumps(load_definition("iut/static-devices.json", f"folder-iut-{unique}")))
    (iut_folder / "broken.json").write_text('{"iut": {"id": ')
    (iut_folder / "log-area.json").write_text(json.dumps(load_definition("log-area/file-server.json", f"misplaced-{unique}")))
    (execution_space_folder / "runners.json").write_text(
        json.dumps(load_definition("execution-space/local-runners.json", f"folder-execution-space-{unique}"))
    )
    missing_folder = tmp_path / "no-such-folder"

    server = start_api_server(
        tmp_path / "api.log",
        IUT_PROVIDERS=str(iut_folder),
        EXECUTION_SPACE_PROVIDERS=str(execution_space_folder),
        LOG_AREA_PROVIDERS=str(missing_folder),
    )
    server.stop()

    log = server.log()
    assert database.get(keys.provider(keys.IUT, f"folder-iut-{unique}")) is not None
    assert database.get(keys.provider(keys.EXECUTION_SPACE, f"folder-execution-space-{unique}")) is not None
    assert database.get(keys.provider(keys.LOG_AREA, f"misplaced-{unique}")) is None
    assert f"{iut_folder / 'broken.json'} is not valid JSON" in log
    assert f"skipped {iut_folder / 'log-area.json'}" in log
    assert f"{missing_folder} is not a directory" in log


# The OpenAPI document.


def test_openapi_documents_every_operation(client):
    document = client.get("/openapi.json").json()

    operations = [(path, method, operation) for path, item in document["paths"].items() for method, operation in item.items()]
    assert {(path, method) for path, method, _ in operations} == {
        ("/", "post"),
        ("/", "get"),
        ("/register", "post"),
        ("/configure", "post"),
        ("/configure", "get"),
        ("/v1/testrun/{testrun}/events", "get"),
        ("/health", "get"),
    }
    for path, method, operation in operations:
        text = json.dumps(operation)
        assert operation.get("summary"), (path, method)
        assert operation.get("description"), (path, method)
        assert '"example' in text or _schema_has_examples(document, operation), (path, method)


def _schema_has_examples(document: dict[str, Any], operation: dict[str, Any]) -> bool:
    """Whether a schema that the operation's body or 200 response refers to has examples."""
    references = [
        value.rsplit("/", 1)[1]
        for value in _values(operation, "$ref")
        if value.startswith("#/components/schemas/")
    ]
    return any("examples" in document["components"]["schemas"][name] for name in references)


def _values(tree: Any, key: str) -> Iterator[Any]:
    if isinstance(tree, dict):
        for name, value in tree.items():
            if name == key:
                yield value
            yield from _values(value, key)
    elif isinstance(tree, list):
        for value in tree:
            yield from _values(value, key)


def test_openapi_request_bodies_have_examples(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]

    for name in ("EnqueueRequest", "ConfigureRequest", "RegisterRequest"):
        assert schemas[name]["examples"], name
