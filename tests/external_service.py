"""An external provider service on 127.0.0.1 for tests: the start, status and stop endpoints.

The service hands out made-up IUTs, execution spaces or log areas and keeps
its own record of what is checked out, so a test can check that everything
the environment provider received was stopped again. `Behaviour` makes it
slow, flaky or broken in the ways a real service can be.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

from environment_provider.keys import KINDS_BY_KEY, Kind


@dataclass
class Behaviour:
    """How the service responds; the defaults make a fast, well-behaved service."""

    # Status requests return PENDING until this many seconds after the start request.
    pending_seconds: float = 0.0
    description: str = "waiting for free items"
    # A fixed (HTTP status, body) for every start request; a str body is sent as plain text.
    start_response: tuple[int, Any] | None = None
    # A fixed (HTTP status, body) for every status request.
    status_response: tuple[int, Any] | None = None
    # Status FAILED with this description instead of DONE.
    failed: str | None = None
    # Hand out maximum_amount + extra items, or minimum_amount - short items when short > 0.
    extra: int = 0
    short: int = 0
    # Per endpoint ("start", "status", "stop"): HTTP statuses returned, one per request, before the normal responses.
    retry_statuses: dict[str, list[int]] = field(default_factory=dict)
    # The stop endpoint returns 200 with {"error": stop_error} and stops nothing.
    stop_error: str | None = None


@dataclass
class ServiceState:
    """The service's own record, shared by the server threads and the test."""

    checked_out: dict[str, dict[str, Any]] = field(default_factory=dict)
    stopped: list[str] = field(default_factory=list)
    unknown_stops: list[Any] = field(default_factory=list)
    start_bodies: list[dict[str, Any]] = field(default_factory=list)
    status_polls: int = 0
    etos_ids: list[str | None] = field(default_factory=list)
    requests: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def make_item(kind: Kind, number: int, start_body: dict[str, Any]) -> dict[str, Any]:
    """Build one item of the kind, shaped like what real services return."""
    name = f"{kind.key}-{number}-{uuid.uuid4().hex[:6]}"
    if kind.key == "iut":
        return {"id": name, "serial": f"EXT{number:04d}", "ip": f"127.0.0.{number % 250 + 2}"}
    if kind.key == "execution-space":
        environment = start_body.get("environment") or {}
        return {
            "id": name,
            "instructions": {
                "image": start_body.get("test_runner"),
                "identifier": name,
                "environment": {"ENVIRONMENT_ID": environment.get("environment_id")},
                "parameters": {},
            },
            "request": {"url": "http://runners.example.invalid/start", "method": "POST"},
        }
    return {
        "id": name,
        "livelogs": f"http://logs.example.invalid/live/{name}",
        "upload": {"url": f"http://logs.example.invalid/store/{name}/{{folder}}/{{name}}", "method": "PUT"},
    }


def external_definition(kind: Kind, url: str, provider_id: str) -> dict[str, Any]:
    """A provider definition of type `external` with the start, status and stop endpoints under `url`."""
    return {
        kind.definition_key: {
            "id": provider_id,
            "type": "external",
            "start": {"host": f"{url}/start"},
            "status": {"host": f"{url}/status"},
            "stop": {"host": f"{url}/stop"},
        }
    }


