"""What every fault scenario shares: its own stack, trial bookkeeping, testrun set-up and etcd checks.

A scenario runs trials. Each trial ends with a list of problems and two
counts. Items leaked are items still held by an HTTP peer, or left in etcd,
when nothing should be. Data lost counts results, keys or tasks that should
exist and do not. A trial passes when all three are empty or zero.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
for folder in (ROOT / "tests", ROOT / "faults"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from celery import Celery  # noqa: E402

from environment_provider import keys  # noqa: E402
from environment_provider.etcd import Database  # noqa: E402
from environment_provider.local import LocalStack, Server, StackError  # noqa: E402
from environment_provider.registry import configure_testrun, register_definition  # noqa: E402
from environment_provider.release import ReleaseReport, release_testrun  # noqa: E402
from environment_provider.settings import Settings  # noqa: E402

from lab import LAB_PREPARE, LAB_PROVIDER  # noqa: E402

CONFIG = {
    "identity": "pkg:docker/acme/edge-gateway@5.2.0",
    "artifact_id": "1f6c2b9e-8d3a-4e57-b0c4-7a9e2d5f3b18",
    "context": "c7d94e21-5a08-4b3f-9e6d-2b1f8a4c7e53",
}
DATASET = {
    "runner_pool": "faults",
    "runner_start_url": "http://127.0.0.1:9/start",
    "log_server_url": "http://127.0.0.1:9",
}
RUNNER = "registry.example.invalid/test-runners/python:3.12"


# Trials and rows.


@dataclass
class Trial:
    """One trial's findings; a trial passes when it has no problem, leak or loss."""

    name: str
    problems: list[str] = field(default_factory=list)
    leaked: int = 0
    lost: int = 0

    def check(self, condition: bool, problem: str) -> bool:
        if not condition:
            self.problems.append(problem)
        return condition

    def leak(self, count: int, what: str) -> None:
        if count:
            self.leaked += count
            self.problems.append(f"{count} leaked: {what}")

    def loss(self, count: int, what: str) -> None:
        if count:
            self.lost += count
            self.problems.append(f"{count} lost: {what}")

    @property
    def passed(self) -> bool:
        return not self.problems and not self.leaked and not self.lost


@dataclass
class Row:
    """One line of the fault table."""

    scenario: str
    trials: list[Trial] = field(default_factory=list)
    seconds: float = 0.0
    facts: list[str] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(trial.passed for trial in self.trials)

    @property
    def leaked(self) -> int:
        return sum(trial.leaked for trial in self.trials)

    @property
    def lost(self) -> int:
        return sum(trial.lost for trial in self.trials)

    @property
    def ok(self) -> bool:
        return bool(self.trials) and self.passed == len(self.trials) and not self.leaked and not self.lost

    def trial(self, name: str) -> "TrialContext":
        """Start a trial; an exception inside the `with` block becomes a problem of the trial."""
        trial = Trial(name)
        self.trials.append(trial)
        return TrialContext(trial)

    def fact(self, text: str) -> None:
        """Note a measured fact for the report, such as how often a second delivery happened."""
        self.facts.append(text)


class TrialContext:
    def __init__(self, trial: Trial) -> None:
        self.trial = trial

    def __enter__(self) -> Trial:
        return self.trial

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> bool:
        if error is None or isinstance(error, KeyboardInterrupt):
            return False
        last = traceback.extract_tb(tb)[-1] if tb else None
        where = f" at {Path(last.filename).name}:{last.lineno}" if last else ""
        self.trial.problems.append(f"trial raised {type(error).__name__}: {str(error)[:300]}{where}")
        return True


# The stack of one scenario.


