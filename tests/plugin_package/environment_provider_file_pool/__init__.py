"""The `file-pool` provider type: IUTs, execution spaces or log areas from a pool kept in a JSON file.

An example plug-in for the ETOS environment provider. The pool file (the
definition's `pool_file`) contains `{"free": [item, ...], "held": {name: item}}`,
where every item is an object with a unique `name`. A checkout moves items
from `free` to `held` and a check-in moves them back, both under an exclusive
lock on `<pool_file>.lock`, so that the workers of one host can share a pool.
"""

from __future__ import annotations

import fcntl
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from environment_provider.errors import CheckinError, CheckoutTimeoutError, NoItemsError
from environment_provider.keys import Kind
from environment_provider.providers import CheckoutRequest, Provider, ProviderContext

FIRST_BACKOFF = 0.05
MAX_BACKOFF = 0.5


@contextmanager
def locked_pool(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the pool read from `path` under an exclusive lock; write it back unless the block raised."""
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        pool = json.loads(path.read_text())
        yield pool
        path.write_text(json.dumps(pool))


class FilePoolProvider(Provider):
    """Hand out items from a JSON pool file; the module documentation describes the file."""

    def __init__(self, kind: Kind, definition: dict[str, Any], context: ProviderContext) -> None:
        super().__init__(kind, definition, context)
        self.pool_file = Path(definition["pool_file"])

    def take(self, request: CheckoutRequest) -> list[dict[str, Any]]:
        """Move up to `request.maximum` free items to `held`; take none while fewer than the minimum are free."""
        with locked_pool(self.pool_file) as pool:
            size = len(pool["free"]) + len(pool["held"])
            if size < request.minimum:
                raise NoItemsError(
                    self.id,
                    "checkout",
                    f"the pool {self.pool_file} has {size} {self.kind.label}s in all but {request.minimum} are needed",
                )
            if len(pool["free"]) < request.minimum:
                return []
            taken = pool["free"][: request.maximum]
            pool["free"] = pool["free"][request.maximum :]
            for item in taken:
                pool["held"][item["name"]] = item
            return taken

    def checkout(self, request: CheckoutRequest) -> list[dict[str, Any]]:
        """Take items from the pool, waiting with backoff while too few are free, until the deadline."""
        delay = FIRST_BACKOFF
        while True:
            items = self.take(request)
            if items:
                for item in items:
                    request.record(item)
                return items

            remaining = request.deadline - time.monotonic()
            if remaining <= 0:
                raise CheckoutTimeoutError(
                    self.id,
                    "checkout",
                    f"fewer than {request.minimum} {self.kind.label}s were free in {self.pool_file} "
                    f"when {request.deadline_source} ran out",
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, MAX_BACKOFF)

    def checkin(self, item: dict[str, Any]) -> None:
        """Move the item back to `free`; raise CheckinError when the pool does not hold it."""
        with locked_pool(self.pool_file) as pool:
            held = pool["held"].pop(str(item.get("name")), None)
            if held is None:
                raise CheckinError(
                    self.id, "checkin", f"{self.kind.label} {item.get('name')!r} is not held in {self.pool_file}"
                )
            pool["free"].append(held)

    def prepare(self, item: dict[str, Any]) -> dict[str, Any]:
        """Mark an IUT as prepared; a real plug-in would flash or reset the device here."""
        return {**item, "prepared": True}
