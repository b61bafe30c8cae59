"""The benchmark scenarios: latency against its floor, throughput, scale, cost per sub-suite, test collection.

Every scenario that goes through Celery uses the product's enqueue helper
and waits on the Celery result (the Redis result backend sends it to the
waiting client through pub/sub), so a time is enqueue to result.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from environment_provider.celery_app import SETTINGS, app
from environment_provider.client import enqueue_checkout, wait_for_result
from environment_provider.collection import test_suites_of
from environment_provider.etcd import Database
from environment_provider.local import LocalStack
from environment_provider.splitter import assign_counts, split_round_robin

from measure import children_of, cpu_by_process_group, difference, read_etcd_counters, total_requests, worker_peak_rss
from report import BenchmarkError, Figure, Report
from workload import RESULT_TIMEOUT, Testruns, check_result, make_tercc, ping

FLOOR_PREFIX = "/benchmark/floor"


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def milliseconds(seconds: list[float]) -> list[float]:
    return [value * 1000 for value in seconds]


# Latency and its floor.


@dataclass
class WritePlan:
    """The etcd writes of one checkout, counted on the server: plain puts, transactions and their sizes."""

    puts: int
    transactions: int
    keys_per_transaction: list[int]
    value_bytes: int

    @classmethod
    def from_counters(cls, counters: dict[str, float]) -> "WritePlan":
        puts = int(counters.get("requests.Put", 0))
        transactions = int(counters.get("requests.Txn", 0))
        key_puts = int(counters.get("key puts", 0))
        put_bytes = counters.get("key-value bytes put", 0.0)
        in_transactions = max(0, key_puts - puts)
        share, extra = divmod(in_transactions, transactions) if transactions else (0, 0)
        keys_per_transaction = [share + (1 if index < extra else 0) for index in range(transactions)]
        # NOTE: the value size is an average. etcd counts the whole key-value record, and the
        # 120 bytes taken off for the key and revision fields are an estimate.
        value_bytes = max(1, int(put_bytes / key_puts) - 120) if key_puts else 1
        return cls(puts, transactions, keys_per_transaction, value_bytes)


def replay_writes(database: Database, plan: WritePlan, lease: int) -> None:
    """Send the planned puts and transactions one after another with the raw etcd client."""
    client = database.client
    prefix = f"{FLOOR_PREFIX}/{uuid.uuid4()}"
    value = "x" * plan.value_bytes
    for index in range(plan.puts):
        client.put(f"{prefix}/put/{index}", value, lease=lease)
    for index, count in enumerate(plan.keys_per_transaction):
        operations = [client.transactions.put(f"{prefix}/txn/{index}/{key}", value, lease=lease) for key in range(count)]
        client.transaction(compare=[], success=operations, failure=[])


def latency(report: Report, stack: LocalStack, testruns: Testruns, repetitions: int, warmup: int, polled: int) -> None:
    """Time one-sub-suite checkouts on a warm worker next to the floor, alternating run by run."""
    progress(f"latency: {warmup} warm-up checkouts, then {repetitions} checkouts and floors")
    for _ in range(warmup):
        testruns.checkout(testruns.configure(1, 1), 1)
        ping()

    testrun_id = testruns.configure(1, 1)
    before = read_etcd_counters(stack.etcd_port)
    testruns.checkout(testrun_id, 1)
    counted = difference(before, read_etcd_counters(stack.etcd_port))
    plan = WritePlan.from_counters(counted)
    requests = ", ".join(
        f"{name.split('.', 1)[1]} {value:.0f}" for name, value in sorted(counted.items()) if name.startswith("requests.")
    )
    report.details.append(
        f"etcd requests of a checkout with one sub-suite, enqueue helper included: {requests}; "
        f"{counted.get('key puts', 0):.0f} keys put, {counted.get('key-value bytes put', 0):,.0f} key-value bytes"
    )
    report.details.append(
        f"floor writes per run: {plan.puts} puts and {plan.transactions} transactions "
        f"({sum(plan.keys_per_transaction)} keys), values of {plan.value_bytes} bytes"
    )

    lease = testruns.database.grant_lease(3600)
    ids = [testruns.configure(1, 1) for _ in range(repetitions)]
    checkouts, pings, writes, floors = [], [], [], []
    for testrun_id in ids:
        checkouts.append(testruns.checkout(testrun_id, 1))
        round_trip = ping()
        started = time.perf_counter()
        replay_writes(testruns.database, plan, lease)
        written = time.perf_counter() - started
        pings.append(round_trip)
        writes.append(written)
        floors.append(round_trip + written)

    section = "1. latency, one sub-suite, warm worker"
    checkout = report.add(Figure(section, "checkout, enqueue to result", "ms", milliseconds(checkouts)))
    report.add(Figure(section, "no-op task round trip", "ms", milliseconds(pings)))
    report.add(Figure(section, "the checkout's etcd writes from the client", "ms", milliseconds(writes)))
    floor = report.add(Figure(section, "floor: no-op round trip + etcd writes", "ms", milliseconds(floors)))
    report.ratios.append(("checkout / floor (medians)", checkout.median / floor.median))

    # The CLI's checkout command waits with client.wait_for_result, which also reads progress events between waits.
    polled_times = []
    for testrun_id in [testruns.configure(1, 1) for _ in range(polled)]:
        started = time.perf_counter()
        task_id = enqueue_checkout(app, testruns.database, SETTINGS, testrun_id, [])
        status = wait_for_result(app, testruns.database, SETTINGS, task_id, testrun_id, RESULT_TIMEOUT)
        polled_times.append(time.perf_counter() - started)
        check_result(testrun_id, status["result"], 1)
    report.add(Figure(section, "checkout, result polled by client.wait_for_result", "ms", milliseconds(polled_times)))


# Throughput.


def throughput(report: Report, stack: LocalStack, testruns: Testruns, concurrency: int, count: int, batches: int) -> None:
    """Measure checkouts per second of one worker with `concurrency` pool processes: configure all, enqueue all, wait for all."""
    progress(f"throughput: worker with {processes(concurrency)}, {batches} batches of {count} testruns")
    worker = stack.start_worker(concurrency=concurrency, name=f"bench-throughput-{concurrency}")
    try:
        warm = [testruns.configure(1, 1) for _ in range(2 * concurrency)]
        for testrun_id, result in [(testrun_id, testruns.enqueue(testrun_id)) for testrun_id in warm]:
            check_result(testrun_id, result.get(timeout=RESULT_TIMEOUT), 1)

        groups = {
            "etcd": [server.process.pid for server in stack.etcd],
            "Redis": [stack.redis.process.pid] if stack.redis else [],
            "worker main process": [worker.process.pid],
            "worker pool processes": children_of(worker.process.pid),
            "benchmark client (configure not counted)": [os.getpid()],
        }
        rates = []
        wall = 0.0
        cpu: dict[str, float] = {}
        for _ in range(batches):
            ids = [testruns.configure(1, 1) for _ in range(count)]
            before = cpu_by_process_group(groups)
            started = time.perf_counter()
            results = [testruns.enqueue(testrun_id) for testrun_id in ids]
            values = [result.get(timeout=RESULT_TIMEOUT) for result in results]
            elapsed = time.perf_counter() - started
            after = cpu_by_process_group(groups)
            for testrun_id, value in zip(ids, values):
                check_result(testrun_id, value, 1)
            rates.append(count / elapsed)
            wall += elapsed
            for name in after:
                cpu[name] = cpu.get(name, 0.0) + after[name] - before[name]
        memory(report, f"{processes(concurrency)}, after throughput", worker.process.pid)
    finally:
        stop_worker(stack, worker)

    report.add(
        Figure("2. throughput, one sub-suite each", f"{processes(concurrency)}, {count} testruns", "checkouts/s", rates, higher_is_better=True)
    )
    checkouts = count * batches
    ours = sum(value for name, value in cpu.items() if name != "machine")
    shares = ", ".join(f"{name} {value / checkouts * 1000:.1f}" for name, value in cpu.items() if name != "machine")
    processors = len(os.sched_getaffinity(0))
    report.details.append(
        f"CPU ms per checkout with {processes(concurrency)}: {shares}; "
        f"other processes on the machine {(cpu['machine'] - ours) / checkouts * 1000:.1f}; "
        f"{processors} processors offered {processors * wall / checkouts * 1000:.1f} ms per checkout"
    )


def processes(count: int) -> str:
    return f"{count} worker process{'es' if count > 1 else ''}"


def stop_worker(stack: LocalStack, worker: Any) -> None:
    worker.stop(timeout=15)
    stack.workers.remove(worker)


def memory(report: Report, label: str, pid: int) -> None:
    """Add the peak RSS of a worker's main process and of its largest pool child."""
    peaks = worker_peak_rss(pid)
    main = [value for name, value in peaks.items() if name.startswith("main")]
    children = [value for name, value in peaks.items() if name.startswith("pool child")]
    section = "4. worker memory, peak RSS (VmHWM)"
    if main:
        report.add(Figure(section, f"{label}: main process", "MiB", [main[0] / 1024]))
    if children:
        report.add(Figure(section, f"{label}: largest pool process (of {len(children)})", "MiB", [max(children) / 1024]))
    report.details.append(f"peak RSS of {label}: " + ", ".join(f"{name} {value / 1024:.1f} MiB" for name, value in peaks.items()))


