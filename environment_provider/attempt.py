"""One attempt of the checkout task: claim the testrun, clean up after earlier attempts, check out.

Celery may run a checkout task more than once: after a worker died
(acks late, rejected back to the queue) or when Redis hands a long task to a
second worker after the visibility timeout. An attempt first takes the
testrun's claim (see claim.py). It then releases what an earlier attempt of
the same task had recorded, and gives up after MAX_ATTEMPTS attempts with
everything checked in.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from . import keys
from .checkout import Checkout, failure_result
from .claim import TestrunClaim
from .collection import InvalidTestCollectionError
from .errors import ConfigurationError, EnvironmentProviderError, TotalTimeoutError
from .etcd import Database, LeaseKeeper, StorageRequestError, StorageUnavailableError
from .events import ProgressLog
from .registry import load_configuration, testrun_lease, update_record
from .release import release_testrun
from .settings import Settings

LOGGER = logging.getLogger(__name__)
MAX_ATTEMPTS = 3


class DuplicateDeliveryError(Exception):
    """Another attempt of the same task already ran to the end; this one must not touch providers."""


def checkout_testrun(
    database: Database, settings: Settings, testrun_id: str, suite_runner_ids: list[str], task_id: str | None
) -> dict[str, Any]:
    """Run one attempt of the checkout of a testrun; return the task result.

    On any failure everything already checked out is checked in before the
    error result is returned. Bad input (an invalid id, an unconfigured
    testrun) returns an error result without writing anything. When another
    attempt of this task already ran to the end, returns that attempt's
    outcome as stored in etcd, or raises DuplicateDeliveryError once the
    testrun has been released since. Raises StorageUnavailableError when etcd
    cannot be reached before the claim.
    """
    try:
        testrun_id = keys.validate_uuid(testrun_id, "testrun id")
        if task_id is not None:
            task_id = keys.validate_uuid(task_id, "task id")
        if not isinstance(suite_runner_ids, list):
            raise ConfigurationError(f"suite_runner_ids must be a list of UUIDs; got {type(suite_runner_ids).__name__}")
        suite_runner_ids = [keys.validate_uuid(value, "suite runner id") for value in suite_runner_ids]
    except (keys.InvalidIdError, ConfigurationError) as error:
        LOGGER.error("checkout of testrun %r rejected: %s", testrun_id, error)
        return failure_result(error)

    # The configuration is read once the claim is held, so that it shows what any earlier attempt left.
    # An unconfigured testrun is rejected then, and releasing the claim deletes the claim key again.
    claim = TestrunClaim(database, testrun_id, task_id)
    outcome = claim.wait(time.monotonic() + settings.total_timeout)
    if outcome == "finished":
        stored = stored_outcome(database, testrun_id)
        if stored is None:
            raise DuplicateDeliveryError(f"task {task_id} already ran to the end for testrun {testrun_id}")
        LOGGER.warning("testrun %s: task %s already ran to the end; returning the outcome stored in etcd", testrun_id, task_id)
        return stored
    if outcome == "timeout":
        error = ConfigurationError(
            f"testrun {testrun_id} stayed claimed by another checkout ({claim.holder()}) for the whole total timeout"
        )
        LOGGER.error("%s", error)
        return failure_result(error)
    try:
        return run_claimed(database, settings, testrun_id, suite_runner_ids, task_id, claim)
    finally:
        claim.release()


def stored_outcome(database: Database, testrun_id: str) -> dict[str, Any] | None:
    """Rebuild the result of an attempt that ran to the end from etcd, or return None once the testrun is released.

    A worker that dies after its attempt ran to the end, but before Celery
    stored the result, leaves the task without a result. The next delivery of
    the task returns this one instead. A sub-suite released on its own since
    is missing from it.
    """
    try:
        configuration = load_configuration(database, testrun_id)
    except ConfigurationError:
        return None
    record = configuration.record
    if record.get("status") == "failed":
        error = record.get("error") or "the checkout failed"
        return {"error": error, "details": f"stored outcome of the attempt that ran to the end: {error}"}
    if record.get("status") != "checked out":
        return None

    by_suite: dict[str, list[dict[str, Any]]] = {}
    for key, value in configuration.sub_suite_keys.items():
        parsed = keys.parse_sub_suite_key(key)
        if parsed is not None and parsed.item == "suite":
            by_suite.setdefault(parsed.suite_id, []).append(json.loads(value))
    suites = []
    for suite_id in record.get("suite_ids") or sorted(by_suite):
        sub_suites = sorted(by_suite.get(suite_id, []), key=lambda sub_suite: int(sub_suite["name"].rsplit("_SubSuite_", 1)[1]))
        if sub_suites:
            suites.append({"suite_name": sub_suites[0]["name"].rsplit("_SubSuite_", 1)[0], "sub_suites": sub_suites})
    return {"suites": suites, "error": None}


def run_claimed(
    database: Database, settings: Settings, testrun_id: str, suite_runner_ids: list[str], task_id: str | None, claim: TestrunClaim
) -> dict[str, Any]:
    try:
        configuration = load_configuration(database, testrun_id)
    except ConfigurationError as error:
        LOGGER.error("checkout of testrun %s rejected: %s", testrun_id, error)
        return failure_result(error)
    record = configuration.record
    owner = record.get("task_id")
    if configuration.sub_suite_keys and record.get("status") == "checked out" and owner != task_id:
        error = ConfigurationError(f"testrun {testrun_id} is already checked out by task {owner}; release it first")
        LOGGER.error("%s", error)
        if owner and configuration.task_id != owner:
            # The enqueue helper pointed the task-id key at this task; point it back at the owner's.
            database.put(keys.task_id(testrun_id), owner, lease=configuration.lease)
        return failure_result(error)

    lease = configuration.lease or testrun_lease(database, testrun_id, settings)
    progress = ProgressLog(database, testrun_id, lease, configuration.last_event)
    attempts = record.get("attempts", 0) + 1 if task_id is not None and record.get("task_id") == task_id else 1
    if task_id is not None:
        database.put_many({keys.task_id(testrun_id): task_id, keys.task_testrun(task_id): testrun_id}, lease=lease)
    update_record(database, testrun_id, lease, record, status="checking out", task_id=task_id, attempts=attempts, error=None)
    if attempts > MAX_ATTEMPTS:
        error = EnvironmentProviderError(
            f"the checkout of testrun {testrun_id} was attempted {MAX_ATTEMPTS} times and each attempt's worker died; "
            "check the worker logs"
        )
        return fail(database, settings, testrun_id, lease, progress, error)

    if configuration.sub_suite_keys:
        progress.message("releasing the environments of an earlier attempt of this checkout first")
        report = release_testrun(database, settings, testrun_id)
        if not report.complete:
            return fail(database, settings, testrun_id, lease, progress, EnvironmentProviderError(
                "could not release the environments of an earlier attempt: " + "; ".join(report.failures)
            ))  # fmt: skip
        configuration = load_configuration(database, testrun_id)
        update_record(database, testrun_id, lease, configuration.record, status="checking out", task_id=task_id, attempts=attempts)

    started = time.monotonic()
    deadline = started + configuration.timeout("total", settings)
    checkout = Checkout(database, settings, configuration, progress, lease, deadline)
    with LeaseKeeper(database, [lease, claim.lease], interval=claim.ttl / 3):
        try:
            result = checkout.run(suite_runner_ids)
        except (
            EnvironmentProviderError, InvalidTestCollectionError, StorageUnavailableError, StorageRequestError, SoftTimeLimitExceeded,
        ) as error:  # fmt: skip
            if isinstance(error, SoftTimeLimitExceeded):
                error = TotalTimeoutError(f"the checkout of testrun {testrun_id} hit the task's time limit")
            return fail(database, settings, testrun_id, lease, progress, error)
        except BaseException:
            LOGGER.exception("checkout of testrun %s failed unexpectedly; releasing what it checked out", testrun_id)
            release_testrun(database, settings, testrun_id)
            update_record(database, testrun_id, lease, status="failed", error="internal error")
            progress.finish("failed", error="internal error; see the worker log")
            raise

    count = sum(len(suite["sub_suites"]) for suite in result["suites"])
    update_record(database, testrun_id, lease, configuration.record, status="checked out")
    progress.finish("checked out", sub_suites=count, seconds=round(time.monotonic() - started, 3))
    LOGGER.info("testrun %s: checked out %d sub-suites in %.3f s", testrun_id, count, time.monotonic() - started)
    return result


def fail(
    database: Database, settings: Settings, testrun_id: str, lease: int, progress: ProgressLog, error: BaseException
) -> dict[str, Any]:
    """Release what the checkout holds, record the failure and return the error result."""
    progress.message(f"checkout failed: {error}", "error")
    result = failure_result(error)
    try:
        report = release_testrun(database, settings, testrun_id)
    except StorageUnavailableError as storage_error:
        result["details"] += f"; release after the failure could not run: {storage_error}"
    else:
        if report.failures:
            result["details"] += "; release after the failure was incomplete: " + "; ".join(report.failures)
    update_record(database, testrun_id, lease, status="failed", error=result["error"])
    progress.finish("failed", error=result["error"])
    return result
