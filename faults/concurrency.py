"""Concurrency: 50 testruns at once over 4 worker processes, sharing one lab IUT provider of 10 devices.

Each testrun requests 1 to 3 IUTs (one test suite of 3 recipes, one test
runner). The driver holds each environment it gets for 2 to 6 s and then
releases it, as a test run would, so the devices turn over. A testrun that
finds no free device before its 'iut' timeout (10 s) fails, and must hold
nothing then.

Checked throughout: the lab's holders of each device, and a sample of
etcd every 0.25 s counting the testruns that record the same device.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from environment_provider.client import enqueue_checkout

from harness import DATASET, Bench, Row, sub_suites, task_outcome, tercc
from peers import DeviceLab

TESTRUNS = 50
WORKERS = 4
DEVICES = 10
RECIPES = 3
IUT_TIMEOUT = 10
HOLD_SECONDS = (2.0, 6.0)


def sample_etcd(bench: Bench, stop: threading.Event, maximum: dict[str, int]) -> None:
    """Record, per device serial, the highest number of testruns whose etcd keys held it at one moment."""
    while not stop.is_set():
        holders: dict[str, set[str]] = defaultdict(set)
        for key, item in bench.sub_suite_items().items():
            if key.endswith("/iut") and "serial" in item:
                holders[item["serial"]].add(key.split("/")[2])
        for serial, testruns in holders.items():
            maximum[serial] = max(maximum.get(serial, 0), len(testruns))
        stop.wait(0.25)


def run(options: Any) -> list[Row]:
    count = max(TESTRUNS, round(TESTRUNS * options.scale))
    row = Row(f"5. concurrency ({count} testruns, {WORKERS} workers, {DEVICES} IUTs)")
    rng = random.Random(options.seed)
    with Bench(keep_logs=options.keep_logs) as bench:
        for index in range(WORKERS):
            bench.start_worker(1, name=f"busy{index}")
        lab = DeviceLab(DEVICES)
        stop = threading.Event()
        etcd_maximum: dict[str, int] = {}
        sampler = threading.Thread(target=sample_etcd, args=(bench, stop, etcd_maximum), daemon=True)
        outcomes = {"checked out": 0, "timed out": 0}
        try:
            providers = bench.register_defaults()
            providers["iut"] = bench.register_lab(lab)
            testruns = [
                bench.configure(
                    providers, tercc(RECIPES), dataset={**DATASET, "lab_url": lab.url},
                    timeouts={"iut": IUT_TIMEOUT, "execution-space": 20, "log-area": 20, "total": 2 * IUT_TIMEOUT},
                )  # fmt: skip
                for _ in range(count)
            ]
            sampler.start()
            tasks = {testrun_id: enqueue_checkout(bench.celery, bench.database, bench.settings, testrun_id, []) for testrun_id in testruns}

            def follow(testrun_id: str) -> None:
                with row.trial(f"testrun {testrun_id[:8]}") as trial:
                    state, result = task_outcome(bench.celery, tasks[testrun_id], timeout=count * 45 / WORKERS)
                    if not trial.check(state == "SUCCESS", f"task ended in state {state}"):
                        trial.loss(1, "the task result")
                        return
                    mine = sorted(serial for serial, holders in lab.held().items() if testrun_id in holders)
                    if result.get("error"):
                        outcomes["timed out"] += 1
                        trial.check("timed out" in result["error"] or "timeout" in result["error"], f"failed other than on its timeout: {result['error']}")
                        trial.leak(len(mine), f"devices held after the failed checkout: {mine}")
                        trial.leak(len(bench.sub_suite_items(testrun_id)), "item keys after the failed checkout")
                        return
                    outcomes["checked out"] += 1
                    serials = sorted(sub_suite["iut"]["serial"] for sub_suite in sub_suites(result))
                    trial.check(mine == serials, f"lab shows {mine} held by the testrun, the result has {serials}")
                    time.sleep(rng.uniform(*HOLD_SECONDS))
                    report = bench.release(testrun_id)
                    trial.check(report.complete, f"release incomplete: {report.failures}")
                    still = sorted(serial for serial, holders in lab.held().items() if testrun_id in holders)
                    trial.leak(len(still), f"devices held after release: {still}")
                    trial.leak(len(bench.sub_suite_items(testrun_id)), "item keys after release")

            with ThreadPoolExecutor(max_workers=count) as pool:
                list(pool.map(follow, testruns))
        finally:
            stop.set()
            if sampler.is_alive():
                sampler.join()
            lab.close()

        with row.trial("the lab's own record at the end") as trial:
            trial.check(max(lab.max_holders.values()) <= 1, f"a device had {max(lab.max_holders.values())} holders at once in the lab")
            trial.check(max(etcd_maximum.values(), default=0) <= 1, f"etcd recorded a device in {max(etcd_maximum.values())} testruns at once")
            trial.check(lab.foreign_releases == 0, f"{lab.foreign_releases} releases of a device by a testrun that did not hold it")
            trial.leak(len(lab.held()), f"devices reserved at the end: {sorted(lab.held())}")
            trial.leak(len(bench.sub_suite_items()), "item keys in etcd at the end")
        row.fact(
            f"{outcomes['checked out']} testruns got an environment, {outcomes['timed out']} failed on their timeout; "
            f"lab: {lab.state.reservations} reservations, {lab.state.double_reservations} refused as already reserved, "
            f"at most {max(lab.max_holders.values())} holder per device; etcd samples: at most "
            f"{max(etcd_maximum.values(), default=0)} testrun per device"
        )
    return [row]