class Bench:
    """A LocalStack of one scenario with a Celery client, settings and an etcd Database for the trials.

    `settings_env` adds environment variables to the driver's settings (not
    to the workers'); worker variables go to `start_worker`.
    """

    def __init__(self, keep_logs: Path | None = None, settings_env: dict[str, str] | None = None, **stack_options: Any) -> None:
        directory = None
        if keep_logs is not None:
            directory = keep_logs / f"stack-{uuid.uuid4().hex[:8]}"
        self.stack = LocalStack(directory=directory, **stack_options)
        self.settings_env = dict(settings_env or {})
        self.beat: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> "Bench":
        self.stack.start()
        environment = {**self.stack.environment(), **self.settings_env}
        self.settings = Settings.from_environment(environment)
        self.database = Database(self.settings)
        self.celery = Celery("faults", broker=self.stack.redis_url, backend=self.stack.redis_url)
        self.celery.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_beat()
        self.celery.close()
        self.database.forget_client()
        self.stack.stop()

    @property
    def directory(self) -> Path:
        assert self.stack.directory is not None
        return self.stack.directory

    def start_worker(self, concurrency: int = 1, name: str | None = None, env: dict[str, str] | None = None, app: str | None = None) -> Server:
        """Start a worker; with `app`, a Celery app module from faults/ replaces the product's app module."""
        if app is None:
            return self.stack.start_worker(concurrency=concurrency, name=name, extra_env=env)
        name = name or f"worker{len(self.stack.workers) + 1}"
        path = os.pathsep.join([str(ROOT / "faults"), os.environ.get("PYTHONPATH", "")])
        worker_env = {**os.environ, **self.stack.environment(), **(env or {}), "PYTHONPATH": path}
        command = [
            sys.executable, "-m", "celery", "-A", app, "worker",
            "--pool", "prefork", "--concurrency", str(concurrency), "--hostname", f"{name}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "INFO",
        ]  # fmt: skip
        log_path = self.directory / f"{name}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=worker_env, start_new_session=True
            )
        worker = Server(name, process, log_path, 0)
        self.stack.workers.append(worker)
        self.stack.wait_for_worker(worker)
        return worker

    def start_beat(self, env: dict[str, str]) -> None:
        """Run `environment-provider beat` with its schedule file in the stack's directory."""
        command = [
            str(Path(sys.executable).parent / "environment-provider"), "beat",
            "--schedule", str(self.directory / "beat-schedule"), "--loglevel", "INFO",
        ]  # fmt: skip
        log = open(self.directory / "beat.log", "ab")
        self.beat = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **self.stack.environment(), **env}, start_new_session=True, cwd=self.directory,
        )  # fmt: skip
        log.close()

    def stop_beat(self) -> None:
        if self.beat is not None and self.beat.poll() is None:
            self.beat.send_signal(signal.SIGTERM)
            try:
                self.beat.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.beat.kill()
                self.beat.wait()
        self.beat = None

    def worker_alive(self, worker: Server, timeout: float = 30.0) -> bool:
        """Tell whether the worker process runs and completes a ping task within `timeout` seconds."""
        if worker.process.poll() is not None:
            return False
        result = self.celery.send_task("EnvironmentProviderPing")
        try:
            return result.get(timeout=timeout) == "pong"
        except Exception:  # noqa: BLE001 - any failure to answer means "not alive"
            return False

    # Providers and testruns.

    def register_lab(self, lab: Any, prepare: bool = False) -> str:
        definition = copy.deepcopy(LAB_PROVIDER)
        definition["iut"]["id"] = f"lab-{uuid.uuid4().hex[:8]}"
        if prepare:
            definition["iut"]["prepare"] = copy.deepcopy(LAB_PREPARE)
        register_definition(self.database, definition)
        return definition["iut"]["id"]

    def register_defaults(self) -> dict[str, str]:
        """Register the example providers of providers/ under fresh names; return kind key -> name."""
        names = {}
        for kind, relative in (
            ("iut", "iut/static-devices.json"),
            ("execution-space", "execution-space/local-runners.json"),
            ("log-area", "log-area/file-server.json"),
        ):
            definition = json.loads((ROOT / "providers" / relative).read_text())
            names[kind] = f"{kind}-{uuid.uuid4().hex[:8]}"
            next(iter(definition.values()))["id"] = names[kind]
            register_definition(self.database, definition)
        return names

    def configure(
        self,
        providers: dict[str, str],
        tercc: dict[str, Any],
        dataset: Any = None,
        timeouts: dict[str, float] | None = None,
        settings: Settings | None = None,
    ) -> str:
        testrun_id = tercc["meta"]["id"]
        configure_testrun(
            self.database,
            settings or self.settings,
            testrun_id,
            tercc,
            providers["iut"],
            providers["execution-space"],
            providers["log-area"],
            dataset=dict(DATASET) if dataset is None else dataset,
            config=dict(CONFIG),
            timeouts=timeouts or {"iut": 30, "execution-space": 30, "log-area": 30, "total": 90},
        )
        return testrun_id

    def release(self, testrun_id: str) -> ReleaseReport:
        return release_testrun(self.database, self.settings, testrun_id)

    # etcd checks.

    def sub_suite_items(self, testrun_id: str | None = None) -> dict[str, dict[str, Any]]:
        """Return every iut, execution-space and log-area key under /testrun/ (or one testrun) with its JSON value."""
        prefix = keys.testruns_prefix() if testrun_id is None else keys.suites_prefix(testrun_id)
        found = {}
        for key, value in self.database.get_prefix(prefix).items():
            parsed = keys.parse_sub_suite_key(key)
            if parsed is not None and parsed.item != "suite":
                found[key] = json.loads(value)
        return found

    def environment_ids(self) -> set[str]:
        """Return the ids of environments that still have a `/environment/{environment}/testrun-id` key."""
        return {key.split("/")[2] for key in self.database.keys_prefix(keys.environments_prefix()) if key.endswith("/testrun-id")}

    def record(self, testrun_id: str) -> dict[str, Any]:
        text = self.database.get(keys.testrun(testrun_id))
        return json.loads(text) if text else {}

    def events(self, testrun_id: str) -> list[dict[str, Any]]:
        values = self.database.get_prefix(keys.sse_prefix(testrun_id))
        return sorted((json.loads(value) for value in values.values()), key=lambda event: event["id"])


