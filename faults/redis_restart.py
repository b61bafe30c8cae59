"""Redis restart with append-only persistence while checkout tasks are queued.

The broker runs with `--appendonly yes` (as in docker-compose.yml). Trials:

- queued, no worker: 20 checkouts are enqueued with no worker running, Redis
  is restarted (SIGTERM, then SIGKILL in a second trial), and a worker
  started afterwards must run all of them. Results stored before the
  restart must still be readable after it.
- queued behind busy workers: one worker process is busy with a checkout
  whose flash takes 8 s while 10 more checkouts wait in the queue; Redis is
  restarted meanwhile, and every checkout must finish.
"""

from __future__ import annotations

import signal
import time
from typing import Any

from environment_provider.client import enqueue_checkout

from harness import DATASET, Bench, Row, Trial, task_outcome, tercc
from peers import DeviceLab

QUEUED = 20
BEHIND_BUSY = 10


def restart_redis(bench: Bench, how: str) -> None:
    """Restart Redis on its port and data directory; `how` is `SIGTERM` or `SIGKILL`."""
    assert bench.stack.redis is not None
    if how == "SIGKILL":
        bench.stack.redis.process.send_signal(signal.SIGKILL)
        bench.stack.redis.process.wait(timeout=10)
    bench.stack.restart_redis()


def follow(bench: Bench, tasks: dict[str, str], trial: Trial, timeout: float) -> list[str]:
    """Wait for each checkout; count a task without a result as lost. Return the testruns checked out."""
    checked_out = []
    deadline = time.monotonic() + timeout
    for testrun_id, task_id in tasks.items():
        state, result = task_outcome(bench.celery, task_id, timeout=max(1.0, deadline - time.monotonic()))
        if state != "SUCCESS":
            trial.loss(1, f"task {task_id} of testrun {testrun_id[:8]} ended in state {state}")
        elif result.get("error") is not None:
            trial.loss(1, f"checkout of testrun {testrun_id[:8]} failed: {result['error']}")
        else:
            checked_out.append(testrun_id)
    return checked_out


def release_all(bench: Bench, testruns: list[str], trial: Trial) -> None:
    for testrun_id in testruns:
        report = bench.release(testrun_id)
        trial.check(report.complete, f"release incomplete: {report.failures}")
    trial.leak(len(bench.sub_suite_items()), "item keys in etcd after release")


def queued_without_worker(bench: Bench, how: str, trial: Trial, scale: float) -> None:
    providers = bench.register_defaults()

    earlier = bench.configure(providers, tercc(2))
    worker = bench.start_worker(2, name=f"before-{how.lower()}")
    earlier_task = enqueue_checkout(bench.celery, bench.database, bench.settings, earlier, [])
    state, _ = task_outcome(bench.celery, earlier_task, timeout=60)
    trial.check(state == "SUCCESS", f"the checkout before the restart ended in state {state}")
    bench.stack.stop_worker(worker)

    count = max(5, round(QUEUED * scale))
    testruns = [bench.configure(providers, tercc(2)) for _ in range(count)]
    tasks = {testrun_id: enqueue_checkout(bench.celery, bench.database, bench.settings, testrun_id, []) for testrun_id in testruns}
    time.sleep(1.5)  # past appendfsync everysec, so a SIGKILL restart is not a test of the fsync window
    restart_redis(bench, how)

    state, result = task_outcome(bench.celery, earlier_task, timeout=5)
    if state != "SUCCESS" or result.get("error") is not None:
        trial.loss(1, f"the result stored before the restart reads as {state}")
    worker = bench.start_worker(2, name=f"after-{how.lower()}")
    checked_out = follow(bench, tasks, trial, timeout=120)
    release_all(bench, checked_out + [earlier], trial)
    bench.stack.stop_worker(worker)


def queued_behind_busy_worker(bench: Bench, trial: Trial, scale: float) -> None:
    lab = DeviceLab(2)
    lab.state.flash_delay = 8.0
    try:
        providers = bench.register_defaults()
        slow = dict(providers, iut=bench.register_lab(lab, prepare=True))
        worker = bench.start_worker(1, name="busy")
        busy_testrun = bench.configure(slow, tercc(1), dataset={**DATASET, "lab_url": lab.url})
        tasks = {busy_testrun: enqueue_checkout(bench.celery, bench.database, bench.settings, busy_testrun, [])}
        count = max(3, round(BEHIND_BUSY * scale))
        for _ in range(count):
            testrun_id = bench.configure(providers, tercc(2))
            tasks[testrun_id] = enqueue_checkout(bench.celery, bench.database, bench.settings, testrun_id, [])
        time.sleep(3)  # the busy checkout is flashing now; the others wait in the queue
        restart_redis(bench, "SIGTERM")

        checked_out = follow(bench, tasks, trial, timeout=120)
        trial.check(lab.state.reservations == 1, f"the lab saw {lab.state.reservations} reservations for one checkout")
        release_all(bench, checked_out, trial)
        trial.leak(len(lab.held()), "devices reserved after release")
        bench.stack.stop_worker(worker)
    finally:
        lab.close()


def run(options: Any) -> list[Row]:
    row = Row("7. Redis restart (append-only) with tasks queued")
    with Bench(keep_logs=options.keep_logs, redis_append_only=True) as bench:
        for how in ("SIGTERM", "SIGKILL"):
            with row.trial(f"{QUEUED} queued, no worker, restart by {how}") as trial:
                queued_without_worker(bench, how, trial, options.scale)
        with row.trial(f"{BEHIND_BUSY} queued behind a busy worker") as trial:
            queued_behind_busy_worker(bench, trial, options.scale)
    return [row]
