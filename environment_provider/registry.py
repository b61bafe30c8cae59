"""Provider registration and testrun configuration."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from packageurl import PackageURL

from . import keys
from .collection import InvalidTestCollectionError, TestSuite, check_tercc, parse_test_suites
from .errors import ConfigurationError, TestrunCheckedOutError
from .etcd import Database
from .keys import KINDS, KINDS_BY_DEFINITION_KEY, TIMEOUT_KINDS, InvalidIdError, Kind
from .providers.base import ProviderContext
from .providers.loader import provider_class
from .settings import Settings
from .validation import InvalidDocumentError, check_stored_size, parse_json, validate

LOGGER = logging.getLogger(__name__)
MAX_TIMEOUT = 7 * 24 * 3600


def dumps(value: Any) -> str:
    """Compact JSON, as every JSON value in etcd is stored."""
    return json.dumps(value, separators=(",", ":"))


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# Provider definitions.


def check_definition(definition: Any, source: str = "the provider definition") -> tuple[Kind, str]:
    """Validate a provider definition; return its kind and id or raise InvalidDocumentError."""
    validate(definition, "provider.json", source)
    check_stored_size(len(dumps(definition).encode()), source, "move large data into the dataset or behind a $request")
    (definition_key, inner), = definition.items()
    kind = KINDS_BY_DEFINITION_KEY[definition_key]
    try:
        provider_class(inner.get("type", "jsontas"))
    except ConfigurationError as error:
        raise InvalidDocumentError(f"{source} is invalid at $.{definition_key}.type: {error}") from None
    return kind, inner["id"]


@dataclass
class DefinitionFile:
    """A provider definition read from a file and validated."""

    path: Path
    kind: Kind
    name: str
    definition: dict[str, Any]


def definition_files(paths: list[str | Path]) -> list[Path]:
    """Expand folders into their `*.json` files (recursively, sorted); keep files as given."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(path.rglob("*.json")))
        else:
            files.append(path)
    return files


def read_definitions(paths: list[str | Path]) -> tuple[list[DefinitionFile], list[str]]:
    """Read and validate every definition under `paths`; return the valid ones and one error per invalid file."""
    valid, errors = [], []
    for path in definition_files(paths):
        try:
            text = path.read_bytes()
        except OSError as error:
            errors.append(f"{path}: cannot be read: {error.strerror}")
            continue
        try:
            definition = parse_json(text, str(path))
            kind, name = check_definition(definition, str(path))
        except InvalidDocumentError as error:
            errors.append(str(error))
            continue
        valid.append(DefinitionFile(path, kind, name, definition))
    return valid, errors


def register_definitions(database: Database, definitions: list[tuple[Kind, str, dict[str, Any]]]) -> None:
    """Store validated definitions in one transaction."""
    database.put_many({keys.provider(kind, name): dumps(definition) for kind, name, definition in definitions})
    for kind, name, _ in definitions:
        LOGGER.info("registered %s provider %r", kind.label, name)


def register_definition(database: Database, definition: Any, source: str = "the provider definition") -> tuple[Kind, str]:
    """Validate and store one definition; return its kind and id."""
    kind, name = check_definition(definition, source)
    register_definitions(database, [(kind, name, definition)])
    return kind, name


def list_providers(database: Database, kind: Kind | None = None) -> dict[str, dict[str, Any]]:
    """Return `{kind key: {provider id: definition}}` for one kind or all kinds."""
    listing = {}
    for each in [kind] if kind else KINDS:
        prefix = keys.provider_prefix(each)
        listing[each.key] = {key[len(prefix):]: json.loads(value) for key, value in database.get_prefix(prefix).items()}
    return listing


# Testrun configuration.


@dataclass
class TestrunConfiguration:
    """Everything configure stored for one testrun, read back in one range request."""

    __test__ = False

    testrun_id: str
    record: dict[str, Any]
    tercc: dict[str, Any]
    config: dict[str, Any]
    providers: dict[str, dict[str, Any]]
    dataset: Any
    timeouts: dict[str, float]
    task_id: str | None
    lease: int = 0
    sub_suite_keys: dict[str, str] = field(default_factory=dict)
    last_event: int = 0

    def provider_definition(self, kind: Kind) -> dict[str, Any]:
        """Return the inner definition (`id`, `type`, stages) of the chosen provider of `kind`."""
        definition = self.providers[kind.key]
        return definition[kind.definition_key]

    def provider_context(
        self, settings: Settings, dataset: dict[str, Any], progress: Callable[[str], None] | None = None
    ) -> ProviderContext:
        """Build what a provider of this testrun may know, for one test suite's `dataset`."""
        context = ProviderContext(
            testrun_id=self.testrun_id,
            settings=settings,
            dataset=dataset,
            identity=self.config.get("identity", ""),
            artifact_id=self.config.get("artifact_id", ""),
            context=self.config.get("context", ""),
            tercc=self.tercc,
        )
        if progress is not None:
            context.progress = progress
        return context

    def timeout(self, kind: str, settings: Settings) -> float:
        return self.timeouts.get(kind, settings.default_timeout(kind))

    def as_json(self) -> dict[str, Any]:
        return {
            "suite_id": self.testrun_id,
            "status": self.record.get("status"),
            "task_id": self.task_id,
            "iut_provider": self.provider_definition(keys.IUT)["id"],
            "execution_space_provider": self.provider_definition(keys.EXECUTION_SPACE)["id"],
            "log_area_provider": self.provider_definition(keys.LOG_AREA)["id"],
            "dataset": self.dataset,
            "config": self.config,
            "timeouts": self.timeouts,
            "tercc": self.tercc,
        }


