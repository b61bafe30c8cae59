"""Settings read from environment variables into one typed object.

Every setting has a default that works with the local stack. The README lists
each variable with its unit and default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping


class SettingsError(ValueError):
    """An environment variable contains a value that cannot be used."""


def _positive_float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number; set it to seconds, for example 3600") from None
    if value <= 0:
        raise SettingsError(f"{name}={raw!r} must be greater than zero")
    return value


def _split_list(raw: str | None) -> list[str]:
    if not raw:
        return []
    return [part.strip() for part in raw.split(",") if part.strip()]


def parse_endpoint(text: str) -> tuple[str, int]:
    """Split `host:port` into its parts; raise SettingsError naming the value when it is malformed."""
    host, separator, port = text.rpartition(":")
    if not separator or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"etcd endpoint {text!r} is not host:port, for example 127.0.0.1:2379")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Settings:
    """Connection settings, default timeouts (seconds) and limits."""

    etcd_endpoints: tuple[tuple[str, int], ...] = (("localhost", 2379),)
    broker_url: str = "redis://localhost:6379/0"
    result_backend: str = "redis://localhost:6379/0"
    provider_directories: dict[str, str] = field(default_factory=dict)
    iut_timeout: float = 3600.0
    execution_space_timeout: float = 3600.0
    log_area_timeout: float = 3600.0
    total_timeout: float = 7200.0
    testrun_ttl: int = 86400
    etcd_timeout: float = 5.0
    environment_allowlist: tuple[str, ...] = ()
    request_allowed_hosts: tuple[str, ...] = ()
    request_timeout: float = 10.0
    api_token: str | None = None
    sweep_interval: float = 300.0
    visibility_timeout: float | None = None
    etcd_retries: int = 6

    @property
    def etcd_addresses(self) -> str:
        """The etcd endpoints as `host:port,...`, for error messages."""
        return ",".join(f"{host}:{port}" for host, port in self.etcd_endpoints)

    def default_timeout(self, kind: str) -> float:
        """Return the timeout in seconds for a kind (`iut`, `execution-space`, `log-area` or `total`)."""
        return {
            "iut": self.iut_timeout,
            "execution-space": self.execution_space_timeout,
            "log-area": self.log_area_timeout,
            "total": self.total_timeout,
        }[kind]

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Read every setting from `environ` (default: the process environment)."""
        env = os.environ if environ is None else environ

        endpoints_text = _split_list(env.get("ETOS_ETCD_ENDPOINTS"))
        if endpoints_text:
            endpoints = tuple(parse_endpoint(text) for text in endpoints_text)
        else:
            port_text = env.get("ETOS_ETCD_PORT", "2379")
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise SettingsError(f"ETOS_ETCD_PORT={port_text!r} is not a port number; set it to 1-65535, for example 2379")
            endpoints = (parse_endpoint(f"{env.get('ETOS_ETCD_HOST', 'localhost')}:{port_text}"),)

        broker_url = env.get("CELERY_BROKER_URL", "redis://localhost:6379/0")
        directories = {
            kind: env[variable]
            for kind, variable in (
                ("iut", "IUT_PROVIDERS"),
                ("execution-space", "EXECUTION_SPACE_PROVIDERS"),
                ("log-area", "LOG_AREA_PROVIDERS"),
            )
            if env.get(variable)
        }

        ttl = _positive_float(env, "ENVIRONMENT_PROVIDER_TESTRUN_TTL", 86400)
        return cls(
            etcd_endpoints=endpoints,
            broker_url=broker_url,
            result_backend=env.get("CELERY_RESULT_BACKEND", broker_url),
            provider_directories=directories,
            iut_timeout=_positive_float(env, "ENVIRONMENT_PROVIDER_WAIT_FOR_IUT_TIMEOUT", 3600),
            execution_space_timeout=_positive_float(
                env, "ENVIRONMENT_PROVIDER_WAIT_FOR_EXECUTION_SPACE_TIMEOUT", 3600
            ),
            log_area_timeout=_positive_float(env, "ENVIRONMENT_PROVIDER_WAIT_FOR_LOG_AREA_TIMEOUT", 3600),
            total_timeout=_positive_float(env, "ENVIRONMENT_PROVIDER_TOTAL_TIMEOUT", 7200),
            testrun_ttl=max(int(ttl), 10),
            etcd_timeout=_positive_float(env, "ETOS_ETCD_TIMEOUT", 5),
            environment_allowlist=tuple(_split_list(env.get("ENVIRONMENT_PROVIDER_ENVIRONMENT_ALLOWLIST"))),
            request_allowed_hosts=tuple(_split_list(env.get("ENVIRONMENT_PROVIDER_REQUEST_ALLOWED_HOSTS"))),
            request_timeout=_positive_float(env, "ENVIRONMENT_PROVIDER_REQUEST_TIMEOUT", 10),
            api_token=env.get("ENVIRONMENT_PROVIDER_API_TOKEN") or None,
            sweep_interval=_positive_float(env, "ENVIRONMENT_PROVIDER_SWEEP_INTERVAL", 300),
            visibility_timeout=_positive_float(env, "ENVIRONMENT_PROVIDER_VISIBILITY_TIMEOUT", 0) or None,
            etcd_retries=int(_positive_float(env, "ENVIRONMENT_PROVIDER_ETCD_RETRIES", 6)),
        )
