"""A lease-backed claim on a testrun, so that one task attempt at a time works on it.

With a Redis broker, a task that runs longer than the visibility timeout is
delivered to a second worker while the first still works, and a worker that
dies has its task delivered again. The attempt that works on a testrun holds
`/testrun/{testrun}/environment-provider/claim` on a short lease of its own,
refreshed while it runs. A second attempt waits while the claim is alive.
When the claim's attempt finishes the same task, the second touches no
provider and returns the stored outcome. When the claim disappears without
an outcome, because its worker died, the second takes over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from typing import Any

from . import keys
from .etcd import Database

LOGGER = logging.getLogger(__name__)
CLAIM_TTL = 10
# Statuses a task leaves behind once it has run to the end (a release may follow a checkout).
TERMINAL_STATUSES = ("checked out", "failed", "released", "release incomplete")


class TestrunClaim:
    """The claim of one task attempt; `acquire` then, when done, `release`."""

    __test__ = False

    def __init__(self, database: Database, testrun_id: str, task_id: str | None, ttl: int = CLAIM_TTL) -> None:
        self.database = database
        self.testrun_id = testrun_id
        self.task_id = task_id
        self.ttl = ttl
        self.attempt = str(uuid.uuid4())
        self.lease = 0

    def value(self) -> str:
        return json.dumps(
            {"task_id": self.task_id, "attempt": self.attempt, "host": socket.gethostname(), "pid": os.getpid()},
            separators=(",", ":"),
        )

    def acquire(self) -> bool:
        """Take the claim unless another attempt has it; return whether this attempt has it now."""
        lease = self.database.grant_lease(self.ttl)
        if self.database.create(keys.claim(self.testrun_id), self.value(), lease=lease):
            self.lease = lease
            return True
        self.database.revoke_lease(lease)
        return False

    def holder(self) -> dict[str, Any] | None:
        text = self.database.get(keys.claim(self.testrun_id))
        return json.loads(text) if text else None

    def release(self) -> None:
        if self.lease:
            self.database.revoke_lease(self.lease)
            self.lease = 0

    def finished(self) -> bool:
        """Tell whether an attempt of this same task already ran to the end (as the testrun record shows)."""
        text = self.database.get(keys.testrun(self.testrun_id))
        record = json.loads(text) if text else {}
        return self.task_id is not None and record.get("task_id") == self.task_id and record.get("status") in TERMINAL_STATUSES

    def wait(self, deadline: float) -> str:
        """Wait until the claim can be taken.

        Returns `acquired` (this attempt has the claim), `finished` (another
        attempt of the same task ran to the end, so this one must not touch
        any provider) or `timeout`.
        """
        delay = 0.1
        reported = False
        while True:
            if self.acquire():
                if self.finished():
                    self.release()
                    return "finished"
                return "acquired"
            if self.finished():
                return "finished"
            if time.monotonic() >= deadline:
                return "timeout"
            if not reported:
                LOGGER.info("testrun %s is claimed by %s; waiting", self.testrun_id, self.holder())
                reported = True
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
