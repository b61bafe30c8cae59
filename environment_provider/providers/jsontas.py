"""The `jsontas` provider type: list, checkout, checkin and prepare stages written as JSONTas rulesets."""

from __future__ import annotations

import logging
import time
from typing import Any

from ..errors import CheckinError, CheckoutTimeoutError, NoItemsError, ProviderError
from .base import CheckoutRequest, Provider, describe_item
from .rulesets import RulesetError, evaluate

LOGGER = logging.getLogger(__name__)
FIRST_BACKOFF = 0.05
MAX_BACKOFF = 2.0


def is_response(result: Any) -> bool:
    """Tell whether `result` is the object a `$request` returns."""
    return isinstance(result, dict) and "status_code" in result and "ok" in result and "json" in result


def failed_response(result: Any) -> bool:
    """Tell whether `result` is a `$request` response with an HTTP error status."""
    return is_response(result) and result["ok"] is False


def describe_result(result: Any) -> str:
    """Describe a failed stage result for messages: the status and body of a response, or the value."""
    if is_response(result):
        return f"HTTP {result['status_code']} from {result['url']}: {str(result['content'])[:200]!r}"
    return repr(result)[:200]


def response_body(result: Any) -> Any:
    """Return the JSON body of a `$request` response, and any other result unchanged."""
    return result["json"] if is_response(result) else result


