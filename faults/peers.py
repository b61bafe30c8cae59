"""HTTP peers of the fault trials on 127.0.0.1, each keeping its own record of what it handed out.

- `DeviceLab` is the device management system of tests/lab.py with a record
  of which testrun (header `X-ETOS-ID`) holds each device, a delay before
  each reservation, and an outage switch that stops and restarts the server
  on the same port.
- `ExternalProvider` serves the external provider protocol (start, status,
  stop) for execution spaces and records every item it allocated and stopped.
- `Recorder` answers fixed responses per path and records every request, so
  a trial can show that a forbidden host was never contacted or that a
  secret reached its peer but no log.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from lab import Lab


class RestartableServer:
    """A ThreadingHTTPServer on a fixed 127.0.0.1 port that can be stopped and started again."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], port: int = 0) -> None:
        self.handler = handler
        self.server: ThreadingHTTPServer | None = None
        self.port = port
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.server is not None:
            return
        deadline = time.monotonic() + 10
        while True:
            try:
                self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self.handler)
                break
            except OSError:
                # The old socket of this port may linger for a moment after a stop.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, name=f"peer-{self.port}", daemon=True).start()

    def stop(self) -> None:
        """Stop listening: connections are refused until `start`."""
        if self.server is None:
            return
        self.server.shutdown()
        self.server.server_close()
        self.server = None

    def outage(self, seconds: float) -> threading.Thread:
        """Stop the server now and start it again after `seconds`, from a background thread."""
        self.stop()

        def come_back() -> None:
            time.sleep(seconds)
            self.start()

        thread = threading.Thread(target=come_back, name=f"outage-{self.port}", daemon=True)
        thread.start()
        return thread


class DeviceLab(Lab):
    """The lab of tests/lab.py with a record of the holders of every device.

    `holders[serial]` lists the testruns that reserved the device and have
    not released it. The lab itself refuses a second reservation (409, counted in
    `state.double_reservations`), so a second holder appears only when one
    testrun releases a device that another holds (`foreign_releases`) and a
    third reserves it again. `max_holders[serial]` is the highest length
    `holders[serial]` reached.
    """

    def __init__(self, count: int, model: str = "edge-gateway") -> None:
        super().__init__(count, model)
        port = self.server.server_address[1]
        self.server.shutdown()
        self.server.server_close()

        self.holders: dict[str, list[str]] = {serial: [] for serial in self.state.devices}
        self.max_holders: dict[str, int] = {serial: 0 for serial in self.state.devices}
        self.foreign_releases = 0
        self.reserve_delay = 0.0
        self.peer = RestartableServer(self._handler(self.server.RequestHandlerClass), port)
        self.url = self.peer.url

    def _handler(self, base: type[BaseHTTPRequestHandler]) -> type[BaseHTTPRequestHandler]:
        lab = self

        class TrackingHandler(base):  # type: ignore[valid-type, misc]
            def do_POST(self) -> None:
                if self.path == "/reserve" and lab.reserve_delay:
                    time.sleep(lab.reserve_delay)
                super().do_POST()

            def reply(self, status: int, body: Any) -> None:
                # The base handler replies to /reserve and /release with the state lock held,
                # so the record changes together with the device.
                if status == 200 and self.path in ("/reserve", "/release"):
                    lab.record(self.path, body["serial"], self.headers.get("X-ETOS-ID", ""))
                super().reply(status, body)

        return TrackingHandler

    def record(self, path: str, serial: str, testrun_id: str) -> None:
        holders = self.holders[serial]
        if path == "/reserve":
            holders.append(testrun_id)
            self.max_holders[serial] = max(self.max_holders[serial], len(holders))
        elif testrun_id in holders:
            holders.remove(testrun_id)
        else:
            self.foreign_releases += 1

    def held(self) -> dict[str, list[str]]:
        """Return the devices with holders, and who holds them."""
        with self.state.lock:
            return {serial: list(holders) for serial, holders in self.holders.items() if holders}

    def stop(self) -> None:
        self.peer.stop()

    def start(self) -> None:
        self.peer.start()

    def outage(self, seconds: float) -> threading.Thread:
        return self.peer.outage(seconds)

    def close(self) -> None:
        self.peer.stop()


@dataclass
class Allocation:
    """One start request of the external provider and the items allocated for it."""

    testrun_id: str
    items: list[dict[str, Any]]
    started: float
    collected: bool = False


