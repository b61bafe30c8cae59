"""A `file-pool` provider that raises RuntimeError in one stage, for tests of how plug-in failures are handled.

The definition field `fail_in` names the stage: `init`, `checkout` (after
every item was taken and recorded), `prepare` or `checkin`.
"""

from __future__ import annotations

from typing import Any

from environment_provider.keys import Kind
from environment_provider.providers import CheckoutRequest, ProviderContext

from . import FilePoolProvider


class FailingFilePoolProvider(FilePoolProvider):
    def __init__(self, kind: Kind, definition: dict[str, Any], context: ProviderContext) -> None:
        super().__init__(kind, definition, context)
        self.fail_in = definition.get("fail_in")
        self.fail_if("init")

    def fail_if(self, stage: str) -> None:
        if self.fail_in == stage:
            raise RuntimeError(f"the {stage} stage of {self.id!r} is broken on purpose")

    def checkout(self, request: CheckoutRequest) -> list[dict[str, Any]]:
        items = super().checkout(request)
        self.fail_if("checkout")
        return items

    def checkin(self, item: dict[str, Any]) -> None:
        self.fail_if("checkin")
        super().checkin(item)

    def prepare(self, item: dict[str, Any]) -> dict[str, Any]:
        self.fail_if("prepare")
        return super().prepare(item)
