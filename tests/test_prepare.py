"""The IUT prepare stage: steps that run for every IUT at once after checkout.

An IUT whose preparation fails is checked in. The checkout goes on when
enough IUTs remain for the test runners, and fails with everything checked
in when too few remain.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

from environment_provider import keys
from environment_provider.registry import register_definition
from environment_provider.release import release_testrun

from conftest import EXAMPLE_DATASET
from lab import LAB_PROVIDER

def prepare_steps(flash_url: str) -> dict[str, Any]:
    """Flash each IUT, then check that the flashed version is the identity's version."""
    return {
        "stages": {
            "environment_provider": {
                "steps": {
                    "flash": {
                        "$request": {
                            "url": {"$join": {"strings": [flash_url, "/flash"]}},
                            "method": "POST",
                            "json": {"serial": "$iut.serial", "image": "$identity.version"},
                        }
                    },
                    "verify": {
                        "$condition": {
                            "if": {"key": "$steps.flash.version", "operator": "$eq", "value": "$identity.version"},
                            "then": {"flashed_version": "$steps.flash.version"},
                            "else": False,
                        }
                    },
                }
            }
        }
    }


def lab_provider_with_prepare(database: Any, unique: str, flash_url: str) -> str:
    definition = copy.deepcopy(LAB_PROVIDER)
    definition["iut"]["id"] = f"lab-{unique}"
    definition["iut"]["prepare"] = prepare_steps(flash_url)
    register_definition(database, definition)
    return f"lab-{unique}"


def functional_only(tercc: dict[str, Any]) -> dict[str, Any]:
    """Keep only the first test suite: 4 recipes for 2 test runners, so 2 to 4 IUTs."""
    tercc["data"]["batches"] = tercc["data"]["batches"][:1]
    return tercc


def sub_suites(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [sub_suite for suite in result["suites"] for sub_suite in suite["sub_suites"]]


def progress_messages(database: Any, testrun_id: str) -> list[str]:
    events = [json.loads(value) for value in database.get_prefix(keys.sse_prefix(testrun_id)).values()]
    return [event["data"].get("message") or event["data"].get("error") or "" for event in sorted(events, key=lambda e: e["id"])]


class FlashServer:
    """Serves `POST /flash`: sleeps `delay` seconds, then returns the version written.

    Serials in `wrong_version` get version 0.0.0 back; `max_in_flight` is the
    highest number of flash requests served at the same time.
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.wrong_version: set[str] = set()
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                time.sleep(server.delay)
                with server.lock:
                    server.in_flight -= 1
                version = "0.0.0" if body["serial"] in server.wrong_version else body["image"]
                data = json.dumps({"serial": body["serial"], "version": version}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def flash_server() -> Iterator[FlashServer]:
    server = FlashServer()
    yield server
    server.close()


def test_failing_iut_is_checked_in_and_checkout_continues(configure, checkout, database, settings, tercc, lab, unique):
    lab.state.failing_flash = {"SN0001"}
    name = lab_provider_with_prepare(database, unique, lab.url)
    testrun_id = configure(functional_only(tercc), iut=name, dataset={**EXAMPLE_DATASET, "lab_url": lab.url})

    _, result = checkout(testrun_id)

    assert result["error"] is None
    serials = sorted(sub_suite["iut"]["serial"] for sub_suite in sub_suites(result))
    assert serials == ["SN0000", "SN0002", "SN0003"]
    assert lab.state.reserved == serials
    assert any("IUT preparation failed" in message and "SN0001" in message for message in progress_messages(database, testrun_id))
    stored_iuts = [key for key in database.keys_prefix(keys.suites_prefix(testrun_id)) if key.endswith("/iut")]
    assert len(stored_iuts) == 3
    recipes = sorted(recipe["id"] for sub_suite in sub_suites(result) for recipe in sub_suite["recipes"])
    assert recipes == sorted(recipe["id"] for recipe in tercc["data"]["batches"][0]["recipes"])

    assert release_testrun(database, settings, testrun_id).complete
    assert lab.state.reserved == []


def test_too_few_prepared_iuts_fail(configure, checkout, database, tercc, lab, unique):
    lab.state.failing_flash = {"SN0000", "SN0001", "SN0002"}
    name = lab_provider_with_prepare(database, unique, lab.url)
    testrun_id = configure(functional_only(tercc), iut=name, dataset={**EXAMPLE_DATASET, "lab_url": lab.url})

    _, result = checkout(testrun_id)

    assert f"provider '{name}' failed in stage 'prepare'" in result["error"]
    assert "only 1 IUTs were prepared but 2 are needed" in result["error"]
    assert "flashing SN000" in result["error"]
    assert lab.state.reservations == 4
    assert lab.state.reserved == []
    assert database.keys_prefix(keys.suites_prefix(testrun_id)) == []


def test_later_steps_see_earlier_results(configure, checkout, database, settings, tercc, lab, flash_server, unique):
    flash_server.wrong_version = {"SN0002"}
    name = lab_provider_with_prepare(database, unique, flash_server.url)
    testrun_id = configure(functional_only(tercc), iut=name, dataset={**EXAMPLE_DATASET, "lab_url": lab.url})

    _, result = checkout(testrun_id)

    assert result["error"] is None
    serials = sorted(sub_suite["iut"]["serial"] for sub_suite in sub_suites(result))
    assert serials == ["SN0000", "SN0001", "SN0003"]
    assert any("prepare step 'verify'" in message and "SN0002" in message for message in progress_messages(database, testrun_id))
    assert release_testrun(database, settings, testrun_id).complete
    assert lab.state.reserved == []


def test_iuts_are_prepared_concurrently(configure, checkout, database, settings, tercc, lab, flash_server, unique):
    flash_server.delay = 0.5
    name = lab_provider_with_prepare(database, unique, flash_server.url)
    testrun_id = configure(functional_only(tercc), iut=name, dataset={**EXAMPLE_DATASET, "lab_url": lab.url})

    _, result = checkout(testrun_id)

    assert len(sub_suites(result)) == 4
    assert flash_server.max_in_flight >= 2, "the flash steps of different IUTs did not overlap"
    assert release_testrun(database, settings, testrun_id).complete


def test_total_timeout_during_prepare(configure, checkout, database, tercc, lab, flash_server, unique):
    flash_server.delay = 2.5
    name = lab_provider_with_prepare(database, unique, flash_server.url)
    testrun_id = configure(functional_only(tercc), iut=name, dataset={**EXAMPLE_DATASET, "lab_url": lab.url}, timeouts={"total": 1})

    started = time.monotonic()
    _, result = checkout(testrun_id)

    assert time.monotonic() - started < 2.5
    assert "the 'total' timeout of 1 s" in result["error"]
    assert f"provider '{name}' was still preparing 4 of 4 IUTs" in result["error"]
    assert lab.state.reserved == []
    assert database.keys_prefix(keys.suites_prefix(testrun_id)) == []
