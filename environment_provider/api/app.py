"""The FastAPI app: `create_app(settings)` wires the routes, the error handlers and the start-up registration."""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.concurrency import run_in_threadpool

from ..etcd import Database
from ..settings import Settings
from . import environment, events, health, providers
from .errors import BodySizeLimit, install_error_handlers
from .services import Services, TokenFirst, create_celery
from .startup import FolderRegistration

LOGGER = logging.getLogger(__name__)

# The largest request body accepted, in bytes: room for a TERCC and a dataset
# of up to 4 MiB each, the limit of one JSON document.
MAX_BODY_SIZE = 9 * 1024 * 1024

# Seconds that `environment-provider api` waits for open requests when it is
# stopped. Event streams stay open until their checkout finishes, so without a
# limit uvicorn would wait for them until the process is killed.
GRACEFUL_SHUTDOWN_SECONDS = 5

DESCRIPTION = """\
The ETOS-compatible HTTP API of the environment provider. A suite starter
registers provider definitions, configures a testrun with one provider of
each kind and a dataset, enqueues the checkout, polls its status, follows its
progress as server-sent events, and releases the environments when the tests
are done.

When the setting ENVIRONMENT_PROVIDER_API_TOKEN is set, `POST /register`,
`POST /configure` and the two releases of `GET /` need the header
`Authorization: Bearer <token>`. Reading a status, a configuration, the
events or the health needs no token.

Every error response is a JSON object with `error` (what failed and what to
do) and `field` (the request field it concerns, or null).
"""


def create_app(settings: Settings) -> FastAPI:
    """Create the API app for `settings`; provider folders are registered when the app starts."""
    services = Services(settings=settings, database=Database(settings), celery=create_celery(settings))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registration = FolderRegistration(services.database, settings.provider_directories)
        await run_in_threadpool(registration.start)
        if settings.api_token:
            LOGGER.info("the API requires a bearer token for register, configure and release")
        try:
            yield
        finally:
            registration.stop()
            services.celery.close()
            services.database.forget_client()

    app = FastAPI(
        title="ETOS environment provider",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.services = services
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_body_size=MAX_BODY_SIZE)
    app.add_middleware(TokenFirst, token=settings.api_token)
    for module in (environment, providers, events, health):
        app.include_router(module.router)
    app.openapi = lambda: openapi_document(app)  # type: ignore[method-assign]
    return app


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI document, corrected where this API differs from FastAPI's defaults.

    FastAPI documents a 422 with its own validation error body on every
    route with parameters, but this API returns a 400 with an ErrorResponse
    body for request validation errors. The bearer token is optional
    unless ENVIRONMENT_PROVIDER_API_TOKEN is set, so `{}` (no security) is
    listed as an alternative.
    """
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    for operations in document["paths"].values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if "HTTPValidationError" in json.dumps(responses.get("422", {})):
                del responses["422"]
            if "security" in operation:
                operation["security"] = [*operation["security"], {}]
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    app.openapi_schema = document
    return document
