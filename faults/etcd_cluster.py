"""etcd cluster: 100 checkouts while one of 3 members is killed, then etcd fully down.

The workers and the driver reach a 3-member cluster through
ETOS_ETCD_ENDPOINTS. The leader is killed with SIGKILL once a quarter of
the checkouts have finished. Every checkout must end with its environment
complete in etcd. Then, with every key snapshotted, all members are killed:

- for a few seconds while a checkout task is sent: the task retries with
  backoff and succeeds once etcd is back;
- for good: the task fails within a bounded time with an error naming every
  endpoint. Once the members are started again, every snapshotted key must
  still be there with its value.
"""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Any, Callable, TypeVar

import pyetcd

from environment_provider.client import enqueue_checkout
from environment_provider.etcd import StorageUnavailableError
from environment_provider.local import Server

from harness import Bench, Row, Trial, keys, sub_suites, task_outcome, tercc, wait_for

T = TypeVar("T")
CHECKOUTS = 100
RETRIES = 3
ETCD_TIMEOUT = 2
BRIEF_OUTAGE = 4.0
# Backoff of RETRIES retries (1 + 2 + 4 s) plus, per attempt, a few etcd timeouts and worker overhead.
FAILURE_BOUND = 60.0


def retry(call: Callable[[], T], attempts: int = 5) -> T:
    """Run a driver-side etcd call again while the cluster elects a new leader."""
    for attempt in range(attempts):
        try:
            return call()
        except StorageUnavailableError:
            if attempt == attempts - 1:
                raise
            time.sleep(1)
    raise AssertionError("unreachable")


def leader_index(bench: Bench) -> int:
    """Return the index in stack.etcd of the current leader."""
    for server in bench.stack.etcd:
        if server.process.poll() is not None:
            continue
        client = pyetcd.client(host="127.0.0.1", port=server.port, timeout=2)
        try:
            leader = client.status().leader
            return int(leader.name.removeprefix("member"))
        except Exception:  # noqa: BLE001 - ask the next member
            continue
        finally:
            client.close()
    return 0


def kill_member(bench: Bench, index: int) -> None:
    server = bench.stack.etcd[index]
    server.process.kill()
    server.process.wait(timeout=10)


def restart_member(bench: Bench, index: int) -> None:
    """Start a stopped member again with its own command line, data directory and port."""
    old = bench.stack.etcd[index]
    if old.process.poll() is None:
        return
    with open(old.log_path, "ab") as log:
        process = subprocess.Popen(
            list(old.process.args), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True  # type: ignore[arg-type]
        )
    bench.stack.etcd[index] = Server(old.name, process, old.log_path, old.port)


def wait_for_cluster(bench: Bench) -> bool:
    def writable() -> bool:
        try:
            bench.database.put("/faults/health", str(time.time()))
            return True
        except StorageUnavailableError:
            return False

    return bool(wait_for(writable, timeout=60, interval=0.5))


def check_environment(bench: Bench, testrun_id: str, result: dict[str, Any], trial: Trial) -> None:
    environments = sub_suites(result)
    trial.check(len(environments) == 3, f"{len(environments)} sub-suites instead of 3")
    for sub_suite in environments:
        prefix = keys.sub_suite_prefix(testrun_id, sub_suite["test_suite_started_id"], sub_suite["sub_suite_id"])
        stored = retry(lambda: bench.database.get_prefix(prefix))
        missing = [item for item in ("iut", "execution-space", "log-area", "suite") if prefix + item not in stored]
        trial.loss(len(missing), f"keys {missing} of environment {sub_suite['sub_suite_id']}")
        if retry(lambda: bench.database.get(keys.environment_testrun(sub_suite["sub_suite_id"]))) != testrun_id:
            trial.loss(1, f"lookup key of environment {sub_suite['sub_suite_id']}")