def load_configuration(database: Database, testrun_id: str) -> TestrunConfiguration:
    """Read a testrun's configuration; raise ConfigurationError when it was never configured."""
    # One range request: the record key is the prefix of all the others, and ids have a fixed length.
    stored = database.get_prefix_with_leases(keys.testrun(testrun_id))
    record_text, lease = stored.pop(keys.testrun(testrun_id), (None, 0))
    values = {key: value for key, (value, _) in stored.items()}
    if record_text is None or keys.tercc(testrun_id) not in values:
        raise ConfigurationError(
            f"testrun {testrun_id} is not configured; run 'environment-provider configure --testrun {testrun_id} ...' "
            "or POST /configure first"
        )

    providers = {}
    for kind in KINDS:
        text = values.get(keys.testrun_provider(testrun_id, kind))
        if text is None:
            raise ConfigurationError(f"testrun {testrun_id} has no {kind.label} provider; configure it again")
        providers[kind.key] = json.loads(text)

    timeout_prefix = keys.timeout_prefix(testrun_id)
    timeouts = {key[len(timeout_prefix):]: float(value) for key, value in values.items() if key.startswith(timeout_prefix)}
    suites_prefix = keys.suites_prefix(testrun_id)
    sse_prefix = keys.sse_prefix(testrun_id)
    return TestrunConfiguration(
        testrun_id=testrun_id,
        record=json.loads(record_text),
        tercc=json.loads(values[keys.tercc(testrun_id)]),
        config=json.loads(values.get(keys.config(testrun_id), "{}")),
        providers=providers,
        dataset=json.loads(values.get(keys.dataset(testrun_id), "{}")),
        timeouts=timeouts,
        task_id=values.get(keys.task_id(testrun_id)),
        lease=lease,
        sub_suite_keys={key: value for key, value in values.items() if key.startswith(suites_prefix)},
        last_event=max((int(key[len(sse_prefix):]) for key in values if key.startswith(sse_prefix)), default=0),
    )


def check_dataset(dataset: Any, suite_count: int | None) -> None:
    """Require an object, or a list with one object per test suite."""
    if isinstance(dataset, dict):
        return
    if not isinstance(dataset, list) or not all(isinstance(item, dict) for item in dataset):
        raise ConfigurationError(
            f"the dataset must be a JSON object, or a list with one object per test suite; got {type(dataset).__name__}"
        )
    if suite_count is not None and len(dataset) != suite_count:
        raise ConfigurationError(
            f"the dataset is a list of {len(dataset)} objects but the TERCC has {suite_count} test suites; "
            "give one object per test suite, or a single object for all"
        )


def iut_bounds(dataset: dict[str, Any], suite: TestSuite) -> tuple[int, int]:
    """Return the (minimum, maximum) number of IUTs to check out for a test suite.

    The minimum is one per test runner; the maximum is the dataset's
    `maximum_amount` (default: the number of recipes), never more than the
    number of recipes. Raises ConfigurationError for an unusable maximum_amount.
    """
    recipe_count = len(suite.recipes)
    maximum = dataset.get("maximum_amount", recipe_count)
    if isinstance(maximum, bool) or not isinstance(maximum, int) or maximum < 1:
        raise ConfigurationError(f"dataset value maximum_amount={maximum!r} must be a whole number of at least 1")
    minimum = len(suite.recipes_by_runner)
    if maximum < minimum:
        raise ConfigurationError(
            f"maximum_amount={maximum} is lower than the {minimum} test runners of test suite {suite.name!r}; "
            f"raise it to at least {minimum}"
        )
    return minimum, min(maximum, recipe_count)


def check_config(config: Any) -> dict[str, Any]:
    """Validate the testrun config: `identity` (purl), `artifact_id` and `context` strings."""
    if not isinstance(config, dict):
        raise ConfigurationError(f"the config must be a JSON object; got {type(config).__name__}")
    for name in ("identity", "artifact_id", "context"):
        if name in config and not isinstance(config[name], str):
            raise ConfigurationError(f"config field {name!r} must be a string; got {type(config[name]).__name__}")
    if config.get("identity"):
        try:
            PackageURL.from_string(config["identity"])
        except ValueError as error:
            raise ConfigurationError(
                f"identity {config['identity']!r} is not a package URL ({error}); use a purl such as pkg:docker/acme/router@2.4.1"
            ) from None
    return config


