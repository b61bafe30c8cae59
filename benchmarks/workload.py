"""Testruns for the benchmarks: the example providers, generated test collections, configure and check out.

Import this module only after the process environment points at the local
stack, because the Celery app reads its settings when it is first imported.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from environment_provider.celery_app import SETTINGS, app
from environment_provider.client import enqueue_checkout
from environment_provider.etcd import Database
from environment_provider.registry import configure_testrun, read_definitions, register_definitions

from report import BenchmarkError

ROOT = Path(__file__).resolve().parent.parent
TEST_RUNNER = "test-runner:1"
TIMEOUTS = {"iut": 60, "execution-space": 60, "log-area": 60, "total": 900}
RESULT_TIMEOUT = 900.0

# etcd 3.5 rejects a request larger than 1.5 MiB unless started with a higher --max-request-bytes,
# and configure stores the whole TERCC as one value, so generated recipes are kept small.
ETCD_MAX_REQUEST_BYTES = 1536 * 1024


def register_example_providers(database: Database) -> dict[str, str]:
    """Register the provider definitions in providers/; return the provider id chosen per kind."""
    definitions, errors = read_definitions([ROOT / "providers"])
    if errors:
        raise BenchmarkError("invalid provider definitions: " + "; ".join(errors))
    register_definitions(database, [(item.kind, item.name, item.definition) for item in definitions])
    return {item.kind.key: item.name for item in definitions}


def make_recipe(index: int) -> dict[str, Any]:
    """Build a recipe with only the fields the schema requires and one TEST_RUNNER constraint (about 135 bytes)."""
    return {
        "id": str(uuid.uuid4()),
        "testCase": {"id": f"tc{index:05d}"},
        "constraints": [{"key": "TEST_RUNNER", "value": TEST_RUNNER}],
    }


def make_tercc(testrun_id: str, recipe_count: int) -> dict[str, Any]:
    """Build a TERCC event with one test suite of `recipe_count` recipes, all for the same test runner."""
    tercc = json.loads((ROOT / "examples" / "tercc.json").read_text())
    tercc["meta"]["id"] = testrun_id
    tercc["data"]["batches"] = [
        {"name": "Benchmark suite", "priority": 1, "recipes": [make_recipe(index) for index in range(recipe_count)]}
    ]
    size = len(json.dumps(tercc, separators=(",", ":")))
    if size > ETCD_MAX_REQUEST_BYTES - 64 * 1024:
        raise BenchmarkError(f"a TERCC of {recipe_count} recipes is {size} bytes, too close to etcd's request limit")
    return tercc


@dataclass
class Testruns:
    """Testruns configured with the example providers, dataset and config, and their checkouts."""

    database: Database
    providers: dict[str, str]
    last_result: Any = None

    def configure(self, recipe_count: int, iut_count: int) -> str:
        """Configure a new testrun of `recipe_count` recipes over at most `iut_count` IUTs; return its id."""
        testrun_id = str(uuid.uuid4())
        dataset = json.loads((ROOT / "examples" / "dataset.json").read_text())
        dataset["maximum_amount"] = iut_count
        config = json.loads((ROOT / "examples" / "config.json").read_text())
        configure_testrun(
            self.database,
            SETTINGS,
            testrun_id,
            make_tercc(testrun_id, recipe_count),
            self.providers["iut"],
            self.providers["execution-space"],
            self.providers["log-area"],
            dataset=dataset,
            config=config,
            timeouts=TIMEOUTS,
        )
        return testrun_id

    def enqueue(self, testrun_id: str) -> Any:
        """Enqueue the checkout through the product's enqueue helper; return the Celery AsyncResult."""
        task_id = enqueue_checkout(app, self.database, SETTINGS, testrun_id, [])
        return app.AsyncResult(task_id)

    def checkout(self, testrun_id: str, expected_sub_suites: int) -> float:
        """Enqueue a checkout, wait for its result and check it; return seconds from enqueue to result."""
        started = time.perf_counter()
        result = self.enqueue(testrun_id).get(timeout=RESULT_TIMEOUT)
        elapsed = time.perf_counter() - started
        check_result(testrun_id, result, expected_sub_suites)
        self.last_result = result
        return elapsed


def check_result(testrun_id: str, result: Any, expected_sub_suites: int) -> None:
    """Raise BenchmarkError unless the task result is a success with the expected number of sub-suites."""
    if not isinstance(result, dict) or result.get("error"):
        raise BenchmarkError(f"checkout of testrun {testrun_id} failed: {result!r}"[:500])
    count = sum(len(suite["sub_suites"]) for suite in result["suites"])
    if count != expected_sub_suites:
        raise BenchmarkError(f"checkout of testrun {testrun_id} wrote {count} sub-suites, expected {expected_sub_suites}")


def ping(timeout: float = 30.0) -> float:
    """Send the no-op task and wait for its result; return the round trip in seconds."""
    started = time.perf_counter()
    result = app.send_task("EnvironmentProviderPing").get(timeout=timeout)
    elapsed = time.perf_counter() - started
    if result != "pong":
        raise BenchmarkError(f"the no-op task returned {result!r} instead of 'pong'")
    return elapsed