class JsontasProvider(Provider):
    """A provider whose stages are JSONTas rulesets in its definition."""

    def values(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Build the dataset a ruleset sees: the testrun's values, then `extra`."""
        context = self.context
        values: dict[str, Any] = {}
        values.update(context.settings_environment())
        values.update(context.dataset)
        values.update(
            {
                "dataset": context.dataset,
                "identity": context.identity_object(),
                "artifact_id": context.artifact_id,
                "context": context.context,
                "tercc": context.tercc,
                "testrun_id": context.testrun_id,
            }
        )
        values.update(extra)
        return values

    @property
    def reserves_items(self) -> bool:
        return "checkout" in self.definition or "checkin" in self.definition

    def run_stage(self, stage: str, ruleset: Any, extra: dict[str, Any], this: Any = None) -> Any:
        try:
            return evaluate(ruleset, self.values(extra), self.context.settings, this)
        except RulesetError as error:
            raise ProviderError(self.id, stage, str(error)) from None

    def list(self, amount: int, extra: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        """Evaluate the `list` stage; return the possible and the available items.

        `possible` is evaluated first and `available` then sees it as `$this.possible`.
        A `$request` response stands for its JSON body, so `"possible": {"$request": ...}`
        lists what a management system returns.
        """
        stage = self.definition["list"]
        values = {**extra, "amount": amount}
        possible = self.list_part("possible", self.run_stage("list", stage["possible"], values))
        if stage["available"] == "$this.possible":
            return possible, possible
        available = self.run_stage("list", stage["available"], values, this={"possible": possible})
        return possible, self.list_part("available", available)

    def list_part(self, name: str, value: Any) -> list[Any]:
        if failed_response(value):
            raise ProviderError(self.id, "list", f"'{name}' got {describe_result(value)}")
        value = response_body(value)
        if not isinstance(value, list):
            raise ProviderError(
                self.id, "list", f"'{name}' evaluated to {type(value).__name__}, not a list; check the ruleset"
            )
        return value

    def checkout(self, request: CheckoutRequest) -> list[dict[str, Any]]:
        """List and check out items until at least `request.minimum` are held or the deadline passes.

        Between attempts the wait grows from 0.05 s to 2 s, and the last
        attempt is made at the deadline.
        """
        delay = FIRST_BACKOFF
        reported_wait = False
        # The first checkout-stage failures are kept for the timeout message: by the last listing the
        # items that failed may no longer be available, and the message would give no reason at all.
        first_failures: list[str] = []
        while True:
            possible, available = self.list(request.maximum, request.values)
            if not possible:
                raise NoItemsError(
                    self.id, "list", f"no possible {self.kind.label}s for this testrun; check the provider's list stage and the dataset"
                )
            if len(possible) < request.minimum:
                raise NoItemsError(
                    self.id,
                    "list",
                    f"only {len(possible)} possible {self.kind.label}s but {request.minimum} are needed",
                )

            failures: list[str] = []
            if len(available) >= request.minimum:
                items = self._checkout_items(available, request, failures)
                if failures and not first_failures:
                    first_failures = failures[:3]
                    for failure in first_failures:
                        self.context.progress(f"checkout stage of provider {self.id!r} failed: {failure}")
                if len(items) >= request.minimum:
                    return items
                for _, error in self.checkin_all(items):
                    LOGGER.warning("testrun %s: %s", self.context.testrun_id, error)

            remaining = request.deadline - time.monotonic()
            if remaining <= 0:
                shown = failures[:3] or first_failures
                reasons = f"; checkout-stage failures: {'; '.join(shown)}" if shown else ""
                raise CheckoutTimeoutError(
                    self.id,
                    "checkout",
                    f"timed out waiting for {request.minimum} available {self.kind.label}s "
                    f"({len(available)} of {len(possible)} available) when {request.deadline_source} ran out{reasons}",
                )
            if not reported_wait:
                self.context.progress(
                    f"waiting for {request.minimum} available {self.kind.label}s from provider {self.id!r} "
                    f"({len(available)} of {len(possible)} available)"
                )
                reported_wait = True
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, MAX_BACKOFF)

    def _checkout_items(
        self, available: list[Any], request: CheckoutRequest, failures: list[str]
    ) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        stage = self.definition.get("checkout")
        for candidate in available:
            if len(items) >= request.maximum:
                break
            if not isinstance(candidate, dict):
                failures.append(f"listed item {candidate!r} is not an object")
                continue
            item = dict(candidate)
            if stage is not None:
                try:
                    result = self.run_stage("checkout", stage, {**request.values, self.kind.dataset_key: item})
                except ProviderError as error:
                    failures.append(str(error))
                    continue
                if not isinstance(result, dict) or failed_response(result):
                    failures.append(f"{self.kind.label} {describe_item(item)}: {describe_result(result)}")
                    continue
                # A `$request` response stands for its JSON body; headers and status are not item fields.
                if is_response(result):
                    result = result["json"] if isinstance(result["json"], dict) else {}
                item.update(result)
            item["provider_id"] = self.id
            if self.kind.key == "iut" and "identity" not in item and self.context.identity:
                item["identity"] = self.context.identity
            request.record(item)
            items.append(item)
        return items

    def checkin(self, item: dict[str, Any]) -> None:
        stage = self.definition.get("checkin")
        if stage is None:
            return
        try:
            result = self.run_stage("checkin", stage, {self.kind.dataset_key: item})
        except ProviderError as error:
            raise CheckinError(self.id, "checkin", f"{describe_item(item)}: {error}") from None
        if not result or failed_response(result):
            raise CheckinError(self.id, "checkin", f"{describe_item(item)}: the ruleset returned {describe_result(result)}")

    def prepare_steps(self) -> dict[str, Any]:
        """Return the `prepare.stages.environment_provider.steps` mapping of step name to ruleset, in order."""
        prepare = self.definition.get("prepare") or {}
        stage = (prepare.get("stages") or {}).get("environment_provider") or {}
        return stage.get("steps") or {}

    def prepare(self, item: dict[str, Any]) -> dict[str, Any]:
        """Run the prepare steps in order. A falsy result or an HTTP error status fails the IUT.

        Later steps see earlier results as `$steps.<name>`. A `$request`
        result is stored as its JSON body, so `$steps.flash.version` reads the
        body of the `flash` step's response.
        """
        results: dict[str, Any] = {}
        for name, ruleset in self.prepare_steps().items():
            stage = f"prepare step {name!r}"
            result = self.run_stage(stage, ruleset, {self.kind.dataset_key: item, "steps": results})
            if not result or failed_response(result):
                raise ProviderError(self.id, stage, f"IUT {describe_item(item)}: the step returned {describe_result(result)}")
            results[name] = response_body(result)
        return item
