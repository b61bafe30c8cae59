"""Profile checkout_testrun in this process against a local stack of its own, with cProfile.

    .venv/bin/python benchmarks/profile_checkout.py --recipes 1 --iuts 1 --runs 200
    .venv/bin/python benchmarks/profile_checkout.py --recipes 10000 --iuts 1000 --runs 1 --warmup 1

The function is the one the `EnvironmentProvider` task calls (imported from
environment_provider.tasks, wherever the package defines it). No Celery
worker is involved: the checkout runs in the calling thread, so the
profile shows the product's own work and its etcd round trips. cProfile's
overhead inflates pure-Python work (JSONTas, jsonschema) more than waiting on
etcd, so the plain wall time of the same checkouts is printed too.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from environment_provider.local import LocalStack  # noqa: E402

WHOLE = "whole checkout_testrun"
BACKGROUND = "(other threads, overlapping)"
# Functions whose cumulative time is reported as a share of the checkout. They can nest
# (a progress event is also an etcd put), so the shares add up to more than 100 %.
WATCHED = {
    ("environment_provider/registry.py", "load_configuration"): "registry.load_configuration (read the testrun's keys)",
    ("environment_provider/registry.py", "update_record"): "registry.update_record (read and write the record)",
    ("environment_provider/collection.py", "test_suites_of"): "collection.test_suites_of",
    ("environment_provider/validation.py", "validate"): "validation.validate (jsonschema)",
    ("environment_provider/providers/rulesets.py", "evaluate"): "rulesets.evaluate (JSONTas)",
    ("environment_provider/providers/jsontas.py", "values"): "JsontasProvider.values (dataset per evaluation)",
    ("environment_provider/checkout.py", "checkout_iuts"): "Checkout.checkout_iuts",
    ("environment_provider/checkout.py", "build_sub_suites"): "Checkout.build_sub_suites",
    ("environment_provider/checkout.py", "record_item"): "Checkout.record_item (one put per item)",
    ("environment_provider/events.py", "emit"): "ProgressLog.emit (one put per event)",
    ("environment_provider/events.py", "__init__"): "ProgressLog.__init__ (list existing events)",
    ("environment_provider/claim.py", "wait"): "TestrunClaim.wait (take the claim)",
    ("environment_provider/claim.py", "release"): "TestrunClaim.release (revoke the claim's lease)",
    ("environment_provider/etcd.py", "grant_lease"): "Database.grant_lease",
    ("environment_provider/etcd.py", "revoke_lease"): "Database.revoke_lease",
    ("environment_provider/etcd.py", "create"): "Database.create (transaction)",
    ("environment_provider/etcd.py", "put"): "Database.put",
    ("environment_provider/etcd.py", "put_many"): "Database.put_many (transaction)",
    ("environment_provider/etcd.py", "get"): "Database.get",
    ("environment_provider/etcd.py", "get_with_lease"): "Database.get_with_lease",
    ("environment_provider/etcd.py", "get_prefix"): "Database.get_prefix",
    ("environment_provider/etcd.py", "keys_prefix"): "Database.keys_prefix",
    ("environment_provider/etcd.py", "client"): "Database.client (lock per call)",
    ("copy.py", "deepcopy"): "copy.deepcopy (all calls)",
}


def cumulative_by_function(stats: pstats.Stats, whole: Callable[..., Any]) -> dict[str, float]:
    """Return the cumulative seconds of `whole` and of each watched function (pstats counts a recursion once)."""
    code = whole.__code__
    whole_key = (code.co_filename, code.co_firstlineno, code.co_name)
    totals: dict[str, float] = {}
    for (filename, line, function), (_, _, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        if (filename, line, function) == whole_key:
            totals[WHOLE] = cumulative
        for (suffix, name), label in WATCHED.items():
            if function == name and filename.endswith(suffix):
                totals[label] = totals.get(label, 0.0) + cumulative
    return totals


class Timers:
    """Wall time and calls of a few functions, by wrapping them with perf_counter (far cheaper than cProfile).

    The wrapped groups do not call each other, because Database methods only
    talk to etcd and JSONTas and schema validation touch no database. On the
    thread that runs the checkout, the groups and the rest therefore add up to
    the whole checkout. Calls from other threads (a background writer, the
    lease keeper) overlap with it and are kept apart under BACKGROUND.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._restore: list[tuple[Any, str, Any]] = []
        self._thread = threading.get_ident()

    def wrap(self, owner: Any, name: str, group: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                label = group if threading.get_ident() == self._thread else f"{group} {BACKGROUND}"
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - started
                self.calls[label] = self.calls.get(label, 0) + 1

        setattr(owner, name, timed)
        self._restore.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)
        self._restore.clear()


