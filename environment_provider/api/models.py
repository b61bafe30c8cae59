"""Request and response bodies of the HTTP API, with the examples shown in the OpenAPI document.

The shapes are those of the ETOS environment provider that ETOS suite
runners and the ETOS API already call. Request models accept extra keys, as
the old service did, and check the types of the keys they know.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

TESTRUN_ID = "5f2b8c4e-1a7d-4e3b-9c6f-8d0a2e4b6c18"
SUITE_RUNNER_IDS = ["6b1d2f0e-93a4-4c55-8e1f-0a7b2c3d4e5f", "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a"]
TASK_ID = "2c9a1d7e-4f3b-4e6a-9b8c-1d0e2f3a4b5c"
ENVIRONMENT_ID = "7a3e9c1b-5d2f-4a8e-b6c0-3f1d9e7a5b2c"
UUID_FORMAT: dict[str, Any] = {"format": "uuid"}
PROVIDER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

EXAMPLE_IUT_PROVIDER = {
    "iut": {
        "id": "static-devices",
        "list": {
            "possible": {"$expand": {"value": {"name": "$identity.name", "version": "$identity.version"}, "to": "$amount"}},
            "available": "$this.possible",
        },
    }
}
EXAMPLE_TERCC = {
    "meta": {"id": TESTRUN_ID, "type": "EiffelTestExecutionRecipeCollectionCreatedEvent", "version": "4.0.0"},
    "data": {
        "batches": [
            {
                "name": "Gateway smoke",
                "priority": 1,
                "recipes": [
                    {
                        "id": "3d0a6f7c-25b1-4f1e-8a0e-5c9b7d4e2a61",
                        "testCase": {"id": "test_boot", "tracker": "gateway-tests", "url": "http://tests.example.invalid/test_boot"},
                        "constraints": [
                            {"key": "ENVIRONMENT", "value": {}},
                            {"key": "PARAMETERS", "value": {}},
                            {"key": "COMMAND", "value": "pytest tests/test_boot.py"},
                            {"key": "TEST_RUNNER", "value": "registry.example.invalid/test-runners/python:3.12"},
                            {"key": "EXECUTE", "value": []},
                            {"key": "CHECKOUT", "value": ["git clone http://git.example.invalid/gateway-tests ."]},
                        ],
                    }
                ],
            }
        ]
    },
}
EXAMPLE_CONFIG = {
    "identity": "pkg:docker/acme/edge-gateway@5.2.0",
    "artifact_id": "1f6c2b9e-8d3a-4e57-b0c4-7a9e2d5f3b18",
    "context": "c7d94e21-5a08-4b3f-9e6d-2b1f8a4c7e53",
}
EXAMPLE_DATASET = {"runner_pool": "nightly", "log_server_url": "http://logs.example.invalid"}
EXAMPLE_TIMEOUTS = {"iut": 600, "execution-space": 300, "log-area": 300, "total": 1800}


# Fields that take more than one JSON type are validated by the routes, so that an
# error names the field alone instead of pydantic's location of one union member.
SuiteRunnerIds = Annotated[
    Any,
    WithJsonSchema({"anyOf": [{"type": "array", "items": {"type": "string", "format": "uuid"}}, {"type": "string"}]}),
]
Dataset = Annotated[
    Any,
    WithJsonSchema({"anyOf": [{"type": "object"}, {"type": "array", "items": {"type": "object"}}, {"type": "string"}]}),
]


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="allow")


class EnqueueRequest(RequestBody):
    """Enqueue the checkout of a configured testrun."""

    model_config = ConfigDict(
        extra="allow", json_schema_extra={"examples": [{"suite_id": TESTRUN_ID, "suite_runner_ids": SUITE_RUNNER_IDS}]}
    )

    suite_id: str = Field(description="The testrun id: the id of the TERCC event.", json_schema_extra=UUID_FORMAT)
    suite_runner_ids: SuiteRunnerIds = Field(
        description=(
            "One test suite started id (a UUID) per test suite of the test collection, in order, as a list or as "
            "a comma-separated string. Ids for the remaining test suites are generated; an empty list is allowed."
        ),
    )


class ConfigureRequest(RequestBody):
    """Configure a testrun from registered providers."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "suite_id": TESTRUN_ID,
                    "iut_provider": "static-devices",
                    "execution_space_provider": "local-runners",
                    "log_area_provider": "file-server",
                    "dataset": EXAMPLE_DATASET,
                    "tercc": EXAMPLE_TERCC,
                    "config": EXAMPLE_CONFIG,
                    "timeouts": EXAMPLE_TIMEOUTS,
                }
            ]
        },
    )

    suite_id: str = Field(description="The testrun id: the id of the TERCC event.", json_schema_extra=UUID_FORMAT)
    iut_provider: str = Field(description="Id of a registered IUT provider.", pattern=PROVIDER_ID_PATTERN)
    execution_space_provider: str = Field(
        description="Id of a registered execution space provider.", pattern=PROVIDER_ID_PATTERN
    )
    log_area_provider: str = Field(description="Id of a registered log area provider.", pattern=PROVIDER_ID_PATTERN)
    dataset: Dataset = Field(
        description=(
            "Values that provider rulesets can read: one object for every test suite, or a list with one object "
            "per test suite. A string is parsed as JSON."
        ),
    )
    tercc: dict[str, Any] | None = Field(
        None,
        description=(
            "The TERCC event (EiffelTestExecutionRecipeCollectionCreatedEvent) with data.batches or "
            "data.batchesUri. When absent, the TERCC already stored for this testrun is used."
        ),
    )
    config: dict[str, Any] | None = Field(
        None, description="identity (a package URL), artifact_id and context of the testrun; all strings."
    )
    timeouts: dict[str, Any] | None = Field(
        None,
        description=(
            "Seconds per kind: iut, execution-space and log-area bound the wait for available items, total bounds "
            "the whole checkout. Kinds left out use the service's settings."
        ),
    )


