"""Duplicate delivery: Redis hands a checkout that runs longer than the visibility timeout to a second worker.

Two workers (one pool process each) run the product's tasks with a Redis
visibility timeout of 10 s (see short_visibility.py). Each trial checks out
2 IUTs whose flash step takes 30 s, so the message is delivered again while
the first attempt works. The lab must see exactly the reservations of one
checkout, and the broker must hold no message of the task at the end.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from environment_provider.client import enqueue_checkout

from harness import DATASET, Bench, Row, keys, log_lines, sub_suites, task_outcome, tercc, wait_for
from peers import DeviceLab

VISIBILITY_TIMEOUT = 10
FLASH_SECONDS = 30.0


def broker_backlog(bench: Bench) -> tuple[int, int]:
    """Return the number of messages in the default queue and in kombu's unacked hash."""
    client = redis.Redis.from_url(bench.stack.redis_url)
    try:
        return int(client.llen("celery")), int(client.hlen("unacked"))
    finally:
        client.close()


def run(options: Any) -> list[Row]:
    row = Row(f"2. duplicate delivery ({VISIBILITY_TIMEOUT} s visibility timeout, {FLASH_SECONDS:g} s checkout)")
    trials = max(2, round(3 * options.scale))
    env = {"FAULTS_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT)}
    with Bench(keep_logs=options.keep_logs) as bench:
        workers = [bench.start_worker(1, name=f"dup{index}", env=env, app="short_visibility") for index in range(2)]
        deliveries = []
        for number in range(trials):
            with row.trial(f"trial {number + 1}") as trial:
                lab = DeviceLab(4)
                lab.state.flash_delay = FLASH_SECONDS
                try:
                    providers = bench.register_defaults()
                    providers["iut"] = bench.register_lab(lab, prepare=True)
                    testrun_id = bench.configure(
                        providers, tercc(2), dataset={**DATASET, "lab_url": lab.url},
                        timeouts={"iut": 60, "execution-space": 60, "log-area": 60, "total": 120},
                    )  # fmt: skip
                    task_id = enqueue_checkout(bench.celery, bench.database, bench.settings, testrun_id, [])
                    state, result = task_outcome(bench.celery, task_id, timeout=150)
                    if not trial.check(state == "SUCCESS", f"task ended in state {state}"):
                        trial.loss(1, f"the result of task {task_id}")
                        continue

                    # Later deliveries of the same message may still be queued; let them run out.
                    settled = wait_for(lambda: broker_backlog(bench) == (0, 0), timeout=3 * VISIBILITY_TIMEOUT, interval=0.5)
                    time.sleep(2)
                    received = sum(log_lines(worker.log_path, f"EnvironmentProvider[{task_id}] received") for worker in workers)
                    deliveries.append(received)
                    trial.check(received >= 2, f"the task was delivered {received} times; the trial needs a second delivery")
                    trial.check(bool(settled), f"messages left in the broker (queue, unacked): {broker_backlog(bench)}")

                    trial.check(result.get("error") is None, f"checkout failed: {result.get('error')}")
                    serials = sorted(sub_suite["iut"]["serial"] for sub_suite in sub_suites(result))
                    trial.check(lab.state.double_reservations == 0, f"{lab.state.double_reservations} refused second reservations")
                    trial.leak(lab.state.reservations - len(serials), f"{lab.state.reservations} reservations for {len(serials)} IUTs of the result")
                    trial.check(sorted(lab.held()) == serials, f"lab holds {sorted(lab.held())}, the result has {serials}")
                    trial.check(len(bench.sub_suite_items(testrun_id)) == 3 * len(serials), "etcd holds items of more than one checkout")

                    report = bench.release(testrun_id)
                    trial.check(report.complete, f"release incomplete: {report.failures}")
                    trial.leak(len(lab.held()), "devices reserved after release")
                    trial.leak(len(bench.sub_suite_items(testrun_id)), "item keys in etcd after release")
                    trial.check(bench.database.get(keys.claim(testrun_id)) is None, "the claim key outlived the checkout")
                finally:
                    lab.close()
        row.fact(f"deliveries per trial: {deliveries}")
    return [row]
