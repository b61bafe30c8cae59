"""`make run`: the example testrun end to end on a temporary local stack with one real worker."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .local import LocalStack


def short(value: str, width: int = 90) -> str:
    return value if len(value) <= width else value[: width - 3] + "..."


def show_keys(database: Any, prefixes: list[str]) -> int:
    count = 0
    for prefix in prefixes:
        for key, value in database.get_prefix(prefix).items():
            print(f"  {key} = {short(value)}")
            count += 1
    return count


def run_demo(providers: Path, examples: Path) -> int:
    """Run register, configure, checkout, release on a fresh stack; print what happens. Return the exit status."""
    tercc = json.loads((examples / "tercc.json").read_text())
    dataset = json.loads((examples / "dataset.json").read_text())
    config = json.loads((examples / "config.json").read_text()) if (examples / "config.json").exists() else {}
    testrun_id = tercc["meta"]["id"]

    print("starting etcd and Redis on 127.0.0.1 ...")
    with LocalStack() as stack:
        os.environ.update(stack.environment())
        print(f"  etcd 127.0.0.1:{stack.etcd_port}, Redis 127.0.0.1:{stack.redis_port}")
        print("starting a Celery worker ...")
        stack.start_worker(concurrency=2)

        # Imported after the environment points at the stack: the Celery app reads its settings at import.
        from . import keys
        from .celery_app import SETTINGS, app
        from .cli import print_summary
        from .client import enqueue_checkout, wait_for_result
        from .etcd import Database
        from .registry import configure_testrun, read_definitions, register_definitions
        from .release import release_testrun

        database = Database(SETTINGS)
        definitions, errors = read_definitions([providers])
        if errors:
            for error in errors:
                print(f"error: {error}", file=sys.stderr)
            return 1
        register_definitions(database, [(item.kind, item.name, item.definition) for item in definitions])
        chosen = {item.kind.key: item.name for item in definitions}
        print(f"registered providers: {', '.join(f'{kind} {name!r}' for kind, name in chosen.items())}")

        configure_testrun(
            database, SETTINGS, testrun_id, tercc, chosen["iut"], chosen["execution-space"], chosen["log-area"],
            dataset=dataset, config=config, timeouts={"iut": 60, "execution-space": 60, "log-area": 60, "total": 300},
        )  # fmt: skip
        print(f"configured testrun {testrun_id} from {examples / 'tercc.json'}")

        started = time.perf_counter()
        task_id = enqueue_checkout(app, database, SETTINGS, testrun_id, [])
        print(f"enqueued task {task_id}; progress:")
        status = wait_for_result(
            app, database, SETTINGS, task_id, testrun_id, 120,
            lambda event: print(f"  [{event['event']}] {event['data'].get('message') or event['data']}"),
        )  # fmt: skip
        elapsed = time.perf_counter() - started
        result = status["result"] or {}
        print()
        print_summary(result, task_id)
        print(f"enqueue to result: {elapsed * 1000:.0f} ms")
        if status["status"] != "SUCCESS" or result.get("error"):
            return 1

        environments = [sub["sub_suite_id"] for suite in result["suites"] for sub in suite["sub_suites"]]
        prefixes = [keys.testrun(testrun_id)] + [keys.environment_prefix(env) for env in environments]
        prefixes.append(keys.task_testrun(task_id))
        print("\netcd keys written:")
        before = show_keys(database, prefixes)

        report = release_testrun(database, SETTINGS, testrun_id)
        print(f"\nreleased testrun {testrun_id}: {len(report.released)} environments, {len(report.failures)} failures")
        sub_suite_keys = database.keys_prefix(keys.suites_prefix(testrun_id))
        environment_keys = [key for env in environments for key in database.keys_prefix(keys.environment_prefix(env))]
        print(f"sub-suite keys left: {len(sub_suite_keys)}; /environment/{{environment}} keys left: {len(environment_keys)}")
        print(f"keys before release: {before}; after: {show_count(database, prefixes)} (configuration, record, task id and progress events stay until the testrun's lease expires)")
        print("stopping the local stack")
        return 0 if report.complete and not sub_suite_keys and not environment_keys else 1


def show_count(database: Any, prefixes: list[str]) -> int:
    return sum(len(database.keys_prefix(prefix)) for prefix in prefixes)
