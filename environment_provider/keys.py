"""Every etcd key the environment provider reads or writes, with id validation.

No other module builds a key string. Each builder validates its ids first, so
an id such as `../x` or `a/b` is rejected before any key exists.

Keys and their values (all UTF-8; JSON is compact):

    /environment/provider/{kind}/{NAME}        provider definition JSON
    /testrun/{testrun}                          testrun record JSON (status, task id, timestamps)
    /testrun/{testrun}/tercc                    the TERCC event JSON
    /testrun/{testrun}/config                   config JSON: identity, artifact_id, context
    /testrun/{testrun}/config/timeout/{kind}    seconds as decimal text (kind includes `total`)
    /testrun/{testrun}/provider/{kind}          copy of the chosen provider definition
    /testrun/{testrun}/provider/dataset         dataset JSON: object, or list per test suite
    /testrun/{testrun}/environment-provider/task-id   Celery task id
    /testrun/{testrun}/environment-provider/claim     the task attempt working on the testrun
                                                (JSON; on its own short lease, see claim.py)
    /testrun/{testrun}/suite/{suite}/subsuite/{environment}/{item}
                                                item = iut, execution-space, log-area (JSON)
                                                or suite (the sub-suite JSON)
    /testrun/{testrun}/sse/{sequence}           one progress event JSON
    /environment/{task}/suite-id                testrun id of a Celery task
    /environment/{environment}/testrun-id       testrun id of an environment
    /environment/{environment}/suite-id         test suite started id of an environment
    /environment/{environment}/suite-idi        legacy spelling, read only

Everything under `/testrun/{testrun}/` and the `/environment/` keys of its
task and environments share the testrun's lease, so they expire together.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass


class InvalidIdError(ValueError):
    """An id cannot be used in a key: not a UUID, or not a valid provider name."""


PROVIDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_SHOWN_ID = 80


@dataclass(frozen=True)
class Kind:
    """One provider kind and the names it goes by in keys, definitions and datasets.

    `key` is the kind in etcd keys and on the command line, `definition_key`
    the top-level key of a provider definition, `dataset_key` the name under
    which a checked-out item is visible to rulesets, `external_key` the list
    in an external provider's status response, and `sub_suite_key` where the
    item sits in the sub-suite JSON.
    """

    key: str
    definition_key: str
    dataset_key: str
    external_key: str
    sub_suite_key: str
    label: str


IUT = Kind("iut", "iut", "iut", "iuts", "iut", "IUT")
EXECUTION_SPACE = Kind(
    "execution-space", "execution_space", "execution_space", "execution_spaces", "executor", "execution space"
)
LOG_AREA = Kind("log-area", "log", "log_area", "log_areas", "log_area", "log area")
KINDS: tuple[Kind, ...] = (IUT, EXECUTION_SPACE, LOG_AREA)
KINDS_BY_KEY = {kind.key: kind for kind in KINDS}
KINDS_BY_DEFINITION_KEY = {kind.definition_key: kind for kind in KINDS}
TIMEOUT_KINDS = ("iut", "execution-space", "log-area", "total")
SUB_SUITE_ITEMS = ("iut", "execution-space", "log-area", "suite")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= MAX_SHOWN_ID else text[:MAX_SHOWN_ID] + "...'"


def validate_uuid(value: object, what: str) -> str:
    """Return `value` as a canonical lower-case UUID string; raise InvalidIdError naming `what` otherwise."""
    if not isinstance(value, str) or len(value) > 64:
        raise InvalidIdError(f"invalid {what} {_shown(value)}: expected a UUID such as {uuid.uuid4()}")
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise InvalidIdError(f"invalid {what} {_shown(value)}: expected a UUID such as {uuid.uuid4()}") from None
    if str(parsed) != value.lower():
        # uuid.UUID accepts forms such as '{...}' or 'urn:uuid:...'; keys use only the canonical form.
        raise InvalidIdError(f"invalid {what} {_shown(value)}: write it in the canonical form {parsed}")
    return str(parsed)


def validate_provider_name(value: object) -> str:
    """Return `value` when it is a valid provider id; raise InvalidIdError otherwise."""
    if not isinstance(value, str) or not PROVIDER_NAME.fullmatch(value):
        raise InvalidIdError(
            f"invalid provider id {_shown(value)}: use 1 to 128 characters of letters, digits, '.', '_' "
            "and '-', starting with a letter or digit"
        )
    return value


def kind_by_key(value: str) -> Kind:
    """Return the Kind for `iut`, `execution-space` or `log-area`."""
    try:
        return KINDS_BY_KEY[value]
    except KeyError:
        raise InvalidIdError(
            f"unknown provider kind {_shown(value)}: use one of {', '.join(KINDS_BY_KEY)}"
        ) from None


# Provider registry.


def provider_prefix(kind: Kind) -> str:
    return f"/environment/provider/{kind.key}/"


def provider(kind: Kind, name: str) -> str:
    return provider_prefix(kind) + validate_provider_name(name)


# Testrun keys.


def testrun(testrun_id: str) -> str:
    return f"/testrun/{validate_uuid(testrun_id, 'testrun id')}"


def testrun_prefix(testrun_id: str) -> str:
    return testrun(testrun_id) + "/"


def tercc(testrun_id: str) -> str:
    return testrun(testrun_id) + "/tercc"


def config(testrun_id: str) -> str:
    return testrun(testrun_id) + "/config"


def timeout(testrun_id: str, kind: str) -> str:
    if kind not in TIMEOUT_KINDS:
        raise InvalidIdError(f"unknown timeout kind {_shown(kind)}: use one of {', '.join(TIMEOUT_KINDS)}")
    return timeout_prefix(testrun_id) + kind


def timeout_prefix(testrun_id: str) -> str:
    return testrun(testrun_id) + "/config/timeout/"


def testrun_provider(testrun_id: str, kind: Kind) -> str:
    return testrun(testrun_id) + f"/provider/{kind.key}"


def dataset(testrun_id: str) -> str:
    return testrun(testrun_id) + "/provider/dataset"


def task_id(testrun_id: str) -> str:
    return testrun(testrun_id) + "/environment-provider/task-id"


def claim(testrun_id: str) -> str:
    """Key held, on a short lease of its own, by the one task attempt that works on the testrun."""
    return testrun(testrun_id) + "/environment-provider/claim"


def testruns_prefix() -> str:
    return "/testrun/"


def environments_prefix() -> str:
    return "/environment/"


def suites_prefix(testrun_id: str) -> str:
    return testrun(testrun_id) + "/suite/"


def sub_suite_prefix(testrun_id: str, suite_id: str, environment_id: str) -> str:
    suite_id = validate_uuid(suite_id, "test suite started id")
    environment_id = validate_uuid(environment_id, "environment id")
    return testrun(testrun_id) + f"/suite/{suite_id}/subsuite/{environment_id}/"


def sub_suite_item(testrun_id: str, suite_id: str, environment_id: str, item: str) -> str:
    """Key of one part of a sub-suite: `iut`, `execution-space`, `log-area` or `suite`."""
    if item not in SUB_SUITE_ITEMS:
        raise InvalidIdError(f"unknown sub-suite item {_shown(item)}: use one of {', '.join(SUB_SUITE_ITEMS)}")
    return sub_suite_prefix(testrun_id, suite_id, environment_id) + item


@dataclass(frozen=True)
class SubSuiteKey:
    """The parts of a parsed sub-suite key."""

    testrun_id: str
    suite_id: str
    environment_id: str
    item: str


SUB_SUITE_KEY = re.compile(r"/testrun/([0-9a-f-]{36})/suite/([0-9a-f-]{36})/subsuite/([0-9a-f-]{36})/([a-z-]+)")


def parse_sub_suite_key(key: str) -> SubSuiteKey | None:
    """Split a sub-suite key into its ids; return None for any other key."""
    match = SUB_SUITE_KEY.fullmatch(key)
    if match is None or match.group(4) not in SUB_SUITE_ITEMS:
        return None
    return SubSuiteKey(*match.groups())


def sse_prefix(testrun_id: str) -> str:
    return testrun(testrun_id) + "/sse/"


def sse(testrun_id: str, sequence: int) -> str:
    return sse_prefix(testrun_id) + str(int(sequence))


# Backward-compatible lookups.


def task_testrun(task: str) -> str:
    """Key that maps a Celery task id to its testrun id."""
    return f"/environment/{validate_uuid(task, 'task id')}/suite-id"


def environment_prefix(environment_id: str) -> str:
    return f"/environment/{validate_uuid(environment_id, 'environment id')}/"


def environment_testrun(environment_id: str) -> str:
    return environment_prefix(environment_id) + "testrun-id"


def environment_suite(environment_id: str) -> str:
    return environment_prefix(environment_id) + "suite-id"


def environment_suite_legacy(environment_id: str) -> str:
    """Return the legacy `suite-idi` spelling of `environment_suite`, read as a fallback only."""
    return environment_prefix(environment_id) + "suite-idi"
