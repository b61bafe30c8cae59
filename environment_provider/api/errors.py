"""Error responses of the HTTP API.

Every error is a JSON object `{"error": "<one-line message>", "field": <name or null>}`,
plus keys that a caller of the old ETOS environment provider reads (`details`,
`status`) where they apply. Bad input gets a 4xx naming the request field; an
unreachable etcd or broker gets a 503.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import grpc
import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..client import BrokerUnavailableError
from ..collection import InvalidTestCollectionError
from ..errors import ConfigurationError
from ..etcd import StorageRequestError, StorageUnavailableError
from ..keys import InvalidIdError
from ..settings import Settings
from ..validation import MAX_DEPTH, InvalidDocumentError

LOGGER = logging.getLogger(__name__)


class ApiError(Exception):
    """An error response: HTTP status, a one-line message, the request field it concerns and extra body keys."""

    def __init__(
        self, status_code: int, message: str, field: str | None = None, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.field = field
        self.headers = headers
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "field": self.field, **self.extra}


@contextlib.contextmanager
def errors_about(field: str | None) -> Iterator[None]:
    """Turn the project's input errors raised inside the block into ApiErrors that name `field`.

    An invalid id is a 400. A document that parses but fails validation, or a
    configuration that does not fit the registered providers, is a 422.
    """
    try:
        yield
    except InvalidIdError as error:
        raise ApiError(400, str(error), field) from None
    except (InvalidDocumentError, InvalidTestCollectionError, ConfigurationError) as error:
        raise ApiError(422, str(error), field) from None


def result_backend_error(settings: Settings, error: Exception) -> BrokerUnavailableError:
    return BrokerUnavailableError(
        f"the Celery result backend at {settings.result_backend} is not reachable ({error}); "
        "start Redis or set CELERY_RESULT_BACKEND"
    )


@contextlib.contextmanager
def result_backend_errors(settings: Settings) -> Iterator[None]:
    """Turn Redis connection errors raised while reading task results into BrokerUnavailableError.

    client.task_status translates only kombu's OperationalError, but the Redis
    result backend raises redis-py's own exceptions when Redis is down.
    """
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
        raise result_backend_error(settings, error) from None


PLACES = {"body": "field", "query": "query parameter", "header": "header", "path": "path parameter"}


def _field_of(location: tuple[Any, ...]) -> str:
    """Name a request field from a validation error location such as ('body', 'suite_runner_ids', 0)."""
    field = ""
    for part in location[1:]:
        if isinstance(part, int):
            field += f"[{part}]"
        elif field:
            field += f".{part}"
        else:
            field = str(part)
    return field or str(location[0])


def _describe(error: dict[str, Any], json_content: bool) -> tuple[str, str]:
    """Return the field and a one-line message for one pydantic validation error."""
    location = tuple(error.get("loc", ()))
    field = _field_of(location)
    kind = error.get("type", "")
    if kind == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", error.get("msg", ""))
        return "body", f"the request body is not valid JSON: {reason}"
    if location == ("body",) and kind == "missing":
        return "body", "the request body is missing; send a JSON object"
    if location == ("body",) and not json_content:
        return "body", "the request body must be a JSON object sent with the header 'Content-Type: application/json'"
    if location == ("body",):
        return "body", "the request body must be a JSON object"
    place = PLACES.get(str(location[0]), "field")
    if kind == "missing":
        return field, f"{place} {field!r} is missing"
    return field, f"{place} {field!r} is invalid: {error.get('msg', kind)}"


async def handle_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    json_content = content_type == "application/json" or content_type.endswith("+json")
    problems = [_describe(item, json_content) for item in error.errors()]
    field, message = problems[0]
    details = [{"field": name, "error": text} for name, text in problems]
    return JSONResponse(status_code=400, content={"error": message, "field": field, "details": details})


async def handle_api_error(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(status_code=error.status_code, content=error.body(), headers=error.headers)


async def handle_http_exception(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Give Starlette's own errors (unknown path, wrong method) and BodyTooLargeError the same body shape."""
    message = str(error.detail)
    field = None
    if isinstance(error, BodyTooLargeError):
        field = "body"
    elif error.status_code == 400:
        # FastAPI raises a bare 400 only when the JSON parser itself fails, as on a body nested thousands deep.
        field = "body"
        message = f"the request body could not be parsed ({message.lower()}); send a JSON object nested at most {MAX_DEPTH} levels deep"
    return JSONResponse(status_code=error.status_code, content={"error": message, "field": field}, headers=error.headers)


