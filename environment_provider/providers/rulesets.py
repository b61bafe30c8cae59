"""JSONTas ruleset evaluation with the environment provider's data structures.

Rulesets run in a fresh `jsontas` dataset per evaluation. Beyond JSONTas'
own data structures they get `$json_dumps`, `$uuid_generate`, `$join`,
`$execution_space_instructions`, and a `$request` that uses httpx with an
explicit timeout, retries connection errors with short backoff, and honours
the operator's host allowlist. Lookups of names that start with `_` are
blocked, so a ruleset cannot walk from a value into Python internals.

JSONTas swallows exceptions raised inside data structures: it logs them and
leaves the `$key` in place. So the data structures here also record their
errors on the dataset, and `evaluate` raises RulesetError when any did.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import httpx
from jsontas.data_structures.datastructure import DataStructure
from jsontas.dataset import Dataset
from jsontas.jsontas import JsonTas

from ..settings import Settings

LOGGER = logging.getLogger(__name__)
ERRORS_KEY = "__environment_provider_errors__"
SETTINGS_KEY = "__environment_provider_settings__"
WRAPPED_VALUE = "__value__"

# JSONTas logs every lookup at debug level and each swallowed exception with a traceback at warning
# level; the errors are reported through RulesetError instead.
logging.getLogger("JSONTas").setLevel(logging.WARNING)
logging.getLogger("Dataset").setLevel(logging.CRITICAL)
# httpx logs each request URL, query string included, at INFO; a ruleset may put a token there.
logging.getLogger("httpx").setLevel(logging.WARNING)


class RulesetError(ValueError):
    """A data structure inside a ruleset failed; the message lists each failure."""


class RulesetDataset(Dataset):
    """A jsontas Dataset that refuses names starting with `_` (no `__class__`, `__globals__` walks)."""

    def get_or_getattr(self, datasubset: Any, key: str) -> Any:
        if key.startswith("_"):
            return None
        if not isinstance(datasubset, (dict, list, tuple, set)) and not hasattr(datasubset, "get"):
            # Plain values (strings, numbers) have no members a ruleset may read.
            return None
        return super().get_or_getattr(datasubset, key)

    def lookup(self, query_string: str, parameters: Any) -> tuple[Any, Any]:
        # JSONTas passes a data structure's parameters as keyword arguments, which fails for
        # `{"$json_dumps": [1, 2]}` or `{"$json_dumps": "text"}`; wrap such values instead.
        if query_string[1:] in DATA_STRUCTURES and not isinstance(parameters, dict):
            parameters = {WRAPPED_VALUE: parameters}
        return super().lookup(query_string, parameters)


class RecordedDataStructure(DataStructure):
    """Base for the data structures here: record a failure on the dataset before JSONTas hides it."""

    def execute(self) -> tuple[Any, Any]:
        try:
            return self.run()
        except Exception as error:  # noqa: BLE001 - recorded here, raised again by evaluate()
            errors = self.dataset.get(ERRORS_KEY)
            if errors is not None:
                errors.append(f"${self.jsonkey}: {error}")
            raise

    def run(self) -> tuple[Any, Any]:
        raise NotImplementedError


class JsonDumps(RecordedDataStructure):
    """`{"$json_dumps": value}`: the value as a compact JSON string."""

    def run(self) -> tuple[Any, Any]:
        value = self.data[WRAPPED_VALUE] if WRAPPED_VALUE in self.data else self.data
        return None, json.dumps(value, separators=(",", ":"))


class UuidGenerate(RecordedDataStructure):
    """`"$uuid_generate"`: a new random UUID string."""

    def run(self) -> tuple[Any, Any]:
        return None, str(uuid.uuid4())


class Join(RecordedDataStructure):
    """`{"$join": {"strings": [...], "separator": ""}}`: the strings joined."""

    def run(self) -> tuple[Any, Any]:
        strings = self.data.get("strings")
        if not isinstance(strings, list):
            raise ValueError("$join needs 'strings', a list")
        separator = self.data.get("separator", "")
        return None, str(separator).join(str(part) for part in strings)


class ExecutionSpaceInstructions(RecordedDataStructure):
    """`{"$execution_space_instructions": {"environment", "parameters", "image"}}`.

    Returns the default instructions for starting a test runner for the
    current sub-suite, with the given `environment` and `parameters` merged
    in and `image` replacing the test runner image when set.
    """

    def run(self) -> tuple[Any, Any]:
        testrun_id = self.dataset.get("testrun_id")
        environment = {
            "TESTRUN_ID": testrun_id,
            "SUITE_ID": testrun_id,
            "TEST_SUITE_STARTED_ID": self.dataset.get("suite_id"),
            "ENVIRONMENT_ID": self.dataset.get("environment_id"),
            "SUB_SUITE_KEY": self.dataset.get("sub_suite_key"),
        }
        environment = {key: value for key, value in environment.items() if value is not None}
        environment.update(self.data.get("environment") or {})
        instructions = {
            "image": self.data.get("image") or self.dataset.get("test_runner"),
            "identifier": str(uuid.uuid4()),
            "environment": environment,
            "parameters": dict(self.data.get("parameters") or {}),
        }
        return None, instructions


def check_allowed(url: str, allowed_hosts: tuple[str, ...]) -> None:
    """Raise ValueError unless `url` is http(s) and its host (or host:port) is allowed."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"URL {url!r} is not an absolute http or https URL")
    if not allowed_hosts or "*" in allowed_hosts:
        return
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if host not in allowed_hosts and f"{host}:{port}" not in allowed_hosts:
        raise ValueError(
            f"host {host}:{port} of URL {url!r} is not in ENVIRONMENT_PROVIDER_REQUEST_ALLOWED_HOSTS; "
            "ask the operator to add it"
        )


