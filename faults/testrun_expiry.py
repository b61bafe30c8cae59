"""Testrun expiry: the periodic sweep releases a testrun whose lease runs out with environments checked out.

Testruns are configured and checked out through the CLI with
ENVIRONMENT_PROVIDER_TESTRUN_TTL=20, so their keys expire 20 s after the
checkout stops refreshing the lease. `environment-provider beat` schedules
the sweep every 2 s (ENVIRONMENT_PROVIDER_SWEEP_INTERVAL), and the worker
releases testruns with less than three intervals left. A control testrun
with the default TTL must be left alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import DATASET, Bench, Row, Trial, keys, sub_suites, task_outcome, tercc
from peers import DeviceLab

TTL = 20
SWEEP_INTERVAL = 2
SHORT_LIVED = 5


@dataclass
class Watch:
    """The times (seconds since the trials started) at which a watcher saw one testrun change."""

    testrun_id: str
    checked_out: float | None = None
    released: float | None = None
    gone: float | None = None
    held_when_gone: int = -1
    lease_left: int = -1


def cli(bench: Bench, env: dict[str, str], *arguments: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "environment-provider"), *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ, **bench.stack.environment(), **env})


def configure_and_checkout(bench: Bench, lab: DeviceLab, providers: dict[str, str], env: dict[str, str], trial: Trial) -> tuple[str, str] | None:
    """Configure a testrun of 2 IUTs and enqueue its checkout through the CLI; return (testrun id, task id)."""
    event = tercc(2)
    tercc_path = bench.directory / f"tercc-{event['meta']['id']}.json"
    tercc_path.write_text(json.dumps(event))
    completed = cli(
        bench, env, "configure", "--tercc", str(tercc_path),
        "--iut", providers["iut"], "--execution-space", providers["execution-space"], "--log-area", providers["log-area"],
        "--dataset", json.dumps({**DATASET, "lab_url": lab.url}), "--identity", "pkg:docker/acme/edge-gateway@5.2.0",
        "--timeout", "total=60",
    )  # fmt: skip
    if not trial.check(completed.returncode == 0, f"configure failed: {completed.stderr.strip()}"):
        return None
    completed = cli(bench, env, "checkout", "--testrun", event["meta"]["id"])
    if not trial.check(completed.returncode == 0, f"checkout failed: {completed.stderr.strip()}"):
        return None
    return event["meta"]["id"], completed.stdout.strip()


def watch(bench: Bench, lab: DeviceLab, watches: list[Watch], started: float, stop: threading.Event) -> None:
    while not stop.is_set():
        for entry in watches:
            if entry.gone is not None:
                continue
            now = time.monotonic() - started
            status = bench.record(entry.testrun_id).get("status")
            if status is None:
                entry.gone = now
                entry.held_when_gone = sum(1 for holders in lab.held().values() if entry.testrun_id in holders)
            elif status == "checked out" and entry.checked_out is None:
                entry.checked_out = now
            elif status == "released" and entry.released is None:
                entry.released = now
                _, lease = bench.database.get_with_lease(keys.testrun(entry.testrun_id))
                entry.lease_left = bench.database.lease_remaining(lease) if lease else -1
        stop.wait(0.2)


def run(options: Any) -> list[Row]:
    row = Row(f"4. testrun expiry ({TTL} s TTL, sweep every {SWEEP_INTERVAL} s)")
    sweep_env = {"ENVIRONMENT_PROVIDER_SWEEP_INTERVAL": str(SWEEP_INTERVAL)}
    short_env = {"ENVIRONMENT_PROVIDER_TESTRUN_TTL": str(TTL)}
    count = max(SHORT_LIVED, round(SHORT_LIVED * options.scale))
    with Bench(keep_logs=options.keep_logs) as bench:
        bench.start_worker(2, name="expiry", env=sweep_env)
        bench.start_beat(sweep_env)
        lab = DeviceLab(2 * (count + 1))
        stop = threading.Event()
        try:
            providers = bench.register_defaults()
            providers["iut"] = bench.register_lab(lab)
            started = time.monotonic()
            trials: list[tuple[Trial, Watch, str]] = []
            for index in range(count + 1):
                control = index == count
                context = row.trial("control with the default TTL" if control else f"testrun {index + 1}")
                with context as trial:
                    ids = configure_and_checkout(bench, lab, providers, {} if control else short_env, trial)
                    if ids is not None:
                        trials.append((trial, Watch(ids[0]), ids[1]))
            watches = [entry for _, entry, _ in trials]
            watcher = threading.Thread(target=watch, args=(bench, lab, watches, started, stop), daemon=True)
            watcher.start()

            for trial, entry, task_id in trials:
                state, result = task_outcome(bench.celery, task_id, timeout=60)
                if trial.check(state == "SUCCESS" and result.get("error") is None, f"checkout failed: {state} {result}"):
                    trial.check(len(sub_suites(result)) == 2, "checkout did not return 2 sub-suites")
            time.sleep(TTL + 4 * SWEEP_INTERVAL)
            stop.set()
            watcher.join()

            control_trial, control, _ = trials[-1]
            for trial, entry, _ in trials[:-1]:
                trial.check(entry.checked_out is not None, "the watcher never saw the testrun checked out")
                trial.check(entry.released is not None, "the sweep never marked the testrun released")
                if not trial.check(entry.gone is not None, f"the testrun's keys did not expire within {TTL + 4 * SWEEP_INTERVAL} s"):
                    continue
                if entry.released is not None:
                    trial.check(entry.released < entry.gone, "the sweep released the testrun after its keys expired")
                trial.leak(entry.held_when_gone, "devices still reserved when the testrun's keys expired")
                trial.leak(sum(1 for holders in lab.held().values() if entry.testrun_id in holders), "devices reserved at the end")
                trial.leak(len(bench.sub_suite_items(entry.testrun_id)), "item keys in etcd at the end")
                if entry.released is not None:
                    row.fact(f"{entry.testrun_id[:8]}: released with {entry.lease_left} s of its lease left; keys gone {entry.gone - entry.released:.1f} s later")

            held = sum(1 for holders in lab.held().values() if control.testrun_id in holders)
            control_trial.check(control.released is None, "the sweep released a testrun with the default TTL")
            control_trial.check(held == 2, f"the control testrun holds {held} devices instead of 2")
            report = bench.release(control.testrun_id)
            control_trial.check(report.complete, f"release of the control testrun incomplete: {report.failures}")
            control_trial.leak(len(lab.held()), "devices reserved after releasing the control testrun")
            beat_log = (bench.directory / "beat.log").read_text(errors="replace")
            row.fact(f"beat sent the sweep {beat_log.count('Sending due task')} times")
        finally:
            stop.set()
            lab.close()
    return [row]
