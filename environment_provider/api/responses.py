"""OpenAPI descriptions of the error responses, shared by the routes."""

from __future__ import annotations

from typing import Any

from .models import ErrorResponse

ERROR_EXAMPLES: dict[int, tuple[str, dict[str, Any]]] = {
    400: (
        "Missing or wrong-typed field, invalid JSON, a body that is not an object, or an id that is not a UUID.",
        {"error": "invalid testrun id 'abc': expected a UUID such as 3b4e...", "field": "suite_id"},
    ),
    401: (
        "A token is configured and the request has no valid 'Authorization: Bearer <token>' header.",
        {"error": "this request needs the header 'Authorization: Bearer <token>' ...", "field": "Authorization"},
    ),
    404: (
        "The testrun, task or environment is not known.",
        {"error": "task 2c9a1d7e-4f3b-4e6a-9b8c-1d0e2f3a4b5c is not known ...", "field": "id"},
    ),
    409: (
        "The testrun has checked-out environments; release it first.",
        {"error": "testrun 0e3f... has checked-out environments; release it before configuring it again", "field": "suite_id"},
    ),
    422: (
        "The request is well formed but its content cannot be used: an invalid provider definition (the message "
        "names the JSON path), an invalid TERCC, or an unknown provider.",
        {"error": "iut_provider is invalid at $.iut.list: 'available' is a required property", "field": "iut_provider"},
    ),
    502: (
        "A provider failed to check in some items; their keys are kept, so the release can be run again.",
        {
            "error": "the release is incomplete: 1 items could not be checked in",
            "field": None,
            "status": "FAILURE",
            "details": "environment 7a3e...: provider 'lab' failed in stage 'checkin': ...",
        },
    ),
    503: (
        "etcd or the Celery broker cannot be reached.",
        {"error": "etcd is not reachable at etcd:2379 (ConnectionFailedError); start etcd or ...", "field": None},
    ),
}


def error_responses(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """Build the `responses` argument of a route for these error status codes."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status_code in status_codes:
        description, example = ERROR_EXAMPLES[status_code]
        responses[status_code] = {
            "model": ErrorResponse,
            "description": description,
            "content": {"application/json": {"example": example}},
        }
    return responses
