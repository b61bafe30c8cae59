"""Run the long fault trials on stacks of their own and print the fault table: `make faults`.

Every scenario starts its own etcd and Redis on free 127.0.0.1 ports, its own
Celery workers and its own HTTP peers, and checks each trial against the
peers' records and against etcd. The exit status is 1 when any row has a
failed trial, a leaked item or lost data, and 2 when a stack could not start.

    .venv/bin/python faults/run.py                  # every scenario
    .venv/bin/python faults/run.py --only 1,5       # some of them
    .venv/bin/python faults/run.py --scale 0.5      # fewer trials where a scenario repeats
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Row, StackError  # noqa: E402

# Scenario number -> module in faults/ with a `run(options) -> list[Row]` function.
SCENARIOS = {
    1: "worker_kill",
    2: "duplicate_delivery",
    3: "release_outage",
    4: "testrun_expiry",
    5: "concurrency",
    6: "etcd_cluster",
    7: "redis_restart",
    8: "hostile_input",
}
HEADERS = ("scenario", "trials", "passed", "items leaked", "data lost", "time (s)")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run the fault scenarios and print the fault table.")
    parser.add_argument("--only", default="", help="comma-separated scenario numbers to run (default: all)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the trial counts of repeated scenarios (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random kill points (default: from the clock)")
    parser.add_argument("--keep-logs", type=Path, help="keep each stack's data and logs in this folder")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every failed trial's problems")
    options = parser.parse_args(argv)
    if options.seed is None:
        options.seed = int(time.time())
    if options.keep_logs is not None:
        options.keep_logs.mkdir(parents=True, exist_ok=True)
    wanted = [int(part) for part in options.only.split(",") if part.strip()] if options.only else list(SCENARIOS)
    unknown = [number for number in wanted if number not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario numbers {unknown}; choose from {', '.join(map(str, SCENARIOS))}")
    options.scenarios = wanted
    return options


def format_table(rows: list[tuple[Row, float | None]]) -> str:
    """Return the fault table as Markdown."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
    for row, seconds in rows:
        cells = [row.scenario, str(len(row.trials)), str(row.passed), str(row.leaked), str(row.lost), "" if seconds is None else f"{seconds:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_failures(rows: list[Row], verbose: bool) -> list[str]:
    lines = []
    for row in rows:
        failed = [trial for trial in row.trials if not trial.passed]
        if not row.trials:
            lines.append(f"{row.scenario}: no trial ran")
        shown = failed if verbose else failed[:3]
        for trial in shown:
            lines.append(f"{row.scenario} / {trial.name}: " + "; ".join(trial.problems[:5]))
        if len(failed) > len(shown):
            lines.append(f"{row.scenario}: {len(failed) - len(shown)} more failed trials (use --verbose)")
    return lines


def machine() -> str:
    memory = ""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = f", {pages / 2**30:.0f} GiB memory"
    except (ValueError, OSError):
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores{memory}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    options = parse_arguments(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The product logs the faults the trials cause (etcd failover, failed check-ins); the trials check
    # their outcomes, and the workers' logs keep them.
    logging.getLogger("environment_provider").setLevel(logging.CRITICAL)
    started = time.monotonic()
    table: list[tuple[Row, float | None]] = []
    stack_failed = False

    for number in options.scenarios:
        module = importlib.import_module(SCENARIOS[number])
        print(f"scenario {number} ({SCENARIOS[number]}) running...", file=sys.stderr, flush=True)
        scenario_started = time.monotonic()
        try:
            rows = module.run(options)
        except StackError as error:
            print(f"scenario {number}: the local stack did not start: {error}", file=sys.stderr)
            rows = [Row(f"{number}. {SCENARIOS[number]} (stack did not start)")]
            stack_failed = True
        elapsed = time.monotonic() - scenario_started
        for index, row in enumerate(rows):
            table.append((row, elapsed if index == 0 else None))
        summary = ", ".join(f"{row.passed}/{len(row.trials)} passed" for row in rows)
        print(f"scenario {number} done in {elapsed:.0f} s: {summary}", file=sys.stderr, flush=True)

    rows = [row for row, _ in table]
    print(format_table(table))
    print()
    for row in rows:
        for fact in row.facts:
            print(f"- {row.scenario}: {fact}")
    failures = describe_failures(rows, options.verbose)
    if failures:
        print("\nFailures:")
        for line in failures:
            print(f"- {line}")
    print(f"\n{len(rows)} rows in {time.monotonic() - started:.0f} s on {machine()}; seed {options.seed}")

    if stack_failed:
        return 2
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
