"""Per-stage timeouts: each of iut, execution-space, log-area and total running out.

Each failure names the stage's timeout and the provider, and leaves nothing
checked out: not in the lab, not at the external service, not in etcd.
"""

from __future__ import annotations

import copy
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

from environment_provider import keys
from environment_provider.registry import register_definition

from conftest import EXAMPLE_DATASET
from external_service import Behaviour, external  # noqa: F401 - `external` is a fixture
from lab import LAB_PROVIDER


def lab_provider(database: Any, unique: str) -> str:
    definition = copy.deepcopy(LAB_PROVIDER)
    definition["iut"]["id"] = f"lab-{unique}"
    register_definition(database, definition)
    return f"lab-{unique}"


def lab_dataset(lab: Any) -> dict[str, Any]:
    return {**EXAMPLE_DATASET, "lab_url": lab.url}


def progress_messages(database: Any, testrun_id: str) -> list[str]:
    events = [json.loads(value) for value in database.get_prefix(keys.sse_prefix(testrun_id)).values()]
    return [event["data"].get("message") or event["data"].get("error") or "" for event in sorted(events, key=lambda e: e["id"])]


def assert_lab_untouched_or_released(lab: Any) -> None:
    assert lab.state.reserved == []
    assert lab.state.releases == lab.state.reservations


class SlowListServer:
    """Serves `GET /runners` with a JSON list of one runner after `delay` seconds."""

    def __init__(self, delay: float) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                time.sleep(delay)
                data = json.dumps([{"host": "runner-1"}]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slow_list() -> Iterator[SlowListServer]:
    server = SlowListServer(delay=1.5)
    yield server
    server.close()


def test_iut_timeout_with_all_devices_reserved(configure, checkout, database, tercc, lab, unique):
    for device in lab.state.devices.values():
        device.reserved = True  # held by another testrun
    name = lab_provider(database, unique)
    testrun_id = configure(tercc, iut=name, dataset=lab_dataset(lab), timeouts={"iut": 1, "total": 30})

    started = time.monotonic()
    _, result = checkout(testrun_id)

    assert time.monotonic() - started >= 1
    assert f"provider '{name}' failed in stage 'checkout'" in result["error"]
    assert "timed out waiting for 2 available IUTs (0 of 6 available) when the 'iut' timeout of 1 s ran out" in result["error"]
    assert any("waiting for 2 available IUTs" in message for message in progress_messages(database, testrun_id))
    assert lab.state.reservations == 0
    assert database.keys_prefix(keys.suites_prefix(testrun_id)) == []


def test_execution_space_timeout_checks_in_iuts(configure, checkout, database, tercc, lab, external, unique):
    spaces = external("execution-space", Behaviour(pending_seconds=math.inf, description="no runner host is free"))
    register_definition(database, spaces.definition(f"ext-es-{unique}"))
    testrun_id = configure(
        tercc,
        iut=lab_provider(database, unique),
        execution_space=f"ext-es-{unique}",
        dataset=lab_dataset(lab),
        timeouts={"execution-space": 1, "total": 30},
    )

    _, result = checkout(testrun_id)

    assert f"provider 'ext-es-{unique}' failed in stage 'status'" in result["error"]
    assert "still PENDING when the 'execution-space' timeout of 1 s ran out: no runner host is free" in result["error"]
    assert lab.state.reservations == 4
    assert_lab_untouched_or_released(lab)
    assert spaces.state.checked_out == {}
    assert database.keys_prefix(keys.suites_prefix(testrun_id)) == []


def test_log_area_timeout_checks_in_iuts(configure, checkout, database, tercc, lab, unique):
    busy_logs = {"log": {"id": f"busy-logs-{unique}", "list": {"possible": [{"livelogs": "http://logs.example.invalid/live"}], "available": []}}}
    register_definition(database, busy_logs)
    testrun_id = configure(
        tercc,
        iut=lab_provider(database, unique),
        log_area=f"busy-logs-{unique}",
        dataset=lab_dataset(lab),
        timeouts={"log-area": 1, "total": 30},
    )

    _, result = checkout(testrun_id)

    assert f"provider 'busy-logs-{unique}' failed in stage 'checkout'" in result["error"]
    assert "timed out waiting for 1 available log areas (0 of 1 available) when the 'log-area' timeout of 1 s ran out" in result["error"]
    assert lab.state.reservations == 4
    assert_lab_untouched_or_released(lab)
    assert database.keys_prefix(keys.suites_prefix(testrun_id)) == []


def test_total_timeout_cuts_a_longer_iut_timeout(configure, checkout, database, tercc, external, unique):
    service = external("iut", Behaviour(pending_seconds=math.inf))
    register_definition(database, service.definition(f"ext-iut-{unique}"))
    testrun_id = configure(tercc, iut=f"ext-iut-{unique}", timeouts={"iut": 20, "total": 1.5})

    started = time.monotonic()
    _, result = checkout(testrun_id)
    elapsed = time.monotonic() - started

    assert 1.5 <= elapsed < 10
    assert f"provider 'ext-iut-{unique}' failed in stage 'status'" in result["error"]
    assert "still PENDING when the 'total' timeout of 1.5 s ran out" in result["error"]
    # Backoff between polls: more than one poll, far fewer than a busy loop.
    assert 3 <= service.state.status_polls <= 20
    assert service.state.checked_out == {}
    assert database.keys_prefix(keys.suites_prefix(testrun_id)) == []


def test_total_timeout_spans_stages(configure, checkout, database, tercc, external, unique):
    iuts = external("iut", Behaviour(pending_seconds=0.8))
    spaces = external("execution-space", Behaviour(pending_seconds=math.inf))
    register_definition(database, iuts.definition(f"ext-iut-{unique}"))
    register_definition(database, spaces.definition(f"ext-es-{unique}"))
    tercc["data"]["batches"] = tercc["data"]["batches"][1:]
    testrun_id = configure(
        tercc,
        iut=f"ext-iut-{unique}",
        execution_space=f"ext-es-{unique}",
        timeouts={"iut": 20, "execution-space": 20, "total": 1.5},
    )

    _, result = checkout(testrun_id)

    assert f"provider 'ext-es-{unique}' failed in stage 'status'" in result["error"]
    assert "the 'total' timeout of 1.5 s ran out" in result["error"]
    assert len(iuts.state.stopped) == 2
    assert iuts.state.checked_out == {}
    assert spaces.state.checked_out == {}
    assert database.keys_prefix(keys.suites_prefix(testrun_id)) == []


def test_total_timeout_before_a_stage_starts(configure, checkout, database, tercc, lab, slow_list, unique):
    slow_spaces = {
        "execution_space": {
            "id": f"slow-es-{unique}",
            "list": {
                "possible": {"$from": {"item": {"$request": {"url": f"{slow_list.url}/runners", "method": "GET"}}, "get": "json"}},
                "available": "$this.possible",
            },
        }
    }
    register_definition(database, slow_spaces)
    tercc["data"]["batches"] = tercc["data"]["batches"][1:]
    testrun_id = configure(
        tercc,
        iut=lab_provider(database, unique),
        execution_space=f"slow-es-{unique}",
        dataset=lab_dataset(lab),
        timeouts={"total": 1},
    )

    _, result = checkout(testrun_id)

    assert "the 'total' timeout of 1 s" in result["error"]
    assert "ran out before the log area checkout from provider" in result["error"]
    assert lab.state.reservations == 2
    assert_lab_untouched_or_released(lab)
    assert database.keys_prefix(keys.suites_prefix(testrun_id)) == []