TOO_LARGE_FOR_ETCD = ("request is too large", "larger than max")


async def handle_grpc_error(request: Request, error: grpc.RpcError) -> JSONResponse:
    """Return the response for an etcd error that etcd.Database does not translate.

    A write that etcd rejects as too large is a 413, any other error a 503.
    """
    code = error.code() if isinstance(error, grpc.Call) else None
    details = (error.details() if isinstance(error, grpc.Call) else None) or str(code)
    if any(text in details for text in TOO_LARGE_FOR_ETCD):
        LOGGER.warning("%s %s: etcd rejected a write as too large: %s", request.method, request.url.path, details)
        message = f"the data is too large to store in etcd ({details}); send a smaller TERCC, dataset or definition"
        return JSONResponse(status_code=413, content={"error": message, "field": "body"})
    LOGGER.error("%s %s: etcd failed with %s: %s", request.method, request.url.path, code, details)
    return JSONResponse(status_code=503, content={"error": f"etcd failed ({code}: {details}); try again", "field": None})


async def handle_storage_request_error(request: Request, error: StorageRequestError) -> JSONResponse:
    """Return 413 for a write that etcd rejected, such as one over its request size limit."""
    LOGGER.warning("%s %s: %s", request.method, request.url.path, error)
    message = f"{error}; send a smaller TERCC, dataset or definition"
    return JSONResponse(status_code=413, content={"error": message, "field": "body"})


async def handle_unavailable(request: Request, error: Exception) -> JSONResponse:
    LOGGER.error("%s %s failed: %s", request.method, request.url.path, error)
    return JSONResponse(status_code=503, content={"error": str(error), "field": None})


async def handle_input_error(request: Request, error: Exception) -> JSONResponse:
    """Fallback for input errors that no route attributed to a field."""
    status_code = 400 if isinstance(error, InvalidIdError) else 422
    return JSONResponse(status_code=status_code, content={"error": str(error), "field": None})


async def handle_unexpected(request: Request, error: Exception) -> JSONResponse:
    LOGGER.exception("%s %s failed unexpectedly", request.method, request.url.path)
    return JSONResponse(status_code=500, content={"error": "internal error; see the API log", "field": None})


class BodyTooLargeError(StarletteHTTPException):
    """The request body is larger than the API accepts."""

    def __init__(self, limit: int, size: int | None = None) -> None:
        what = "larger than" if size is None else f"{size} bytes, more than"
        super().__init__(413, f"the request body is {what} the limit of {limit} bytes; send less data")


class BodySizeLimit:
    """Reject request bodies larger than `max_body_size` bytes with a 413 and a JSON error body.

    A declared Content-Length is checked before the body is read, and a
    chunked body is counted while the route reads it.
    """

    def __init__(self, app: ASGIApp, max_body_size: int) -> None:
        self.app = app
        self.max_body_size = max_body_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_size:
            error = BodyTooLargeError(self.max_body_size, int(declared))
            response = JSONResponse(status_code=413, content={"error": error.detail, "field": "body"})
            await response(scope, receive, send)
            return

        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_size:
                    raise BodyTooLargeError(self.max_body_size)
            return message

        await self.app(scope, receive_within_limit, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, handle_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, handle_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)  # type: ignore[arg-type]
    app.add_exception_handler(grpc.RpcError, handle_grpc_error)  # type: ignore[arg-type]
    app.add_exception_handler(StorageRequestError, handle_storage_request_error)  # type: ignore[arg-type]
    for unavailable in (StorageUnavailableError, BrokerUnavailableError):
        app.add_exception_handler(unavailable, handle_unavailable)
    for invalid in (InvalidIdError, InvalidDocumentError, InvalidTestCollectionError, ConfigurationError):
        app.add_exception_handler(invalid, handle_input_error)
    app.add_exception_handler(Exception, handle_unexpected)