def run(options: Any) -> list[Row]:
    count = max(20, round(CHECKOUTS * options.scale))
    member_row = Row(f"6. etcd: one of 3 members killed during {count} checkouts")
    outage_row = Row("6b. etcd: all members down, briefly and for good")
    worker_env = {"ENVIRONMENT_PROVIDER_ETCD_RETRIES": str(RETRIES), "ETOS_ETCD_TIMEOUT": str(ETCD_TIMEOUT)}
    with Bench(keep_logs=options.keep_logs, etcd_members=3, settings_env={"ETOS_ETCD_TIMEOUT": str(ETCD_TIMEOUT)}) as bench:
        for index in range(2):
            bench.start_worker(2, name=f"cluster{index}", env=worker_env)
        providers = bench.register_defaults()
        testruns = [bench.configure(providers, tercc(2, 1)) for _ in range(count)]
        tasks = {testrun_id: enqueue_checkout(bench.celery, bench.database, bench.settings, testrun_id, []) for testrun_id in testruns}

        killed: dict[str, Any] = {}

        def killer() -> None:
            wait_for(lambda: sum(bench.celery.AsyncResult(tasks[t]).ready() for t in testruns[: count // 2]) >= count // 4, timeout=300, interval=0.2)
            index = leader_index(bench)
            killed["index"] = index
            killed["done"] = sum(bench.celery.AsyncResult(task).ready() for task in tasks.values())
            kill_member(bench, index)

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        for testrun_id in testruns:
            with member_row.trial(f"testrun {testrun_id[:8]}") as trial:
                state, result = task_outcome(bench.celery, tasks[testrun_id], timeout=300)
                if not trial.check(state == "SUCCESS", f"task ended in state {state}"):
                    trial.loss(1, "the task result")
                    continue
                if result.get("error") is not None:
                    trial.loss(1, f"the checkout failed: {result['error']}")
                    continue
                check_environment(bench, testrun_id, result, trial)
        thread.join(timeout=5)
        member_row.fact(f"killed member{killed.get('index')} (the leader) after {killed.get('done')} of {count} checkouts had finished")

        restart_member(bench, killed.get("index", 0))
        if not wait_for_cluster(bench):
            outage_row.trial("cluster back").__enter__().problems.append("the cluster did not come back after restarting the killed member")
            return [member_row, outage_row]
        snapshot = retry(lambda: bench.database.get_prefix("/testrun/"))
        snapshot.update(retry(lambda: bench.database.get_prefix("/environment/")))
        brief_testrun = bench.configure(providers, tercc(2, 1))
        lasting_testrun = bench.configure(providers, tercc(2, 1))

        with outage_row.trial(f"all members down for {BRIEF_OUTAGE:g} s") as trial:
            for index in range(3):
                kill_member(bench, index)
            result_handle = bench.celery.send_task("EnvironmentProvider", args=[brief_testrun, []])
            time.sleep(BRIEF_OUTAGE)
            for index in range(3):
                restart_member(bench, index)
            state, result = task_outcome(bench.celery, result_handle.id, timeout=120)
            if trial.check(state == "SUCCESS", f"task ended in state {state}"):
                if trial.check(result.get("error") is None, f"checkout after a {BRIEF_OUTAGE:g} s outage failed: {result.get('error')}"):
                    trial.check(wait_for_cluster(bench), "the cluster did not come back")
                    check_environment(bench, brief_testrun, result, trial)

        with outage_row.trial("all members down for good") as trial:
            trial.check(wait_for_cluster(bench), "the cluster did not come back before the second outage")
            for index in range(3):
                kill_member(bench, index)
            started = time.monotonic()
            result_handle = bench.celery.send_task("EnvironmentProvider", args=[lasting_testrun, []])
            state, result = task_outcome(bench.celery, result_handle.id, timeout=FAILURE_BOUND + 60)
            elapsed = time.monotonic() - started
            outage_row.fact(f"with etcd down for good the task failed after {elapsed:.1f} s: {str((result or {}).get('error'))[:160]}")
            if trial.check(state == "SUCCESS", f"task ended in state {state} after {elapsed:.0f} s"):
                error = str(result.get("error"))
                trial.check(elapsed <= FAILURE_BOUND, f"the task took {elapsed:.0f} s to fail, more than {FAILURE_BOUND:g} s")
                for server in bench.stack.etcd:
                    trial.check(f"127.0.0.1:{server.port}" in error, f"the error does not name endpoint 127.0.0.1:{server.port}: {error}")

            for index in range(3):
                restart_member(bench, index)
            if trial.check(wait_for_cluster(bench), "the cluster did not come back after the outage"):
                after = retry(lambda: bench.database.get_prefix("/testrun/"))
                after.update(retry(lambda: bench.database.get_prefix("/environment/")))
                missing = [key for key in snapshot if key not in after]
                changed = [key for key in snapshot if key in after and after[key] != snapshot[key]]
                trial.loss(len(missing), f"keys written before the outages are gone, e.g. {missing[:2]}")
                trial.loss(len(changed), f"keys written before the outages changed, e.g. {changed[:2]}")
                outage_row.fact(f"{len(snapshot)} keys snapshotted before the outages; {len(missing)} missing and {len(changed)} changed after")

        with member_row.trial("release of every testrun") as trial:
            for testrun_id in testruns + [brief_testrun]:
                report = retry(lambda: bench.release(testrun_id))
                trial.check(report.complete, f"release of {testrun_id} incomplete: {report.failures}")
            trial.leak(len(retry(lambda: bench.sub_suite_items())), "item keys in etcd after releasing every testrun")
    return [member_row, outage_row]