class ExternalService:
    """The HTTP server and its state. `down()` closes the port and `up()` listens on it again."""

    def __init__(self, kind_key: str, behaviour: Behaviour | None = None, listening: bool = True) -> None:
        self.kind = KINDS_BY_KEY[kind_key]
        self.behaviour = behaviour or Behaviour()
        self.state = ServiceState()
        self.server: ThreadingHTTPServer | None = None
        self.port = 0
        self.up()
        self.url = f"http://127.0.0.1:{self.port}"
        if not listening:
            self.down()

    def definition(self, provider_id: str) -> dict[str, Any]:
        """A provider definition of type `external` that points at this service."""
        return external_definition(self.kind, self.url, provider_id)

    def up(self) -> None:
        if self.server is not None:
            return
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self.handler())
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def down(self) -> None:
        if self.server is None:
            return
        self.server.shutdown()
        self.server.server_close()
        self.server = None

    def up_after(self, seconds: float) -> threading.Timer:
        """Start listening after `seconds`; until then connections are refused."""
        timer = threading.Timer(seconds, self.up)
        timer.start()
        return timer

    def handler(self) -> type[BaseHTTPRequestHandler]:
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def reply(self, status: int, body: Any = None) -> None:
                if status == 204:
                    self.send_response(204)
                    self.end_headers()
                    return
                text = body if isinstance(body, str) else json.dumps(body)
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def body(self) -> Any:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"null")

            def handle_endpoint(self, endpoint: str) -> None:
                etos_id = self.headers.get("X-ETOS-ID")
                with service.state.lock:
                    service.state.etos_ids.append(etos_id)
                    queued = service.behaviour.retry_statuses.get(endpoint)
                    retry_status = queued.pop(0) if queued else None
                if not etos_id:
                    return self.reply(400, {"error": "header X-ETOS-ID is missing"})
                if retry_status is not None:
                    return self.reply(retry_status, {"error": "busy, try again"})
                getattr(self, f"do_{endpoint}")()

            def do_GET(self) -> None:
                if urlsplit(self.path).path == "/status":
                    return self.handle_endpoint("status")
                self.reply(404, {"error": "not found"})

            def do_POST(self) -> None:
                path = urlsplit(self.path).path
                if path in ("/start", "/stop"):
                    return self.handle_endpoint(path[1:])
                self.reply(404, {"error": "not found"})

            def do_start(self) -> None:
                body = self.body()
                behaviour = service.behaviour
                with service.state.lock:
                    service.state.start_bodies.append(body)
                    if behaviour.start_response is not None:
                        return self.reply(*behaviour.start_response)
                    request_id = str(uuid.uuid4())
                    service.state.requests[request_id] = {"body": body, "started": time.monotonic(), "items": None}
                self.reply(200, {"id": request_id})

            def do_status(self) -> None:
                request_id = parse_qs(urlsplit(self.path).query).get("id", [""])[0]
                behaviour = service.behaviour
                with service.state.lock:
                    service.state.status_polls += 1
                    if behaviour.status_response is not None:
                        return self.reply(*behaviour.status_response)
                    request = service.state.requests.get(request_id)
                    if request is None:
                        return self.reply(404, {"error": f"no request {request_id}"})
                    if behaviour.failed is not None:
                        return self.reply(200, {"status": "FAILED", "description": behaviour.failed})
                    if time.monotonic() - request["started"] < behaviour.pending_seconds:
                        return self.reply(200, {"status": "PENDING", "description": behaviour.description})
                    if request["items"] is None:
                        request["items"] = self.hand_out(request["body"])
                    self.reply(200, {"status": "DONE", "description": "ready", service.kind.external_key: request["items"]})

            def hand_out(self, body: dict[str, Any]) -> list[dict[str, Any]]:
                behaviour = service.behaviour
                if behaviour.short:
                    count = body["minimum_amount"] - behaviour.short
                else:
                    count = body["maximum_amount"] + behaviour.extra
                items = [make_item(service.kind, len(service.state.checked_out) + len(service.state.stopped) + index, body) for index in range(count)]
                for item in items:
                    service.state.checked_out[item["id"]] = item
                return items

            def do_stop(self) -> None:
                items = self.body()
                if not isinstance(items, list):
                    return self.reply(400, {"error": "expected a JSON list of items"})
                with service.state.lock:
                    if service.behaviour.stop_error is not None:
                        return self.reply(200, {"error": service.behaviour.stop_error})
                    unknown = [item for item in items if not isinstance(item, dict) or item.get("id") not in service.state.checked_out]
                    for item in items:
                        if item not in unknown:
                            del service.state.checked_out[item["id"]]
                            service.state.stopped.append(item["id"])
                    service.state.unknown_stops.extend(unknown)
                if unknown:
                    return self.reply(404, {"error": f"{len(unknown)} items are not checked out here"})
                self.reply(204)

        return Handler

    def close(self) -> None:
        self.down()


@pytest.fixture
def external() -> Iterator[Any]:
    """A factory of ExternalService instances that are closed after the test."""
    services: list[ExternalService] = []
    timers: list[threading.Timer] = []

    def create(kind_key: str, behaviour: Behaviour | None = None, listening: bool = True, up_after: float | None = None) -> ExternalService:
        service = ExternalService(kind_key, behaviour, listening=listening and up_after is None)
        if up_after is not None:
            timers.append(service.up_after(up_after))
        services.append(service)
        return service

    yield create
    for timer in timers:
        timer.cancel()
        timer.join()
    for service in services:
        service.close()
