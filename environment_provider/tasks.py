"""Celery tasks: the checkout (`EnvironmentProvider`), release, and a no-op for health checks."""

from __future__ import annotations

import logging
from typing import Any

from .celery_app import SETTINGS, app
from .checkout import checkout_testrun
from .etcd import Database
from .keys import InvalidIdError
from .release import release_environment, release_task, release_testrun

LOGGER = logging.getLogger(__name__)
DATABASE = Database(SETTINGS)


@app.task(name="EnvironmentProvider", bind=True)
def environment_provider(self: Any, suite_id: str, suite_runner_ids: list[str] | None = None) -> dict[str, Any]:
    """Check out the environment of testrun `suite_id`; see checkout.checkout_testrun."""
    return checkout_testrun(DATABASE, SETTINGS, suite_id, suite_runner_ids or [], self.request.id)


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


@app.task(name="EnvironmentProviderPing")
def ping() -> str:
    """Return "pong": used to check that a worker is up and to time the queue round trip."""
    return "pong"
