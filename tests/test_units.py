"""Pure functions: splitting, key parsing and settings."""

from __future__ import annotations

import uuid

import pytest

from environment_provider import keys
from environment_provider.settings import Settings, SettingsError
from environment_provider.splitter import assign_counts, split_round_robin


def test_each_runner_gets_one_iut_at_least():
    assert assign_counts({"a": 9, "b": 1}, 2) == {"a": 1, "b": 1}


def test_iuts_follow_recipe_share():
    assert assign_counts({"a": 30, "b": 10}, 8) == {"a": 6, "b": 2}


def test_runner_never_gets_more_iuts_than_recipes():
    counts = assign_counts({"a": 2, "b": 50}, 20)

    assert counts["a"] <= 2
    assert sum(counts.values()) == 20


def test_surplus_iuts_stay_unassigned():
    assert sum(assign_counts({"a": 1, "b": 2}, 10).values()) == 3


def test_fewer_iuts_than_runners_is_an_error():
    with pytest.raises(ValueError, match="2 IUTs cannot serve 3 test runners"):
        assign_counts({"a": 1, "b": 1, "c": 1}, 2)


def test_round_robin_deals_in_turn():
    assert split_round_robin([1, 2, 3, 4, 5], 2) == [[1, 3, 5], [2, 4]]


def test_sub_suite_key_round_trips():
    ids = [str(uuid.uuid4()) for _ in range(3)]

    parsed = keys.parse_sub_suite_key(keys.sub_suite_item(*ids, "log-area"))

    assert parsed == keys.SubSuiteKey(*ids, "log-area")


def test_uuid_in_other_form_is_rejected():
    value = uuid.uuid4()

    with pytest.raises(keys.InvalidIdError, match="canonical form"):
        keys.testrun("{" + str(value) + "}")


def test_settings_read_endpoints():
    settings = Settings.from_environment({"ETOS_ETCD_ENDPOINTS": "10.0.0.1:2379, 10.0.0.2:2380"})

    assert settings.etcd_endpoints == (("10.0.0.1", 2379), ("10.0.0.2", 2380))


def test_settings_reject_bad_timeout():
    with pytest.raises(SettingsError, match="ENVIRONMENT_PROVIDER_WAIT_FOR_IUT_TIMEOUT='soon'"):
        Settings.from_environment({"ENVIRONMENT_PROVIDER_WAIT_FOR_IUT_TIMEOUT": "soon"})


def test_result_backend_defaults_to_broker():
    settings = Settings.from_environment({"CELERY_BROKER_URL": "redis://127.0.0.1:7000/1"})

    assert settings.result_backend == "redis://127.0.0.1:7000/1"


def test_settings_name_bad_etcd_port():
    with pytest.raises(SettingsError, match="ETOS_ETCD_PORT='abc' is not a port number"):
        Settings.from_environment({"ETOS_ETCD_PORT": "abc"})
