"""Hostile input is rejected or bounded with a clear error, writes nothing it should not, and leaks no secret.

The long versions of these trials, with a worker of their own that has a
host allowlist and an environment allowlist, run in `make faults`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

from environment_provider import keys
from environment_provider.collection import InvalidTestCollectionError
from environment_provider.errors import ProviderError
from environment_provider.keys import InvalidIdError
from environment_provider.local import free_port
from environment_provider.providers.base import CheckoutRequest, ProviderContext
from environment_provider.providers.external import ExternalProvider
from environment_provider.providers.jsontas import JsontasProvider
from environment_provider.providers.rulesets import RulesetError, evaluate
from environment_provider.registry import configure_testrun, register_definition
from environment_provider.validation import MAX_DEPTH, MAX_DOCUMENT_BYTES, InvalidDocumentError

from conftest import EXAMPLE_DATASET, load_definition

CLI = [sys.executable, "-m", "environment_provider.cli"]
ESCAPING_IDS = ["a/b", "..", "../" + str(uuid.uuid4()), "", "x" * 5000, "not-a-uuid", str(uuid.uuid4()) + "/x"]
ESCAPING_PROVIDER_IDS = ["../x", "a/b", "", "x" * 200, ".hidden", "name with space"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, env=dict(os.environ))


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": True}
    for _ in range(depth - 1):
        value = {"next": value}
    return value


def set_constraint(recipe: dict[str, Any], key: str, value: Any) -> None:
    for constraint in recipe["constraints"]:
        if constraint["key"] == key:
            constraint["value"] = value


class Peer:
    """An HTTP server on 127.0.0.1 that returns fixed JSON per `METHOD /path` and records each request."""

    def __init__(self, routes: dict[str, tuple[int, Any]]) -> None:
        self.requests: list[tuple[str, str]] = []
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def answer(self) -> None:
                path = self.path.split("?")[0]
                peer.requests.append((self.command, self.path))
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, body = routes.get(f"{self.command} {path}", (404, {"message": "not found"}))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def peer() -> Iterator[Peer]:
    server = Peer({
        "GET /devices": (200, [{"serial": "S1", "reserved": False}]),
        "POST /reserve": (200, {"reserved": True}),
        "POST /release": (500, {"message": "release failed"}),
    })  # fmt: skip
    yield server
    server.close()


# Ids that try to leave their key prefix.


@pytest.mark.parametrize("testrun_id", ESCAPING_IDS)
def test_task_rejects_escaping_testrun_id(app, database, worker, testrun_id):
    before = database.keys_prefix("/")

    result = app.send_task("EnvironmentProvider", args=[testrun_id, []]).get(timeout=60)

    assert result["error"].startswith("invalid testrun id")
    assert database.keys_prefix("/") == before


def test_task_rejects_escaping_suite_runner_id(configure, app, database, worker, tercc):
    testrun_id = configure(tercc)

    result = app.send_task("EnvironmentProvider", args=[testrun_id, ["../x"]]).get(timeout=60)

    assert result["error"].startswith("invalid suite runner id '../x'")
    assert database.keys_prefix(keys.suites_prefix(testrun_id)) == []


@pytest.mark.parametrize("field", ["testrun_id", "task_id", "environment_id"])
@pytest.mark.parametrize("bad_id", ["../x", "a/b", "", "x" * 5000])
def test_release_task_rejects_escaping_id(app, worker, field, bad_id):
    report = app.send_task("EnvironmentProviderRelease", kwargs={field: bad_id}).get(timeout=60)

    assert report["error"].startswith("invalid ")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["status", "../x"], "invalid task id '../x'"),
        (["release", "--task", "a/b"], "invalid task id 'a/b'"),
        (["release", "--testrun", "x" * 5000], "invalid testrun id 'xxxx"),
        (["checkout", "--testrun", ".."], "invalid testrun id '..'"),
        (["checkout", "--testrun", str(uuid.uuid4()), "--suite-runner-id", "../x"], "invalid suite runner id '../x'"),
    ],
)
def test_cli_rejects_escaping_id(stack, arguments, message):
    completed = run_cli(*arguments)

    assert completed.returncode == 1
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize("provider_id", ESCAPING_PROVIDER_IDS)
def test_registry_rejects_escaping_provider_id(database, provider_id):
    definition = load_definition("iut/static-devices.json")
    definition["iut"]["id"] = provider_id
    before = database.keys_prefix("/environment/provider/")

    with pytest.raises(InvalidDocumentError, match=r"\$\.iut\.id"):
        register_definition(database, definition)

    assert database.keys_prefix("/environment/provider/") == before


@pytest.mark.parametrize("provider_id", ESCAPING_PROVIDER_IDS)
def test_configure_rejects_escaping_provider_name(database, settings, tercc, providers, provider_id):
    with pytest.raises(InvalidIdError, match="invalid provider id"):
        configure_testrun(database, settings, tercc["meta"]["id"], tercc, provider_id, providers["execution-space"], providers["log-area"])

    assert database.keys_prefix(keys.testrun(tercc["meta"]["id"])) == []


# Provider definitions.


def test_definition_file_over_size_limit_is_rejected(database, tmp_path):
    definition = load_definition("iut/static-devices.json", "huge-file")
    definition["iut"]["padding"] = "x" * (MAX_DOCUMENT_BYTES + 1)
    (tmp_path / "huge.json").write_text(json.dumps(definition))

    completed = run_cli("register", str(tmp_path / "huge.json"))

    assert completed.returncode == 1
    assert f"more than the limit of {MAX_DOCUMENT_BYTES} bytes" in completed.stderr
    assert database.get(keys.provider(keys.IUT, "huge-file")) is None


def test_definition_object_over_size_limit_is_rejected(database):
    definition = load_definition("iut/static-devices.json", "huge-object")
    definition["iut"]["padding"] = "x" * (MAX_DOCUMENT_BYTES + 1)

    with pytest.raises(InvalidDocumentError, match="more than the limit of"):
        register_definition(database, definition)

    assert database.get(keys.provider(keys.IUT, "huge-object")) is None


def test_definition_nested_too_deep_is_rejected(database):
    definition = load_definition("iut/static-devices.json", "deep-object")
    definition["iut"]["padding"] = nested(MAX_DEPTH + 1)

    with pytest.raises(InvalidDocumentError, match=f"nested deeper than {MAX_DEPTH} levels"):
        register_definition(database, definition)

    assert database.get(keys.provider(keys.IUT, "deep-object")) is None


def test_unparsably_deep_definition_rejected(tmp_path):
    (tmp_path / "deep.json").write_text('{"iut": ' + "[" * 100_000 + "]" * 100_000 + "}")

    completed = run_cli("register", str(tmp_path / "deep.json"))

    assert completed.returncode == 1
    assert "nested too deeply to parse" in completed.stderr


def test_request_to_unlisted_host_is_not_sent(settings, peer):
    limited = dataclasses.replace(settings, request_allowed_hosts=("127.0.0.1:1",))

    with pytest.raises(RulesetError, match="not in ENVIRONMENT_PROVIDER_REQUEST_ALLOWED_HOSTS"):
        evaluate({"$request": {"url": f"{peer.url}/devices", "method": "GET"}}, {}, limited)

    assert peer.requests == []


def test_list_stage_with_unlisted_host_fails_checkout(settings, peer):
    limited = dataclasses.replace(settings, request_allowed_hosts=("127.0.0.1:1",))
    definition = {
        "id": "unlisted",
        "list": {"possible": {"$from": {"item": {"$request": {"url": f"{peer.url}/devices", "method": "GET"}}, "get": "json"}}, "available": "$this.possible"},
    }
    provider = JsontasProvider(keys.IUT, definition, ProviderContext(testrun_id=str(uuid.uuid4()), settings=limited))

    with pytest.raises(ProviderError, match="not in ENVIRONMENT_PROVIDER_REQUEST_ALLOWED_HOSTS"):
        provider.checkout(CheckoutRequest(1, 1, time.monotonic() + 5))

    assert peer.requests == []


def test_external_provider_on_unlisted_host_fails_checkout(settings, peer):
    limited = dataclasses.replace(settings, request_allowed_hosts=("127.0.0.1:1",))
    definition = {"id": "unlisted-es", "type": "external", **{stage: {"host": f"{peer.url}/{stage}"} for stage in ("start", "status", "stop")}}
    provider = ExternalProvider(keys.EXECUTION_SPACE, definition, ProviderContext(testrun_id=str(uuid.uuid4()), settings=limited))

    with pytest.raises(ProviderError, match="not in ENVIRONMENT_PROVIDER_REQUEST_ALLOWED_HOSTS"):
        provider.checkout(CheckoutRequest(1, 1, time.monotonic() + 5))

    assert peer.requests == []


# Test collections.


def test_tercc_with_10000_recipes_is_checked_out(configure, checkout, tercc):
    recipes = [{"id": f"r{index}", "testCase": {"id": f"t{index}"}, "constraints": [{"key": "TEST_RUNNER", "value": "runner"}]} for index in range(10_000)]
    tercc["data"]["batches"] = [{"name": "Many", "priority": 1, "recipes": recipes}]
    testrun_id = configure(tercc, dataset={**EXAMPLE_DATASET, "maximum_amount": 4})

    _, result = checkout(testrun_id)

    assert result["error"] is None
    sub_suites = result["suites"][0]["sub_suites"]
    assert len(sub_suites) == 4
    assert sorted(recipe["id"] for sub_suite in sub_suites for recipe in sub_suite["recipes"]) == sorted(recipe["id"] for recipe in recipes)


def test_tercc_over_etcd_value_limit_is_rejected_clearly(database, settings, tercc, providers):
    recipe = tercc["data"]["batches"][0]["recipes"][0]
    tercc["data"]["batches"] = [{"name": "Many", "priority": 1, "recipes": [dict(recipe, id=str(index)) for index in range(10_000)]}]

    with pytest.raises((InvalidTestCollectionError, InvalidDocumentError), match="bytes"):
        configure_testrun(database, settings, tercc["meta"]["id"], tercc, providers["iut"], providers["execution-space"], providers["log-area"])


MALFORMED_CONSTRAINTS = {
    "constraints is a string": lambda recipe: recipe.update(constraints="TEST_RUNNER=python"),
    "constraint is a string": lambda recipe: recipe["constraints"].append("TEST_RUNNER"),
    "constraint without value": lambda recipe: recipe["constraints"].append({"key": "COMMAND"}),
    "unknown constraint key": lambda recipe: recipe["constraints"].append({"key": "FOO", "value": 1}),
    "TEST_RUNNER is a number": lambda recipe: set_constraint(recipe, "TEST_RUNNER", 5),
    "TEST_RUNNER is empty": lambda recipe: set_constraint(recipe, "TEST_RUNNER", ""),
    "constraints missing": lambda recipe: recipe.pop("constraints"),
}


@pytest.mark.parametrize("damage", MALFORMED_CONSTRAINTS.values(), ids=MALFORMED_CONSTRAINTS.keys())
def test_malformed_constraints_are_rejected(database, settings, tercc, providers, damage):
    damage(tercc["data"]["batches"][0]["recipes"][1])

    with pytest.raises(InvalidTestCollectionError, match=r"recipes\[1\]"):
        configure_testrun(database, settings, tercc["meta"]["id"], tercc, providers["iut"], providers["execution-space"], providers["log-area"])

    assert database.keys_prefix(keys.testrun(tercc["meta"]["id"])) == []


# Environment variables and secrets.


def test_rulesets_see_only_allowlisted_environment(monkeypatch, settings):
    monkeypatch.setenv("HOSTILE_VISIBLE", "visible-value")
    monkeypatch.setenv("HOSTILE_HIDDEN", "hidden-value")
    allowed = dataclasses.replace(settings, environment_allowlist=("HOSTILE_VISIBLE",))
    definition = load_definition("log-area/file-server.json")["log"]
    definition["list"]["possible"]["$expand"]["value"]["logs"] = {
        "visible": "$HOSTILE_VISIBLE", "hidden": "$HOSTILE_HIDDEN", "via_dataset": "$sneaky", "path": "$PATH",
    }  # fmt: skip
    context = ProviderContext(testrun_id=str(uuid.uuid4()), settings=allowed, dataset={"sneaky": "$HOSTILE_HIDDEN"})

    logs = JsontasProvider(keys.LOG_AREA, definition, context).checkout(CheckoutRequest(1, 1, time.monotonic() + 5))[0]["logs"]

    assert logs["visible"] == "visible-value"
    assert logs["hidden"] == "$HOSTILE_HIDDEN"
    assert logs["via_dataset"] == "$HOSTILE_HIDDEN"
    assert logs["path"] == "$PATH"


def secretive_provider(url: str, request: dict[str, Any], name: str) -> dict[str, Any]:
    """An IUT provider that lists, reserves and releases with the dataset's `lab_password`."""
    bearer = {"$join": {"strings": ["Bearer ", "$lab_password"]}}
    return {
        "iut": {
            "id": name,
            "list": {"possible": {"$from": {"item": {"$request": request}, "get": "json"}}, "available": "$this.possible"},
            "checkout": {"$request": {"url": f"{url}/reserve", "method": "POST", "auth": {"username": "etos", "password": "$lab_password"}, "json": {"serial": "$iut.serial"}}},
            "checkin": {"$request": {"url": f"{url}/release", "method": "POST", "headers": {"Authorization": bearer}, "json": {"serial": "$iut.serial"}}},
        }
    }


