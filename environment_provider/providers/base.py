"""The provider base class: the whole contract a provider type implements.

A provider type is a subclass of `Provider`. The environment provider
creates one instance per testrun, test suite and kind, then calls:

- `checkout(request)`: return between `request.minimum` and `request.maximum`
  items (dicts), or raise a ProviderError subclass. Call `request.record(item)`
  for each item as soon as it is checked out, so that a crashed worker's
  items can be released by the next attempt; items returned but not recorded
  are recorded after `checkout` returns. Stop waiting at `request.deadline`
  (a `time.monotonic()` value) with CheckoutTimeoutError, and name
  `request.deadline_source` in its message.
- `checkin(item)`: check one item in again, or raise CheckinError.
- `checkin_all(items)`: check in many; the default calls `checkin` for each
  and returns the failures instead of raising.
- `prepare(item)` (IUT providers only): make a checked-out IUT ready; return
  the item, or raise ProviderError to have it checked in and dropped.

`self.definition` is the inner provider definition (`id`, `type`, …),
`self.kind` the Kind, and `self.context` the ProviderContext.

Any other exception that a plug-in raises is reported as a ProviderError of
the stage it came from (`init`, `checkout`, `prepare`, `checkin`). Every
item gets `provider_id` set to this provider's id, and IUTs without
`identity` get the testrun's identity. More items than `request.maximum` are
checked in again at once, and fewer than `request.minimum` fail the checkout.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from packageurl import PackageURL

from ..errors import CheckinError, ProviderError
from ..keys import Kind
from ..settings import Settings

LOGGER = logging.getLogger(__name__)


@dataclass
class ProviderContext:
    """What a provider may know about the testrun it serves.

    `dataset` is this test suite's dataset (an object); `identity` the
    artifact's package URL string; `progress` sends one line to the user.
    """

    testrun_id: str
    settings: Settings
    dataset: dict[str, Any] = field(default_factory=dict)
    identity: str = ""
    artifact_id: str = ""
    context: str = ""
    tercc: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[str], None] = lambda message: None

    @functools.cached_property
    def identity_fields(self) -> dict[str, Any]:
        """The identity purl as an object (`type`, `namespace`, `name`, `version`, `qualifiers`, `subpath`)."""
        if not self.identity:
            return {}
        fields = PackageURL.from_string(self.identity).to_dict()
        fields["qualifiers"] = dict(fields.get("qualifiers") or {})
        return fields

    def identity_object(self) -> dict[str, Any]:
        return dict(self.identity_fields)

    def settings_environment(self) -> dict[str, str]:
        """Return the process environment variables the operator allowed rulesets to read."""
        return {name: os.environ[name] for name in self.settings.environment_allowlist if name in os.environ}


@dataclass
class CheckoutRequest:
    """One checkout call: how many items, until when, and extra dataset values.

    `values` contains what the rulesets see beyond the context, such as
    `test_runner`, `iut`, `environment_id` and `suite_id`. `deadline_source`
    names the timeout that set `deadline`, for error messages, for example
    "the 'iut' timeout of 60 s".
    """

    minimum: int
    maximum: int
    deadline: float
    values: dict[str, Any] = field(default_factory=dict)
    record: Callable[[dict[str, Any]], None] = lambda item: None
    deadline_source: str = "the timeout"
    # A provider whose peer allocates items later, after the checkout call returned an id, records a
    # placeholder for that request with `record_request` and removes it with `forget_request` once the
    # request has ended either way. A worker that dies in between leaves the placeholder, and the next
    # release passes it to `checkin` so the provider can collect and give back what the request allocated.
    record_request: Callable[[dict[str, Any]], None] = lambda placeholder: None
    forget_request: Callable[[], None] = lambda: None

    def seconds_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


def describe_item(item: dict[str, Any]) -> str:
    """Name an item for messages by its first identifying field, such as `serial='SN0001'`."""
    for key in ("id", "serial", "name", "identifier"):
        if key in item:
            return f"{key}={item[key]!r}"
    return "(unnamed)"


class Provider:
    """Base class of every provider type; see the module documentation for the contract."""

    def __init__(self, kind: Kind, definition: dict[str, Any], context: ProviderContext) -> None:
        self.kind = kind
        self.definition = definition
        self.context = context

    @property
    def reserves_items(self) -> bool:
        """Tell whether a checkout reserves something on a peer that a check-in must give back.

        When False (a static list, say), the environment provider may record
        the items of one checkout in batches. Defaults to True.
        """
        return True

    @property
    def id(self) -> str:
        return str(self.definition.get("id", "?"))

    def checkout(self, request: CheckoutRequest) -> list[dict[str, Any]]:
        raise NotImplementedError

    def checkin(self, item: dict[str, Any]) -> None:
        raise NotImplementedError

    def checkin_all(self, items: list[dict[str, Any]]) -> list[tuple[dict[str, Any], ProviderError]]:
        """Check in every item; return the (item, error) pairs that failed."""
        failures = []
        for item in items:
            try:
                self.checkin(item)
            except ProviderError as error:
                failures.append((item, error))
            except Exception as error:  # noqa: BLE001 - a plug-in may raise anything; report it per item
                LOGGER.exception("provider %r raised while checking in an item", self.id)
                failures.append((item, CheckinError(self.id, "checkin", f"{type(error).__name__}: {error}")))
        return failures

    def prepare(self, item: dict[str, Any]) -> dict[str, Any]:
        return item
