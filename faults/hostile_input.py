"""Hostile input through the task, the CLI and the registry; the worker must stay up throughout.

One worker runs with ENVIRONMENT_PROVIDER_REQUEST_ALLOWED_HOSTS naming the
lab and one recorder server, and ENVIRONMENT_PROVIDER_ENVIRONMENT_ALLOWLIST
naming one of two environment variables. A second recorder, not allowed,
must never receive a request. After every trial the worker must run a ping
task.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Callable

from environment_provider.collection import InvalidTestCollectionError
from environment_provider.keys import InvalidIdError
from environment_provider.registry import configure_testrun, register_definition
from environment_provider.validation import MAX_DEPTH, MAX_DOCUMENT_BYTES, InvalidDocumentError

from harness import DATASET, ROOT, Bench, Row, Trial, recipe, sub_suites, task_outcome, tercc
from peers import Recorder

CLI = str(Path(sys.executable).parent / "environment-provider")
BAD_IDS = ["a/b", "..", "../" + str(uuid.uuid4()), "", "x" * 5000, "not-a-uuid", str(uuid.uuid4()) + "/x", "{" + str(uuid.uuid4()) + "}"]
BAD_PROVIDER_IDS = ["../x", "a/b", "", "x" * 200, ".hidden", "name with space"]
MALFORMED_CONSTRAINTS: dict[str, Callable[[dict[str, Any]], None]] = {
    "constraints is a string": lambda recipe: recipe.update(constraints="TEST_RUNNER=python"),
    "constraint is a string": lambda recipe: recipe["constraints"].append("TEST_RUNNER"),
    "constraint without value": lambda recipe: recipe["constraints"].append({"key": "COMMAND"}),
    "unknown constraint key": lambda recipe: recipe["constraints"].append({"key": "FOO", "value": 1}),
    "TEST_RUNNER is a number": lambda recipe: set_constraint(recipe, "TEST_RUNNER", 5),
    "TEST_RUNNER is empty": lambda recipe: set_constraint(recipe, "TEST_RUNNER", ""),
    "constraints missing": lambda recipe: recipe.pop("constraints"),
}


def set_constraint(recipe: dict[str, Any], key: str, value: Any) -> None:
    for constraint in recipe["constraints"]:
        if constraint["key"] == key:
            constraint["value"] = value


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": True}
    for _ in range(depth - 1):
        value = {"next": value}
    return value


def minimal_recipes(count: int) -> list[dict[str, Any]]:
    """Recipes of about 90 bytes each, so that 10,000 fit into one etcd value (1.5 MiB by default)."""
    return [{"id": f"r{index}", "testCase": {"id": f"t{index}"}, "constraints": [{"key": "TEST_RUNNER", "value": "runner"}]} for index in range(count)]


class Hostile:
    """The trials, sharing one stack, one worker and the recorder servers."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.allowed = Recorder()
        self.forbidden = Recorder({"GET /devices": (200, [{"serial": "F1", "reserved": False}])})
        self.hidden_value = f"hidden-{uuid.uuid4().hex}"
        self.worker_env = {
            "ENVIRONMENT_PROVIDER_REQUEST_ALLOWED_HOSTS": f"127.0.0.1:{self.allowed.peer.port}",
            "ENVIRONMENT_PROVIDER_ENVIRONMENT_ALLOWLIST": "FAULTS_VISIBLE",
            "FAULTS_VISIBLE": "visible-value",
            "FAULTS_HIDDEN": self.hidden_value,
        }
        self.worker = bench.start_worker(1, name="hostile", env=self.worker_env)
        self.providers = bench.register_defaults()
        self.secrets: list[str] = [self.hidden_value]

    def close(self) -> None:
        self.allowed.close()
        self.forbidden.close()

    def cli(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        environment = {**os.environ, **self.bench.stack.environment()}
        return subprocess.run([CLI, *arguments], capture_output=True, text=True, timeout=120, env=environment)

    def keyspace(self) -> dict[str, str]:
        return self.bench.database.get_prefix("/")

    def checkout(self, testrun_id: str, suite_runner_ids: list[Any] | None = None, timeout: float = 60) -> tuple[str, Any]:
        handle = self.bench.celery.send_task("EnvironmentProvider", args=[testrun_id, suite_runner_ids or []])
        return task_outcome(self.bench.celery, handle.id, timeout)

    def check_cli_rejects(self, trial: Trial, arguments: list[str], expected: str) -> None:
        completed = self.cli(*arguments)
        command = " ".join(argument[:40] for argument in arguments)
        trial.check(completed.returncode in (1, 2), f"'{command}' exited {completed.returncode}")
        trial.check("Traceback" not in completed.stderr, f"'{command}' printed a traceback: {completed.stderr[-300:]}")
        trial.check(expected in completed.stderr, f"'{command}' did not print {expected!r}: {completed.stderr.strip()[-300:]}")

    # Ids.

    def ids_through_task(self, trial: Trial) -> None:
        before = self.keyspace()
        for bad in BAD_IDS:
            state, result = self.checkout(bad)
            if trial.check(state == "SUCCESS", f"checkout of testrun id {bad[:40]!r} ended in state {state}: {result!r}"[:300]):
                trial.check("invalid testrun id" in str(result.get("error")), f"testrun id {bad[:40]!r}: {str(result.get('error'))[:200]}")
            for field in ("testrun_id", "task_id", "environment_id"):
                report = self.bench.celery.send_task("EnvironmentProviderRelease", kwargs={field: bad}).get(timeout=30)
                trial.check("invalid" in str(report.get("error")), f"release by {field}={bad[:40]!r} returned {str(report)[:200]}")
        trial.check(self.keyspace() == before, "the rejected ids changed the keyspace")

        testrun_id = self.bench.configure(self.providers, tercc(2))
        state, result = self.checkout(testrun_id, ["../" + str(uuid.uuid4())])
        if trial.check(state == "SUCCESS", f"a suite runner id with '../' made the task end in state {state}: {result!r}"[:300]):
            trial.check("invalid suite runner id" in str(result.get("error")), f"suite runner id '../…': {result}")
        trial.check(self.bench.sub_suite_items(testrun_id) == {}, "items checked out for a rejected suite runner id")

    def ids_through_cli(self, trial: Trial) -> None:
        tercc_path = self.bench.directory / "hostile-tercc.json"
        tercc_path.write_text(json.dumps(tercc(2)))
        before = self.keyspace()
        for bad in ("../x", "a/b", "x" * 5000, "not-a-uuid"):
            configure = ["configure", "--testrun", bad, "--tercc", str(tercc_path), "--iut", self.providers["iut"],
                         "--execution-space", self.providers["execution-space"], "--log-area", self.providers["log-area"]]  # fmt: skip
            self.check_cli_rejects(trial, configure, "invalid testrun id")
            self.check_cli_rejects(trial, ["checkout", "--testrun", bad], "invalid testrun id")
            self.check_cli_rejects(trial, ["release", "--testrun", bad], "invalid testrun id")
            self.check_cli_rejects(trial, ["release", "--task", bad], "invalid task id")
            self.check_cli_rejects(trial, ["release", "--environment", bad], "invalid environment id")
            self.check_cli_rejects(trial, ["status", bad], "invalid task id")
        testrun_id = self.bench.configure(self.providers, tercc(2))
        before = self.keyspace()
        self.check_cli_rejects(trial, ["checkout", "--testrun", testrun_id, "--suite-runner-id", "../x"], "invalid suite runner id")
        trial.check(self.keyspace() == before, "the CLI wrote keys for rejected ids")

    def ids_through_registry(self, trial: Trial) -> None:
        before = self.keyspace()
        for bad in BAD_PROVIDER_IDS:
            definition = json.loads((ROOT / "providers" / "iut" / "static-devices.json").read_text())
            definition["iut"]["id"] = bad
            try:
                register_definition(self.bench.database, definition)
                trial.check(False, f"provider id {bad[:40]!r} was registered")
            except InvalidDocumentError as error:
                trial.check("$.iut.id" in str(error), f"provider id {bad[:40]!r}: {error}")
            path = self.bench.directory / "bad-id.json"
            path.write_text(json.dumps(definition))
            self.check_cli_rejects(trial, ["register", str(path)], "$.iut.id")
            event = tercc(2)
            try:
                configure_testrun(self.bench.database, self.bench.settings, event["meta"]["id"], event, bad, self.providers["execution-space"], self.providers["log-area"])
                trial.check(False, f"configure accepted provider name {bad[:40]!r}")
            except InvalidIdError as error:
                trial.check("invalid provider id" in str(error), f"provider name {bad[:40]!r}: {error}")
        trial.check(self.keyspace() == before, "rejected provider ids changed the keyspace")

    # Provider definitions.

    def huge_definition(self, trial: Trial) -> None:
        definition = json.loads((ROOT / "providers" / "iut" / "static-devices.json").read_text())
        definition["iut"]["id"] = "huge"
        definition["iut"]["list"]["possible"]["$expand"]["value"]["padding"] = "x" * (MAX_DOCUMENT_BYTES + 1024)
        path = self.bench.directory / "huge.json"
        path.write_text(json.dumps(definition))
        self.check_cli_rejects(trial, ["register", str(path)], f"more than the limit of {MAX_DOCUMENT_BYTES} bytes")

        try:
            register_definition(self.bench.database, definition)
            trial.check(False, "a definition over the size limit was registered from an object")
        except InvalidDocumentError as error:
            trial.check("more than the limit of" in str(error), f"huge definition object: {error}")
        except Exception as error:  # noqa: BLE001 - any other exception is the finding
            trial.problems.append(f"a definition object over {MAX_DOCUMENT_BYTES} bytes raised {type(error).__name__}, not a clear error: {str(error)[:120]}")

        definition["iut"]["list"]["possible"]["$expand"]["value"]["padding"] = "x" * (2 * 2**20)
        path.write_text(json.dumps(definition))
        completed = self.cli("register", str(path))
        trial.check("Traceback" not in completed.stderr, f"a 2 MiB definition (under the {MAX_DOCUMENT_BYTES}-byte limit, over etcd's request limit) crashed the CLI: {completed.stderr.strip().splitlines()[-1][:200] if completed.stderr.strip() else ''}")
        trial.check(self.bench.database.get("/environment/provider/iut/huge") is None, "the huge definition was stored")

    def deep_definition(self, trial: Trial) -> None:
        definition = json.loads((ROOT / "providers" / "iut" / "static-devices.json").read_text())
        definition["iut"]["id"] = "deep"
        definition["iut"]["list"]["possible"]["$expand"]["value"]["deep"] = nested(MAX_DEPTH + 1)
        try:
            register_definition(self.bench.database, definition)
            trial.check(False, f"a definition nested deeper than {MAX_DEPTH} levels was registered")
        except InvalidDocumentError as error:
            trial.check(f"deeper than {MAX_DEPTH} levels" in str(error), f"deep definition: {error}")
        path = self.bench.directory / "deep.json"
        path.write_text(json.dumps(definition))
        self.check_cli_rejects(trial, ["register", str(path)], f"deeper than {MAX_DEPTH} levels")
        path.write_text('{"iut": ' + "[" * 100_000 + "]" * 100_000 + "}")
        self.check_cli_rejects(trial, ["register", str(path)], "nested too deeply")

    def request_to_unlisted_host(self, trial: Trial) -> None:
        definition = {
            "iut": {
                "id": f"unlisted-{uuid.uuid4().hex[:8]}",
                "list": {
                    "possible": {"$from": {"item": {"$request": {"url": f"{self.forbidden.url}/devices", "method": "GET"}}, "get": "json"}},
                    "available": "$this.possible",
                },
            }
        }
        register_definition(self.bench.database, definition)
        testrun_id = self.bench.configure(dict(self.providers, iut=definition["iut"]["id"]), tercc(1), timeouts={"iut": 5, "total": 20})
        state, result = self.checkout(testrun_id)
        error = str((result or {}).get("error"))
        trial.check("not in ENVIRONMENT_PROVIDER_REQUEST_ALLOWED_HOSTS" in error, f"$request to an unlisted host: {error[:200]}")

        external = {
            "execution_space": {
                "id": f"unlisted-es-{uuid.uuid4().hex[:8]}", "type": "external",
                "start": {"host": f"{self.forbidden.url}/start"}, "status": {"host": f"{self.forbidden.url}/status"},
                "stop": {"host": f"{self.forbidden.url}/stop"},
            }
        }  # fmt: skip
        register_definition(self.bench.database, external)
        testrun_id = self.bench.configure(dict(self.providers, **{"execution-space": external["execution_space"]["id"]}), tercc(1), timeouts={"execution-space": 5, "total": 20})
        state, result = self.checkout(testrun_id)
        error = str((result or {}).get("error"))
        trial.check("not in ENVIRONMENT_PROVIDER_REQUEST_ALLOWED_HOSTS" in error, f"external provider on an unlisted host: {error[:200]}")
        trial.check(self.bench.sub_suite_items(testrun_id) == {}, "items left after the rejected execution space provider")
        trial.check(self.forbidden.count() == 0, f"the unlisted host received {self.forbidden.count()} requests")

    # Test collections.

    def many_recipes(self, trial: Trial) -> None:
        event = tercc(1)
        event["data"]["batches"][0]["recipes"] = minimal_recipes(10_000)
        testrun_id = self.bench.configure(self.providers, event, dataset={**DATASET, "maximum_amount": 4})
        state, result = self.checkout(testrun_id, timeout=120)
        if trial.check(state == "SUCCESS" and result.get("error") is None, f"10,000 recipes: {state} {str(result)[:200]}"):
            recipes = [recipe["id"] for sub_suite in sub_suites(result) for recipe in sub_suite["recipes"]]
            trial.check(len(sub_suites(result)) == 4, f"{len(sub_suites(result))} sub-suites instead of 4")
            trial.loss(10_000 - len(set(recipes)), "recipes missing from the sub-suites")
            trial.check(len(recipes) == 10_000, f"{len(recipes)} recipes in the sub-suites")
            report = self.bench.release(testrun_id)
            trial.check(report.complete, f"release incomplete: {report.failures}")

    def many_large_recipes(self, trial: Trial) -> None:
        event = tercc(1)
        event["data"]["batches"][0]["recipes"] = [recipe(COMMAND="pytest tests/test_gateway.py -k dhcp") for _ in range(10_000)]
        size = len(json.dumps(event))
        try:
            self.bench.configure(self.providers, event, dataset={**DATASET, "maximum_amount": 4})
            trial.problems.append(f"a {size}-byte TERCC was stored, larger than etcd's request limit")
        except (InvalidTestCollectionError, InvalidDocumentError) as error:
            trial.check("bytes" in str(error) or "limit" in str(error), f"{size}-byte TERCC: {error}")
        except Exception as error:  # noqa: BLE001 - any other exception is the finding
            trial.problems.append(f"a TERCC of 10,000 recipes of ~{size // 10_000} bytes ({size} bytes) raised {type(error).__name__}, not a clear error: {str(error).splitlines()[0][:120] if str(error) else ''}")

    def malformed_constraints(self, trial: Trial) -> None:
        before = self.keyspace()
        for name, damage in MALFORMED_CONSTRAINTS.items():
            event = tercc(2)
            damage(event["data"]["batches"][0]["recipes"][1])
            try:
                self.bench.configure(self.providers, event)
                trial.check(False, f"{name}: configured")
            except InvalidTestCollectionError as error:
                text = str(error)
                trial.check("recipes[1]" in text or "recipe" in text, f"{name}: the error does not point at the recipe: {text[:200]}")
        trial.check(self.keyspace() == before, "malformed test collections changed the keyspace")

        served = tercc(2)
        MALFORMED_CONSTRAINTS["TEST_RUNNER is a number"](served["data"]["batches"][0]["recipes"][0])
        self.allowed.routes["GET /collection.json"] = (200, served["data"]["batches"])
        event = tercc(2)
        event["data"] = {"batchesUri": f"{self.allowed.url}/collection.json"}
        testrun_id = self.bench.configure(self.providers, event)
        state, result = self.checkout(testrun_id)
        trial.check("no TEST_RUNNER constraint" in str((result or {}).get("error")), f"malformed collection behind batchesUri: {result}")
        trial.check(self.bench.sub_suite_items(testrun_id) == {}, "items checked out for a malformed collection")

    # Environment variables and secrets.

    def environment_variables(self, trial: Trial) -> None:
        definition = json.loads((ROOT / "providers" / "log-area" / "file-server.json").read_text())
        definition["log"]["id"] = f"env-{uuid.uuid4().hex[:8]}"
        definition["log"]["list"]["possible"]["$expand"]["value"]["logs"] = {
            "visible": "$FAULTS_VISIBLE", "hidden": "$FAULTS_HIDDEN", "via_dataset": "$sneaky", "path": "$PATH",
            "globals": "$tercc.__class__.__init__.__globals__",
        }  # fmt: skip
        register_definition(self.bench.database, definition)
        testrun_id = self.bench.configure(dict(self.providers, **{"log-area": definition["log"]["id"]}), tercc(1), dataset={**DATASET, "sneaky": "$FAULTS_HIDDEN"})
        state, result = self.checkout(testrun_id)
        if not trial.check(state == "SUCCESS" and result.get("error") is None, f"checkout failed: {result}"):
            return
        logs = sub_suites(result)[0]["log_area"]["logs"]
        trial.check(logs["visible"] == "visible-value", f"the allowlisted variable read as {logs['visible']!r}")
        for name in ("hidden", "via_dataset", "path", "globals"):
            trial.check(isinstance(logs[name], str) and logs[name].startswith("$"), f"ruleset value {name} resolved to {str(logs[name])[:80]!r}")
        self.bench.release(testrun_id)

    def secret_trial(self, trial: Trial, use: str) -> None:
        """Check out with a secret from the dataset used one way; the secret must stay out of the log, events and result."""
        secret = f"secret-{uuid.uuid4().hex}"
        self.secrets.append(secret)
        self.allowed.routes.update({
            "GET /devices": (200, [{"serial": "S1", "reserved": False}]),
            "POST /reserve": (200, {"reserved": True}),
            "POST /release": (500, {"message": "release failed"}),
        })  # fmt: skip

        url = self.allowed.url
        request: dict[str, Any] = {"url": f"{url}/devices", "method": "GET"}
        if use == "password in $request auth":
            request["auth"] = {"username": "etos", "password": "$lab_password"}
        elif use == "Authorization header":
            request["headers"] = {"Authorization": {"$join": {"strings": ["Bearer ", "$lab_password"]}}}
        elif use == "token in a query parameter":
            request["params"] = {"token": "$lab_password"}
        elif use == "password in the URL of a host that is down":
            request["url"] = {"$join": {"strings": ["http://etos:", "$lab_password", f"@127.0.0.1:{self.allowed.peer.port}/devices"]}}
        definition = {
            "iut": {
                "id": f"secretive-{uuid.uuid4().hex[:8]}",
                "list": {"possible": {"$from": {"item": {"$request": request}, "get": "json"}}, "available": "$this.possible"},
                "checkout": {"$request": {"url": f"{url}/reserve", "method": "POST", "auth": {"username": "etos", "password": "$lab_password"}, "json": {"serial": "$iut.serial"}}},
                "checkin": {"$request": {"url": f"{url}/release", "method": "POST", "headers": {"Authorization": {"$join": {"strings": ["Bearer ", "$lab_password"]}}}, "json": {"serial": "$iut.serial"}}},
            }
        }
        register_definition(self.bench.database, definition)

        if use == "password in the URL of a host that is down":
            self.allowed.peer.stop()
        try:
            testrun_id = self.bench.configure(
                dict(self.providers, iut=definition["iut"]["id"]), tercc(1), dataset={**DATASET, "lab_password": secret}, timeouts={"iut": 3, "total": 20}
            )
            state, result = self.checkout(testrun_id)
            report = self.bench.release(testrun_id)
        finally:
            self.allowed.peer.start()

        events = json.dumps(self.bench.events(testrun_id))
        log = self.worker.log_path.read_text(errors="replace")
        trial.check(secret not in log, f"the secret ({use}) is in the worker log: {next((line for line in log.splitlines() if secret in line), '')[:200]}")
        trial.check(secret not in events, f"the secret ({use}) is in the SSE events")
        trial.check(secret not in json.dumps(result), f"the secret ({use}) is in the task result")
        trial.check(secret not in json.dumps(report.as_json()), f"the secret ({use}) is in the release report")


SECRET_USES = ("password in $request auth", "Authorization header", "token in a query parameter", "password in the URL of a host that is down")


def run(options: Any) -> list[Row]:
    row = Row("8. hostile input (ids, definitions, TERCCs, environment, secrets)")
    with Bench(keep_logs=options.keep_logs) as bench:
        hostile = Hostile(bench)
        try:
            trials: list[tuple[str, Callable[[Trial], None]]] = [
                ("ids through the task", hostile.ids_through_task),
                ("ids through the CLI", hostile.ids_through_cli),
                ("ids through the registry", hostile.ids_through_registry),
                (f"definition over {MAX_DOCUMENT_BYTES} bytes", hostile.huge_definition),
                (f"definition nested over {MAX_DEPTH} levels", hostile.deep_definition),
                ("$request to a host not allowed", hostile.request_to_unlisted_host),
                ("TERCC of 10,000 small recipes", hostile.many_recipes),
                ("TERCC of 10,000 recipes over etcd's limit", hostile.many_large_recipes),
                ("malformed constraints", hostile.malformed_constraints),
                ("rulesets reading environment variables", hostile.environment_variables),
            ]
            trials += [(f"secret: {use}", lambda trial, use=use: hostile.secret_trial(trial, use)) for use in SECRET_USES]
            for name, body in trials:
                with row.trial(name) as trial:
                    try:
                        body(trial)
                    finally:
                        trial.check(bench.worker_alive(hostile.worker), "the worker is not up after the trial")
            with row.trial("hidden environment variable in the log and events") as trial:
                log = hostile.worker.log_path.read_text(errors="replace")
                trial.check(hostile.hidden_value not in log, "the value of a variable outside the allowlist is in the worker log")
            row.fact(f"the unlisted host received {hostile.forbidden.count()} requests; the worker log has {len(hostile.worker.log_path.read_text(errors='replace').splitlines())} lines")
        finally:
            hostile.close()
    return [row]