# Scale.


def scale(report: Report, testruns: Testruns, sizes: list[tuple[int, int, int]]) -> None:
    """Time one testrun per (recipes, IUTs, repetitions) entry and add the ratio of each median to the previous size's."""
    section = "3. scale, one testrun"
    medians = []
    for recipes, iuts, repetitions in sizes:
        progress(f"scale: {repetitions} checkouts of {recipes} recipes over {iuts} IUTs")
        ids = [testruns.configure(recipes, iuts) for _ in range(repetitions)]
        times = [testruns.checkout(testrun_id, iuts) for testrun_id in ids]
        size = len(json.dumps(testruns.last_result, separators=(",", ":")))
        report.details.append(f"task result of {recipes:,} recipes over {iuts:,} IUTs: {size:,} bytes of JSON")
        figure = report.add(Figure(section, f"{recipes:,} recipes over {iuts:,} IUTs", "ms", milliseconds(times), decimals=0))
        medians.append((recipes, figure.median))
    for (smaller, small_time), (larger, large_time) in zip(medians, medians[1:]):
        report.ratios.append((f"work 10x: {larger:,} / {smaller:,} recipes (linear is {larger / smaller:g})", large_time / small_time))


# Cost per sub-suite.


def cost(report: Report, stack: LocalStack, testruns: Testruns, size: int, repetitions: int) -> None:
    """Check out `size` and 2 x `size` sub-suites in pairs and add what each extra sub-suite costs, as etcd counts it."""
    progress(f"cost: {repetitions} pairs of checkouts of {size} and {2 * size} sub-suites")
    per_extra: list[dict[str, float]] = []
    fixed: list[dict[str, float]] = []
    for _ in range(repetitions):
        measured = {}
        for sub_suites in (size, 2 * size):
            testrun_id = testruns.configure(sub_suites, sub_suites)
            before = read_etcd_counters(stack.etcd_port)
            seconds = testruns.checkout(testrun_id, sub_suites)
            counters = difference(before, read_etcd_counters(stack.etcd_port))
            counters["seconds"] = seconds
            measured[sub_suites] = counters
        small, large = measured[size], measured[2 * size]
        names = set(small) | set(large)
        extra = {name: (large.get(name, 0.0) - small.get(name, 0.0)) / size for name in names}
        per_extra.append(extra)
        fixed.append({name: small.get(name, 0.0) - size * extra[name] for name in names})

    section = f"4. cost per extra sub-suite ({size} vs {2 * size} sub-suites)"

    def samples(name: str) -> list[float]:
        return [extra.get(name, 0.0) for extra in per_extra]

    report.add(Figure(section, "added time per extra sub-suite", "ms", [value * 1000 for value in samples("seconds")], decimals=2))
    report.add(Figure(section, "etcd requests per extra sub-suite", "requests", [total_requests(extra) for extra in per_extra], decimals=2))
    for name, unit, decimals in (
        ("key puts", "keys", 2),
        ("key-value bytes put", "bytes", 0),
        ("gRPC bytes received", "bytes", 0),
        ("WAL bytes written", "bytes", 0),
        ("WAL fsyncs", "fsyncs", 2),
    ):
        report.add(Figure(section, f"{name} per extra sub-suite", unit, samples(name), decimals=decimals))

    methods = sorted({name for extra in per_extra for name in extra if name.startswith("requests.")})
    report.details.append(
        "etcd requests per extra sub-suite by gRPC method (last pair): "
        + ", ".join(f"{name.split('.', 1)[1]} {per_extra[-1].get(name, 0.0):.2f}" for name in methods)
    )
    report.details.append(
        "etcd requests per checkout that do not grow with sub-suites (last pair, enqueue helper included): "
        + ", ".join(f"{name.split('.', 1)[1]} {fixed[-1].get(name, 0.0):.1f}" for name in methods)
    )


