"""Test fixtures on the real local stack: etcd, Redis and a Celery worker process on 127.0.0.1.

The stack starts in pytest_configure, before test modules are imported,
because the Celery app reads its settings when it is first imported.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from environment_provider.local import LocalStack  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STACK: LocalStack | None = None


def pytest_configure(config: pytest.Config) -> None:
    global STACK
    if os.environ.get("ENVIRONMENT_PROVIDER_TEST_NO_STACK"):
        return
    STACK = LocalStack()
    STACK.start()
    os.environ.update(STACK.environment())


def pytest_unconfigure(config: pytest.Config) -> None:
    if STACK is not None:
        STACK.stop()


@pytest.fixture(scope="session")
def stack() -> LocalStack:
    assert STACK is not None, "the local stack did not start"
    return STACK


@pytest.fixture(scope="session")
def worker(stack: LocalStack) -> Any:
    """One Celery worker process (prefork, 2 child processes) serving the whole session."""
    existing = [worker for worker in stack.workers if worker.process.poll() is None]
    return existing[0] if existing else stack.start_worker(concurrency=2)


@pytest.fixture(scope="session")
def settings(stack: LocalStack) -> Any:
    from environment_provider.settings import Settings

    return Settings.from_environment()


@pytest.fixture(scope="session")
def database(settings: Any) -> Any:
    from environment_provider.etcd import Database

    return Database(settings)


@pytest.fixture(scope="session")
def app(stack: LocalStack) -> Any:
    from environment_provider.celery_app import app

    return app


@pytest.fixture
def tercc() -> dict[str, Any]:
    """The example TERCC with a fresh event id."""
    event = json.loads((ROOT / "examples" / "tercc.json").read_text())
    event["meta"]["id"] = str(uuid.uuid4())
    return event


def load_definition(relative: str, name: str | None = None) -> dict[str, Any]:
    definition = json.loads((ROOT / "providers" / relative).read_text())
    if name:
        next(iter(definition.values()))["id"] = name
    return definition


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def providers(database: Any, unique: str) -> dict[str, str]:
    """Register the default providers under names of this test's own; return kind -> name."""
    from environment_provider.registry import register_definition

    names = {}
    for kind, relative in (("iut", "iut/static-devices.json"), ("execution-space", "execution-space/local-runners.json"), ("log-area", "log-area/file-server.json")):
        name = f"{kind}-{unique}"
        register_definition(database, load_definition(relative, name))
        names[kind] = name
    return names


EXAMPLE_DATASET = json.loads((ROOT / "examples" / "dataset.json").read_text())
EXAMPLE_CONFIG = json.loads((ROOT / "examples" / "config.json").read_text())


@pytest.fixture
def configure(database: Any, settings: Any, providers: dict[str, str]) -> Callable[..., str]:
    """Configure a testrun; keyword arguments override the example TERCC, providers, dataset, config and timeouts."""
    from environment_provider.registry import configure_testrun

    def configure_with(tercc: dict[str, Any], **overrides: Any) -> str:
        testrun_id = overrides.pop("testrun_id", tercc["meta"]["id"])
        configure_testrun(
            database,
            settings,
            testrun_id,
            tercc,
            overrides.pop("iut", providers["iut"]),
            overrides.pop("execution_space", providers["execution-space"]),
            overrides.pop("log_area", providers["log-area"]),
            dataset=overrides.pop("dataset", dict(EXAMPLE_DATASET)),
            config=overrides.pop("config", dict(EXAMPLE_CONFIG)),
            timeouts=overrides.pop("timeouts", {"iut": 20, "execution-space": 20, "log-area": 20, "total": 60}),
        )
        assert not overrides, f"unknown overrides {overrides}"
        return testrun_id

    return configure_with


@pytest.fixture
def checkout(app: Any, database: Any, settings: Any, worker: Any) -> Callable[..., tuple[str, dict[str, Any]]]:
    """Enqueue a checkout through the real worker and wait for it; return (task id, result)."""
    from environment_provider.client import enqueue_checkout, wait_for_result

    def run(testrun_id: str, suite_runner_ids: list[str] | None = None, timeout: float = 90) -> tuple[str, dict[str, Any]]:
        task_id = enqueue_checkout(app, database, settings, testrun_id, suite_runner_ids or [])
        status = wait_for_result(app, database, settings, task_id, testrun_id, timeout)
        assert status["status"] == "SUCCESS", status
        return task_id, status["result"]

    return run


@pytest.fixture
def lab() -> Iterator[Any]:
    from lab import Lab

    server = Lab(6)
    yield server
    server.close()