def install_timers(timers: Timers) -> None:
    """Wrap every Database method that sends a request, and the JSONTas and JSON Schema entry points where they are called."""
    import environment_provider.collection as collection
    import environment_provider.providers.jsontas as jsontas
    from environment_provider.etcd import Database

    for name in ("get", "get_with_lease", "get_prefix", "keys_prefix", "put", "put_many", "create", "delete",
                 "delete_prefix", "grant_lease", "revoke_lease", "lease_remaining", "refresh_lease"):  # fmt: skip
        if hasattr(Database, name):
            timers.wrap(Database, name, f"etcd: Database.{name}")
    timers.wrap(jsontas, "evaluate", "JSONTas: rulesets.evaluate")
    timers.wrap(collection, "validate", "JSON Schema: validation.validate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", type=int, default=1, help="recipes in the one test suite (default 1)")
    parser.add_argument("--iuts", type=int, default=1, help="maximum_amount of IUTs, so sub-suites (default 1)")
    parser.add_argument("--runs", type=int, default=100, help="checkouts in each of the three passes: plain, timed, cProfile (default 100)")
    parser.add_argument("--warmup", type=int, default=3, help="checkouts before the passes (default 3)")
    parser.add_argument("--top", type=int, default=25, help="rows of each pstats listing (default 25)")
    parser.add_argument("--output", type=Path, help="also save the raw profile to this file, for snakeviz or pstats")
    args = parser.parse_args(argv)

    with LocalStack() as stack:
        os.environ.update(stack.environment())
        from environment_provider.celery_app import SETTINGS
        from environment_provider.etcd import Database
        from environment_provider.tasks import checkout_testrun
        from workload import Testruns, check_result, register_example_providers

        database = Database(SETTINGS)
        testruns = Testruns(database, register_example_providers(database))

        def checkout(testrun_id: str) -> None:
            result = checkout_testrun(database, SETTINGS, testrun_id, [], str(uuid.uuid4()))
            check_result(testrun_id, result, args.iuts)

        for _ in range(args.warmup):
            checkout(testruns.configure(args.recipes, args.iuts))

        plain_ids = [testruns.configure(args.recipes, args.iuts) for _ in range(args.runs)]
        started = time.perf_counter()
        for testrun_id in plain_ids:
            checkout(testrun_id)
        plain = (time.perf_counter() - started) / args.runs

        timed_ids = [testruns.configure(args.recipes, args.iuts) for _ in range(args.runs)]
        timers = Timers()
        install_timers(timers)
        started = time.perf_counter()
        try:
            for testrun_id in timed_ids:
                checkout(testrun_id)
        finally:
            timers.restore()
        timed = time.perf_counter() - started

        profiled_ids = [testruns.configure(args.recipes, args.iuts) for _ in range(args.runs)]
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        for testrun_id in profiled_ids:
            checkout(testrun_id)
        profiler.disable()
        profiled = (time.perf_counter() - started) / args.runs

    if args.output:
        profiler.dump_stats(args.output)
    stats = pstats.Stats(profiler)
    totals = cumulative_by_function(stats, checkout_testrun)
    whole = totals.get(WHOLE) or profiled * args.runs

    print(f"checkout_testrun of {args.recipes} recipes over {args.iuts} IUTs, {args.runs} runs in this process")
    print(f"mean wall time per checkout: {plain * 1000:.2f} ms without the profiler, {profiled * 1000:.2f} ms with it\n")
    print(f"time by group with perf_counter wrappers ({timed / args.runs * 1000:.2f} ms per checkout), share of the whole:")
    rest = timed
    for group, seconds in sorted(timers.seconds.items(), key=lambda item: -item[1]):
        if not group.endswith(BACKGROUND):
            rest -= seconds
        calls = timers.calls[group] / args.runs
        print(f"  {seconds / timed * 100:5.1f} %  {seconds / args.runs * 1000:9.2f} ms/checkout  {calls:8.1f} calls/checkout  {group}")
    print(f"  {rest / timed * 100:5.1f} %  {rest / args.runs * 1000:9.2f} ms/checkout  {'':>8}                 the rest (Python in the product and its libraries)")
    etcd_calls = sum(calls for group, calls in timers.calls.items() if group.startswith("etcd"))
    print(f"  etcd requests per checkout: {etcd_calls / args.runs:.1f}\n")

    print("cumulative time of watched functions, share of checkout_testrun under cProfile:")
    for label, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"  {seconds / whole * 100:5.1f} %  {seconds / args.runs * 1000:9.2f} ms/checkout  {label}")

    for order in ("cumulative", "tottime"):
        buffer = io.StringIO()
        pstats.Stats(profiler, stream=buffer).strip_dirs().sort_stats(order).print_stats(args.top)
        print(f"\npstats sorted by {order}:")
        print(buffer.getvalue().split("\n", 4)[-1].rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