def lease_keys(report: Report, database: Database, attached: int, puts: int) -> None:
    """Time single puts on a fresh lease and on a lease that already has `attached` keys, as one testrun's lease does.

    Before etcd 3.5.10 a put with a lease takes time that grows with the keys
    already attached to that lease (the 3.5.10 change log: "Improve Lease put
    performance for the case that auth is disabled or the user is admin").
    """
    progress(f"etcd: {puts} puts on a fresh lease and on a lease with {attached:,} keys")
    client = database.client
    lease = database.grant_lease(3600)
    prefix = f"{FLOOR_PREFIX}/{uuid.uuid4()}"
    value = "x" * 300

    def timed_puts(label: str) -> list[float]:
        times = []
        for index in range(puts):
            started = time.perf_counter()
            client.put(f"{prefix}/{label}/{index}", value, lease=lease)
            times.append(time.perf_counter() - started)
        return times

    fresh = timed_puts("fresh")
    batch = 100
    for start in range(0, attached, batch):
        operations = [
            client.transactions.put(f"{prefix}/attached/{index}", value, lease=lease)
            for index in range(start, min(start + batch, attached))
        ]
        client.transaction(compare=[], success=operations, failure=[])
    loaded = timed_puts("loaded")

    section = "4. etcd put latency by keys already on the lease"
    report.add(Figure(section, f"put, lease holding 0 to {puts:,} keys", "ms", milliseconds(fresh), decimals=2))
    report.add(
        Figure(section, f"put, lease holding {attached + puts:,} to {attached + 2 * puts:,} keys", "ms", milliseconds(loaded), decimals=2)
    )


