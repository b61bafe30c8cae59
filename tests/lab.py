"""A small device management system on 127.0.0.1 that stands in for a real lab for IUT providers.

It lists devices, reserves and releases them, and "flashes" them, and keeps
its own record of who holds which device so tests can check that every IUT
checked out was checked in again.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Device:
    serial: str
    model: str
    reserved: bool = False


@dataclass
class LabState:
    devices: dict[str, Device] = field(default_factory=dict)
    reservations: int = 0
    releases: int = 0
    double_reservations: int = 0
    failing_flash: set[str] = field(default_factory=set)
    release_refused: bool = False
    flash_delay: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def reserved(self) -> list[str]:
        with self.lock:
            return sorted(serial for serial, device in self.devices.items() if device.reserved)


class Lab:
    """The server and its state; `url` is the base URL for datasets."""

    def __init__(self, count: int, model: str = "edge-gateway") -> None:
        self.state = LabState({f"SN{index:04d}": Device(f"SN{index:04d}", model) for index in range(count)})
        state = self.state

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def reply(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                if parts.path != "/devices":
                    return self.reply(404, {"message": "not found"})
                model = parse_qs(parts.query).get("model", [None])[0]
                with state.lock:
                    devices = [
                        {"serial": device.serial, "model": device.model, "reserved": device.reserved}
                        for device in state.devices.values()
                        if model is None or device.model == model
                    ]
                self.reply(200, devices)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                serial = body.get("serial")
                with state.lock:
                    device = state.devices.get(serial)
                    if device is None:
                        return self.reply(404, {"message": f"no device {serial}"})
                    if self.path == "/reserve":
                        if device.reserved:
                            state.double_reservations += 1
                            return self.reply(409, {"message": f"{serial} is already reserved"})
                        device.reserved = True
                        state.reservations += 1
                        return self.reply(200, {"serial": serial, "reserved_by": self.headers.get("X-ETOS-ID", "")})
                    if self.path == "/release":
                        if state.release_refused:
                            return self.reply(503, {"message": "maintenance"})
                        device.reserved = False
                        state.releases += 1
                        return self.reply(200, {"serial": serial})
                    if self.path == "/flash" and state.flash_delay:
                        # Sleep without the lock so that other requests go on meanwhile.
                        state.lock.release()
                        try:
                            time.sleep(state.flash_delay)
                        finally:
                            state.lock.acquire()
                    if self.path == "/flash":
                        if serial in state.failing_flash:
                            return self.reply(500, {"message": f"flashing {serial} failed"})
                        return self.reply(200, {"serial": serial, "version": body.get("image")})
                self.reply(404, {"message": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


LAB_PROVIDER = {
    "iut": {
        "id": "lab",
        "list": {
            "possible": {
                "$from": {
                    "item": {"$request": {"url": {"$join": {"strings": ["$lab_url", "/devices"]}}, "method": "GET", "params": {"model": "$identity.name"}}},
                    "get": "json",
                }
            },
            "available": {"$filter": {"items": "$this.possible", "filters": [{"key": "reserved", "operator": "$eq", "value": False}]}},
        },
        "checkout": {
            "$condition": {
                "then": {"$request": {"url": {"$join": {"strings": ["$lab_url", "/reserve"]}}, "method": "POST", "json": {"serial": "$iut.serial"}}},
                "if": {"key": "$response.status_code", "operator": "$eq", "value": 200},
                "else": "$response.json.message",
            }
        },
        "checkin": {"$request": {"url": {"$join": {"strings": ["$lab_url", "/release"]}}, "method": "POST", "json": {"serial": "$iut.serial"}}},
    }
}


LAB_PREPARE = {
    "stages": {
        "environment_provider": {
            "steps": {
                "flash": {
                    "$request": {
                        "url": {"$join": {"strings": ["$lab_url", "/flash"]}},
                        "method": "POST",
                        "json": {"serial": "$iut.serial", "image": "$identity.version"},
                        "timeout": 30,
                    }
                }
            }
        }
    }
}
