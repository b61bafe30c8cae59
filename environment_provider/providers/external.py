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

Connection errors and 429/503 answers are retried with backoff until the
deadline; other error answers fail at once.
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
MAX_BACKOFF = 2.0
REQUEST_TIMEOUT = 10.0
CHECKIN_TIMEOUT = 30.0


class RetryableError(Exception):
    """One attempt failed in a way that may pass: connection error, 429 or 503."""


class ExternalProvider(Provider):
    """A provider that delegates to an HTTP service implementing the start, status and stop endpoints."""

    def _url(self, endpoint: str) -> str:
        url = self.definition[endpoint]["host"]
        check_allowed(url, self.context.settings.request_allowed_hosts)
        return url

    def _send(self, stage: str, method: str, deadline: float, **kwargs: Any) -> httpx.Response:
        """Send one request, retrying connection errors and 429/503 answers until `deadline`."""
        try:
            url = self._url(stage)
        except ValueError as error:
            raise ProviderError(self.id, stage, str(error)) from None
        headers = {"X-ETOS-ID": self.context.testrun_id}
        delay = 0.05
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise RetryableError("no time left")
                response = httpx.request(
                    method, url, headers=headers, timeout=min(REQUEST_TIMEOUT, max(remaining, 0.1)), **kwargs
                )
                if response.status_code in RETRY_STATUSES:
                    raise RetryableError(f"HTTP {response.status_code}")
                return response
            except (httpx.TransportError, RetryableError) as error:
                if time.monotonic() + delay >= deadline:
                    raise CheckoutTimeoutError(
                        self.id, stage, f"{method} {url} did not succeed before the timeout: {error}"
                    ) from None
                LOGGER.info("provider %r %s %s: %s; retrying in %.2f s", self.id, method, url, error, delay)
                time.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)

    def _json(self, stage: str, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise ProviderError(self.id, stage, f"HTTP {response.status_code}: {response.text[:200]!r}")
        try:
            return response.json()
        except json.JSONDecodeError:
            raise ProviderError(self.id, stage, f"the answer is not JSON: {response.text[:200]!r}") from None

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
        started = self._json("start", self._send("start", "POST", request.deadline, json=self.start_body(request)))
        request_id = started.get("id") if isinstance(started, dict) else None
        if not isinstance(request_id, (str, int)) or request_id == "":
            raise ProviderError(self.id, "start", f"the answer has no 'id': {started!r}"[:300])

        items = self._wait_until_done(str(request_id), request)
        items = [dict(item, provider_id=self.id) for item in items]
        for item in items:
            request.record(item)

        if len(items) > request.maximum:
            extra, items = items[request.maximum :], items[: request.maximum]
            self.context.progress(f"provider {self.id!r} returned {len(extra)} more {self.kind.label}s than asked for; checking them in")
            self._stop_quietly(extra)
        if len(items) < request.minimum:
            self._stop_quietly(items)
            raise NoItemsError(
                self.id, "status", f"returned {len(items)} {self.kind.label}s but at least {request.minimum} are needed"
            )
        return items

    def _wait_until_done(self, request_id: str, request: CheckoutRequest) -> list[dict[str, Any]]:
        delay = 0.05
        while True:
            status = self._json("status", self._send("status", "GET", request.deadline, params={"id": request_id}))
            if not isinstance(status, dict):
                raise ProviderError(self.id, "status", f"the answer is not an object: {status!r}"[:300])
            state = status.get("status")
            if state == "DONE":
                items = status.get(self.kind.external_key)
                if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
                    raise ProviderError(
                        self.id, "status", f"DONE without a list of objects in {self.kind.external_key!r}"
                    )
                return items
            if state == "FAILED":
                raise ProviderError(self.id, "status", f"FAILED: {status.get('description') or 'no description'}")
            if state != "PENDING":
                raise ProviderError(self.id, "status", f"unknown status {state!r}; expected PENDING, DONE or FAILED")
            if time.monotonic() + delay >= request.deadline:
                raise CheckoutTimeoutError(
                    self.id, "status", f"still PENDING at the timeout: {status.get('description') or 'no description'}"
                )
            time.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)

    def _stop(self, items: list[dict[str, Any]]) -> None:
        if not items:
            return
        deadline = time.monotonic() + CHECKIN_TIMEOUT
        try:
            response = self._send("stop", "POST", deadline, json=items)
        except CheckoutTimeoutError as error:
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
        try:
            self._stop(items)
        except ProviderError as error:
            LOGGER.error("testrun %s: %s", self.context.testrun_id, error)

    def checkin(self, item: dict[str, Any]) -> None:
        self._stop([item])

    def checkin_all(self, items: list[dict[str, Any]]) -> list[tuple[dict[str, Any], ProviderError]]:
        try:
            self._stop(items)
        except ProviderError as error:
            return [(item, error) for item in items]
        return []
