"""Bad input gets a clear error naming the value, writes nothing and leaves nothing checked out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest

from environment_provider import keys
from environment_provider.collection import InvalidTestCollectionError
from environment_provider.errors import ConfigurationError
from environment_provider.keys import InvalidIdError
from environment_provider.registry import configure_testrun, register_definition
from environment_provider.validation import InvalidDocumentError

from conftest import EXAMPLE_DATASET, ROOT, load_definition
from lab import LAB_PROVIDER

CLI = [sys.executable, "-m", "environment_provider.cli"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


def keys_of_testrun(database: Any, testrun_id: str) -> list[str]:
    return database.keys_prefix(keys.testrun(testrun_id))


def lab_dataset(lab: Any, **extra: Any) -> dict[str, Any]:
    return {**EXAMPLE_DATASET, "lab_url": lab.url, **extra}


# Provider definitions.


def test_invalid_definition_names_json_path(database):
    definition = load_definition("iut/static-devices.json", "broken-list")
    del definition["iut"]["list"]["available"]

    with pytest.raises(InvalidDocumentError, match=r"\$\.iut\.list.*'available' is a required property"):
        register_definition(database, definition)

    assert database.get(keys.provider(keys.IUT, "broken-list")) is None


def test_definition_with_bad_id_is_rejected(database):
    definition = load_definition("iut/static-devices.json", "../escape")

    with pytest.raises(InvalidDocumentError, match=r"\$\.iut\.id"):
        register_definition(database, definition)


def test_unknown_provider_type_lists_known_types(database):
    definition = load_definition("iut/static-devices.json", "odd-type")
    definition["iut"]["type"] = "no-such-type"

    with pytest.raises(InvalidDocumentError, match="known types are jsontas, external"):
        register_definition(database, definition)


def test_cli_register_all_or_nothing(database, tmp_path, unique):
    good = load_definition("iut/static-devices.json", f"good-{unique}")
    (tmp_path / "good.json").write_text(json.dumps(good))
    (tmp_path / "bad.json").write_text('{"iut": {"id": "x"')

    completed = run_cli("register", str(tmp_path))

    assert completed.returncode == 1
    assert "bad.json is not valid JSON" in completed.stderr
    assert "nothing registered" in completed.stderr
    assert database.get(keys.provider(keys.IUT, f"good-{unique}")) is None


# Testrun configuration.


def test_unknown_provider_is_rejected(database, settings, tercc, providers):
    testrun_id = tercc["meta"]["id"]

    with pytest.raises(ConfigurationError, match="unknown IUT provider 'no-such-provider'"):
        configure_testrun(database, settings, testrun_id, tercc, "no-such-provider", providers["execution-space"], providers["log-area"])

    assert keys_of_testrun(database, testrun_id) == []


@pytest.mark.parametrize("change", ["both", "neither"])
def test_tercc_needs_exactly_one_collection(database, settings, tercc, providers, change):
    if change == "both":
        tercc["data"]["batchesUri"] = "http://127.0.0.1:9/collection.json"
    else:
        del tercc["data"]["batches"]

    with pytest.raises(InvalidTestCollectionError, match=f"exactly one of data.batches and data.batchesUri, but it has {change}"):
        configure_testrun(database, settings, tercc["meta"]["id"], tercc, providers["iut"], providers["execution-space"], providers["log-area"])

    assert keys_of_testrun(database, tercc["meta"]["id"]) == []


def test_recipe_without_test_runner_is_rejected(database, settings, tercc, providers):
    recipe = tercc["data"]["batches"][0]["recipes"][1]
    recipe["constraints"] = [c for c in recipe["constraints"] if c["key"] != "TEST_RUNNER"]

    with pytest.raises(InvalidTestCollectionError, match=f"recipe '{recipe['id']}'.*has no TEST_RUNNER constraint"):
        configure_testrun(database, settings, tercc["meta"]["id"], tercc, providers["iut"], providers["execution-space"], providers["log-area"])

    assert keys_of_testrun(database, tercc["meta"]["id"]) == []


def test_dataset_list_must_match_suite_count(database, settings, tercc, providers):
    with pytest.raises(ConfigurationError, match="list of 3 objects but the TERCC has 2 test suites"):
        configure_testrun(
            database, settings, tercc["meta"]["id"], tercc, providers["iut"], providers["execution-space"], providers["log-area"],
            dataset=[{}, {}, {}],
        )  # fmt: skip

    assert keys_of_testrun(database, tercc["meta"]["id"]) == []


@pytest.mark.parametrize("testrun_id", ["a/b", "..", "../" + str(uuid.uuid4()), "", "x" * 5000, "not-a-uuid"])
def test_testrun_id_outside_uuid_is_rejected(database, settings, tercc, providers, testrun_id):
    with pytest.raises(InvalidIdError, match="invalid testrun id"):
        configure_testrun(database, settings, testrun_id, tercc, providers["iut"], providers["execution-space"], providers["log-area"])


@pytest.mark.parametrize("builder", [keys.testrun, keys.task_testrun, keys.environment_prefix])
@pytest.mark.parametrize("value", ["../etc", "a/b", "", None, str(uuid.uuid4()) + "/x"])
def test_key_builders_reject_escaping_ids(builder, value):
    with pytest.raises(InvalidIdError):
        builder(value)


def test_cli_release_rejects_slash_in_id():
    completed = run_cli("release", "--environment", "../../testrun")

    assert completed.returncode == 1
    assert "invalid environment id '../../testrun'" in completed.stderr


def test_bad_timeout_is_rejected(database, settings, tercc, providers):
    with pytest.raises(ConfigurationError, match="timeout iut=-1"):
        configure_testrun(
            database, settings, tercc["meta"]["id"], tercc, providers["iut"], providers["execution-space"], providers["log-area"],
            timeouts={"iut": -1},
        )  # fmt: skip


def test_invalid_identity_is_rejected(database, settings, tercc, providers):
    with pytest.raises(ConfigurationError, match="identity 'router 2.4' is not a package URL"):
        configure_testrun(
            database, settings, tercc["meta"]["id"], tercc, providers["iut"], providers["execution-space"], providers["log-area"],
            config={"identity": "router 2.4"},
        )  # fmt: skip


# The task.


def test_unconfigured_testrun_fails_without_keys(app, database, worker):
    testrun_id = str(uuid.uuid4())

    result = app.send_task("EnvironmentProvider", args=[testrun_id, []]).get(timeout=60)

    assert result["error"].startswith(f"testrun {testrun_id} is not configured")
    assert keys_of_testrun(database, testrun_id) == []


def test_task_rejects_id_with_slash(app, database, worker):
    result = app.send_task("EnvironmentProvider", args=["../../environment", []]).get(timeout=60)

    assert "invalid testrun id '../../environment'" in result["error"]


def test_cli_checkout_of_unconfigured_testrun_fails():
    testrun_id = str(uuid.uuid4())

    completed = run_cli("checkout", "--testrun", testrun_id)

    assert completed.returncode == 1
    assert f"testrun {testrun_id} is not configured" in completed.stderr


def test_provider_without_possible_iuts_fails_at_once(configure, checkout, database, tercc, lab):
    register_definition(database, LAB_PROVIDER)
    testrun_id = configure(tercc, iut="lab", config={"identity": "pkg:docker/acme/unknown-model@1.0"}, dataset=lab_dataset(lab))

    _, result = checkout(testrun_id)

    assert "no possible IUTs" in result["error"]
    assert "'lab'" in result["error"]
    assert database.keys_prefix(keys.suites_prefix(testrun_id)) == []


def test_timeout_waiting_for_iuts_checks_everything_in(configure, checkout, database, tercc, lab):
    register_definition(database, LAB_PROVIDER)
    for serial in list(lab.state.devices)[:5]:
        lab.state.devices[serial].reserved = True  # held by someone else: 1 of 6 free, 2 needed per suite
    testrun_id = configure(tercc, iut="lab", dataset=lab_dataset(lab), timeouts={"iut": 1.5, "total": 30})

    _, result = checkout(testrun_id)

    assert "timed out waiting for 2 available IUTs" in result["error"]
    assert database.keys_prefix(keys.suites_prefix(testrun_id)) == []
    assert lab.state.reserved == sorted(list(lab.state.devices)[:5])


def test_failed_execution_space_checks_in_iuts(configure, checkout, database, tercc, lab, unique):
    register_definition(database, LAB_PROVIDER)
    broken = load_definition("execution-space/local-runners.json", f"broken-es-{unique}")
    broken["execution_space"]["checkout"] = "no runner host is free"
    register_definition(database, broken)
    testrun_id = configure(tercc, iut="lab", execution_space=f"broken-es-{unique}", dataset=lab_dataset(lab), timeouts={"execution-space": 1, "total": 30})

    _, result = checkout(testrun_id)

    assert result["error"].startswith(f"provider 'broken-es-{unique}' failed in stage 'checkout'")
    assert "no runner host is free" in result["error"]
    assert lab.state.reserved == []
    assert lab.state.reservations == lab.state.releases
    assert database.keys_prefix(keys.suites_prefix(testrun_id)) == []
    record = json.loads(database.get(keys.testrun(testrun_id)))
    assert record["status"] == "failed"


def test_dead_management_system_is_named(configure, checkout, database, tercc, lab):
    register_definition(database, LAB_PROVIDER)
    dataset = lab_dataset(lab)
    lab.close()
    testrun_id = configure(tercc, iut="lab", dataset=dataset, timeouts={"iut": 1, "total": 30})

    _, result = checkout(testrun_id)

    assert f"{lab.url}/devices failed" in result["error"]
    assert "Connection refused" in result["error"]


# Unreachable servers.


def test_unreachable_etcd_is_named(tercc, tmp_path):
    (tmp_path / "tercc.json").write_text(json.dumps(tercc))

    completed = run_cli("providers", env={"ETOS_ETCD_HOST": "127.0.0.1", "ETOS_ETCD_PORT": "9", "ETOS_ETCD_TIMEOUT": "1"})

    assert completed.returncode == 1
    assert "etcd is not reachable at 127.0.0.1:9" in completed.stderr


def test_unreachable_redis_is_named(configure, database, tercc):
    testrun_id = configure(tercc)

    completed = run_cli("checkout", "--testrun", testrun_id, env={"CELERY_BROKER_URL": "redis://127.0.0.1:9/0", "CELERY_RESULT_BACKEND": "redis://127.0.0.1:9/0"})

    assert completed.returncode == 1
    assert "Celery broker at redis://127.0.0.1:9/0 is not reachable" in completed.stderr
    assert database.get(keys.task_id(testrun_id)) is None


def test_dataset_cannot_read_process_environment(configure, checkout, database, tercc, unique):
    leaky = load_definition("log-area/file-server.json", f"leaky-{unique}")
    leaky["log"]["list"]["possible"]["$expand"]["value"]["logs"] = {"path": "$PATH", "home": "$HOME", "globals": "$tercc.__class__.__init__.__globals__"}
    register_definition(database, leaky)
    testrun_id = configure(tercc, log_area=f"leaky-{unique}")

    _, result = checkout(testrun_id)

    logs = result["suites"][0]["sub_suites"][0]["log_area"]["logs"]
    assert logs["path"] == "$PATH"
    assert logs["home"] == "$HOME"
    assert logs["globals"] == "$tercc.__class__.__init__.__globals__"


def test_example_files_are_valid():
    from environment_provider.registry import read_definitions

    definitions, errors = read_definitions([ROOT / "providers"])

    assert errors == []
    assert sorted(item.kind.key for item in definitions) == ["execution-space", "iut", "log-area"]