def check_timeouts(timeouts: Any) -> dict[str, float]:
    """Validate `{kind: seconds}` for the kinds iut, execution-space, log-area and total."""
    if not isinstance(timeouts, dict):
        raise ConfigurationError(f"timeouts must be an object of kind to seconds; got {type(timeouts).__name__}")
    checked = {}
    for kind, seconds in timeouts.items():
        if kind not in TIMEOUT_KINDS:
            raise ConfigurationError(f"unknown timeout kind {kind!r}: use one of {', '.join(TIMEOUT_KINDS)}")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= MAX_TIMEOUT:
            raise ConfigurationError(
                f"timeout {kind}={seconds!r} must be a number of seconds greater than 0 and at most {MAX_TIMEOUT}"
            )
        checked[kind] = float(seconds)
    return checked


def testrun_lease(database: Database, testrun_id: str, settings: Settings) -> int:
    """Return the testrun's lease, granting a new one when it has none that is alive."""
    _, lease = database.get_with_lease(keys.testrun(testrun_id))
    if lease and database.lease_remaining(lease) > 0:
        return lease
    return database.grant_lease(settings.testrun_ttl)


def configure_testrun(
    database: Database,
    settings: Settings,
    testrun_id: str,
    tercc: Any,
    iut_provider: str,
    execution_space_provider: str,
    log_area_provider: str,
    dataset: Any = None,
    config: Any = None,
    timeouts: Any = None,
) -> TestrunConfiguration:
    """Validate everything, then store the testrun's configuration in one transaction.

    Raises InvalidIdError, InvalidTestCollectionError or ConfigurationError
    before anything is written.
    """
    testrun_id = keys.validate_uuid(testrun_id, "testrun id")
    dataset = {} if dataset is None else dataset
    config = check_config({} if config is None else config)
    timeouts = check_timeouts({} if timeouts is None else timeouts)

    # A collection behind data.batchesUri is fetched by the worker, which may reach hosts that this process cannot.
    suites = parse_test_suites(tercc["data"]["batches"]) if check_tercc(tercc) else None
    check_dataset(dataset, None if suites is None else len(suites))
    for index, suite in enumerate(suites or []):
        iut_bounds(dataset[index] if isinstance(dataset, list) else dataset, suite)

    chosen = {}
    for kind, name in ((keys.IUT, iut_provider), (keys.EXECUTION_SPACE, execution_space_provider), (keys.LOG_AREA, log_area_provider)):
        text = database.get(keys.provider(kind, name))
        if text is None:
            known = sorted(list_providers(database, kind)[kind.key])
            raise ConfigurationError(
                f"unknown {kind.label} provider {name!r}; registered: {', '.join(known) or 'none'}; "
                "register it with 'environment-provider register FILE' first"
            )
        chosen[kind] = text

    existing = database.keys_prefix(keys.suites_prefix(testrun_id))
    if existing:
        raise TestrunCheckedOutError(
            f"testrun {testrun_id} has checked-out environments; release it before configuring it again"
        )

    lease = testrun_lease(database, testrun_id, settings)
    timestamp = now()
    record = {"testrun_id": testrun_id, "status": "configured", "task_id": None, "created": timestamp, "updated": timestamp}
    values = {
        keys.testrun(testrun_id): dumps(record),
        keys.tercc(testrun_id): dumps(tercc),
        keys.config(testrun_id): dumps(config),
        keys.dataset(testrun_id): dumps(dataset),
    }
    values.update({keys.testrun_provider(testrun_id, kind): text for kind, text in chosen.items()})
    values.update({keys.timeout(testrun_id, kind): repr(seconds) for kind, seconds in timeouts.items()})
    stale = [keys.timeout(testrun_id, kind) for kind in TIMEOUT_KINDS if kind not in timeouts]
    check_stored_size(len(values[keys.tercc(testrun_id)].encode()), "the TERCC", "serve the test collection at data.batchesUri")
    check_stored_size(
        sum(len(value.encode()) for value in values.values()),
        "the testrun configuration",
        "serve the test collection at data.batchesUri and keep the dataset small",
    )
    database.put_many(values, lease=lease, delete=stale)
    LOGGER.info("configured testrun %s with providers %s, %s, %s", testrun_id, iut_provider, execution_space_provider, log_area_provider)
    return load_configuration(database, testrun_id)


def update_record(
    database: Database, testrun_id: str, lease: int, record: dict[str, Any] | None = None, **changes: Any
) -> dict[str, Any]:
    """Merge `changes` into the testrun record and store it.

    Pass the `record` the caller already read (it is updated in place) to save reading it again.
    Only the task that has the testrun's claim may do that.
    """
    if record is None:
        text = database.get(keys.testrun(testrun_id))
        record = json.loads(text) if text else {"testrun_id": testrun_id, "created": now()}
    record.update(changes, updated=now())
    database.put(keys.testrun(testrun_id), dumps(record), lease=lease)
    return record


__all__ = [
    "InvalidIdError",
    "InvalidTestCollectionError",
    "InvalidDocumentError",
    "ConfigurationError",
    "TestrunConfiguration",
    "check_definition",
    "configure_testrun",
    "list_providers",
    "load_configuration",
    "read_definitions",
    "register_definition",
    "register_definitions",
]
