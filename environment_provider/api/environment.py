"""`POST /` enqueues a checkout; `GET /` reads its status or releases environments."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query

from .. import keys
from ..client import enqueue_checkout, task_status
from ..collection import parse_test_suites
from ..errors import ConfigurationError
from ..registry import load_configuration
from ..release import ReleaseReport, release_environment, release_task
from .errors import ApiError, errors_about, result_backend_errors
from .models import ENVIRONMENT_ID, TASK_ID, EnqueueRequest, EnqueueResponse, ReleaseResponse, TaskStatusResponse
from .responses import error_responses
from .services import Credentials, Services, ServicesDependency, require_token

LOGGER = logging.getLogger(__name__)
router = APIRouter()


def suite_runner_id_list(value: Any) -> list[str]:
    """Accept a list of ids, or the comma-separated string that ETOS suite runners send."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise ApiError(
        400,
        "field 'suite_runner_ids' is invalid: give a list of UUID strings, or one string of UUIDs separated by commas",
        "suite_runner_ids",
    )


def check_suite_runner_ids(services: Services, testrun_id: str, suite_runner_ids: list[str]) -> None:
    """Reject an unconfigured testrun (404) and more suite runner ids than it has test suites (422)."""
    try:
        configuration = load_configuration(services.database, testrun_id)
    except ConfigurationError as error:
        raise ApiError(404, str(error), "suite_id") from None

    data = configuration.tercc.get("data") or {}
    if "batches" not in data:
        return  # The test collection is behind data.batchesUri; the worker fetches and counts it.
    with errors_about("suite_id"):
        suite_count = len(parse_test_suites(data["batches"]))
    if len(suite_runner_ids) > suite_count:
        raise ApiError(
            422,
            f"got {len(suite_runner_ids)} suite runner ids but testrun {testrun_id} has {suite_count} test suites; "
            "give at most one per test suite",
            "suite_runner_ids",
        )


@router.post(
    "/",
    response_model=EnqueueResponse,
    summary="Enqueue the checkout of a testrun",
    description=(
        "Sends the Celery task `EnvironmentProvider` for a configured testrun and returns its task id. "
        "The task id is stored in etcd before the response is sent, so `GET /?id=<task>` works at once. "
        "Configure the testrun with `POST /configure` first."
    ),
    responses=error_responses(400, 404, 422, 503),
)
def enqueue(body: EnqueueRequest, services: ServicesDependency) -> dict[str, Any]:
    with errors_about("suite_id"):
        testrun_id = keys.validate_uuid(body.suite_id, "testrun id")
    suite_runner_ids = suite_runner_id_list(body.suite_runner_ids)
    with errors_about("suite_runner_ids"):
        suite_runner_ids = [keys.validate_uuid(value, "suite runner id") for value in suite_runner_ids]
    check_suite_runner_ids(services, testrun_id, suite_runner_ids)

    with errors_about("suite_id"):
        task_id = enqueue_checkout(services.celery, services.database, services.settings, testrun_id, suite_runner_ids)
    LOGGER.info("enqueued checkout task %s for testrun %s", task_id, testrun_id)
    return {"result": "success", "data": {"id": task_id}}


def read_status(services: Services, value: str) -> dict[str, Any]:
    with errors_about("id"):
        task_id = keys.validate_uuid(value, "task id")
    with result_backend_errors(services.settings):
        status = task_status(services.celery, services.settings, task_id)

    # Celery reports PENDING for any id it has not seen, so the task's etcd key separates a queued task from an unknown one.
    # NOTE: a task sent by a raw send_task gets that key only when a worker starts it, so until then its id is a 404.
    if status["status"] == "PENDING" and services.database.get(keys.task_testrun(task_id)) is None:
        raise ApiError(
            404,
            f"task {task_id} is not known: it was never enqueued here, or its testrun expired; "
            "enqueue a checkout with POST / first",
            "id",
        )

    result = status["result"]
    if isinstance(result, dict) and result.get("error") is not None:
        status["status"] = "FAILURE"
    return status


def release_response(report: ReleaseReport, field: str, target: str) -> dict[str, Any]:
    """Turn a release report into the response body, or raise a 404 or 502 ApiError."""
    if report.not_found:
        raise ApiError(404, f"nothing to release: {report.not_found}", field, status="FAILURE")
    if report.failures:
        raise ApiError(
            502,
            f"the release of {target} is incomplete: {len(report.failures)} items could not be checked in; "
            "their keys are kept, run the release again once the provider is back",
            None,
            status="FAILURE",
            details="; ".join(report.failures),
            released=report.released,
            failures=report.failures,
        )
    return {"status": "SUCCESS", "released": report.released, "failures": [], "complete": True}


def release_by_task(services: Services, value: str) -> dict[str, Any]:
    with errors_about("release"):
        task_id = keys.validate_uuid(value, "task id")
    report = release_task(services.database, services.settings, task_id)
    LOGGER.info("released task %s: %d environments, %d failures", task_id, len(report.released), len(report.failures))
    return release_response(report, "release", f"task {task_id}")


def release_single(services: Services, value: str) -> dict[str, Any]:
    with errors_about("single_release"):
        environment_id = keys.validate_uuid(value, "environment id")
    report = release_environment(services.database, services.settings, environment_id)
    LOGGER.info("released environment %s: %d failures", environment_id, len(report.failures))
    return release_response(report, "single_release", f"environment {environment_id}")


QUERY_PARAMETERS = ("id", "release", "single_release")


@router.get(
    "/",
    response_model=TaskStatusResponse | ReleaseResponse,
    summary="Read a checkout's status, or release environments",
    description=(
        "Give exactly one query parameter:\n\n"
        "- `id=<task>`: the Celery state and result of a checkout task. An id that was never enqueued is a 404.\n"
        "- `release=<task>`: check in every environment of the task's testrun and delete their keys. "
        "Releasing twice is harmless.\n"
        "- `single_release=<environment>`: check in one sub-suite environment and delete its keys. "
        "An environment that was never checked out, or was already released, is a 404.\n\n"
        "When ENVIRONMENT_PROVIDER_API_TOKEN is set, the two releases need `Authorization: Bearer <token>`; "
        "reading a status does not."
    ),
    responses=error_responses(400, 401, 404, 502, 503),
)
def read_or_release(
    services: ServicesDependency,
    credentials: Credentials,
    task_id: Annotated[
        str | None,
        Query(alias="id", description="A checkout task id.", openapi_examples={"task": {"value": TASK_ID}}),
    ] = None,
    release: Annotated[
        str | None,
        Query(description="Release the testrun of this task id.", openapi_examples={"task": {"value": TASK_ID}}),
    ] = None,
    single_release: Annotated[
        str | None,
        Query(description="Release this environment id.", openapi_examples={"environment": {"value": ENVIRONMENT_ID}}),
    ] = None,
) -> dict[str, Any]:
    present = [name for name, value in zip(QUERY_PARAMETERS, (task_id, release, single_release)) if value is not None]
    if len(present) != 1:
        raise ApiError(
            400,
            f"give exactly one of the query parameters id, release and single_release; got {', '.join(present) or 'none'}",
            present[0] if present else "id",
        )

    if task_id is not None:
        return read_status(services, task_id)
    require_token(services, credentials)
    if release is not None:
        return release_by_task(services, release)
    return release_single(services, single_release or "")
