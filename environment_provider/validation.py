"""JSON Schema validation and size bounds for documents from users."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import jsonschema
from referencing import Registry, Resource

MAX_DOCUMENT_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 64
# etcd rejects a request over --max-request-bytes (1.5 MiB by default); this leaves room for the other keys.
MAX_STORED_BYTES = 1_400_000


class InvalidDocumentError(ValueError):
    """A document failed validation; the message names the JSON path and the reason."""


class DocumentTooLargeError(InvalidDocumentError):
    """A document is larger than etcd accepts in one request; `what` names the document."""

    def __init__(self, message: str, what: str) -> None:
        super().__init__(message)
        self.what = what


@functools.cache
def _schema_registry() -> tuple[Registry, dict[str, Any]]:
    schemas = {}
    registry: Registry = Registry()
    for name in ("provider.json", "tercc.json", "test-collection.json"):
        schema = json.loads(resources.files(__package__).joinpath("schemas", name).read_text())
        schemas[name] = schema
        registry = registry.with_resource(schema["$id"], Resource.from_contents(schema))
    return registry, schemas


def _depth(value: Any, limit: int) -> int:
    """Return the nesting depth of `value`, stopping once it passes `limit`."""
    stack = [(value, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return deepest


def check_bounds(document: Any, what: str) -> None:
    """Reject documents nested deeper than MAX_DEPTH levels."""
    if _depth(document, MAX_DEPTH) > MAX_DEPTH:
        raise InvalidDocumentError(f"{what} is nested deeper than {MAX_DEPTH} levels; flatten it")


def check_stored_size(size: int, what: str, hint: str) -> None:
    """Reject a value of `size` bytes that etcd would refuse to store; `hint` tells the user what to do instead."""
    if size > MAX_STORED_BYTES:
        raise DocumentTooLargeError(
            f"{what} is too large: {size} bytes as JSON, more than the limit of {MAX_STORED_BYTES} bytes that etcd "
            f"accepts in one request; {hint}",
            what,
        )


def parse_json(text: str | bytes, what: str) -> Any:
    """Parse JSON text of at most MAX_DOCUMENT_BYTES; raise InvalidDocumentError naming `what`."""
    if len(text) > MAX_DOCUMENT_BYTES:
        raise InvalidDocumentError(
            f"{what} is {len(text)} bytes, more than the limit of {MAX_DOCUMENT_BYTES} bytes"
        )
    try:
        document = json.loads(text)
    except RecursionError:
        raise InvalidDocumentError(f"{what} is nested too deeply to parse") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidDocumentError(f"{what} is not valid JSON: {error}") from None
    check_bounds(document, what)
    return document


@functools.cache
def _validator(schema_name: str) -> jsonschema.Draft202012Validator:
    registry, schemas = _schema_registry()
    return jsonschema.Draft202012Validator(schemas[schema_name], registry=registry)


def validate(document: Any, schema_name: str, what: str) -> None:
    """Validate `document` against a bundled schema; the error names the first failing JSON path."""
    check_bounds(document, what)
    validator = _validator(schema_name)
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is not None:
        raise InvalidDocumentError(f"{what} is invalid at {error.json_path}: {error.message}")
