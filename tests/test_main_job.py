"""The main job on the real stack: configure, check out through a Celery worker, release."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from celery import Celery

from environment_provider import keys
from environment_provider.release import release_environment, release_task, release_testrun

from conftest import EXAMPLE_CONFIG


def sub_suites(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [sub_suite for suite in result["suites"] for sub_suite in suite["sub_suites"]]


def test_example_testrun_writes_every_key(configure, checkout, database, tercc, providers):
    testrun_id = configure(tercc)
    suite_ids = [str(uuid.uuid4()), str(uuid.uuid4())]

    task_id, result = checkout(testrun_id, suite_ids)

    assert result["error"] is None
    assert [suite["suite_name"] for suite in result["suites"]] == ["Gateway functional", "Gateway smoke"]
    assert database.get(keys.task_id(testrun_id)) == task_id
    assert database.get(keys.task_testrun(task_id)) == testrun_id
    record = json.loads(database.get(keys.testrun(testrun_id)))
    assert record["status"] == "checked out"
    assert record["task_id"] == task_id

    for suite, suite_id in zip(result["suites"], suite_ids):
        for sub_suite in suite["sub_suites"]:
            environment_id = sub_suite["sub_suite_id"]
            stored = json.loads(database.get(keys.sub_suite_item(testrun_id, suite_id, environment_id, "suite")))
            assert stored == sub_suite
            assert stored["suite_id"] == testrun_id
            assert stored["test_suite_started_id"] == suite_id
            assert stored["artifact"] == EXAMPLE_CONFIG["artifact_id"]
            assert stored["context"] == EXAMPLE_CONFIG["context"]
            iut = json.loads(database.get(keys.sub_suite_item(testrun_id, suite_id, environment_id, "iut")))
            assert iut == stored["iut"]
            assert iut["identity"] == EXAMPLE_CONFIG["identity"]
            assert iut["name"] == "edge-gateway"
            assert iut["provider_id"] == providers["iut"]
            executor = json.loads(database.get(keys.sub_suite_item(testrun_id, suite_id, environment_id, "execution-space")))
            assert executor == stored["executor"]
            assert executor["instructions"]["image"] == stored["test_runner"]
            assert executor["instructions"]["environment"]["ENVIRONMENT_ID"] == environment_id
            assert executor["request"]["json"]["instructions"] == executor["instructions"]
            log_area = json.loads(database.get(keys.sub_suite_item(testrun_id, suite_id, environment_id, "log-area")))
            assert log_area == stored["log_area"]
            assert log_area["livelogs"] == f"http://logs.example.invalid/live/{EXAMPLE_CONFIG['context']}"
            assert database.get(keys.environment_testrun(environment_id)) == testrun_id
            assert database.get(keys.environment_suite(environment_id)) == suite_id
            for recipe in stored["recipes"]:
                runner = next(c["value"] for c in recipe["constraints"] if c["key"] == "TEST_RUNNER")
                assert runner == stored["test_runner"]


def test_recipes_are_split_over_runners(configure, checkout, tercc):
    testrun_id = configure(tercc)

    _, result = checkout(testrun_id)

    functional = result["suites"][0]["sub_suites"]
    recipe_ids = sorted(recipe["id"] for sub_suite in functional for recipe in sub_suite["recipes"])
    expected = sorted(recipe["id"] for recipe in tercc["data"]["batches"][0]["recipes"])
    assert recipe_ids == expected
    assert {sub_suite["test_runner"] for sub_suite in functional} == {
        "registry.example.invalid/test-runners/python:3.12",
        "registry.example.invalid/test-runners/bash:5",
    }


def test_progress_events_end_with_finished(configure, checkout, database, tercc):
    testrun_id = configure(tercc)

    checkout(testrun_id)

    events = sorted((json.loads(value) for value in database.get_prefix(keys.sse_prefix(testrun_id)).values()), key=lambda e: e["id"])
    assert [event["id"] for event in events] == list(range(1, len(events) + 1))
    assert events[-1]["event"] == "finished"
    assert events[-1]["data"]["status"] == "checked out"
    assert any("checked out 4 IUTs" in event["data"].get("message", "") for event in events)


def test_release_testrun_deletes_environment_keys(configure, checkout, database, settings, tercc):
    testrun_id = configure(tercc)
    _, result = checkout(testrun_id)

    report = release_testrun(database, settings, testrun_id)

    assert report.complete
    assert sorted(report.released) == sorted(sub["sub_suite_id"] for sub in sub_suites(result))
    assert database.keys_prefix(keys.suites_prefix(testrun_id)) == []
    for sub_suite in sub_suites(result):
        assert database.keys_prefix(keys.environment_prefix(sub_suite["sub_suite_id"])) == []
    assert json.loads(database.get(keys.testrun(testrun_id)))["status"] == "released"


def test_release_twice_is_harmless(configure, checkout, database, settings, tercc):
    testrun_id = configure(tercc)
    task_id, _ = checkout(testrun_id)
    release_task(database, settings, task_id)

    again = release_task(database, settings, task_id)

    assert again.complete
    assert again.released == []


def test_release_one_environment_keeps_the_others(configure, checkout, database, settings, tercc):
    testrun_id = configure(tercc)
    _, result = checkout(testrun_id)
    first, *others = sub_suites(result)

    report = release_environment(database, settings, first["sub_suite_id"])

    assert report.released == [first["sub_suite_id"]]
    assert database.keys_prefix(keys.environment_prefix(first["sub_suite_id"])) == []
    for other in others:
        assert database.get(keys.environment_testrun(other["sub_suite_id"])) == testrun_id
    assert release_environment(database, settings, first["sub_suite_id"]).not_found


def test_two_suites_get_their_own_datasets(configure, checkout, tercc):
    datasets = [
        {"runner_pool": "pool-functional", "runner_start_url": "http://runners.example.invalid/a", "log_server_url": "http://logs-a.example.invalid"},
        {"runner_pool": "pool-smoke", "runner_start_url": "http://runners.example.invalid/b", "log_server_url": "http://logs-b.example.invalid"},
    ]
    testrun_id = configure(tercc, dataset=datasets)

    _, result = checkout(testrun_id)

    for suite, dataset in zip(result["suites"], datasets):
        for sub_suite in suite["sub_suites"]:
            assert sub_suite["executor"]["instructions"]["environment"]["RUNNER_POOL"] == dataset["runner_pool"]
            assert sub_suite["log_area"]["livelogs"].startswith(dataset["log_server_url"])


def test_maximum_amount_limits_iuts(configure, checkout, tercc):
    testrun_id = configure(tercc, dataset={**json.loads('{"runner_pool": "p", "runner_start_url": "http://r.example.invalid", "log_server_url": "http://l.example.invalid"}'), "maximum_amount": 2})

    _, result = checkout(testrun_id)

    functional = result["suites"][0]["sub_suites"]
    assert len(functional) == 2
    assert sum(len(sub_suite["recipes"]) for sub_suite in functional) == 4
    assert {sub_suite["test_runner"] for sub_suite in functional} == {
        "registry.example.invalid/test-runners/python:3.12",
        "registry.example.invalid/test-runners/bash:5",
    }


def test_more_iuts_than_recipes_are_returned(configure, checkout, database, tercc, lab):
    from environment_provider.registry import register_definition
    from lab import LAB_PROVIDER

    register_definition(database, LAB_PROVIDER)
    tercc["data"]["batches"] = tercc["data"]["batches"][1:]  # one suite: 2 recipes, 2 runners
    testrun_id = configure(tercc, iut="lab", dataset={"lab_url": lab.url, "maximum_amount": 6, "runner_pool": "p", "runner_start_url": "http://r.example.invalid", "log_server_url": "http://l.example.invalid"})

    _, result = checkout(testrun_id)

    assert len(sub_suites(result)) == 2
    assert len(lab.state.reserved) == 2
    assert sorted(lab.state.reserved) == sorted(sub["iut"]["serial"] for sub in sub_suites(result))


def test_management_system_iuts_are_checked_in_after_release(configure, checkout, database, settings, tercc, lab):
    from environment_provider.registry import register_definition
    from lab import LAB_PROVIDER

    register_definition(database, LAB_PROVIDER)
    testrun_id = configure(tercc, iut="lab", dataset={"lab_url": lab.url, "runner_pool": "p", "runner_start_url": "http://r.example.invalid", "log_server_url": "http://l.example.invalid"})
    _, result = checkout(testrun_id)
    assert len(lab.state.reserved) == len(sub_suites(result)) == 6

    release_testrun(database, settings, testrun_id)

    assert lab.state.reserved == []
    assert lab.state.releases == lab.state.reservations == 6


def test_raw_send_task_records_task_id(configure, database, stack, worker, tercc):
    testrun_id = configure(tercc)
    suite_starter = Celery(broker=stack.redis_url, backend=stack.redis_url)

    result = suite_starter.send_task("EnvironmentProvider", args=[testrun_id, []])
    value = result.get(timeout=60)

    assert value["error"] is None
    assert database.get(keys.task_id(testrun_id)) == result.id
    assert database.get(keys.task_testrun(result.id)) == testrun_id
    suite_starter.close()


def test_collection_behind_batches_uri_is_fetched_by_worker(configure, checkout, tercc):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    batches = json.dumps(tercc["data"].pop("batches")).encode()
    requests = []

    class Collection(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(batches)))
            self.end_headers()
            self.wfile.write(batches)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collection)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    tercc["data"]["batchesUri"] = f"http://127.0.0.1:{server.server_address[1]}/collection.json"
    try:
        testrun_id = configure(tercc)
        assert requests == []

        _, result = checkout(testrun_id)
    finally:
        server.shutdown()
        server.server_close()

    assert result["error"] is None
    assert requests == ["/collection.json"]
    assert [suite["suite_name"] for suite in result["suites"]] == ["Gateway functional", "Gateway smoke"]


def test_documented_lab_manager_definition_works_unchanged(configure, checkout, database, settings, tercc, lab, unique):
    from environment_provider.registry import register_definition

    definition = json.loads((Path(__file__).parent / "fixtures" / "etos-docs-lab-manager.json").read_text())
    definition["iut"]["id"] = f"lab-manager-{unique}"
    register_definition(database, definition)
    testrun_id = configure(tercc, iut=f"lab-manager-{unique}", dataset={"lab_manager_url": lab.url, "runner_pool": "p", "runner_start_url": "http://r.example.invalid", "log_server_url": "http://l.example.invalid"})

    _, result = checkout(testrun_id)

    assert result["error"] is None
    assert sorted(lab.state.reserved) == sorted(sub["iut"]["serial"] for sub in sub_suites(result))
    release_testrun(database, settings, testrun_id)
    assert lab.state.reserved == []
