"""Benchmark the checkout on a local stack of its own: `make bench`, or `.venv/bin/python benchmarks/run.py [--quick]`.

Starts etcd and Redis on free 127.0.0.1 ports, starts its own Celery
workers, runs every scenario, stops everything and prints a Markdown table
(median and 95th percentile per scenario), the ratios and the targets. All
figures of one output come from the same run: compare within a run, because
other work on the machine moves absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from environment_provider.local import LocalStack, find_binary  # noqa: E402

from report import BenchmarkError, Report, Target  # noqa: E402


@dataclass(frozen=True)
class Plan:
    """How much each scenario repeats; `--quick` trades precision for a run of about a minute."""

    latency_runs: int
    latency_warmup: int
    polled_runs: int
    throughput_count: int
    throughput_batches: int
    scale_sizes: tuple[tuple[int, int, int], ...]
    cost_size: int
    cost_pairs: int
    lease_keys: int
    lease_puts: int
    collection_runs: int


FULL = Plan(
    latency_runs=100,
    latency_warmup=8,
    polled_runs=10,
    throughput_count=200,
    throughput_batches=5,
    scale_sizes=((100, 10, 20), (1_000, 100, 10), (10_000, 1_000, 5)),
    cost_size=100,
    cost_pairs=10,
    lease_keys=7_000,
    lease_puts=500,
    collection_runs=10,
)
QUICK = Plan(
    latency_runs=15,
    latency_warmup=4,
    polled_runs=3,
    throughput_count=40,
    throughput_batches=2,
    scale_sizes=((100, 10, 3), (1_000, 100, 2), (10_000, 1_000, 1)),
    cost_size=50,
    cost_pairs=2,
    lease_keys=7_000,
    lease_puts=100,
    collection_runs=3,
)
CONCURRENCY_LEVELS = (1, 2, 4)


def first_line(command: list[str]) -> str:
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False).stdout
    except OSError as error:
        return f"unknown ({error.strerror})"
    return output.strip().splitlines()[0] if output.strip() else "unknown"


def machine() -> list[str]:
    """Describe the machine and the servers this run used."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "unknown")
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    memory_kib = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
    return [
        f"date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"processors (nproc): {len(os.sched_getaffinity(0))}, CPU model: {model}",
        f"memory: {memory_kib / 1024 / 1024:.1f} GiB",
        f"Python: {platform.python_version()} ({sys.executable})",
        f"etcd: {first_line([find_binary('etcd'), '--version'])}",
        f"Redis: {first_line([find_binary('redis-server'), '--version'])}",
        f"kernel: {platform.release()}",
    ]


def add_targets(report: Report) -> None:
    """Add the goals for this product on a 2-core machine, each checked against a median of this run."""

    def milliseconds(value: float) -> str:
        return f"{value:.1f} ms"

    work_ratios = [name for name, _ in report.ratios if name.startswith("work 10x")]
    report.targets += [
        Target(
            "one-sub-suite checkout median under 50 ms",
            lambda: report.median_of("checkout, enqueue to result"),
            lambda value: value < 50,
            milliseconds,
        ),
        Target(
            "one-sub-suite checkout under 3x the floor",
            lambda: report.ratio("checkout / floor (medians)"),
            lambda value: value < 3,
            lambda value: f"{value:.2f}x",
        ),
        Target(
            "at least 40 checkouts/s with 2 worker processes",
            lambda: next((f.median for f in report.figures if f.unit == "checkouts/s" and f.name.startswith("2 worker processes,")), None),
            lambda value: value >= 40,
            lambda value: f"{value:.1f} checkouts/s",
        ),
        Target(
            "1,000 recipes over 100 IUTs under 1 s",
            lambda: report.median_of("1,000 recipes over 100 IUTs"),
            lambda value: value < 1000,
            milliseconds,
        ),
        Target(
            "under 5 ms added per extra sub-suite",
            lambda: report.median_of("added time per extra sub-suite"),
            lambda value: value < 5,
            lambda value: f"{value:.2f} ms",
        ),
    ]
    for name in work_ratios:
        report.targets.append(
            Target(f"{name} under 12", lambda name=name: report.ratio(name), lambda value: value < 12, lambda value: f"{value:.2f}")
        )


def run(plan: Plan, report: Report) -> None:
    with LocalStack() as stack:
        os.environ.update(stack.environment())

        # Imported once the environment points at this stack: the Celery app reads its settings at import.
        import scenarios
        from environment_provider.celery_app import SETTINGS
        from environment_provider.etcd import Database
        from workload import Testruns, register_example_providers

        scenarios.progress(f"local stack: etcd 127.0.0.1:{stack.etcd_port}, Redis 127.0.0.1:{stack.redis_port}")
        database = Database(SETTINGS)
        testruns = Testruns(database, register_example_providers(database))

        scenarios.collection(report, plan.collection_runs)

        worker = stack.start_worker(concurrency=2, name="bench-main")
        try:
            scenarios.latency(report, stack, testruns, plan.latency_runs, plan.latency_warmup, plan.polled_runs)
            scenarios.scale(report, testruns, list(plan.scale_sizes))
            scenarios.cost(report, stack, testruns, plan.cost_size, plan.cost_pairs)
            scenarios.lease_keys(report, database, plan.lease_keys, plan.lease_puts)
            scenarios.memory(report, "2 worker processes, after latency, scale and cost", worker.process.pid)
        finally:
            scenarios.stop_worker(stack, worker)

        for concurrency in CONCURRENCY_LEVELS:
            scenarios.throughput(report, stack, testruns, concurrency, plan.throughput_count, plan.throughput_batches)

        rates = {f.name.split(" ", 1)[0]: f.median for f in report.figures if f.unit == "checkouts/s"}
        for concurrency in CONCURRENCY_LEVELS[1:]:
            if "1" in rates and str(concurrency) in rates:
                report.ratios.append((f"throughput {concurrency} / 1 worker processes", rates[str(concurrency)] / rates["1"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and 40 instead of 200 testruns per throughput batch (about a minute)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every sample, ratio and target to FILE as JSON")
    args = parser.parse_args(argv)

    plan = QUICK if args.quick else FULL
    started = time.perf_counter()
    report = Report()
    description = machine()
    try:
        run(plan, report)
    except BenchmarkError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    add_targets(report)
    duration = time.perf_counter() - started

    command = "benchmarks/run.py" + (" --quick" if args.quick else "")
    print(f"# Benchmark run: {command}\n")
    print("\n".join(f"- {line}" for line in description))
    print(f"- wall time of the whole run: {duration:.0f} s\n")
    print(report.table())
    print("\nRatios:\n")
    print(report.ratio_lines())
    print("\nTargets (medians of this run):\n")
    print(report.target_lines())
    print("\nCounted details:\n")
    print("\n".join(f"- {line}" for line in report.details))
    if args.json:
        document = {"command": command, "machine": description, "seconds": duration, **report.as_json()}
        args.json.write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