def check_out_with_secret(configure, app, database, tercc, peer, unique, request: dict[str, Any]) -> tuple[str, str]:
    """Check out and release with a secret in the dataset; return the secret and everything it must stay out of."""
    from environment_provider.release import release_testrun
    from environment_provider.settings import Settings

    secret = f"secret-{uuid.uuid4().hex}"
    first = tercc["data"]["batches"][0]["recipes"][0]
    tercc["data"]["batches"] = [{"name": "One recipe", "priority": 1, "recipes": [first]}]  # the one device listed is enough
    register_definition(database, secretive_provider(peer.url, request, f"secretive-{unique}"))
    testrun_id = configure(tercc, iut=f"secretive-{unique}", dataset={**EXAMPLE_DATASET, "lab_password": secret}, timeouts={"iut": 3, "total": 20})
    result = app.send_task("EnvironmentProvider", args=[testrun_id, []]).get(timeout=60)
    report = release_testrun(database, Settings.from_environment(), testrun_id)
    events = list(database.get_prefix(keys.sse_prefix(testrun_id)).values())
    return secret, json.dumps([result, report.as_json(), events])


@pytest.mark.parametrize("use", ["auth", "authorization header"])
def test_secret_stays_out_of_events_and_worker_log(configure, app, database, worker, tercc, peer, unique, use):
    request: dict[str, Any] = {"url": f"{peer.url}/devices", "method": "GET"}
    if use == "auth":
        request["auth"] = {"username": "etos", "password": "$lab_password"}
    else:
        request["headers"] = {"Authorization": {"$join": {"strings": ["Bearer ", "$lab_password"]}}}

    secret, shown = check_out_with_secret(configure, app, database, tercc, peer, unique, request)

    assert len(peer.requests) >= 3, shown
    assert secret not in shown
    assert secret not in worker.log_path.read_text(errors="replace")


