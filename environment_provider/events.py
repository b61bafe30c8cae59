"""Progress events for users: one JSON entry per line under `/testrun/{testrun}/sse/`."""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
from typing import Any

from . import keys
from .etcd import Database, StorageUnavailableError

LOGGER = logging.getLogger(__name__)
SECRET_PATTERN = re.compile(r"(?i)((?:password|passwd|token|secret|authorization)[\"']?\s*[:=]\s*[\"']?)([^\s\"',}]+)")
URL_PASSWORD = re.compile(r"(://[^/\s:@]+:)[^/\s@]+@")


def redact(text: str) -> str:
    """Mask values that follow words such as password or token."""
    return URL_PASSWORD.sub(r"\1***@", SECRET_PATTERN.sub(r"\1***", text))


def sequence_of(key: str) -> int:
    return int(key.rsplit("/", 1)[1])


class ProgressLog:
    """Writes a testrun's progress events to etcd and to the log.

    Each event is `{"id": n, "event": ..., "data": {...}}` at
    `/testrun/{testrun}/sse/{n}`, with n counting up from the highest
    existing sequence. Only the task that holds the testrun's claim writes
    here. A background thread writes the events in order, so the checkout
    does not wait for them; `finish` writes the last event and waits until
    all are stored.
    """

    def __init__(self, database: Database, testrun_id: str, lease: int, last_event: int | None = None) -> None:
        """Continue after sequence `last_event`, or after the highest stored sequence when it is None."""
        self.database = database
        self.testrun_id = testrun_id
        self.lease = lease
        self._lock = threading.Lock()
        if last_event is None:
            existing = database.keys_prefix(keys.sse_prefix(testrun_id))
            last_event = max((sequence_of(key) for key in existing), default=0)
        self._next = last_event + 1
        self._pending: queue.Queue[tuple[int, str] | None] = queue.Queue()
        self._writer: threading.Thread | None = None

    def _write(self) -> None:
        while (entry := self._pending.get()) is not None:
            sequence, text = entry
            try:
                self.database.put(keys.sse(self.testrun_id, sequence), text, lease=self.lease)
            except StorageUnavailableError as error:
                LOGGER.warning("testrun %s: progress event %d not stored: %s", self.testrun_id, sequence, error)

    def emit(self, event: str, data: dict[str, Any]) -> None:
        with self._lock:
            sequence = self._next
            self._next += 1
            if self._writer is None:
                self._writer = threading.Thread(target=self._write, name=f"progress-{self.testrun_id}", daemon=True)
                self._writer.start()
            self._pending.put((sequence, json.dumps({"id": sequence, "event": event, "data": data}, separators=(",", ":"))))

    def flush(self) -> None:
        """Wait until every event emitted so far is stored, and stop the writer thread."""
        with self._lock:
            writer, self._writer = self._writer, None
            if writer is None:
                return
            self._pending.put(None)
        writer.join(timeout=30)

    def message(self, text: str, level: str = "info") -> None:
        """Send one line to the user and to the log."""
        text = redact(text)
        LOGGER.log(logging.getLevelName(level.upper()), "testrun %s: %s", self.testrun_id, text)
        self.emit("message", {"level": level, "message": text})

    def finish(self, status: str, **data: Any) -> None:
        """Send the final event (`status` is `checked out` or `failed`) and wait until all events are stored."""
        self.emit("finished", {"status": status, **{key: redact(str(value)) if key == "error" else value for key, value in data.items()}})
        self.flush()
