"""The `environment-provider` command driven as a user would, against the real stack and worker."""

from __future__ import annotations

import json
import uuid

from environment_provider import keys

from conftest import ROOT, load_definition
from test_bad_input import run_cli


def test_cli_flow_register_configure_checkout_release(database, worker, tmp_path, unique):
    for kind, relative in (("iut", "iut/static-devices.json"), ("execution-space", "execution-space/local-runners.json"), ("log-area", "log-area/file-server.json")):
        (tmp_path / f"{kind}.json").write_text(json.dumps(load_definition(relative, f"cli-{kind}-{unique}")))
    tercc = json.loads((ROOT / "examples" / "tercc.json").read_text())
    testrun_id = str(uuid.uuid4())
    (tmp_path / "tercc.json").write_text(json.dumps(tercc))

    registered = run_cli("register", str(tmp_path / "iut.json"), str(tmp_path / "execution-space.json"), str(tmp_path / "log-area.json"))
    assert registered.returncode == 0, registered.stderr
    assert f"registered iut provider 'cli-iut-{unique}'" in registered.stdout

    listed = run_cli("providers", "--kind", "iut", "--json")
    assert f"cli-iut-{unique}" in json.loads(listed.stdout)["iut"]

    configured = run_cli(
        "configure", "--testrun", testrun_id, "--tercc", str(tmp_path / "tercc.json"),
        "--iut", f"cli-iut-{unique}", "--execution-space", f"cli-execution-space-{unique}", "--log-area", f"cli-log-area-{unique}",
        "--dataset", str(ROOT / "examples" / "dataset.json"), "--identity", "pkg:docker/acme/edge-gateway@5.2.0",
        "--timeout", "iut=30", "--timeout", "total=120",
    )  # fmt: skip
    assert configured.returncode == 0, configured.stderr
    assert database.get(keys.timeout(testrun_id, "iut")) == "30.0"

    checked_out = run_cli("checkout", "--testrun", testrun_id, "--wait", "--json", "--wait-timeout", "60")
    assert checked_out.returncode == 0, checked_out.stderr
    result = json.loads(checked_out.stdout)
    assert result["error"] is None
    assert len(result["suites"]) == 2
    task_id = database.get(keys.task_id(testrun_id))

    status = run_cli("status", task_id, "--json")
    assert json.loads(status.stdout)["status"] == "SUCCESS"

    released = run_cli("release", "--task", task_id)
    assert released.returncode == 0, released.stderr
    assert "released 6 environments" in released.stdout
    assert database.keys_prefix(keys.suites_prefix(testrun_id)) == []


def test_cli_checkout_wait_shows_progress(configure, worker, tercc):
    testrun_id = configure(tercc)

    completed = run_cli("checkout", "--testrun", testrun_id, "--wait")

    assert completed.returncode == 0, completed.stderr
    assert "checked out 4 IUTs" in completed.stderr
    assert "test suite 'Gateway functional': 4 sub-suites" in completed.stdout


def test_cli_invalid_dataset_json_is_named(tercc, tmp_path):
    (tmp_path / "tercc.json").write_text(json.dumps(tercc))

    completed = run_cli(
        "configure", "--tercc", str(tmp_path / "tercc.json"), "--iut", "a", "--execution-space", "b", "--log-area", "c",
        "--dataset", "{not json",
    )  # fmt: skip

    assert completed.returncode == 1
    assert "--dataset is not valid JSON" in completed.stderr


def test_cli_rejects_non_object_dataset(tercc, providers, tmp_path):
    (tmp_path / "tercc.json").write_text(json.dumps(tercc))

    completed = run_cli(
        "configure", "--tercc", str(tmp_path / "tercc.json"), "--iut", providers["iut"],
        "--execution-space", providers["execution-space"], "--log-area", providers["log-area"], "--dataset", "5",
    )  # fmt: skip

    assert completed.returncode == 1
    assert "the dataset must be a JSON object" in completed.stderr
