"""The checkout of a testrun: IUTs, execution spaces and log areas into one sub-suite per IUT.

Every item is written to its sub-suite key as soon as its provider returns
it, so a release (by this task on failure, or by the next attempt after a crash)
finds and checks in everything. The sub-suite JSON itself and the
backward-compatible `/environment/{environment}/` keys are written last, in
one transaction per sub-suite, so a reader of `.../suite` sees a complete
environment or none.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from celery.exceptions import SoftTimeLimitExceeded

from . import keys
from .collection import TestSuite, test_suites_of
from .errors import ConfigurationError, EnvironmentProviderError, NoItemsError, ProviderError, TotalTimeoutError
from .etcd import Database, StorageUnavailableError
from .events import ProgressLog
from .keys import EXECUTION_SPACE, IUT, LOG_AREA, Kind
from .providers.base import CheckoutRequest, Provider
from .providers.jsontas import JsontasProvider
from .providers.loader import create_provider
from .registry import TestrunConfiguration, check_dataset, dumps, iut_bounds, update_record
from .settings import Settings
from .splitter import assign_counts, split_round_robin

LOGGER = logging.getLogger(__name__)
MAX_PREPARE_THREADS = 16
TRANSACTION_SIZE = 100
# Exceptions that pass through provider calls unchanged. Any other exception from a provider
# (a plug-in may raise anything) becomes a ProviderError of the stage it came from.
PASSED_THROUGH = (EnvironmentProviderError, StorageUnavailableError, SoftTimeLimitExceeded)


def provider_failure(provider: Provider, stage: str, error: Exception) -> ProviderError:
    """Turn an unexpected exception from a provider into a ProviderError naming the provider and stage."""
    LOGGER.error(
        "testrun %s: provider %r raised in stage %r", provider.context.testrun_id, provider.id, stage, exc_info=error
    )
    return ProviderError(provider.id, stage, f"{type(error).__name__}: {error}")


@dataclass
class SuitePlan:
    """One test suite with its test suite started id, dataset and providers."""

    suite: TestSuite
    suite_id: str
    dataset: dict[str, Any]
    providers: dict[str, Provider] = field(default_factory=dict)


class Checkout:
    """The state of one checkout task; nothing here is shared between tasks."""

    def __init__(
        self,
        database: Database,
        settings: Settings,
        configuration: TestrunConfiguration,
        progress: ProgressLog,
        lease: int,
        deadline: float,
    ) -> None:
        self.database = database
        self.settings = settings
        self.configuration = configuration
        self.testrun_id = configuration.testrun_id
        self.progress = progress
        self.lease = lease
        self.deadline = deadline

    # Planning.

    def plan(self, suites: list[TestSuite], suite_runner_ids: list[str]) -> list[SuitePlan]:
        """Pair each test suite with its started id and dataset."""
        if len(suite_runner_ids) > len(suites):
            raise ConfigurationError(
                f"got {len(suite_runner_ids)} suite runner ids for {len(suites)} test suites; give at most one per test suite"
            )
        suite_ids = [keys.validate_uuid(value, "suite runner id") for value in suite_runner_ids]
        suite_ids += [str(uuid.uuid4()) for _ in range(len(suites) - len(suite_ids))]

        dataset = self.configuration.dataset
        check_dataset(dataset, len(suites))
        datasets = dataset if isinstance(dataset, list) else [dataset] * len(suites)
        plans = [SuitePlan(suite, suite_id, suite_dataset) for suite, suite_id, suite_dataset in zip(suites, suite_ids, datasets)]
        for plan in plans:
            context = self.configuration.provider_context(self.settings, plan.dataset, self.progress.message)
            for kind in (IUT, EXECUTION_SPACE, LOG_AREA):
                plan.providers[kind.key] = create_provider(kind, self.configuration.provider_definition(kind), context)
        return plans

    def stage_deadline(self, kind: Kind, provider: Provider) -> tuple[float, str]:
        """Return the earlier of the kind's timeout from now and the total deadline, and which of the two it is."""
        total = self.configuration.timeout("total", self.settings)
        if time.monotonic() >= self.deadline:
            raise TotalTimeoutError(
                f"the 'total' timeout of {total:g} s of testrun {self.testrun_id} ran out before the {kind.label} "
                f"checkout from provider {provider.id!r}; raise the 'total' timeout or free up the providers"
            )
        timeout = self.configuration.timeout(kind.key, self.settings)
        kind_deadline = time.monotonic() + timeout
        if kind_deadline <= self.deadline:
            return kind_deadline, f"the '{kind.key}' timeout of {timeout:g} s"
        return self.deadline, f"the 'total' timeout of {total:g} s"

    # Recording.

    def record_item(self, plan: SuitePlan, environment_id: str, kind: Kind, item: dict[str, Any]) -> None:
        key = keys.sub_suite_item(self.testrun_id, plan.suite_id, environment_id, kind.key)
        self.database.put(key, dumps(item), lease=self.lease)

    def forget_item(self, plan: SuitePlan, environment_id: str, kind: Kind) -> None:
        self.database.delete(keys.sub_suite_item(self.testrun_id, plan.suite_id, environment_id, kind.key))

    def return_items(self, plan: SuitePlan, kind: Kind, items: list[tuple[str, dict[str, Any]]]) -> None:
        """Check in items the checkout does not use and delete their keys; keep the keys of failures."""
        provider = plan.providers[kind.key]
        failures = provider.checkin_all([item for _, item in items])
        failed = {id(item) for item, _ in failures}
        for item, error in failures:
            self.progress.message(f"could not check in an unused {kind.label}: {error}", "warning")
        for environment_id, item in items:
            if id(item) not in failed:
                self.forget_item(plan, environment_id, kind)

    # The stages.

    def checkout_items(
        self,
        plan: SuitePlan,
        kind: Kind,
        minimum: int,
        maximum: int,
        values: dict[str, Any],
        record: Callable[[dict[str, Any]], None],
    ) -> list[dict[str, Any]]:
        """Run one provider checkout and hold it to the provider contract; return the items kept.

        Each item gets `provider_id` (and an IUT the testrun's `identity`
        when it has none) and is passed to `record` once. Items beyond
        `maximum` are checked in at once without being recorded. Raises
        NoItemsError for fewer than `minimum` items, leaving what was
        recorded to the release.
        """
        provider = plan.providers[kind.key]
        identity = self.configuration.config.get("identity", "")
        kept: list[dict[str, Any]] = []
        extra: list[dict[str, Any]] = []
        seen: set[int] = set()

        def record_once(item: dict[str, Any]) -> None:
            if id(item) in seen:
                return
            seen.add(id(item))
            if len(kept) >= maximum:
                extra.append(item)
                return
            item["provider_id"] = provider.id
            if kind is IUT and identity:
                item.setdefault("identity", identity)
            record(item)
            kept.append(item)

        placeholders: list[str] = []

        def record_request(placeholder: dict[str, Any]) -> None:
            # A placeholder gets an environment id of its own, so that recording the real items never overwrites it.
            key = keys.sub_suite_item(self.testrun_id, plan.suite_id, str(uuid.uuid4()), kind.key)
            self.database.put(key, dumps(placeholder), lease=self.lease)
            placeholders.append(key)

        def forget_request() -> None:
            if placeholders:
                self.database.delete(*placeholders)
                placeholders.clear()

        deadline, deadline_source = self.stage_deadline(kind, provider)
        request = CheckoutRequest(
            minimum, maximum, deadline, values, record_once, deadline_source,
            record_request=record_request, forget_request=forget_request,
        )  # fmt: skip
        try:
            items = provider.checkout(request)
        except PASSED_THROUGH:
            raise
        except Exception as error:  # noqa: BLE001 - see PASSED_THROUGH
            raise provider_failure(provider, "checkout", error) from None
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise ProviderError(provider.id, "checkout", f"returned {type(items).__name__}, not a list of objects")
        for item in items:
            record_once(item)

        if extra:
            self.progress.message(
                f"provider {provider.id!r} returned {len(extra)} more {kind.label}s than requested; checking them in"
            )
            for _, error in provider.checkin_all(extra):
                self.progress.message(f"could not check in an unused {kind.label}: {error}", "warning")
        if len(kept) < minimum:
            raise NoItemsError(
                provider.id, "checkout", f"returned {len(kept)} {kind.label}s but at least {minimum} are needed"
            )
        return kept

    def checkout_iuts(self, plan: SuitePlan) -> list[tuple[str, dict[str, Any]]]:
        """Check out this suite's IUTs; return (environment id, IUT) pairs."""
        minimum, maximum = iut_bounds(plan.dataset, plan.suite)

        checked_out: list[tuple[str, dict[str, Any]]] = []
        provider = plan.providers[IUT.key]
        # Items of a provider that reserves nothing need no check-in, so one write per batch is as safe as one per item.
        pending: dict[str, str] | None = None if provider.reserves_items else {}

        def record(item: dict[str, Any]) -> None:
            environment_id = str(uuid.uuid4())
            if pending is None:
                self.record_item(plan, environment_id, IUT, item)
            else:
                pending[keys.sub_suite_item(self.testrun_id, plan.suite_id, environment_id, IUT.key)] = dumps(item)
            checked_out.append((environment_id, item))

        self.progress.message(f"checking out {minimum} to {maximum} IUTs from provider {provider.id!r} for test suite {plan.suite.name!r}")
        try:
            self.checkout_items(plan, IUT, minimum, maximum, {"suite_id": plan.suite_id}, record)
        finally:
            if pending:
                self.write_batches(pending)
        self.progress.message(f"checked out {len(checked_out)} IUTs from provider {provider.id!r}")
        return checked_out

    def write_batches(self, values: dict[str, str]) -> None:
        """Write `values` in transactions of at most TRANSACTION_SIZE keys (etcd's default limit is 128)."""
        items = list(values.items())
        for start in range(0, len(items), TRANSACTION_SIZE):
            self.database.put_many(dict(items[start : start + TRANSACTION_SIZE]), lease=self.lease)

    def prepare_iuts(self, plan: SuitePlan, iuts: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
        """Run the IUT provider's prepare stage for all IUTs at once; check in the IUTs that fail it.

        Each IUT is prepared from its own copy. Raises ProviderError when
        fewer IUTs than test runners remain, and TotalTimeoutError when the
        total deadline passes first.
        """
        provider = plan.providers[IUT.key]
        if type(provider).prepare is Provider.prepare:
            return iuts
        if isinstance(provider, JsontasProvider) and not provider.prepare_steps():
            return iuts

        def prepare(pair: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]] | ProviderError:
            try:
                item = provider.prepare(json.loads(json.dumps(pair[1])))
            except ProviderError as error:
                return error
            except PASSED_THROUGH:
                raise
            except Exception as error:  # noqa: BLE001 - see PASSED_THROUGH
                return provider_failure(provider, "prepare", error)
            if not isinstance(item, dict):
                return ProviderError(provider.id, "prepare", f"returned {type(item).__name__} instead of the IUT object")
            return pair[0], item

        self.progress.message(f"preparing {len(iuts)} IUTs with provider {provider.id!r}")
        pool = ThreadPoolExecutor(max_workers=min(MAX_PREPARE_THREADS, len(iuts)))
        futures = [pool.submit(prepare, pair) for pair in iuts]
        _, pending = concurrent.futures.wait(futures, timeout=max(0.0, self.deadline - time.monotonic()))
        # NOTE: a step still running at the deadline is not interrupted; its thread ends with its own request timeout.
        pool.shutdown(wait=not pending, cancel_futures=True)
        if pending:
            total = self.configuration.timeout("total", self.settings)
            raise TotalTimeoutError(
                f"the 'total' timeout of {total:g} s of testrun {self.testrun_id} ran out while provider "
                f"{provider.id!r} was still preparing {len(pending)} of {len(iuts)} IUTs; raise the 'total' timeout"
            )
        outcomes = [future.result() for future in futures]

        prepared, failed = [], []
        for pair, outcome in zip(iuts, outcomes):
            if isinstance(outcome, ProviderError):
                self.progress.message(f"IUT preparation failed, checking the IUT in: {outcome}", "warning")
                failed.append(pair)
            else:
                prepared.append(outcome)
        if failed:
            self.return_items(plan, IUT, failed)
        minimum = len(plan.suite.recipes_by_runner)
        if len(prepared) < minimum:
            first_failure = next(str(outcome) for outcome in outcomes if isinstance(outcome, ProviderError))
            raise ProviderError(
                provider.id,
                "prepare",
                f"only {len(prepared)} IUTs were prepared but {minimum} are needed; first failure: {first_failure}",
            )
        for environment_id, item in prepared:
            self.record_item(plan, environment_id, IUT, item)
        return prepared

    def checkout_one(
        self, plan: SuitePlan, kind: Kind, values: dict[str, Any], environment_id: str, pending: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Check out exactly one execution space or log area for one environment.

        With `pending`, the item's key is added there for the caller's next
        transaction instead of being written at once. If the checkout fails
        after the item was returned, the item is written before the error is raised.
        """
        key = keys.sub_suite_item(self.testrun_id, plan.suite_id, environment_id, kind.key)

        def record(item: dict[str, Any]) -> None:
            if pending is None:
                self.database.put(key, dumps(item), lease=self.lease)
            else:
                pending[key] = dumps(item)

        try:
            return self.checkout_items(plan, kind, 1, 1, values, record)[0]
        except BaseException:
            if pending:
                self.database.put_many(pending, lease=self.lease)
            raise

    def build_sub_suites(self, plan: SuitePlan, iuts: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Assign IUTs to test runners, check out their execution spaces and log areas, write the sub-suites."""
        runners = plan.suite.recipes_by_runner
        counts = assign_counts({runner: len(recipes) for runner, recipes in runners.items()}, len(iuts))
        used = sum(counts.values())
        if used < len(iuts):
            self.progress.message(f"checking in {len(iuts) - used} IUTs that no test runner needs")
            self.return_items(plan, IUT, iuts[used:])

        config = self.configuration.config
        sub_suites = []
        position = 0
        for runner, count in counts.items():
            shares = split_round_robin(runners[runner], count)
            for recipes in shares:
                environment_id, iut = iuts[position]
                position += 1
                sub_suite_key = keys.sub_suite_item(self.testrun_id, plan.suite_id, environment_id, "suite")
                values = {
                    "test_runner": runner,
                    "iut": iut,
                    "environment_id": environment_id,
                    "suite_id": plan.suite_id,
                    "sub_suite_key": sub_suite_key,
                }
                # The log area is recorded in the sub-suite's transaction below, since nothing runs in between.
                # So is the execution space when its provider reserves nothing that a check-in must give back.
                pending: dict[str, str] = {}
                deferred = None if plan.providers[EXECUTION_SPACE.key].reserves_items else pending
                executor = self.checkout_one(plan, EXECUTION_SPACE, values, environment_id, deferred)
                log_area = self.checkout_one(plan, LOG_AREA, {**values, "executor": executor}, environment_id, pending)
                sub_suite = {
                    "name": f"{plan.suite.name}_SubSuite_{len(sub_suites)}",
                    "sub_suite_id": environment_id,
                    "suite_id": self.testrun_id,
                    "test_suite_started_id": plan.suite_id,
                    "priority": plan.suite.priority,
                    "recipes": recipes,
                    "test_runner": runner,
                    "iut": iut,
                    "executor": executor,
                    "log_area": log_area,
                    "artifact": config.get("artifact_id", ""),
                    "context": config.get("context", ""),
                }
                self.database.put_many(
                    {
                        **pending,
                        sub_suite_key: dumps(sub_suite),
                        keys.environment_testrun(environment_id): self.testrun_id,
                        keys.environment_suite(environment_id): plan.suite_id,
                    },
                    lease=self.lease,
                )
                sub_suites.append(sub_suite)
                self.progress.message(
                    f"sub-suite {sub_suite['name']} ready: {len(recipes)} recipes, environment {environment_id}"
                )
        return sub_suites

    def run(self, suite_runner_ids: list[str]) -> dict[str, Any]:
        """Check out every test suite; return the task result. Raises on failure, leaving release to the caller."""
        suites = test_suites_of(self.configuration.tercc)
        plans = self.plan(suites, suite_runner_ids)
        update_record(
            self.database, self.testrun_id, self.lease, self.configuration.record, suite_ids=[plan.suite_id for plan in plans]
        )

        result = []
        for plan in plans:
            iuts = self.checkout_iuts(plan)
            iuts = self.prepare_iuts(plan, iuts)
            result.append({"suite_name": plan.suite.name, "sub_suites": self.build_sub_suites(plan, iuts)})
        return {"suites": result, "error": None}


def failure_result(error: BaseException) -> dict[str, Any]:
    """Build the task result for a failed checkout: a one-line reason and details."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return {"error": reason, "details": f"{type(error).__name__}: {error}"}