# Test collection, in-process.


def collection(report: Report, repetitions: int, recipes: int = 10_000, iuts: int = 1_000) -> None:
    """Parse, validate and split a collection of `recipes` over `iuts` IUTs inside this process."""
    progress(f"test collection: {repetitions} runs of parse and split at {recipes:,} recipes")
    text = json.dumps(make_tercc(str(uuid.uuid4()), recipes), separators=(",", ":"))
    parse, suites_of, split, total = [], [], [], []
    for _ in range(repetitions):
        started = time.perf_counter()
        tercc = json.loads(text)
        parsed = time.perf_counter()
        suites = test_suites_of(tercc)
        grouped = time.perf_counter()
        runners = suites[0].recipes_by_runner
        counts = assign_counts({runner: len(items) for runner, items in runners.items()}, iuts)
        shares = [split_round_robin(runners[runner], count) for runner, count in counts.items()]
        finished = time.perf_counter()
        if sum(len(share) for runner_shares in shares for share in runner_shares) != recipes:
            raise BenchmarkError("the split lost recipes")
        parse.append(parsed - started)
        suites_of.append(grouped - parsed)
        split.append(finished - grouped)
        total.append(finished - started)

    section = f"5. test collection, {recipes:,} recipes ({len(text) / 1e6:.2f} MB TERCC), in-process"
    report.add(Figure(section, "json.loads of the TERCC", "ms", milliseconds(parse)))
    report.add(Figure(section, "collection.test_suites_of (schema validation, grouping)", "ms", milliseconds(suites_of)))
    report.add(Figure(section, f"assign_counts + split_round_robin over {iuts:,} IUTs", "ms", milliseconds(split), decimals=2))
    report.add(Figure(section, "parse and split in all", "ms", milliseconds(total)))