ProviderField = Annotated[Any, WithJsonSchema({"anyOf": [{"type": "object"}, {"type": "string"}, {"type": "null"}]})]


class RegisterRequest(RequestBody):
    """Provider definitions to validate and store; each is a JSON object or a string of JSON."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{"iut_provider": EXAMPLE_IUT_PROVIDER}]})

    iut_provider: ProviderField = Field(None, description='An IUT provider definition: {"iut": {...}}.')
    execution_space_provider: ProviderField = Field(
        None, description='An execution space provider definition: {"execution_space": {...}}.'
    )
    log_area_provider: ProviderField = Field(None, description='A log area provider definition: {"log": {...}}.')


class TaskId(BaseModel):
    id: str = Field(description="The Celery task id of the checkout.", json_schema_extra=UUID_FORMAT)


class EnqueueResponse(BaseModel):
    """The checkout was enqueued."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"result": "success", "data": {"id": TASK_ID}}]})

    result: Literal["success"]
    data: TaskId


class TaskStatusResponse(BaseModel):
    """The state and result of a checkout task."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"status": "STARTED", "result": None},
                {"status": "SUCCESS", "result": {"suites": [{"suite_name": "Gateway smoke", "sub_suites": []}], "error": None}},
                {"status": "FAILURE", "result": {"error": "provider 'static-devices' failed in stage 'list': ...", "details": "..."}},
            ]
        }
    )

    status: str = Field(
        description=(
            "The Celery state: PENDING, STARTED, SUCCESS or FAILURE. A finished checkout whose result has an "
            "error is reported as FAILURE, as the ETOS environment provider did."
        )
    )
    result: Any = Field(
        description=(
            "The task result once finished: {suites, error: null} on success, {error, details} on failure; "
            "null before that."
        )
    )


class ReleaseResponse(BaseModel):
    """A release that checked in everything it found."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"status": "SUCCESS", "released": [ENVIRONMENT_ID], "failures": [], "complete": True}]
        }
    )

    status: Literal["SUCCESS"]
    released: list[str] = Field(description="Environment ids whose IUT, execution space and log area were checked in.")
    failures: list[str] = Field(description="Always empty in a successful response.")
    complete: bool


class ConfigurationResponse(BaseModel):
    """The stored configuration of a testrun."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "suite_id": TESTRUN_ID,
                    "status": "configured",
                    "task_id": None,
                    "iut_provider": "static-devices",
                    "execution_space_provider": "local-runners",
                    "log_area_provider": "file-server",
                    "dataset": EXAMPLE_DATASET,
                    "config": EXAMPLE_CONFIG,
                    "timeouts": {"iut": 600.0, "total": 1800.0},
                    "tercc": EXAMPLE_TERCC,
                }
            ]
        }
    )

    suite_id: str
    status: str | None = Field(description="configured, checking out, checked out, failed, released, ...")
    task_id: str | None = Field(description="The id of the latest checkout task, if one was enqueued.")
    iut_provider: str
    execution_space_provider: str
    log_area_provider: str
    dataset: Any
    config: dict[str, Any]
    timeouts: dict[str, float]
    tercc: dict[str, Any]


class HealthResponse(BaseModel):
    """Health of a service whose etcd and Celery broker both respond."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok", "etcd": "ok", "broker": "ok"}]})

    status: Literal["ok"]
    etcd: str
    broker: str


class ErrorResponse(BaseModel):
    """An error: the message, and the request field it concerns (null when it concerns no single field)."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "error": "field 'suite_id' is missing",
                    "field": "suite_id",
                    "details": [{"field": "suite_id", "error": "field 'suite_id' is missing"}],
                }
            ]
        },
    )

    error: str
    field: str | None
    details: Any = None
