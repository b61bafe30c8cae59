"""The `external` provider type: a provider service reached over HTTP.

Protocol, per request with header `X-ETOS-ID: <testrun id>`:

- start: `POST {start.host}` with a JSON body (`minimum_amount`,
  `maximum_amount`, `identity`, `artifact_id`, `tercc`, `dataset`, `context`;
  execution spaces add `test_runner` and `environment`) returns `{"id": ...}`.
- status: `GET {status.host}?id=<id>` returns `{"status": "PENDING" | "DONE" |
  "FAILED", "description": ..., "<iuts|execution_spaces|log_areas>": [...]}`,
  polled until DONE, FAILED or the deadline.
- stop: `POST {stop.host}` with a JSON list of items returns 204, or a JSON
  body whose `error` says why they could not be checked in.

Connection errors and 429/503 responses are retried with backoff until the
deadline; other error responses fail at once. Each attempt has a timeout of
ENVIRONMENT_PROVIDER_REQUEST_TIMEOUT seconds at most, and a stop call is
retried for that long too.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import httpx

from ..errors import CheckinError, CheckoutTimeoutError, NoItemsError, ProviderError
from .base import CheckoutRequest, Provider
from .rulesets import check_allowed

LOGGER = logging.getLogger(__name__)
RETRY_STATUSES = (429, 503)
# Key of the placeholder item that stands for a started request until its items are collected.
PENDING_REQUEST = "external_request_id"
FIRST_BACKOFF = 0.05
MAX_BACKOFF = 2.0
MIN_ATTEMPT_TIMEOUT = 0.1


class RetryableError(Exception):
    """One attempt failed in a way that may pass: connection error, 429 or 503."""


class RetriesExhaustedError(Exception):
    """Every attempt of one call failed with a retryable error until the deadline."""


class ExternalProvider(Provider):
    """A provider that delegates to an HTTP service implementing the start, status and stop endpoints."""

    def _url(self, endpoint: str) -> str:
        url = self.definition[endpoint]["host"]
        check_allowed(url, self.context.settings.request_allowed_hosts)
        return url

    def _send(
        self, stage: str, method: str, deadline: float, deadline_source: str, **kwargs: Any
    ) -> httpx.Response:
        """Send one request, retrying connection errors and 429/503 responses until `deadline`.

        Raises RetriesExhaustedError, naming `deadline_source`, when no
        attempt succeeded before the deadline.
        """
        try:
            url = self._url(stage)
        except ValueError as error:
            raise ProviderError(self.id, stage, str(error)) from None
        headers = {"X-ETOS-ID": self.context.testrun_id}
        delay = FIRST_BACKOFF
        reported = False
        while True:
            remaining = deadline - time.monotonic()
            attempt_timeout = max(min(self.context.settings.request_timeout, remaining), MIN_ATTEMPT_TIMEOUT)
            try:
                response = httpx.request(method, url, headers=headers, timeout=attempt_timeout, **kwargs)
                if response.status_code in RETRY_STATUSES:
                    raise RetryableError(f"HTTP {response.status_code}")
                return response
            except (httpx.TransportError, RetryableError) as error:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RetriesExhaustedError(f"{method} {url} still failed when {deadline_source} ran out: {error}")
                LOGGER.info(
                    "testrun %s: provider %r %s %s failed (%s); retrying in %.2f s",
                    self.context.testrun_id, self.id, method, url, error, min(delay, remaining),
                )
                if not reported:
                    # Users watching the checkout would otherwise see nothing until the deadline.
                    self.context.progress(
                        f"provider {self.id!r} {stage} endpoint {url} failed ({error}); retrying until {deadline_source} runs out"
                    )
                    reported = True
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, MAX_BACKOFF)

    def _json(self, stage: str, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise ProviderError(self.id, stage, f"HTTP {response.status_code}: {response.text[:200]!r}")
        try:
            return response.json()
        except json.JSONDecodeError:
            raise ProviderError(self.id, stage, f"the response is not JSON: {response.text[:200]!r}") from None

    def start_body(self, request: CheckoutRequest) -> dict[str, Any]:
        context = self.context
        body = {
            "minimum_amount": request.minimum,
            "maximum_amount": request.maximum,
            "identity": context.identity,
            "artifact_id": context.artifact_id,
            "tercc": context.tercc,
            "dataset": context.dataset,
            "context": context.context,
        }
        if self.kind.key == "execution-space":
            body["test_runner"] = request.values.get("test_runner")
            body["environment"] = {
                key: request.values[key] for key in ("environment_id", "suite_id", "sub_suite_key") if key in request.values
            }
        return body

    def checkout(self, request: CheckoutRequest) -> list[dict[str, Any]]:
        """Start a request, poll its status until DONE, and return the items within the requested amounts.

        Items beyond `request.maximum` are stopped at once. With fewer than
        `request.minimum` items, all received items are stopped and
        NoItemsError is raised. Only the items kept are recorded.
        """
        started = self._json("start", self._send_in_checkout("start", "POST", request, json=self.start_body(request)))
        request_id = started.get("id") if isinstance(started, dict) else None
        if isinstance(request_id, bool) or not isinstance(request_id, (str, int)) or request_id == "":
            raise ProviderError(self.id, "start", f"the response has no 'id': {started!r}"[:300])
        LOGGER.info("testrun %s: provider %r started request %s", self.context.testrun_id, self.id, request_id)

        request.record_request({PENDING_REQUEST: str(request_id), "provider_id": self.id})
        try:
            return self._collect(str(request_id), request)
        finally:
            request.forget_request()

    def _collect(self, request_id: str, request: CheckoutRequest) -> list[dict[str, Any]]:
        """Wait for a started request; keep and record up to the maximum and stop the rest."""
        items = [dict(item, provider_id=self.id) for item in self._wait_until_done(request_id, request)]
        if len(items) < request.minimum:
            self._stop_quietly(items)
            raise NoItemsError(
                self.id,
                "status",
                f"request {request_id} returned {len(items)} {self.kind.label}s but at least {request.minimum} "
                "are needed; the items received were sent to stop",
            )

        kept, extra = items[: request.maximum], items[request.maximum :]
        for item in kept:
            request.record(item)
        if extra:
            self.context.progress(
                f"provider {self.id!r} returned {len(extra)} more {self.kind.label}s than requested; stopping them"
            )
            self._stop_quietly(extra)
        return kept

    def _send_in_checkout(self, stage: str, method: str, request: CheckoutRequest, **kwargs: Any) -> httpx.Response:
        try:
            return self._send(stage, method, request.deadline, request.deadline_source, **kwargs)
        except RetriesExhaustedError as error:
            raise CheckoutTimeoutError(self.id, stage, str(error)) from None

    def _wait_until_done(self, request_id: str, request: CheckoutRequest) -> list[dict[str, Any]]:
        """Poll the status endpoint with backoff until DONE; return the items of the DONE response."""
        delay = FIRST_BACKOFF
        reported_wait = False
        while True:
            response = self._send_in_checkout("status", "GET", request, params={"id": request_id})
            status = self._json("status", response)
            if not isinstance(status, dict):
                raise ProviderError(self.id, "status", f"the response is not an object: {status!r}"[:300])
            state = status.get("status")
            description = status.get("description") or "no description"
            if state == "DONE":
                items = status.get(self.kind.external_key)
                if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
                    raise ProviderError(
                        self.id, "status", f"DONE without a list of objects in {self.kind.external_key!r}"
                    )
                return items
            if state == "FAILED":
                raise ProviderError(self.id, "status", f"request {request_id} FAILED: {description}")
            if state != "PENDING":
                raise ProviderError(self.id, "status", f"unknown status {state!r}; expected PENDING, DONE or FAILED")

            remaining = request.deadline - time.monotonic()
            if remaining <= 0:
                raise CheckoutTimeoutError(
                    self.id,
                    "status",
                    f"{self.kind.label} request {request_id} was still PENDING when {request.deadline_source} "
                    f"ran out: {description}",
                )
            if not reported_wait:
                self.context.progress(f"waiting for provider {self.id!r}: {description}")
                reported_wait = True
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, MAX_BACKOFF)

    def _stop(self, items: list[dict[str, Any]]) -> None:
        """Send the items to the stop endpoint; raise CheckinError when the service does not confirm."""
        if not items:
            return
        timeout = self.context.settings.request_timeout
        deadline = time.monotonic() + timeout
        try:
            response = self._send("stop", "POST", deadline, f"the stop timeout of {timeout:g} s", json=items)
        except RetriesExhaustedError as error:
            raise CheckinError(self.id, "stop", str(error)) from None
        if response.status_code >= 400:
            raise CheckinError(self.id, "stop", f"HTTP {response.status_code}: {response.text[:200]!r}")
        if response.status_code != 204 and response.content:
            try:
                body = response.json()
            except json.JSONDecodeError:
                body = None
            if isinstance(body, dict) and body.get("error"):
                raise CheckinError(self.id, "stop", str(body["error"]))

    def _stop_quietly(self, items: list[dict[str, Any]]) -> None:
        """Stop items the checkout does not keep; a failure is logged and shown, since no key records them."""
        try:
            self._stop(items)
        except ProviderError as error:
            # NOTE: these items are not recorded in etcd, so no later release can stop them.
            LOGGER.error("testrun %s: %d unused %ss were not stopped: %s", self.context.testrun_id, len(items), self.kind.label, error)
            self.context.progress(f"could not stop {len(items)} unused {self.kind.label}s: {error}")

    def checkin(self, item: dict[str, Any]) -> None:
        if PENDING_REQUEST in item:
            self._stop_abandoned(item)
        else:
            self._stop([item])

    def checkin_all(self, items: list[dict[str, Any]]) -> list[tuple[dict[str, Any], ProviderError]]:
        failures: list[tuple[dict[str, Any], ProviderError]] = []
        placeholders = [item for item in items if PENDING_REQUEST in item]
        for placeholder in placeholders:
            try:
                self._stop_abandoned(placeholder)
            except ProviderError as error:
                failures.append((placeholder, error))
        real = [item for item in items if PENDING_REQUEST not in item]
        try:
            self._stop(real)
        except ProviderError as error:
            failures += [(item, error) for item in real]
        return failures

    def _stop_abandoned(self, placeholder: dict[str, Any]) -> None:
        """Stop what a request allocated for a checkout attempt whose worker died before it was collected.

        Raises CheckinError while the request is still PENDING, so that its
        key is kept and a later release tries again.
        """
        request_id = placeholder[PENDING_REQUEST]
        timeout = self.context.settings.request_timeout
        deadline = time.monotonic() + timeout
        delay = FIRST_BACKOFF
        while True:
            try:
                response = self._send("status", "GET", deadline, f"the status timeout of {timeout:g} s", params={"id": request_id})
            except RetriesExhaustedError as error:
                raise CheckinError(self.id, "status", str(error)) from None
            status = self._json("status", response)
            state = status.get("status") if isinstance(status, dict) else None
            if state != "PENDING":
                break
            if time.monotonic() + delay >= deadline:
                raise CheckinError(
                    self.id, "status", f"request {request_id} of an abandoned checkout is still PENDING; release again later"
                )
            time.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)
        if state == "DONE":
            items = status.get(self.kind.external_key)
            if isinstance(items, list) and items:
                self._stop([dict(item) for item in items if isinstance(item, dict)])
        LOGGER.info("testrun %s: provider %r request %s of an abandoned checkout ended %s", self.context.testrun_id, self.id, request_id, state)
