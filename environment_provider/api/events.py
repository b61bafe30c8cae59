"""`GET /v1/testrun/{testrun}/events`: a testrun's progress entries in etcd, streamed as server-sent events.

The checkout task writes one entry per key `/testrun/{testrun}/sse/{n}`:
`{"id": n, "event": "message" | "finished", "data": {...}}`. The stream
replays the stored entries after `Last-Event-ID`, then follows an etcd watch
on the prefix, and ends after a `finished` event that no later entry follows.
A testrun checked out twice has two `finished` events, so a stream replaying
both continues past the first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass
from typing import Annotated, Any, AsyncIterator, Iterator

import pyetcd.events
from fastapi import APIRouter, Header, Path
from fastapi.sse import format_sse_event
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from .. import keys
from ..etcd import CONNECTION_ERRORS, Database, StorageUnavailableError
from .errors import ApiError, errors_about
from .models import TESTRUN_ID
from .responses import error_responses
from .services import ServicesDependency

LOGGER = logging.getLogger(__name__)
router = APIRouter()

FINISHED = "finished"
PING_INTERVAL = 10.0
# A comment line without the blank line that ends an event. Clients ignore it
# either way, but some (httpx-sse 0.4) turn a comment followed by a blank line
# into an empty event once an event id has been seen.
KEEPALIVE = b": ping\n"
MAX_EVENT_ID_DIGITS = 18
WATCH_ENDED = object()
EXAMPLE_STREAM = (
    "event: message\n"
    'data: {"level":"info","message":"checking out 1 to 2 IUTs from provider \'static-devices\' for test suite \'Gateway smoke\'"}\n'
    "id: 1\n\n"
    "event: message\n"
    'data: {"level":"info","message":"checked out 2 IUTs from provider \'static-devices\'"}\n'
    "id: 2\n\n"
    "event: finished\n"
    'data: {"status":"checked out","sub_suites":2,"seconds":1.42}\n'
    "id: 3\n\n"
)


class EventStreamResponse(StreamingResponse):
    """A `text/event-stream` response.

    Not FastAPI's EventSourceResponse, because FastAPI treats every route that
    declares that class as a generator of events, and this route must be able
    to return 400 or 404 before the stream starts.
    """

    media_type = "text/event-stream"


@dataclass(frozen=True)
class ProgressEntry:
    """One stored progress entry."""

    id: int
    event: str
    data: Any

    def encode(self) -> bytes:
        data = json.dumps(self.data, separators=(",", ":"))
        return format_sse_event(data_str=data, event=self.event, id=str(self.id))


def parse_entry(key: str, value: str | bytes) -> ProgressEntry | None:
    """Parse a stored entry; log and skip one that is not `{"id": int, "event": str, "data": ...}`."""
    try:
        entry = json.loads(value)
    except (json.JSONDecodeError, UnicodeDecodeError):
        entry = None
    valid = (
        isinstance(entry, dict)
        and isinstance(entry.get("id"), int)
        and isinstance(entry.get("event"), str)
        and entry["event"]
        and "\n" not in entry["event"]
    )
    if not valid:
        LOGGER.warning("skipped the malformed progress entry at %s", key)
        return None
    return ProgressEntry(entry["id"], entry["event"], entry.get("data"))


def parse_last_event_id(value: str | None) -> int:
    """Return the sequence number of the Last-Event-ID header; 0 when it is absent or empty."""
    if value is None or not value.strip():
        return 0
    text = value.strip()
    if not text.isdigit() or len(text) > MAX_EVENT_ID_DIGITS:
        raise ApiError(
            400,
            f"header 'Last-Event-ID' is invalid: {value[:40]!r} is not the id of an event of this stream, "
            "which are whole numbers counting up from 1",
            "Last-Event-ID",
        )
    return int(text)


def testrun_known(database: Database, testrun_id: str) -> bool:
    """Whether the testrun has a record or any progress entry in etcd."""
    if database.get(keys.testrun(testrun_id)) is not None:
        return True
    return bool(database.keys_prefix(keys.sse_prefix(testrun_id)))


def forward_watch(watch_events: Iterator[Any], loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> None:
    """Pass etcd watch events from this thread to the stream's queue, then WATCH_ENDED or the error that ended it."""

    def deliver(item: Any) -> bool:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:
            return False  # The event loop is closed because the server is shutting down.
        return True

    try:
        for event in watch_events:
            if not deliver(event):
                return
    except Exception as error:  # noqa: BLE001 - any failure of the watch ends the stream, which logs it
        deliver(error)
        return
    deliver(WATCH_ENDED)


