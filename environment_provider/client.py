"""Enqueue helpers for suite starters, the CLI and the HTTP API."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable

import celery.exceptions
import redis.exceptions
from celery import Celery
from kombu.exceptions import OperationalError

from . import keys
from .errors import EnvironmentProviderError
from .etcd import Database
from .registry import load_configuration
from .settings import Settings

TASK_NAME = "EnvironmentProvider"
TIME_LIMIT_GRACE = 60.0


class BrokerUnavailableError(EnvironmentProviderError):
    """The Celery broker or result backend cannot be reached."""


def broker_error(settings: Settings, error: Exception) -> BrokerUnavailableError:
    return BrokerUnavailableError(
        f"the Celery broker at {settings.broker_url} is not reachable ({error}); start Redis or set CELERY_BROKER_URL"
    )


def check_broker(app: Celery, settings: Settings, timeout: float = 2.0) -> None:
    """Raise BrokerUnavailableError unless the broker and the result backend respond within `timeout` seconds."""
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
    except (OperationalError, OSError) as error:
        raise broker_error(settings, error) from None
    backend_client = getattr(app.backend, "client", None)
    if backend_client is not None and hasattr(backend_client, "ping"):
        try:
            backend_client.ping()
        except (redis.exceptions.RedisError, OSError) as error:
            raise BrokerUnavailableError(
                f"the Celery result backend at {settings.result_backend} is not reachable ({error}); "
                "start Redis or set CELERY_RESULT_BACKEND"
            ) from None


def enqueue_checkout(app: Celery, database: Database, settings: Settings, testrun_id: str, suite_runner_ids: list[str]) -> str:
    """Send the checkout task for a configured testrun; return its task id.

    The task id keys are written before this returns, so a lookup by task id
    works at once. Nothing is written when the testrun is not configured or
    the broker cannot be reached.
    """
    testrun_id = keys.validate_uuid(testrun_id, "testrun id")
    suite_runner_ids = [keys.validate_uuid(value, "suite runner id") for value in suite_runner_ids]
    # configure writes the record and the rest in one transaction, so the record alone shows the testrun is configured.
    record, lease = database.get_with_lease(keys.testrun(testrun_id))
    if record is None:
        load_configuration(database, testrun_id)  # raises the "not configured" error
    total_text = database.get(keys.timeout(testrun_id, "total"))
    total = float(total_text) if total_text else settings.total_timeout

    check_broker(app, settings)
    task_id = str(uuid.uuid4())
    try:
        app.send_task(
            TASK_NAME,
            args=[testrun_id, suite_runner_ids],
            task_id=task_id,
            soft_time_limit=total + TIME_LIMIT_GRACE,
            time_limit=total + 2 * TIME_LIMIT_GRACE,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        )
    except (OperationalError, RuntimeError) as error:
        # The Redis result backend raises RuntimeError once its reconnection attempts run out.
        raise broker_error(settings, error) from None

    database.put_many({keys.task_id(testrun_id): task_id, keys.task_testrun(task_id): testrun_id}, lease=lease)
    return task_id


def task_status(app: Celery, settings: Settings, task_id: str) -> dict[str, Any]:
    """Return `{"status": <Celery state>, "result": <task result or None>}` for a task id."""
    task_id = keys.validate_uuid(task_id, "task id")
    try:
        result = app.AsyncResult(task_id)
        state = result.state
        value = result.result if state in ("SUCCESS", "FAILURE") else None
    except (OperationalError, redis.exceptions.RedisError) as error:
        raise broker_error(settings, error) from None
    if isinstance(value, BaseException):
        value = {"error": str(value) or type(value).__name__, "details": repr(value)}
    return {"status": state, "result": value}


def wait_for_result(
    app: Celery,
    database: Database,
    settings: Settings,
    task_id: str,
    testrun_id: str,
    timeout: float,
    on_event: Callable[[dict[str, Any]], None] = lambda event: None,
    interval: float = 0.1,
) -> dict[str, Any]:
    """Wait for a task's result, passing each new progress event of its testrun to `on_event`."""
    prefix = keys.sse_prefix(testrun_id)
    seen = max((int(key.rsplit("/", 1)[1]) for key in database.keys_prefix(prefix)), default=0)
    deadline = time.monotonic() + timeout
    result = app.AsyncResult(task_id)
    while True:
        try:
            # Returns as soon as the result is published (Redis pub/sub), or after `interval`.
            result.get(timeout=interval, propagate=False)
            ready = True
        except celery.exceptions.TimeoutError:
            ready = False
        except (OperationalError, redis.exceptions.RedisError) as error:
            raise broker_error(settings, error) from None
        events = sorted(
            (json.loads(value) for key, value in database.get_prefix(prefix).items() if int(key.rsplit("/", 1)[1]) > seen),
            key=lambda event: event["id"],
        )
        for event in events:
            seen = max(seen, event["id"])
            on_event(event)
        if ready:
            return task_status(app, settings, task_id)
        if time.monotonic() >= deadline:
            raise EnvironmentProviderError(
                f"task {task_id} did not finish within {timeout:g} s; is a worker running? "
                f"Check with 'environment-provider status {task_id}'"
            )
