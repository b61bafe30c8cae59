"""Test collection parsing: the test suites and recipes of a TERCC."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

from .validation import InvalidDocumentError, parse_json, validate

CONSTRAINT_KEYS = ("ENVIRONMENT", "PARAMETERS", "COMMAND", "TEST_RUNNER", "EXECUTE", "CHECKOUT")
MAX_RECIPES = 100_000


class InvalidTestCollectionError(ValueError):
    """The TERCC or its test collection cannot be used; the message gives the reason and the JSON path."""


@dataclass
class TestSuite:
    """One test suite of the collection, with its recipes grouped by test runner image."""

    __test__ = False  # not a pytest test class

    name: str
    priority: int
    recipes: list[dict[str, Any]]
    recipes_by_runner: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def constraint(recipe: dict[str, Any], key: str) -> Any:
    """Return the value of one constraint of a recipe, or None when it is absent."""
    for item in recipe.get("constraints", []):
        if item.get("key") == key:
            return item.get("value")
    return None


def fetch_batches(uri: str, timeout: float) -> Any:
    """Download the test collection behind `data.batchesUri`."""
    try:
        response = httpx.get(uri, timeout=timeout, follow_redirects=True)
        response.raise_for_status()
    except httpx.HTTPError as error:
        raise InvalidTestCollectionError(
            f"could not fetch data.batchesUri {uri!r}: {error}; check that the URI is reachable from the worker"
        ) from None
    try:
        return parse_json(response.content, f"the test collection at {uri!r}")
    except InvalidDocumentError as error:
        raise InvalidTestCollectionError(str(error)) from None


def check_tercc(tercc: Any) -> bool:
    """Validate a TERCC without fetching anything; return whether it carries `data.batches` itself."""
    try:
        validate(tercc, "tercc.json", "the TERCC")
    except InvalidDocumentError as error:
        raise InvalidTestCollectionError(str(error)) from None

    data = tercc["data"]
    has_batches = "batches" in data
    if has_batches == ("batchesUri" in data):
        raise InvalidTestCollectionError(
            "the TERCC must have exactly one of data.batches and data.batchesUri, "
            f"but it has {'both' if has_batches else 'neither'}"
        )
    return has_batches


def batches_of(tercc: Any, fetch_timeout: float = 30.0) -> list[Any]:
    """Return the raw test collection of a TERCC, fetching `batchesUri` when needed."""
    if check_tercc(tercc):
        return tercc["data"]["batches"]
    return fetch_batches(tercc["data"]["batchesUri"], fetch_timeout)


def parse_test_suites(batches: Any) -> list[TestSuite]:
    """Validate a test collection and group each suite's recipes by their TEST_RUNNER."""
    try:
        validate(batches, "test-collection.json", "the test collection")
    except InvalidDocumentError as error:
        raise InvalidTestCollectionError(str(error)) from None

    total = sum(len(batch["recipes"]) for batch in batches)
    if total > MAX_RECIPES:
        raise InvalidTestCollectionError(
            f"the test collection has {total} recipes, more than the limit of {MAX_RECIPES}; split the testrun"
        )

    suites = []
    for suite_index, batch in enumerate(batches):
        suite = TestSuite(name=batch["name"], priority=batch.get("priority", 1), recipes=batch["recipes"])
        for recipe_index, recipe in enumerate(batch["recipes"]):
            runner = constraint(recipe, "TEST_RUNNER")
            if not isinstance(runner, str) or not runner:
                raise InvalidTestCollectionError(
                    f"recipe {recipe['id']!r} ($[{suite_index}].recipes[{recipe_index}]) in test suite "
                    f"{batch['name']!r} has no TEST_RUNNER constraint; add one naming the test runner image"
                )
            suite.recipes_by_runner.setdefault(runner, []).append(recipe)
        suites.append(suite)
    return suites


def test_suites_of(tercc: Any, fetch_timeout: float = 30.0) -> list[TestSuite]:
    """Return the parsed test suites of a TERCC."""
    return parse_test_suites(batches_of(tercc, fetch_timeout))