@dataclass
class ExternalState:
    allocations: dict[str, Allocation] = field(default_factory=dict)
    stopped: set[str] = field(default_factory=set)
    unknown_stops: int = 0
    ready_after: float = 0.0
    stop_refused: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class ExternalProvider:
    """An external execution space provider: start allocates, status returns DONE after `ready_after` s, stop frees.

    Items are allocated when a request starts, as a provider that starts a
    machine would, so a request whose requester never collects the result
    still holds its items.
    """

    def __init__(self, ready_after: float = 0.0) -> None:
        self.state = ExternalState(ready_after=ready_after)
        self.peer = RestartableServer(self._handler())
        self.url = self.peer.url

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        state = self.state

        class Handler(JsonHandler):
            def do_POST(self) -> None:
                body = self.read_json()
                if self.path == "/start":
                    amount = int(body.get("maximum_amount") or 1)
                    request_id = str(uuid.uuid4())
                    items = [
                        {"id": str(uuid.uuid4()), "instructions": {"image": body.get("test_runner"), "environment": {}, "parameters": {}}}
                        for _ in range(amount)
                    ]
                    with state.lock:
                        state.allocations[request_id] = Allocation(self.headers.get("X-ETOS-ID", ""), items, time.monotonic())
                    return self.reply(200, {"id": request_id})
                if self.path == "/stop":
                    with state.lock:
                        if state.stop_refused:
                            return self.reply(503, {"error": "maintenance"})
                        known = {item["id"] for allocation in state.allocations.values() for item in allocation.items}
                        for item in body if isinstance(body, list) else []:
                            if item.get("id") in known:
                                state.stopped.add(item["id"])
                            else:
                                state.unknown_stops += 1
                    return self.reply(204, None)
                self.reply(404, {"error": "not found"})

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                request_id = parse_qs(parts.query).get("id", [""])[0]
                with state.lock:
                    allocation = state.allocations.get(request_id)
                    if parts.path != "/status" or allocation is None:
                        return self.reply(404, {"error": f"no request {request_id}"})
                    if time.monotonic() - allocation.started < state.ready_after:
                        return self.reply(200, {"status": "PENDING", "description": "starting the execution space"})
                    allocation.collected = True
                    items = json.loads(json.dumps(allocation.items))
                self.reply(200, {"status": "DONE", "description": "ready", "execution_spaces": items})

        return Handler

    def held(self) -> list[str]:
        """Return the ids of allocated items that were not stopped."""
        with self.state.lock:
            return [
                item["id"]
                for allocation in self.state.allocations.values()
                for item in allocation.items
                if item["id"] not in self.state.stopped
            ]

    def held_uncollected(self) -> list[str]:
        """Return held items whose request never returned them (the requester never saw DONE)."""
        with self.state.lock:
            return [
                item["id"]
                for allocation in self.state.allocations.values()
                if not allocation.collected
                for item in allocation.items
                if item["id"] not in self.state.stopped
            ]

    def definition(self, provider_id: str) -> dict[str, Any]:
        return {
            "execution_space": {
                "id": provider_id,
                "type": "external",
                "start": {"host": f"{self.url}/start"},
                "status": {"host": f"{self.url}/status"},
                "stop": {"host": f"{self.url}/stop"},
            }
        }

    def close(self) -> None:
        self.peer.stop()


class JsonHandler(BaseHTTPRequestHandler):
    """Base handler: quiet, JSON in and out."""

    def log_message(self, *args: Any) -> None:
        pass

    def read_json(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length) if length else b""
        try:
            return json.loads(data or b"{}")
        except json.JSONDecodeError:
            return {}

    def reply(self, status: int, body: Any) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


class Recorder:
    """Records every request; `routes` maps `METHOD /path` to (status, JSON body) or to a function of the request."""

    def __init__(self, routes: dict[str, Any] | None = None) -> None:
        self.routes: dict[str, Any] = dict(routes or {})
        self.requests: list[RecordedRequest] = []
        self.lock = threading.Lock()
        self.peer = RestartableServer(self._handler())
        self.url = self.peer.url

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        recorder = self

        class Handler(JsonHandler):
            def handle_any(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                request = RecordedRequest(
                    self.command, parts.path, parts.query, dict(self.headers.items()), self.rfile.read(length) if length else b""
                )
                with recorder.lock:
                    recorder.requests.append(request)
                route = recorder.routes.get(f"{self.command} {parts.path}", (404, {"error": "not found"}))
                status, body = route(request) if callable(route) else route
                self.reply(status, body)

            do_GET = do_POST = do_PUT = do_DELETE = handle_any

        return Handler

    def count(self, predicate: Callable[[RecordedRequest], bool] = lambda request: True) -> int:
        with self.lock:
            return sum(1 for request in self.requests if predicate(request))

    def close(self) -> None:
        self.peer.stop()
