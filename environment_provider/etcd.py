"""etcd access: one client per process, leases, transactions and watches.

gRPC channels must not cross a fork, and Celery's prefork pool forks its
workers after the parent has imported everything. `Database` therefore
creates its client lazily and creates a new one when the process id changes.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

import grpc
import pyetcd
import pyetcd.exceptions

from .settings import Settings

LOGGER = logging.getLogger(__name__)
T = TypeVar("T")
# Seconds to wait before repeating a failed call on another member, times the attempt number;
# a cluster that lost its leader needs about a second to elect a new one.
FAILOVER_DELAY = 0.5

CONNECTION_ERRORS = (
    pyetcd.exceptions.ConnectionFailedError,
    pyetcd.exceptions.ConnectionTimeoutError,
    pyetcd.exceptions.NoServerAvailableError,
)


class StorageUnavailableError(RuntimeError):
    """etcd cannot be reached at the configured endpoints."""


class StorageRequestError(ValueError):
    """etcd rejected a request, for example one larger than its request size limit."""


def _translate_errors(method: Callable[..., T]) -> Callable[..., T]:
    """Raise StorageUnavailableError for connection errors; with several endpoints, try the call on the next member first.

    The multi-endpoint client marks a member failed when a call to it fails,
    but does not repeat the call. Repeating it here is safe for the calls of
    Database: a put, delete or refresh applied twice has the same effect, a
    lease granted twice leaves one unused lease that expires, and a create
    applied before its timeout reports False, after which the caller sees
    the key taken.
    """

    @functools.wraps(method)
    def wrapper(self: "Database", *args: Any, **kwargs: Any) -> T:
        attempts = len(self.settings.etcd_endpoints)
        for attempt in range(1, attempts + 1):
            try:
                return method(self, *args, **kwargs)
            except CONNECTION_ERRORS as error:
                last_member = attempt == attempts or isinstance(error, pyetcd.exceptions.NoServerAvailableError)
                if not last_member:
                    LOGGER.warning(
                        "etcd call %s failed (%s); trying another of the endpoints %s",
                        method.__name__, type(error).__name__, self.settings.etcd_addresses,
                    )  # fmt: skip
                    time.sleep(FAILOVER_DELAY * attempt)
                    continue
                self.forget_client()
                raise StorageUnavailableError(
                    f"etcd is not reachable at {self.settings.etcd_addresses} ({type(error).__name__}); "
                    "start etcd or set ETOS_ETCD_HOST and ETOS_ETCD_PORT (or ETOS_ETCD_ENDPOINTS)"
                ) from error
        raise AssertionError("not reached: the last attempt returns or raises")

    return wrapper


class Database:
    """Key-value access to etcd for one process.

    Values are stored and returned as `str`. Methods raise
    StorageUnavailableError, naming the endpoints, when etcd cannot be reached.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: Any = None
        self._client_pid: int | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        """The etcd client of this process, created on first use after start or fork."""
        with self._lock:
            if self._client is None or self._client_pid != os.getpid():
                self._client = self._connect()
                self._client_pid = os.getpid()
            return self._client

    def _connect(self) -> Any:
        endpoints = self.settings.etcd_endpoints
        if len(endpoints) == 1:
            host, port = endpoints[0]
            return pyetcd.client(host=host, port=port, timeout=self.settings.etcd_timeout)
        # NOTE: time_retry is how long a failed member stays out of rotation before it is tried again.
        members = [pyetcd.Endpoint(host, port, secure=False, time_retry=5.0) for host, port in endpoints]
        return pyetcd.MultiEndpointEtcd3Client(endpoints=members, timeout=self.settings.etcd_timeout, failover=True)

    def forget_client(self) -> None:
        """Drop the client so that the next call connects again."""
        with self._lock:
            if self._client is not None and self._client_pid == os.getpid():
                try:
                    self._client.close()
                except (AttributeError, ValueError, RuntimeError):
                    LOGGER.debug("closing the etcd client failed", exc_info=True)
            self._client = None

    @_translate_errors
    def get(self, key: str) -> str | None:
        value, _ = self.client.get(key)
        return None if value is None else value.decode()

    @_translate_errors
    def get_with_lease(self, key: str) -> tuple[str | None, int]:
        """Return the value of `key` and the id of its lease (0 when it has none or is missing)."""
        value, metadata = self.client.get(key)
        if value is None:
            return None, 0
        return value.decode(), metadata.lease_id

    @_translate_errors
    def get_prefix(self, prefix: str) -> dict[str, str]:
        """Return every key under `prefix` with its value, in key order."""
        return {metadata.key.decode(): value.decode() for value, metadata in self.client.get_prefix(prefix)}

    @_translate_errors
    def get_prefix_with_leases(self, prefix: str) -> dict[str, tuple[str, int]]:
        """Return every key under `prefix` with its value and lease id (0 for none), in key order."""
        return {
            metadata.key.decode(): (value.decode(), metadata.lease_id) for value, metadata in self.client.get_prefix(prefix)
        }

    @_translate_errors
    def keys_prefix(self, prefix: str) -> list[str]:
        """Return every key under `prefix`, without values."""
        return [metadata.key.decode() for _, metadata in self.client.get_prefix(prefix, keys_only=True)]

    @_translate_errors
    def put(self, key: str, value: str, lease: int | None = None) -> None:
        self.client.put(key, value, lease=lease or None)

    @_translate_errors
    def put_many(self, values: dict[str, str], lease: int | None = None, delete: Iterable[str] = ()) -> None:
        """Write `values` and delete `delete` in one transaction, so readers see all or none."""
        client = self.client
        operations = [client.transactions.put(key, value, lease=lease or None) for key, value in values.items()]
        operations += [client.transactions.delete(key) for key in delete]
        if operations:
            client.transaction(compare=[], success=operations, failure=[])

    @_translate_errors
    def create(self, key: str, value: str, lease: int | None = None) -> bool:
        """Write `key` only when it does not exist; return whether it was written."""
        client = self.client
        succeeded, _ = client.transaction(
            compare=[client.transactions.create(key) == 0],
            success=[client.transactions.put(key, value, lease=lease or None)],
            failure=[],
        )
        return bool(succeeded)

    @_translate_errors
    def delete(self, *keys: str) -> None:
        """Delete `keys` in one transaction."""
        client = self.client
        if keys:
            client.transaction(compare=[], success=[client.transactions.delete(key) for key in keys], failure=[])

    @_translate_errors
    def delete_prefix(self, prefix: str) -> None:
        self.client.delete_prefix(prefix)

    @_translate_errors
    def grant_lease(self, ttl: int) -> int:
        """Create a lease of `ttl` seconds and return its id."""
        return self.client.lease(ttl).id

    @_translate_errors
    def revoke_lease(self, lease_id: int) -> None:
        """Revoke a lease, deleting every key attached to it."""
        self.client.revoke_lease(lease_id)

    @_translate_errors
    def lease_remaining(self, lease_id: int) -> int:
        """Return the seconds left on a lease; -1 when it has expired or does not exist."""
        response = self.client.get_lease_info(lease_id)
        return int(response.TTL)

    @_translate_errors
    def refresh_lease(self, lease_id: int) -> None:
        for _ in self.client.refresh_lease(lease_id):
            break

    @_translate_errors
    def revision(self) -> int:
        """Return the store's current revision."""
        return int(self.client.status().raft_index)

    def watch_prefix(self, prefix: str, start_revision: int | None = None) -> tuple[Iterator[Any], Callable[[], None]]:
        """Watch `prefix`; return an iterator of etcd events and a function that stops it."""
        try:
            kwargs = {"start_revision": start_revision} if start_revision else {}
            return self.client.watch_prefix(prefix, **kwargs)
        except CONNECTION_ERRORS as error:
            self.forget_client()
            raise StorageUnavailableError(
                f"etcd is not reachable at {self.settings.etcd_addresses} ({type(error).__name__})"
            ) from error

    @_translate_errors
    def check(self) -> None:
        """Raise StorageUnavailableError unless etcd responds."""
        self.client.status()


class LeaseKeeper:
    """Refresh leases from a background thread while a task works on its testrun."""

    def __init__(self, database: Database, lease_ids: list[int], interval: float) -> None:
        self._database = database
        self._lease_ids = [lease_id for lease_id in lease_ids if lease_id]
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def __enter__(self) -> "LeaseKeeper":
        if self._lease_ids:
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            for lease_id in self._lease_ids:
                try:
                    self._database.refresh_lease(lease_id)
                except StorageUnavailableError as error:
                    LOGGER.warning("could not refresh lease %x: %s", lease_id, error)
