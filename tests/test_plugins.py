"""Provider types from installed packages: a plug-in is pip-installed, served by a worker of its own, and removed.

The plug-in is tests/plugin_package (provider type `file-pool`). Entry points
are read once per process, so the worker that serves these tests starts
after the install. It consumes an extra queue that only these tests send
the checkout task to.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from celery import Celery

from environment_provider import keys
from environment_provider.client import enqueue_checkout, wait_for_result
from environment_provider.keys import KINDS_BY_KEY
from environment_provider.providers import known_types, loader
from environment_provider.registry import register_definition
from environment_provider.release import release_testrun
from environment_provider.validation import InvalidDocumentError

from conftest import EXAMPLE_CONFIG

PLUGIN_SOURCE = Path(__file__).parent / "plugin_package"
DISTRIBUTION = "environment-provider-file-pool"
MODULE = "environment_provider_file_pool"
PLUGIN_QUEUE = "environment-provider-plugin-tests"


def pip(*args: str) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert completed.returncode == 0, f"pip {' '.join(args)} failed:\n{completed.stdout}\n{completed.stderr}"


def forget_plugins() -> None:
    """Make this process see the installed entry points and modules as they are now."""
    for name in [name for name in sys.modules if name == MODULE or name.startswith(MODULE + ".")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    loader._plugins.cache_clear()


class InstalledPlugin:
    """The plug-in package installed into the test environment; `uninstall` may be called early."""

    def __init__(self, build_directory: Path) -> None:
        source = build_directory / "plugin_package"
        # A build writes build/ and *.egg-info next to the sources, so build from a copy.
        shutil.copytree(PLUGIN_SOURCE, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
        pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(source))
        self.installed = True
        forget_plugins()

    def uninstall(self) -> None:
        if self.installed:
            pip("uninstall", "--yes", DISTRIBUTION)
            self.installed = False
            forget_plugins()


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InstalledPlugin]:
    installed = InstalledPlugin(tmp_path_factory.mktemp("plugin-build"))
    yield installed
    installed.uninstall()


@pytest.fixture(scope="module")
def plugin_app(stack: Any, worker: Any, plugin: InstalledPlugin) -> Iterator[Celery]:
    """A Celery app that sends checkouts to a worker started after the install.

    The session worker is started first, so that it stays the `worker`
    fixture's worker after this one stops.
    """
    plugin_worker = stack.start_worker(
        concurrency=1, name="plugin-worker", extra_env={"CELERY_WORKER_QUEUES": f"celery,{PLUGIN_QUEUE}"}
    )
    app = Celery(broker=stack.redis_url, backend=stack.redis_url)
    app.conf.task_routes = {"EnvironmentProvider": {"queue": PLUGIN_QUEUE}}
    yield app
    app.close()
    plugin_worker.stop(timeout=15)
    stack.workers.remove(plugin_worker)


@pytest.fixture
def plugin_checkout(plugin_app: Celery, database: Any, settings: Any) -> Callable[[str], dict[str, Any]]:
    def run(testrun_id: str) -> dict[str, Any]:
        task_id = enqueue_checkout(plugin_app, database, settings, testrun_id, [])
        status = wait_for_result(plugin_app, database, settings, task_id, testrun_id, timeout=60)
        assert status["status"] == "SUCCESS", status
        return status["result"]

    return run


def make_pool(path: Path, prefix: str, free: int, held: int = 0) -> Path:
    items = [{"name": f"{prefix}-{index}", "rack": index // 4} for index in range(free + held)]
    path.write_text(json.dumps({"free": items[:free], "held": {item["name"]: item for item in items[free:]}}))
    return path


def read_pool(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def pool_definition(kind_key: str, name: str, pool_file: Path, **extra: Any) -> dict[str, Any]:
    kind = KINDS_BY_KEY[kind_key]
    return {kind.definition_key: {"id": name, "type": "file-pool", "pool_file": str(pool_file)} | extra}


def sub_suites(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [sub_suite for suite in result["suites"] for sub_suite in suite["sub_suites"]]


# Checkouts through the plug-in.


def test_plugin_type_checks_out_and_in(plugin_checkout, configure, database, settings, tercc, tmp_path, unique, providers):
    iut_pool = make_pool(tmp_path / "iuts.json", "rig", free=8)
    log_pool = make_pool(tmp_path / "logs.json", "share", free=6)
    register_definition(database, pool_definition("iut", f"pool-iut-{unique}", iut_pool))
    register_definition(database, pool_definition("log-area", f"pool-la-{unique}", log_pool))
    testrun_id = configure(tercc, iut=f"pool-iut-{unique}", log_area=f"pool-la-{unique}")

    result = plugin_checkout(testrun_id)

    assert result["error"] is None
    checked_out = sub_suites(result)
    assert len(checked_out) == 6
    assert sorted(read_pool(iut_pool)["held"]) == sorted(sub["iut"]["name"] for sub in checked_out)
    assert sorted(read_pool(log_pool)["held"]) == sorted(sub["log_area"]["name"] for sub in checked_out)
    for sub_suite in checked_out:
        assert sub_suite["iut"]["prepared"] is True
        assert sub_suite["iut"]["provider_id"] == f"pool-iut-{unique}"
        assert sub_suite["iut"]["identity"] == EXAMPLE_CONFIG["identity"]
        assert sub_suite["log_area"]["provider_id"] == f"pool-la-{unique}"
        assert sub_suite["executor"]["provider_id"] == providers["execution-space"]

    report = release_testrun(database, settings, testrun_id)

    assert report.complete
    assert read_pool(iut_pool)["held"] == {}
    assert len(read_pool(iut_pool)["free"]) == 8
    assert read_pool(log_pool)["held"] == {}
    assert database.keys_prefix(keys.suites_prefix(testrun_id)) == []


def test_plugin_waits_until_the_iut_timeout(plugin_checkout, configure, database, tercc, tmp_path, unique):
    iut_pool = make_pool(tmp_path / "iuts.json", "rig", free=1, held=5)
    register_definition(database, pool_definition("iut", f"pool-iut-{unique}", iut_pool))
    testrun_id = configure(tercc, iut=f"pool-iut-{unique}", timeouts={"iut": 1, "total": 30})

    result = plugin_checkout(testrun_id)

    assert f"provider 'pool-iut-{unique}' failed in stage 'checkout'" in result["error"]
    assert "fewer than 2 IUTs were free" in result["error"]
    assert "when the 'iut' timeout of 1 s ran out" in result["error"]
    assert len(read_pool(iut_pool)["free"]) == 1
    assert database.keys_prefix(keys.suites_prefix(testrun_id)) == []


@pytest.mark.parametrize("stage", ["init", "checkout", "prepare"])
def test_plugin_that_raises_is_reported(plugin_checkout, configure, database, tercc, tmp_path, unique, stage):
    iut_pool = make_pool(tmp_path / "iuts.json", "rig", free=6)
    register_definition(database, pool_definition("iut", f"pool-iut-{unique}", iut_pool, type="file-pool-failing", fail_in=stage))
    testrun_id = configure(tercc, iut=f"pool-iut-{unique}")

    result = plugin_checkout(testrun_id)

    assert f"provider 'pool-iut-{unique}' failed in stage '{stage}'" in result["error"]
    assert f"RuntimeError: the {stage} stage of 'pool-iut-{unique}' is broken on purpose" in result["error"]
    assert read_pool(iut_pool)["held"] == {}
    assert database.keys_prefix(keys.suites_prefix(testrun_id)) == []
    assert json.loads(database.get(keys.testrun(testrun_id)))["status"] == "failed"


def test_plugin_raising_in_checkin_keeps_keys(plugin_checkout, configure, database, settings, tercc, tmp_path, unique):
    tercc["data"]["batches"] = tercc["data"]["batches"][1:]
    iut_pool = make_pool(tmp_path / "iuts.json", "rig", free=2)
    register_definition(database, pool_definition("iut", f"pool-iut-{unique}", iut_pool, type="file-pool-failing", fail_in="checkin"))
    testrun_id = configure(tercc, iut=f"pool-iut-{unique}")
    result = plugin_checkout(testrun_id)
    assert result["error"] is None

    report = release_testrun(database, settings, testrun_id)

    assert len(report.failures) == 2
    for failure in report.failures:
        assert f"provider 'pool-iut-{unique}' failed in stage 'checkin'" in failure
        assert "RuntimeError: the checkin stage" in failure
    left = database.keys_prefix(keys.suites_prefix(testrun_id))
    assert sorted(key.rsplit("/", 1)[1] for key in left) == ["iut", "iut", "suite", "suite"]


# Registration of plug-in types.


def test_unknown_type_lists_installed_plugins(plugin, database, unique):
    definition = {"iut": {"id": f"odd-{unique}", "type": "no-such-type"}}

    with pytest.raises(InvalidDocumentError) as raised:
        register_definition(database, definition)

    assert "$.iut.type" in str(raised.value)
    assert "known types are jsontas, external, file-pool," in str(raised.value)
    assert "environment_provider.providers" in str(raised.value)
    assert database.get(keys.provider(keys.IUT, f"odd-{unique}")) is None


def test_plugin_that_fails_to_import_is_rejected(plugin, database, unique):
    definition = {"iut": {"id": f"broken-{unique}", "type": "file-pool-import-error"}}

    with pytest.raises(InvalidDocumentError, match="RuntimeError: this plug-in module is broken on purpose"):
        register_definition(database, definition)


def test_plugin_entry_point_must_name_provider_class(plugin, database, unique):
    definition = {"iut": {"id": f"not-a-class-{unique}", "type": "file-pool-not-a-class"}}

    with pytest.raises(InvalidDocumentError, match="is not a subclass of environment_provider.providers.Provider"):
        register_definition(database, definition)


def test_uninstalled_plugin_type_is_unknown(plugin, database, tmp_path, unique):
    assert "file-pool" in known_types()

    plugin.uninstall()

    assert known_types() == ["jsontas", "external"]
    with pytest.raises(InvalidDocumentError, match="unknown provider type 'file-pool': known types are jsontas, external;"):
        register_definition(database, pool_definition("iut", f"pool-{unique}", tmp_path / "pool.json"))


def test_docs_show_the_tested_plugin_source():
    docs = (Path(__file__).parent.parent / "docs" / "providers.md").read_text()
    listing = docs.split("`environment_provider_file_pool/__init__.py`:\n\n```python\n", 1)[1].split("\n```\n", 1)[0]

    assert listing + "\n" == (PLUGIN_SOURCE / MODULE / "__init__.py").read_text()
