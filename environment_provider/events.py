"""Progress events for users: one JSON entry per line under `/testrun/{testrun}/sse/`."""

from __future__ import annotations

import json
import logging
import re
import threading
from typing import Any

from . import keys
from .etcd import Database, StorageUnavailableError

LOGGER = logging.getLogger(__name__)
SECRET_PATTERN = re.compile(r"(?i)((?:password|passwd|token|secret|authorization)[\"']?\s*[:=]\s*[\"']?)([^\s\"',}]+)")


def redact(text: str) -> str:
    """Mask values that follow words such as password or token."""
    return SECRET_PATTERN.sub(r"\1***", text)


def sequence_of(key: str) -> int:
    return int(key.rsplit("/", 1)[1])


class ProgressLog:
    """Writes a testrun's progress events to etcd and to the log.

    Each event is `{"id": n, "event": ..., "data": {...}}` at
    `/testrun/{testrun}/sse/{n}`, with n counting up from the highest
    existing sequence. Only the task that holds the testrun writes here.
    """

    def __init__(self, database: Database, testrun_id: str, lease: int) -> None:
        self.database = database
        self.testrun_id = testrun_id
        self.lease = lease
        self._lock = threading.Lock()
        existing = database.keys_prefix(keys.sse_prefix(testrun_id))
        self._next = max((sequence_of(key) for key in existing), default=0) + 1

    def emit(self, event: str, data: dict[str, Any]) -> None:
        with self._lock:
            sequence = self._next
            self._next += 1
        entry = {"id": sequence, "event": event, "data": data}
        try:
            self.database.put(keys.sse(self.testrun_id, sequence), json.dumps(entry, separators=(",", ":")), lease=self.lease)
        except StorageUnavailableError as error:
            LOGGER.warning("testrun %s: progress event %d not stored: %s", self.testrun_id, sequence, error)

    def message(self, text: str, level: str = "info") -> None:
        """Send one line to the user and to the log."""
        text = redact(text)
        LOGGER.log(logging.getLevelName(level.upper()), "testrun %s: %s", self.testrun_id, text)
        self.emit("message", {"level": level, "message": text})

    def finish(self, status: str, **data: Any) -> None:
        """Send the final event: `status` is `checked out` or `failed`."""
        self.emit("finished", {"status": status, **{key: redact(str(value)) if key == "error" else value for key, value in data.items()}})
