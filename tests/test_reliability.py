"""Faults, fast representatives: a worker killed mid-checkout, a second delivery, expiring testruns, etcd down."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import time
import uuid

import pytest

from environment_provider import keys
from environment_provider.registry import configure_testrun, register_definition
from environment_provider.release import sweep

from conftest import EXAMPLE_CONFIG, EXAMPLE_DATASET
from external_service import Behaviour, external  # noqa: F401 - `external` is a fixture
from lab import LAB_PREPARE, LAB_PROVIDER


@pytest.fixture
def slow_lab(lab, database, unique):
    """The lab IUT provider with a flash step that takes a second per IUT."""
    definition = copy.deepcopy(LAB_PROVIDER)
    definition["iut"]["id"] = f"slow-lab-{unique}"
    definition["iut"]["prepare"] = LAB_PREPARE
    register_definition(database, definition)
    lab.state.flash_delay = 1.0
    return definition["iut"]["id"]


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def lab_dataset(lab):
    return {**EXAMPLE_DATASET, "lab_url": lab.url}


def test_killed_worker_is_redone_without_leaks(configure, app, database, worker, tercc, lab, slow_lab):
    tercc["data"]["batches"] = tercc["data"]["batches"][1:]
    testrun_id = configure(tercc, iut=slow_lab, dataset=lab_dataset(lab))
    result = app.send_task("EnvironmentProvider", args=[testrun_id, []])

    holder = wait_for(lambda: database.get(keys.claim(testrun_id)), 20, "the claim")
    # Kill once both IUTs are recorded in etcd: a kill between the lab's reply and the etcd write
    # would leak that IUT, and no release can know about it.
    wait_for(lambda: len([k for k in database.keys_prefix(keys.suites_prefix(testrun_id)) if k.endswith("/iut")]) == 2, 20, "two recorded IUTs")
    os.kill(json.loads(holder)["pid"], signal.SIGKILL)
    value = result.get(timeout=90)

    assert value["error"] is None
    held = sorted(sub["iut"]["serial"] for suite in value["suites"] for sub in suite["sub_suites"])
    assert lab.state.reserved == held
    assert lab.state.reservations - lab.state.releases == len(held)
    assert json.loads(database.get(keys.testrun(testrun_id)))["attempts"] == 2


def test_second_delivery_does_not_check_out_again(configure, app, database, worker, tercc, lab, slow_lab):
    tercc["data"]["batches"] = tercc["data"]["batches"][1:]
    testrun_id = configure(tercc, iut=slow_lab, dataset=lab_dataset(lab))
    task_id = str(uuid.uuid4())
    first = app.send_task("EnvironmentProvider", args=[testrun_id, []], task_id=task_id)
    wait_for(lambda: database.get(keys.claim(testrun_id)), 20, "the claim")

    app.send_task("EnvironmentProvider", args=[testrun_id, []], task_id=task_id)
    value = first.get(timeout=60)
    time.sleep(1.0)  # let the second delivery see the outcome and exit

    assert value["error"] is None
    assert lab.state.reservations == 2
    assert len(lab.state.reserved) == 2
    assert database.get(keys.claim(testrun_id)) is None


def test_second_checkout_of_checked_out_testrun_fails(configure, checkout, database, tercc):
    testrun_id = configure(tercc)
    first_task, first = checkout(testrun_id)

    _, second = checkout(testrun_id)

    assert second["error"] == f"testrun {testrun_id} is already checked out by task {first_task}; release it first"
    environments = [sub["sub_suite_id"] for suite in first["suites"] for sub in suite["sub_suites"]]
    assert all(database.get(keys.environment_testrun(env)) == testrun_id for env in environments)


def test_sweep_releases_expiring_testrun(database, settings, providers, checkout, tercc, lab):
    register_definition(database, LAB_PROVIDER)
    short_lived = dataclasses.replace(settings, testrun_ttl=30)
    testrun_id = tercc["meta"]["id"]
    configure_testrun(
        database, short_lived, testrun_id, tercc, "lab", providers["execution-space"], providers["log-area"],
        dataset=lab_dataset(lab), config=dict(EXAMPLE_CONFIG),
    )  # fmt: skip
    checkout(testrun_id)
    assert len(lab.state.reserved) == 6

    released = sweep(database, settings, margin=60)

    assert testrun_id in released
    assert lab.state.reserved == []
    assert database.keys_prefix(keys.suites_prefix(testrun_id)) == []


def test_sweep_leaves_long_lived_testruns(configure, checkout, database, settings, tercc):
    testrun_id = configure(tercc)
    checkout(testrun_id)

    released = sweep(database, settings, margin=60)

    assert testrun_id not in released
    assert database.keys_prefix(keys.suites_prefix(testrun_id)) != []


def test_unreachable_etcd_fails_after_retries(stack, app):
    worker = stack.start_worker(
        concurrency=1, name="etcd-down", queue="etcd-down",
        extra_env={"ETOS_ETCD_PORT": "9", "ETOS_ETCD_TIMEOUT": "1", "ENVIRONMENT_PROVIDER_ETCD_RETRIES": "1"},
    )  # fmt: skip
    try:
        value = app.send_task("EnvironmentProvider", args=[str(uuid.uuid4()), []], queue="etcd-down").get(timeout=60)
    finally:
        stack.stop_worker(worker)

    assert value["error"].startswith("etcd is not reachable at 127.0.0.1:9")


def test_killed_worker_during_external_request_leaks_nothing(configure, app, database, worker, tercc, external, unique):
    service = external("iut", Behaviour(pending_seconds=2))
    register_definition(database, service.definition(f"slow-external-{unique}"))
    tercc["data"]["batches"] = tercc["data"]["batches"][1:]
    testrun_id = configure(tercc, iut=f"slow-external-{unique}")
    result = app.send_task("EnvironmentProvider", args=[testrun_id, []])

    holder = wait_for(lambda: database.get(keys.claim(testrun_id)), 20, "the claim")
    wait_for(
        lambda: any("external_request_id" in value for value in database.get_prefix(keys.suites_prefix(testrun_id)).values()),
        20,
        "the placeholder of the pending request",
    )
    os.kill(json.loads(holder)["pid"], signal.SIGKILL)
    value = result.get(timeout=90)

    assert value["error"] is None
    held = sorted(sub["iut"]["id"] for suite in value["suites"] for sub in suite["sub_suites"])
    assert sorted(service.state.checked_out) == held
    assert len(service.state.stopped) == 2