class Request(RecordedDataStructure):
    """`{"$request": {"url", "method", "json", "data", "params", "headers", "auth", "timeout"}}`.

    Sends one HTTP request and returns the response as a JSON object
    (`status_code`, `reason`, `ok`, `headers`, `content`, `json`, `url`),
    also stored as `$response`. The testrun id goes along as header
    `X-ETOS-ID` unless the ruleset sets it. Connection errors are retried with backoff
    until `timeout` seconds (default ENVIRONMENT_PROVIDER_REQUEST_TIMEOUT)
    have passed; then the request fails.
    """

    def run(self) -> tuple[Any, Any]:
        settings: Settings = self.dataset.get(SETTINGS_KEY) or Settings()
        url = self.data.get("url")
        method = str(self.data.get("method", "GET")).upper()
        if not isinstance(url, str):
            raise ValueError("$request needs 'url', a string")
        check_allowed(url, settings.request_allowed_hosts)
        timeout = float(self.data.get("timeout") or settings.request_timeout)

        auth = None
        if isinstance(self.data.get("auth"), dict):
            credentials = self.data["auth"]
            username, password = credentials.get("username", ""), credentials.get("password", "")
            auth = (
                httpx.DigestAuth(username, password)
                if str(credentials.get("type", "basic")).lower() == "digest"
                else httpx.BasicAuth(username, password)
            )

        headers = dict(self.data.get("headers") or {})
        if self.dataset.get("testrun_id") and not any(name.lower() == "x-etos-id" for name in headers):
            headers["X-ETOS-ID"] = str(self.dataset.get("testrun_id"))
        response = self._send(method, url, timeout, auth, headers)
        data = {
            "status_code": response.status_code,
            "reason": response.reason_phrase,
            "ok": response.is_success,
            "headers": dict(response.headers),
            "content": response.text,
            "encoding": response.encoding,
            "url": str(response.url),
            "json": None,
        }
        if response.headers.get("content-type", "").split(";")[0].strip() == "application/json":
            try:
                data["json"] = response.json()
            except ValueError:
                LOGGER.info("response from %s says JSON but does not parse", url)
        self.dataset.add("response", data)
        return None, data

    def _send(self, method: str, url: str, timeout: float, auth: Any, headers: dict[str, Any]) -> httpx.Response:
        """Send the request; retry connection errors and 429/503 responses with backoff until `timeout` passes.

        When the time is up, a 429 or 503 response is returned for the ruleset to judge.
        """
        deadline = time.monotonic() + timeout
        delay = 0.05
        shown = masked_url(url)
        while True:
            try:
                response = httpx.request(
                    method,
                    url,
                    json=self.data.get("json"),
                    data=self.data.get("data") if isinstance(self.data.get("data"), (dict, str)) else None,
                    params=self.data.get("params"),
                    headers=headers,
                    auth=auth,
                    timeout=max(0.1, min(timeout, deadline - time.monotonic())),
                )
                if response.status_code not in RETRY_STATUSES or time.monotonic() + delay >= deadline:
                    return response
                reason = f"HTTP {response.status_code}"
            except (httpx.ConnectError, httpx.RemoteProtocolError) as error:
                if time.monotonic() + delay >= deadline:
                    raise ValueError(f"{method} {shown} failed: {masked_text(str(error), url)}") from None
                reason = masked_text(str(error), url)
            except httpx.TimeoutException:
                raise ValueError(f"{method} {shown} timed out after {timeout:g} s") from None
            except httpx.HTTPError as error:
                raise ValueError(f"{method} {shown} failed: {masked_text(str(error), url)}") from None
            LOGGER.info("%s %s failed (%s); retrying in %.2f s", method, shown, reason, delay)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


RETRY_STATUSES = (429, 503)


def masked_url(url: str) -> str:
    """Return `url` with the password of its user information replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def masked_text(text: str, url: str) -> str:
    """Remove the password of `url` from `text`, such as an httpx error message that quotes the URL."""
    password = urlsplit(url).password
    return text.replace(password, "***") if password else text


DATA_STRUCTURES = {
    "json_dumps": JsonDumps,
    "uuid_generate": UuidGenerate,
    "join": Join,
    "execution_space_instructions": ExecutionSpaceInstructions,
    "request": Request,
}


def to_json_value(value: Any) -> Any:
    """Return a JSON-only deep copy of `value`; raise RulesetError for values JSON cannot hold."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as error:
        raise RulesetError(f"the ruleset produced a value that is not JSON: {error}") from None


def evaluate(ruleset: Any, values: dict[str, Any], settings: Settings, this: Any = None) -> Any:
    """Evaluate one ruleset against `values`; return the JSON result or raise RulesetError.

    `$this` is the document being evaluated, unless `this` gives another value.
    """
    dataset = RulesetDataset()
    dataset.merge(values)
    dataset.merge(DATA_STRUCTURES)
    errors: list[str] = []
    dataset.add(ERRORS_KEY, errors)
    dataset.add(SETTINGS_KEY, settings)

    document = copy.deepcopy(ruleset)
    dataset.add("this", document if this is None else this)
    # JSONTas starts a top-level list's query tree as an empty dict and then indexes it; give it the list.
    query_tree = copy.deepcopy(document) if isinstance(document, list) else None
    result = JsonTas(dataset).resolve(document, query_tree)
    if errors:
        raise RulesetError("; ".join(errors))
    return to_json_value(result)