# Test collections.


def recipe(runner: str = RUNNER, **constraints: Any) -> dict[str, Any]:
    """Build a small recipe with every constraint key; `constraints` replace values by key."""
    values = {"ENVIRONMENT": {}, "PARAMETERS": {}, "COMMAND": "pytest", "TEST_RUNNER": runner, "EXECUTE": [], "CHECKOUT": []}
    values.update(constraints)
    return {
        "id": str(uuid.uuid4()),
        "testCase": {"id": f"test_{uuid.uuid4().hex[:8]}"},
        "constraints": [{"key": key, "value": value} for key, value in values.items()],
    }


def tercc(*suite_sizes: int, runners: int = 1) -> dict[str, Any]:
    """Build a TERCC with one test suite per size, spreading the recipes over `runners` test runner images."""
    batches = []
    for index, size in enumerate(suite_sizes or (2,)):
        recipes = [recipe(f"{RUNNER}-{position % runners}" if runners > 1 else RUNNER) for position in range(size)]
        batches.append({"name": f"Suite {index}", "priority": 1, "recipes": recipes})
    return {
        "meta": {"id": str(uuid.uuid4()), "type": "EiffelTestExecutionRecipeCollectionCreatedEvent", "version": "4.0.0"},
        "data": {"batches": batches},
    }


def sub_suites(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [sub_suite for suite in result.get("suites") or [] for sub_suite in suite["sub_suites"]]


# Waiting.


def wait_for(condition: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    """Poll `condition` until it returns a truthy value; return it, or None after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def task_outcome(celery: Celery, task_id: str, timeout: float) -> tuple[str, Any]:
    """Wait for a task's final state; return (state, result). A state other than SUCCESS or FAILURE means it timed out."""
    result = celery.AsyncResult(task_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = result.state
        if state in ("SUCCESS", "FAILURE"):
            return state, result.result
        time.sleep(0.1)
    return result.state, None


def checkout_outcome(bench: Bench, task_id: str, testrun_id: str, timeout: float, settle: float = 25.0) -> tuple[str, Any]:
    """Wait for a checkout task's final state, as `task_outcome` does.

    Gives up early when the testrun record has shown a final status, with
    no claim on the testrun, for `settle` seconds while the task still has no
    result: no attempt is left that could store one.
    """
    from environment_provider.claim import TERMINAL_STATUSES

    result = bench.celery.AsyncResult(task_id)
    deadline = time.monotonic() + timeout
    settled_since: float | None = None
    while time.monotonic() < deadline:
        state = result.state
        if state in ("SUCCESS", "FAILURE"):
            return state, result.result
        ended = bench.record(testrun_id).get("status") in TERMINAL_STATUSES and bench.database.get(keys.claim(testrun_id)) is None
        if not ended:
            settled_since = None
        elif settled_since is None:
            settled_since = time.monotonic()
        elif time.monotonic() - settled_since > settle:
            return state, None
        time.sleep(0.2)
    return result.state, None


def log_lines(path: Path, needle: str) -> int:
    try:
        return path.read_text(errors="replace").count(needle)
    except OSError:
        return 0


def kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


__all__ = ["Bench", "Row", "Trial", "StackError", "keys", "tercc", "recipe", "wait_for", "task_outcome", "sub_suites"]
