"""`GET /health`: checks that etcd and the Celery broker respond."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..client import BrokerUnavailableError, check_broker
from ..etcd import StorageUnavailableError
from .models import HealthResponse
from .services import ServicesDependency

router = APIRouter()

UNAVAILABLE_EXAMPLE = {
    "status": "unavailable",
    "error": "broker is down: the Celery broker at redis://redis:6379/0 is not reachable (...)",
    "field": None,
    "etcd": "ok",
    "broker": "the Celery broker at redis://redis:6379/0 is not reachable (...); start Redis or set CELERY_BROKER_URL",
}


async def probe(check: Callable[[], None]) -> str:
    """Run a blocking check; return "ok" or the reason it failed."""
    try:
        await run_in_threadpool(check)
    except (StorageUnavailableError, BrokerUnavailableError) as error:
        return str(error)
    return "ok"


@router.get(
    "/health",
    response_model=HealthResponse,
    summary="Check etcd and the Celery broker",
    description=(
        "Asks etcd for its status and connects to the Celery broker and result backend, both at once. "
        "Returns 200 when both respond, and 503 naming the one that is down otherwise."
    ),
    responses={503: {"description": "etcd or the broker is down.", "content": {"application/json": {"example": UNAVAILABLE_EXAMPLE}}}},
)
async def health(services: ServicesDependency) -> Any:
    etcd, broker = await asyncio.gather(
        probe(services.database.check), probe(lambda: check_broker(services.celery, services.settings))
    )
    down = [name for name, state in (("etcd", etcd), ("broker", broker)) if state != "ok"]
    if not down:
        return {"status": "ok", "etcd": etcd, "broker": broker}
    return JSONResponse(
        status_code=503,
        content={
            "status": "unavailable",
            "error": f"{' and '.join(down)} {'is' if len(down) == 1 else 'are'} down",
            "field": None,
            "etcd": etcd,
            "broker": broker,
        },
    )