class EventStream:
    """The server-sent events of one testrun for one client, after event id `after`."""

    def __init__(self, database: Database, testrun_id: str, after: int, ping_interval: float = PING_INTERVAL) -> None:
        self.database = database
        self.testrun_id = testrun_id
        self.after = after
        self.ping_interval = ping_interval
        self.sent: set[int] = set()

    def is_new(self, entry: ProgressEntry | None) -> bool:
        return entry is not None and entry.id > self.after and entry.id not in self.sent

    async def __aiter__(self) -> AsyncIterator[bytes]:
        prefix = keys.sse_prefix(self.testrun_id)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        # The watch starts before the stored entries are read, so no entry falls between the two.
        try:
            watch_events, cancel = await run_in_threadpool(self.database.watch_prefix, prefix)
        except StorageUnavailableError as error:
            LOGGER.warning("events of testrun %s: the etcd watch did not start: %s", self.testrun_id, error)
            return
        # NOTE: pyetcd's watch iterator blocks, so every open stream holds one thread until it ends.
        forwarder = threading.Thread(
            target=forward_watch, args=(watch_events, loop, queue), name=f"events-{self.testrun_id}", daemon=True
        )
        forwarder.start()

        try:
            async for chunk in self.replay_and_follow(prefix, queue):
                yield chunk
        finally:
            try:
                cancel()
            except CONNECTION_ERRORS as error:
                LOGGER.warning("events of testrun %s: cancelling the etcd watch failed: %s", self.testrun_id, error)

    async def replay_and_follow(self, prefix: str, queue: asyncio.Queue[Any]) -> AsyncIterator[bytes]:
        try:
            stored = await run_in_threadpool(self.database.get_prefix, prefix)
        except StorageUnavailableError as error:
            LOGGER.warning("events of testrun %s: reading the stored events failed: %s", self.testrun_id, error)
            return
        parsed = [parse_entry(key, value) for key, value in stored.items()]
        entries = sorted((entry for entry in parsed if entry is not None), key=lambda entry: entry.id)
        for entry in entries:
            if self.is_new(entry):
                self.sent.add(entry.id)
                yield entry.encode()
        if entries and entries[-1].event == FINISHED:
            return

        while True:
            try:
                item = await asyncio.wait_for(queue.get(), self.ping_interval)
            except TimeoutError:
                yield KEEPALIVE
                continue

            if item is WATCH_ENDED:
                LOGGER.warning("events of testrun %s: the etcd watch was closed", self.testrun_id)
                return
            if isinstance(item, Exception):
                LOGGER.warning("events of testrun %s: the etcd watch failed: %s", self.testrun_id, item)
                return
            key = item.key.decode()
            if isinstance(item, pyetcd.events.DeleteEvent):
                LOGGER.info("events of testrun %s: %s was deleted, so the testrun expired or was removed", self.testrun_id, key)
                return

            entry = parse_entry(key, item.value)
            if entry is None or not self.is_new(entry):
                continue
            self.sent.add(entry.id)
            yield entry.encode()
            if entry.event == FINISHED:
                return


@router.get(
    "/v1/testrun/{testrun}/events",
    response_class=EventStreamResponse,
    summary="Stream a testrun's progress as server-sent events",
    description=(
        "Streams the testrun's progress entries as server-sent events with `id` (a sequence number counting up "
        "from 1), `event` (`message`, or `finished` for the last one) and `data` (JSON: `level` and `message`, "
        "or `status` and a summary for `finished`). Stored entries are sent first, then new ones as the checkout "
        "writes them. The stream ends after a `finished` event; while it waits it sends a `: ping` comment every "
        f"{PING_INTERVAL:g} seconds. A client that reconnects with the header `Last-Event-ID: <n>` gets only "
        "the events after n."
    ),
    responses={
        200: {
            "description": "The event stream.",
            "content": {"text/event-stream": {"schema": {"type": "string"}, "example": EXAMPLE_STREAM}},
        },
        **error_responses(400, 404, 503),
    },
)
async def testrun_events(
    services: ServicesDependency,
    testrun: Annotated[str, Path(description="The testrun id.", openapi_examples={"testrun": {"value": TESTRUN_ID}})],
    last_event_id: Annotated[
        str | None,
        Header(alias="Last-Event-ID", description="Resume after this event id.", openapi_examples={"resume": {"value": "2"}}),
    ] = None,
) -> EventStreamResponse:
    with errors_about("testrun"):
        testrun_id = keys.validate_uuid(testrun, "testrun id")
    after = parse_last_event_id(last_event_id)
    if not await run_in_threadpool(testrun_known, services.database, testrun_id):
        raise ApiError(404, f"testrun {testrun_id} is not known: configure it with POST /configure first", "testrun")

    stream = EventStream(services.database, testrun_id, after)
    return EventStreamResponse(stream, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
