"""Check-in of one environment or a whole testrun, and deletion of the keys released."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from . import keys
from .errors import ConfigurationError, ProviderError
from .etcd import Database
from .keys import EXECUTION_SPACE, IUT, LOG_AREA, Kind
from .providers.base import Provider, describe_item
from .providers.loader import create_provider
from .registry import TestrunConfiguration, load_configuration, update_record
from .settings import Settings

LOGGER = logging.getLogger(__name__)
RELEASE_ORDER: tuple[Kind, ...] = (EXECUTION_SPACE, LOG_AREA, IUT)
MAX_RELEASE_THREADS = 16


@dataclass
class ReleaseReport:
    """Outcome of a release: environments released, items that failed to check in, and what was not found."""

    released: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    not_found: str | None = None

    @property
    def complete(self) -> bool:
        return not self.failures

    def merge(self, other: "ReleaseReport") -> None:
        self.released.extend(other.released)
        self.failures.extend(other.failures)

    def as_json(self) -> dict[str, Any]:
        return {"released": self.released, "failures": self.failures, "complete": self.complete, "not_found": self.not_found}


def suite_dataset(configuration: TestrunConfiguration, suite_id: str) -> dict[str, Any]:
    """Return the dataset of the test suite with this test suite started id."""
    dataset = configuration.dataset
    if isinstance(dataset, dict):
        return dataset
    suite_ids = configuration.record.get("suite_ids") or []
    if suite_id in suite_ids and suite_ids.index(suite_id) < len(dataset):
        return dataset[suite_ids.index(suite_id)]
    return dataset[0] if dataset else {}


def provider_for(configuration: TestrunConfiguration, settings: Settings, kind: Kind, dataset: dict[str, Any]) -> Provider:
    context = configuration.provider_context(settings, dataset)
    return create_provider(kind, configuration.provider_definition(kind), context)


def release_sub_suite(
    database: Database,
    settings: Settings,
    configuration: TestrunConfiguration,
    suite_id: str,
    environment_id: str,
    values: dict[str, str],
) -> ReleaseReport:
    """Check in the items of one sub-suite; delete the keys of what was checked in.

    `values` maps this sub-suite's keys to their values. When every item is
    checked in, the sub-suite and its `/environment/{environment}/` keys are
    deleted too; otherwise the failed items' keys stay for a later release.
    """
    testrun_id = configuration.testrun_id
    report = ReleaseReport()
    dataset = suite_dataset(configuration, suite_id)
    checked_in: list[str] = []

    for kind in RELEASE_ORDER:
        key = keys.sub_suite_item(testrun_id, suite_id, environment_id, kind.key)
        if key not in values:
            continue
        item = json.loads(values[key])
        try:
            provider = provider_for(configuration, settings, kind, dataset)
            failures = provider.checkin_all([item])
        except (ProviderError, ConfigurationError) as error:
            failures = [(item, error)]
        except Exception as error:  # noqa: BLE001 - a plug-in's checkin_all may raise anything; keep the key
            LOGGER.exception("testrun %s: checking in %s of environment %s raised", testrun_id, kind.label, environment_id)
            failures = [(item, f"{type(error).__name__}: {error}")]
        if failures:
            for _, error in failures:
                report.failures.append(
                    f"environment {environment_id}: {kind.label} {describe_item(item)} was not checked in: {error}"
                )
                LOGGER.error("testrun %s: %s of environment %s was not checked in: %s", testrun_id, kind.label, environment_id, error)
            continue
        checked_in.append(key)
        LOGGER.info("testrun %s: checked in %s of environment %s", testrun_id, kind.label, environment_id)

    if report.failures:
        database.delete(*checked_in)
        return report

    database.delete(
        *checked_in,
        keys.sub_suite_item(testrun_id, suite_id, environment_id, "suite"),
        keys.environment_testrun(environment_id),
        keys.environment_suite(environment_id),
        keys.environment_suite_legacy(environment_id),
    )
    report.released.append(environment_id)
    return report


def group_sub_suites(sub_suite_keys: dict[str, str]) -> dict[tuple[str, str], dict[str, str]]:
    """Group sub-suite keys by (test suite started id, environment id)."""
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for key, value in sub_suite_keys.items():
        parsed = keys.parse_sub_suite_key(key)
        if parsed is not None:
            groups.setdefault((parsed.suite_id, parsed.environment_id), {})[key] = value
    return groups


def release_testrun(database: Database, settings: Settings, testrun_id: str) -> ReleaseReport:
    """Check in every environment of a testrun. Releasing a released testrun does nothing."""
    testrun_id = keys.validate_uuid(testrun_id, "testrun id")
    try:
        configuration = load_configuration(database, testrun_id)
    except ConfigurationError:
        return ReleaseReport(not_found=f"testrun {testrun_id} is not configured (never, or its lease expired)")

    report = ReleaseReport()
    groups = list(group_sub_suites(configuration.sub_suite_keys).items())
    if groups:
        # Check-ins of different sub-suites are independent; a slow or unreachable provider then costs its
        # retry time once, not once per sub-suite.
        with ThreadPoolExecutor(max_workers=min(MAX_RELEASE_THREADS, len(groups))) as pool:
            reports = pool.map(
                lambda group: release_sub_suite(database, settings, configuration, group[0][0], group[0][1], group[1]),
                groups,
            )
            for each in reports:
                report.merge(each)

    status = "released" if report.complete else "release incomplete"
    update_record(database, testrun_id, configuration.lease, status=status)
    LOGGER.info("testrun %s: released %d environments, %d failures", testrun_id, len(report.released), len(report.failures))
    return report


def testrun_of_task(database: Database, task_id: str) -> str | None:
    """Return the testrun id a Celery task id maps to, or None."""
    return database.get(keys.task_testrun(task_id))


def release_task(database: Database, settings: Settings, task_id: str) -> ReleaseReport:
    """Release the whole testrun of a Celery task."""
    task_id = keys.validate_uuid(task_id, "task id")
    testrun_id = testrun_of_task(database, task_id)
    if testrun_id is None:
        return ReleaseReport(not_found=f"task {task_id} is not known: no key {keys.task_testrun(task_id)}")
    record_text = database.get(keys.testrun(testrun_id))
    owner = json.loads(record_text).get("task_id") if record_text else None
    if owner and owner != task_id and database.keys_prefix(keys.suites_prefix(testrun_id)):
        return ReleaseReport(
            not_found=f"task {task_id} holds no environments of testrun {testrun_id}: task {owner} checked them out; "
            f"release with --task {owner} or --testrun {testrun_id}"
        )
    return release_testrun(database, settings, testrun_id)


def release_environment(database: Database, settings: Settings, environment_id: str) -> ReleaseReport:
    """Release one sub-suite environment by its environment id."""
    environment_id = keys.validate_uuid(environment_id, "environment id")
    testrun_id = database.get(keys.environment_testrun(environment_id))
    suite_id = database.get(keys.environment_suite(environment_id)) or database.get(
        keys.environment_suite_legacy(environment_id)
    )
    if testrun_id is None or suite_id is None:
        return ReleaseReport(not_found=f"environment {environment_id} is not checked out (never, or already released)")

    try:
        configuration = load_configuration(database, testrun_id)
    except ConfigurationError as error:
        return ReleaseReport(failures=[f"environment {environment_id}: {error}"])
    values = database.get_prefix(keys.sub_suite_prefix(testrun_id, suite_id, environment_id))
    return release_sub_suite(database, settings, configuration, suite_id, environment_id, values)


def sweep(database: Database, settings: Settings, margin: float) -> list[str]:
    """Release every testrun with environments whose lease has less than `margin` seconds left.

    When a testrun's lease expires, etcd deletes its keys, the copies of its
    provider definitions included, and nothing could check its items in any
    more. The sweep releases such testruns while that is still possible.
    A testrun claimed by a running task is left alone.
    """
    testruns = sorted({parsed.testrun_id for key in database.keys_prefix(keys.testruns_prefix()) if (parsed := keys.parse_sub_suite_key(key))})
    released = []
    for testrun_id in testruns:
        _, lease = database.get_with_lease(keys.testrun(testrun_id))
        remaining = database.lease_remaining(lease) if lease else -1
        if remaining > margin or database.get(keys.claim(testrun_id)) is not None:
            continue
        LOGGER.warning("testrun %s: lease has %d s left with environments checked out; releasing it", testrun_id, remaining)
        report = release_testrun(database, settings, testrun_id)
        if report.failures:
            LOGGER.error("testrun %s: sweep release incomplete: %s", testrun_id, "; ".join(report.failures))
        released.append(testrun_id)
    return released
