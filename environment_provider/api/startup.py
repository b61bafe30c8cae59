"""Registration of the provider folders named by IUT_PROVIDERS, EXECUTION_SPACE_PROVIDERS and LOG_AREA_PROVIDERS.

Invalid files are logged by name and skipped; the valid definitions of all
folders are stored in one etcd transaction. When etcd is not reachable yet
(for example while docker compose still starts it), a background thread
retries until it is, or until the app stops.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from ..etcd import Database, StorageUnavailableError
from ..keys import KINDS_BY_KEY, Kind
from ..registry import read_definitions, register_definitions

LOGGER = logging.getLogger(__name__)
FIRST_RETRY_DELAY = 1.0
MAX_RETRY_DELAY = 30.0

Definition = tuple[Kind, str, dict[str, Any]]


def read_provider_folders(directories: dict[str, str]) -> list[Definition]:
    """Read the definitions of each kind's folder; log and skip every file that cannot be registered."""
    definitions: list[Definition] = []
    for kind_key, folder in directories.items():
        kind = KINDS_BY_KEY[kind_key]
        if not Path(folder).is_dir():
            LOGGER.error("the %s provider folder %s is not a directory; nothing was registered from it", kind.label, folder)
            continue

        valid, errors = read_definitions([folder])
        for error in errors:
            LOGGER.error("skipped an invalid provider definition: %s", error)
        for item in valid:
            if item.kind is not kind:
                LOGGER.error(
                    "skipped %s: it defines a %s provider but is in the %s provider folder %s",
                    item.path, item.kind.label, kind.label, folder,
                )  # fmt: skip
                continue
            definitions.append((item.kind, item.name, item.definition))
    return definitions


def register_folders(database: Database, definitions: list[Definition]) -> None:
    register_definitions(database, definitions)
    LOGGER.info("registered %d provider definitions from the provider folders", len(definitions))


class FolderRegistration:
    """Registers the provider folders at start-up, retrying in a thread while etcd is unreachable."""

    def __init__(self, database: Database, directories: dict[str, str]) -> None:
        self.database = database
        self.directories = directories
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Register at once; on failure, log it and keep retrying in a background thread."""
        definitions = read_provider_folders(self.directories)
        if not definitions:
            self.done.set()
            return
        try:
            register_folders(self.database, definitions)
        except StorageUnavailableError as error:
            LOGGER.error("could not register the provider folders, retrying in the background: %s", error)
            self._thread = threading.Thread(target=self._retry, args=(definitions,), name="provider-folders", daemon=True)
            self._thread.start()
            return
        self.done.set()

    def _retry(self, definitions: list[Definition]) -> None:
        delay = FIRST_RETRY_DELAY
        while not self._stop.wait(delay):
            try:
                register_folders(self.database, definitions)
            except StorageUnavailableError as error:
                delay = min(delay * 2, MAX_RETRY_DELAY)
                LOGGER.warning("registering the provider folders failed again, next try in %g s: %s", delay, error)
                continue
            self.done.set()
            return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
