"""Objects the routes share (settings, the etcd database, a Celery app) and the bearer-token check."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import parse_qs

from celery import Celery
from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..etcd import Database
from ..settings import Settings
from .errors import ApiError

BEARER = HTTPBearer(
    auto_error=False,
    description="Required for register, configure and release when ENVIRONMENT_PROVIDER_API_TOKEN is set.",
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]


@dataclass
class Services:
    """One per app: the settings it was created with, its etcd client and its Celery app."""

    settings: Settings
    database: Database
    celery: Celery


def create_celery(settings: Settings) -> Celery:
    """Create a Celery app that only sends tasks and reads results, on the broker and backend of `settings`.

    The API does not reuse `environment_provider.celery_app.app`, because that
    app reads its settings from the process environment when it is imported,
    and `create_app` may be given other settings.
    """
    app = Celery("environment_provider", broker=settings.broker_url, backend=settings.result_backend, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_backend_transport_options={"retry_policy": {"timeout": 5.0}},
        redis_socket_connect_timeout=2.0,
        broker_connection_retry_on_startup=True,
    )
    return app


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDependency = Annotated[Services, Depends(get_services)]


def require_token(services: Services, credentials: HTTPAuthorizationCredentials | None) -> None:
    """Raise a 401 ApiError unless no token is configured or the request carries it as a bearer token."""
    token = services.settings.api_token
    if token is None:
        return
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ApiError(
            401,
            "this request needs the header 'Authorization: Bearer <token>' with the token of ENVIRONMENT_PROVIDER_API_TOKEN",
            "Authorization",
            headers=challenge,
        )
    if not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
        raise ApiError(
            401,
            "the bearer token is not the token of ENVIRONMENT_PROVIDER_API_TOKEN",
            "Authorization",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )


class TokenFirst:
    """ASGI middleware: check the bearer token of write requests before their body is read or validated.

    Without it, a request with neither token nor valid body would get a
    validation error, which tells an unauthenticated caller about the body
    it should send. `require_token` in the routes stays as a second check.
    """

    def __init__(self, app: Any, token: str | None) -> None:
        self.app = app
        self.token = token

    @staticmethod
    def protected(scope: dict[str, Any]) -> bool:
        method, path = scope.get("method"), scope.get("path")
        if method == "POST" and path in ("/register", "/configure"):
            return True
        if method == "GET" and path == "/":
            query = parse_qs(scope.get("query_string", b"").decode(errors="replace"))
            return "release" in query or "single_release" in query
        return False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.token and scope["type"] == "http" and self.protected(scope):
            header = dict(scope.get("headers") or []).get(b"authorization", b"").decode(errors="replace")
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or not value:
                message = "this request needs the header 'Authorization: Bearer <token>' with the token of ENVIRONMENT_PROVIDER_API_TOKEN"
                challenge = "Bearer"
            elif not hmac.compare_digest(value.strip().encode(), self.token.encode()):
                message = "the bearer token is not the token of ENVIRONMENT_PROVIDER_API_TOKEN"
                challenge = 'Bearer error="invalid_token"'
            else:
                await self.app(scope, receive, send)
                return
            response = JSONResponse(
                status_code=401, content={"error": message, "field": "Authorization"}, headers={"WWW-Authenticate": challenge}
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
