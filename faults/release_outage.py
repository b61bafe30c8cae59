"""Release while a provider is out: its stop endpoint returns 503, or its server refuses connections.

Each trial checks out 2 sub-suites (IUTs from the lab, execution spaces from
an external provider, log areas from the example provider) and releases the
testrun while one peer is out, through the release task or the CLI.

- brief outage (OUTAGE_SECONDS, shorter than the request timeout): the
  release must retry and end complete with nothing held.
- sustained outage: the release must end incomplete, keep the keys of the
  items it could not check in (and only those), and a release after the
  peer is back must finish the job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from environment_provider.client import enqueue_checkout
from environment_provider.registry import register_definition

from harness import DATASET, Bench, Row, Trial, keys, sub_suites, task_outcome, tercc
from peers import DeviceLab, ExternalProvider

REQUEST_TIMEOUT = 5
OUTAGE_SECONDS = 2.0
OUTAGES = ("lab returns 503", "lab server stopped", "external stop returns 503", "external server stopped")


def start_outage(outage: str, lab: DeviceLab, external: ExternalProvider) -> None:
    if outage == "lab returns 503":
        lab.state.release_refused = True
    elif outage == "lab server stopped":
        lab.stop()
    elif outage == "external stop returns 503":
        external.state.stop_refused = True
    else:
        external.peer.stop()


def end_outage(lab: DeviceLab, external: ExternalProvider) -> None:
    lab.state.release_refused = False
    lab.start()
    external.state.stop_refused = False
    external.peer.start()


def release_through(path: str, bench: Bench, testrun_id: str) -> dict[str, Any]:
    """Release the testrun through the release task or the CLI; return the release report as JSON."""
    if path == "task":
        return bench.celery.send_task("EnvironmentProviderRelease", kwargs={"testrun_id": testrun_id}).get(timeout=120)
    command = [str(Path(sys.executable).parent / "environment-provider"), "release", "--testrun", testrun_id, "--json"]
    environment = {**os.environ, **bench.stack.environment(), "ENVIRONMENT_PROVIDER_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT)}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
    report = json.loads(completed.stdout)
    report["exit_status"] = completed.returncode
    return report


def run_trial(bench: Bench, outage: str, sustained: bool, path: str, trial: Trial) -> None:
    lab = DeviceLab(4)
    external = ExternalProvider()
    try:
        providers = bench.register_defaults()
        providers["iut"] = bench.register_lab(lab)
        providers["execution-space"] = f"es-{uuid.uuid4().hex[:8]}"
        register_definition(bench.database, external.definition(providers["execution-space"]))
        testrun_id = bench.configure(providers, tercc(2), dataset={**DATASET, "lab_url": lab.url})
        task_id = enqueue_checkout(bench.celery, bench.database, bench.settings, testrun_id, [])
        state, result = task_outcome(bench.celery, task_id, timeout=60)
        if not trial.check(state == "SUCCESS" and result.get("error") is None, f"checkout failed: {state} {result}"):
            return
        environments = sub_suites(result)
        items_before = bench.sub_suite_items(testrun_id)

        start_outage(outage, lab, external)
        if not sustained:
            threading.Timer(OUTAGE_SECONDS, end_outage, args=(lab, external)).start()
        started = time.monotonic()
        report = release_through(path, bench, testrun_id)
        elapsed = time.monotonic() - started
        end_outage(lab, external)

        if not sustained:
            trial.check(report["complete"], f"release during a {OUTAGE_SECONDS:g} s outage was incomplete after {elapsed:.1f} s: {report['failures'][:2]}")
        else:
            down_kind = "iut" if outage.startswith("lab") else "execution-space"
            kept = bench.sub_suite_items(testrun_id)
            kept_kinds = sorted({key.rsplit("/", 1)[1] for key in kept})
            trial.check(not report["complete"], "release reported complete while a provider was down")
            trial.check(len(report["failures"]) == len(environments), f"{len(report['failures'])} failures reported for {len(environments)} environments")
            trial.check(kept_kinds == [down_kind], f"keys kept after the incomplete release: {kept_kinds}, expected only {down_kind}")
            trial.loss(len([key for key in items_before if key.endswith("/" + down_kind) and key not in kept]), f"{down_kind} keys deleted though not checked in")
            if path == "cli":
                trial.check(report["exit_status"] == 1, f"CLI exit status {report['exit_status']} for an incomplete release")
            for sub_suite in environments:
                if bench.database.get(keys.environment_testrun(sub_suite["sub_suite_id"])) is None:
                    trial.loss(1, f"environment {sub_suite['sub_suite_id']} lost its lookup key while an item is still out")
            held = len(lab.held()) if down_kind == "iut" else len(external.held())
            trial.check(held == len(environments), f"{held} items of the down provider still held, expected {len(environments)}")
            report = release_through(path, bench, testrun_id)
            trial.check(report["complete"], f"the release after the outage was incomplete: {report['failures'][:2]}")

        if not report["complete"]:
            release_through(path, bench, testrun_id)  # clean up after a failed check above, then count what stays
        trial.leak(len(lab.held()), "devices reserved after the releases")
        trial.leak(len(external.held()), "execution spaces allocated after the releases")
        trial.leak(len(bench.sub_suite_items(testrun_id)), "item keys in etcd after the releases")
        trial.leak(sum(1 for sub_suite in environments if bench.database.get(keys.environment_testrun(sub_suite["sub_suite_id"]))), "environment keys after the releases")
    finally:
        lab.close()
        external.close()


def run(options: Any) -> list[Row]:
    brief = Row(f"3. release during a {OUTAGE_SECONDS:g} s provider outage")
    sustained = Row("3b. release during a sustained provider outage, then again")
    env = {"ENVIRONMENT_PROVIDER_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT)}
    with Bench(keep_logs=options.keep_logs, settings_env=env) as bench:
        bench.start_worker(2, name="release", env=env)
        for outage in OUTAGES:
            for path in ("task", "cli"):
                with brief.trial(f"{outage}, via {path}") as trial:
                    run_trial(bench, outage, False, path, trial)
                with sustained.trial(f"{outage}, via {path}") as trial:
                    run_trial(bench, outage, True, path, trial)
    return [brief, sustained]
