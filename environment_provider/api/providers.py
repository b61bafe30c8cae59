"""Provider registration and testrun configuration.

`POST /register` stores provider definitions. `POST /configure` and `GET /configure` set and read a testrun's configuration.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from .. import keys
from ..collection import InvalidTestCollectionError, batches_of, parse_test_suites
from ..errors import ConfigurationError, TestrunCheckedOutError
from ..keys import EXECUTION_SPACE, IUT, LOG_AREA, Kind
from ..registry import (
    check_config,
    check_dataset,
    check_definition,
    check_timeouts,
    configure_testrun,
    list_providers,
    load_configuration,
    register_definitions,
)
from ..validation import DocumentTooLargeError, check_bounds, parse_json
from .errors import ApiError, errors_about
from .models import TESTRUN_ID, ConfigurationResponse, ConfigureRequest, RegisterRequest
from .responses import error_responses
from .services import Credentials, Services, ServicesDependency, require_token

LOGGER = logging.getLogger(__name__)
router = APIRouter()

REGISTER_FIELDS: tuple[tuple[str, Kind], ...] = (
    ("iut_provider", IUT),
    ("execution_space_provider", EXECUTION_SPACE),
    ("log_area_provider", LOG_AREA),
)
FIELD_OF_KIND = {kind.key: field for field, kind in REGISTER_FIELDS}


def definition_of(field: str, value: Any) -> Any:
    """Return a definition given as an object, or parsed from a string of JSON."""
    if isinstance(value, str):
        with errors_about(field):
            return parse_json(value, field)
    if not isinstance(value, dict):
        raise ApiError(
            400, f"field {field!r} is invalid: give a provider definition as a JSON object or a string of JSON", field
        )
    return value


@router.post(
    "/register",
    status_code=204,
    summary="Register provider definitions",
    description=(
        "Validates each given definition against the provider schema and stores them all in one etcd "
        "transaction: either every definition is registered or none is. A definition with the id of a "
        "registered provider of its kind replaces it. Each field takes an object or a string of JSON, and "
        "must hold a definition of its own kind. Give at least one.\n\n"
        "Needs `Authorization: Bearer <token>` when ENVIRONMENT_PROVIDER_API_TOKEN is set."
    ),
    response_class=Response,
    responses={204: {"description": "Every given definition was stored."}, **error_responses(400, 401, 422, 503)},
)
def register(body: RegisterRequest, services: ServicesDependency, credentials: Credentials) -> Response:
    require_token(services, credentials)
    provided = [(field, kind, getattr(body, field)) for field, kind in REGISTER_FIELDS if getattr(body, field) is not None]
    if not provided:
        raise ApiError(
            400, "give at least one of iut_provider, execution_space_provider and log_area_provider", "iut_provider"
        )

    definitions = []
    for field, expected, value in provided:
        definition = definition_of(field, value)
        with errors_about(field):
            kind, name = check_definition(definition, field)
        if kind is not expected:
            raise ApiError(
                422,
                f"{field} holds a {kind.label} provider definition ({kind.definition_key!r}); "
                f"send it as {FIELD_OF_KIND[kind.key]}, or send a {expected.definition_key!r} definition as {field}",
                field,
            )
        definitions.append((kind, name, definition))

    register_definitions(services.database, definitions)
    return Response(status_code=204)


def check_provider_ids(services: Services, body: ConfigureRequest) -> None:
    """Reject a provider id that names no registered provider of its kind, naming the field."""
    for field, kind in REGISTER_FIELDS:
        name = getattr(body, field)
        with errors_about(field):
            registered = services.database.get(keys.provider(kind, name)) is not None
        if not registered:
            known = sorted(list_providers(services.database, kind)[kind.key])
            raise ApiError(
                422,
                f"unknown {kind.label} provider {name!r}; registered: {', '.join(known) or 'none'}; "
                "register it with POST /register first",
                field,
            )


def stored_tercc(services: Services, testrun_id: str) -> Any:
    text = services.database.get(keys.tercc(testrun_id))
    if text is None:
        raise ApiError(
            422, f"field 'tercc' is missing and testrun {testrun_id} has no stored TERCC; send the TERCC event", "tercc"
        )
    return json.loads(text)


def suite_count_of(tercc: Any) -> int | None:
    """Count the test suites of a TERCC with inline batches.

    Return None when they are behind data.batchesUri, which this function does not fetch.
    """
    with errors_about("tercc"):
        if isinstance(tercc, dict) and isinstance(tercc.get("data"), dict) and "batches" not in tercc["data"]:
            if "batchesUri" not in tercc["data"]:
                batches_of(tercc)  # raises the error that names what is missing
            return None
        return len(parse_test_suites(batches_of(tercc)))


def dataset_of(value: Any) -> Any:
    """Return the dataset given as an object or a list, or parsed from a string of JSON."""
    if isinstance(value, str):
        with errors_about("dataset"):
            return parse_json(value, "dataset")
    if not isinstance(value, (dict, list)):
        raise ApiError(
            400, "field 'dataset' is invalid: give a JSON object, a list of objects, or a string of JSON", "dataset"
        )
    return value


@router.post(
    "/configure",
    response_model=ConfigurationResponse,
    summary="Configure a testrun",
    description=(
        "Chooses the registered IUT, execution space and log area providers for a testrun and stores them with "
        "the dataset, the TERCC, the config (identity, artifact_id, context) and the timeouts, in one etcd "
        "transaction. Everything is validated before anything is written. Configuring a testrun again replaces "
        "its configuration, unless it has checked-out environments (409). Returns the stored configuration.\n\n"
        "Needs `Authorization: Bearer <token>` when ENVIRONMENT_PROVIDER_API_TOKEN is set."
    ),
    responses=error_responses(400, 401, 409, 422, 503),
)
def configure(body: ConfigureRequest, services: ServicesDependency, credentials: Credentials) -> dict[str, Any]:
    require_token(services, credentials)
    with errors_about("suite_id"):
        testrun_id = keys.validate_uuid(body.suite_id, "testrun id")
    with errors_about("config"):
        config = check_config({} if body.config is None else body.config)
        check_bounds(config, "the config")
    with errors_about("timeouts"):
        timeouts = check_timeouts({} if body.timeouts is None else body.timeouts)
    tercc = stored_tercc(services, testrun_id) if body.tercc is None else body.tercc
    suite_count = suite_count_of(tercc)
    dataset = dataset_of(body.dataset)
    with errors_about("dataset"):
        check_bounds(dataset, "the dataset")
        check_dataset(dataset, suite_count)
    check_provider_ids(services, body)

    try:
        configuration = configure_testrun(
            services.database,
            services.settings,
            testrun_id,
            tercc,
            body.iut_provider,
            body.execution_space_provider,
            body.log_area_provider,
            dataset=dataset,
            config=config,
            timeouts=timeouts,
        )
    except TestrunCheckedOutError as error:
        raise ApiError(409, str(error), "suite_id") from None
    except ConfigurationError as error:
        # Every other field was checked above; what is left is the dataset against the test suites (maximum_amount).
        raise ApiError(422, str(error), "dataset") from None
    except InvalidTestCollectionError as error:
        raise ApiError(422, str(error), "tercc") from None
    except DocumentTooLargeError as error:
        raise ApiError(413, str(error), "tercc" if error.what == "the TERCC" else "body") from None
    return configuration.as_json()


@router.get(
    "/configure",
    response_model=ConfigurationResponse,
    summary="Read a testrun's configuration",
    description="Returns what `POST /configure` stored for the testrun, with its status and latest task id.",
    responses=error_responses(400, 404, 503),
)
def read_configuration(
    services: ServicesDependency,
    suite_id: Annotated[str, Query(description="The testrun id.", openapi_examples={"testrun": {"value": TESTRUN_ID}})],
) -> dict[str, Any]:
    with errors_about("suite_id"):
        testrun_id = keys.validate_uuid(suite_id, "testrun id")
    try:
        configuration = load_configuration(services.database, testrun_id)
    except ConfigurationError as error:
        raise ApiError(404, str(error), "suite_id") from None
    return configuration.as_json()
