"""Celery tasks: the checkout (`EnvironmentProvider`), release, and a no-op for health checks."""

from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import Ignore

from .attempt import DuplicateDeliveryError, checkout_testrun
from .celery_app import SETTINGS, app
from .checkout import failure_result
from .etcd import Database, StorageUnavailableError
from .keys import InvalidIdError
from .release import release_environment, release_task, release_testrun, sweep

LOGGER = logging.getLogger(__name__)
DATABASE = Database(SETTINGS)
# With the default of 6 retries, an etcd outage is retried after 1, 2, 4, 8, 10 and 10 s: about 35 s in all.
MAX_RETRY_DELAY = 10


@app.task(name="EnvironmentProvider", bind=True)
def environment_provider(self: Any, suite_id: str, suite_runner_ids: list[str] | None = None) -> dict[str, Any]:
    """Check out the environment of testrun `suite_id`; see attempt.checkout_testrun."""
    try:
        return checkout_testrun(DATABASE, SETTINGS, suite_id, suite_runner_ids or [], self.request.id)
    except DuplicateDeliveryError as duplicate:
        LOGGER.warning("ignoring a second delivery: %s", duplicate)
        raise Ignore() from None
    except StorageUnavailableError as error:
        retries = SETTINGS.etcd_retries
        if self.request.retries < retries:
            delay = min(2**self.request.retries, MAX_RETRY_DELAY)
            LOGGER.warning("testrun %s: %s; retrying in %d s", suite_id, error, delay)
            raise self.retry(countdown=delay, max_retries=retries) from None
        LOGGER.error("testrun %s: giving up after %d retries: %s", suite_id, retries, error)
        return failure_result(error)


@app.task(name="EnvironmentProviderRelease")
def release(testrun_id: str | None = None, task_id: str | None = None, environment_id: str | None = None) -> dict[str, Any]:
    """Release by exactly one of testrun id, task id or environment id; return the release report."""
    try:
        if environment_id is not None:
            report = release_environment(DATABASE, SETTINGS, environment_id)
        elif task_id is not None:
            report = release_task(DATABASE, SETTINGS, task_id)
        elif testrun_id is not None:
            report = release_testrun(DATABASE, SETTINGS, testrun_id)
        else:
            return {"error": "give one of testrun_id, task_id or environment_id"}
    except InvalidIdError as error:
        return {"error": str(error)}
    return report.as_json()


@app.task(name="EnvironmentProviderSweep")
def sweep_task() -> dict[str, Any]:
    """Release testruns whose lease runs out within three sweep intervals; return what was released."""
    return {"released": sweep(DATABASE, SETTINGS, margin=3 * SETTINGS.sweep_interval)}


@app.task(name="EnvironmentProviderPing")
def ping() -> str:
    """Return "pong": used to check that a worker is up and to time the queue round trip."""
    return "pong"