def test_query_token_not_logged(configure, app, database, worker, tercc, peer, unique):
    request = {"url": f"{peer.url}/devices", "method": "GET", "params": {"token": "$lab_password"}}

    secret, shown = check_out_with_secret(configure, app, database, tercc, peer, unique, request)

    assert secret not in shown
    assert secret not in worker.log_path.read_text(errors="replace")


def test_url_password_not_leaked(configure, app, database, worker, tercc, peer, unique):
    closed_port = free_port()
    request = {"url": {"$join": {"strings": ["http://etos:", "$lab_password", f"@127.0.0.1:{closed_port}/devices"]}}, "method": "GET", "timeout": 1}

    secret, shown = check_out_with_secret(configure, app, database, tercc, peer, unique, request)

    assert secret not in shown
    assert secret not in worker.log_path.read_text(errors="replace")


def test_checkin_retries_503_within_request_timeout(configure, checkout, database, settings, tercc, lab):
    import threading

    from environment_provider.release import release_testrun
    from lab import LAB_PROVIDER

    register_definition(database, LAB_PROVIDER)
    testrun_id = configure(tercc, iut="lab", dataset={**EXAMPLE_DATASET, "lab_url": lab.url})
    checkout(testrun_id)
    lab.state.release_refused = True
    threading.Timer(1.0, lambda: setattr(lab.state, "release_refused", False)).start()

    report = release_testrun(database, settings, testrun_id)

    assert report.complete
    assert lab.state.reserved == []
