"""Worker SIGKILL mid-checkout: the task is delivered again and the next attempt cleans up after the dead one.

Each trial checks out one test suite of 2 recipes, 6 items in all. The lab
provides 2 IUTs (0.2 s per reservation, 0.5 s flash), an external provider 2
execution spaces (DONE after 0.3 s), and a slow log area provider 2 log
areas (0.3 s each).
The pool process that holds the testrun's claim is killed with SIGKILL once
k items of its attempt are recorded in etcd, k drawn from 0 to 5. After the
sixth item only fast etcd writes remain; a kill at k=5 sometimes lands
there, and the plans "after the end" aim at the moment the testrun record
says "checked out" while the attempt still holds the claim (the window is
a few milliseconds, so some of these kills miss it and the checkout
simply succeeds).

Plans:
- once: one kill, then the redelivered task must check out afresh.
- after the end: one kill once the attempt has run to the end; the next
  delivery must return the outcome stored in etcd.
- every attempt: a kill in each of the 3 attempts; the 4th delivery must end
  FAILED with everything checked in. A kill that lands before an attempt
  counted itself in the testrun record leaves it uncounted, so such a trial
  may end with a checkout instead.
- external request pending: the kill lands while the external provider has
  allocated execution spaces whose request status was not yet DONE.
"""

from __future__ import annotations

import json
import queue
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from environment_provider.attempt import MAX_ATTEMPTS
from environment_provider.client import enqueue_checkout
from environment_provider.claim import CLAIM_TTL, TERMINAL_STATUSES
from environment_provider.registry import register_definition

from harness import DATASET, ROOT, Bench, Row, Trial, keys, kill, sub_suites, checkout_outcome, tercc, wait_for
from peers import DeviceLab, ExternalProvider, Recorder

ITEMS_PER_TRIAL = 6
AFTER_THE_END = ITEMS_PER_TRIAL
LANES = 3
LOG_AREA_DELAY = 0.3


@dataclass
class Plan:
    kind: str  # "once", "after the end", "every attempt" or "external request pending"
    kill_points: list[int]


def plans(rng: random.Random, scale: float) -> tuple[list[Plan], list[Plan]]:
    """Return the plans of the main row and of the external-request row."""
    once_count = max(20, round(30 * scale))
    points = [index % ITEMS_PER_TRIAL for index in range(once_count)]
    rng.shuffle(points)
    main = [Plan("once", [point]) for point in points]
    main += [Plan("after the end", [AFTER_THE_END]) for _ in range(max(3, round(4 * scale)))]
    main += [Plan("every attempt", [rng.randrange(ITEMS_PER_TRIAL) for _ in range(MAX_ATTEMPTS)]) for _ in range(max(3, round(5 * scale)))]
    rng.shuffle(main)
    pending = [Plan("external request pending", [-1]) for _ in range(max(3, round(3 * scale)))]
    return main, pending


def slow_log_area(request: Any) -> tuple[int, dict[str, Any]]:
    time.sleep(LOG_AREA_DELAY)
    return 200, {"logs": {"created": True}}


def register_slow_log_area(bench: Bench, url: str) -> str:
    """Register the example log area provider with a checkout that takes LOG_AREA_DELAY seconds."""
    definition = json.loads((ROOT / "providers" / "log-area" / "file-server.json").read_text())
    definition["log"]["id"] = f"slow-logs-{uuid.uuid4().hex[:8]}"
    definition["log"]["checkout"] = {"$request": {"url": f"{url}/log-area", "method": "POST", "json": {"context": "$context"}}}
    register_definition(bench.database, definition)
    return definition["log"]["id"]


class Lane:
    """One trial at a time with its own lab and external provider."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.killed_attempts: set[str] = set()

    def run(self, plan: Plan, trial: Trial, facts: dict[str, Any]) -> None:
        bench = self.bench
        lab = DeviceLab(4)
        lab.reserve_delay = 0.2
        lab.state.flash_delay = 0.5
        external = ExternalProvider(ready_after=0.3)
        log_server = Recorder({"POST /log-area": slow_log_area})
        try:
            providers = bench.register_defaults()
            providers["iut"] = bench.register_lab(lab, prepare=True)
            providers["execution-space"] = f"es-{uuid.uuid4().hex[:8]}"
            register_definition(bench.database, external.definition(providers["execution-space"]))
            providers["log-area"] = register_slow_log_area(bench, log_server.url)
            testrun_id = bench.configure(
                providers, tercc(2), dataset={**DATASET, "lab_url": lab.url},
                timeouts={"iut": 20, "execution-space": 20, "log-area": 20, "total": 60},
            )  # fmt: skip
            task_id = enqueue_checkout(bench.celery, bench.database, bench.settings, testrun_id, [])

            kills = 0
            for point in plan.kill_points:
                if self.kill_attempt(testrun_id, point, external, trial):
                    kills += 1
            facts.setdefault("kills", []).append(kills)

            state, result = checkout_outcome(bench, task_id, testrun_id, timeout=60 + (CLAIM_TTL + 30) * (kills + 1))
            if not trial.check(state == "SUCCESS", f"task {task_id} has state {state} and no result; record {bench.record(testrun_id)}"[:400]):
                trial.loss(1, f"the result of task {task_id}")
                self.check_release(testrun_id, lab, external, trial)
                return
            self.check_result(kills, testrun_id, result, lab, external, trial)
            self.check_release(testrun_id, lab, external, trial)
        finally:
            lab.close()
            external.close()
            log_server.close()

    def kill_attempt(self, testrun_id: str, point: int, external: ExternalProvider, trial: Trial) -> bool:
        """Wait for an attempt to hold the claim and reach its kill point, then SIGKILL its process."""
        bench = self.bench
        claim_key = keys.claim(testrun_id)

        def fresh_claim_or_end() -> dict[str, Any] | None:
            text = bench.database.get(claim_key)
            holder = json.loads(text) if text else None
            if holder and holder["attempt"] not in self.killed_attempts:
                return holder
            if bench.record(testrun_id).get("status") in TERMINAL_STATUSES:
                return {"ended": True}
            return None

        holder = wait_for(fresh_claim_or_end, timeout=CLAIM_TTL + 30)
        if not trial.check(holder is not None, "no attempt took the claim to be killed"):
            return False
        if holder.get("ended"):
            return False  # an earlier kill landed after the checkout had run to the end
        before = set(bench.sub_suite_items(testrun_id))

        if point < 0:
            reached = wait_for(lambda: any(not allocation.collected for allocation in external.state.allocations.values()), 30, 0.005)
        elif point == AFTER_THE_END:
            reached = wait_for(lambda: bench.record(testrun_id).get("status") == "checked out", 30, 0.001)
        else:
            reached = wait_for(lambda: len(set(bench.sub_suite_items(testrun_id)) - before) >= point, 30, 0.005)
        if not trial.check(bool(reached) or point == 0, f"the attempt never reached kill point {point}"):
            return False
        if bench.database.get(claim_key) is None:
            if point != AFTER_THE_END:
                trial.problems.append(f"the attempt finished before kill point {point}")
            return False
        self.killed_attempts.add(holder["attempt"])
        return kill(holder["pid"])

    def check_result(
        self, kills: int, testrun_id: str, result: dict[str, Any], lab: DeviceLab, external: ExternalProvider, trial: Trial
    ) -> None:
        bench = self.bench
        record = bench.record(testrun_id)
        held_devices = lab.held()
        held_spaces = set(external.held())
        trial.check(all(holders == [testrun_id] for holders in held_devices.values()), f"devices held by others: {held_devices}")
        trial.check(lab.foreign_releases == 0, f"{lab.foreign_releases} releases of devices the releaser did not hold")
        attempts = record.get("attempts", 0)
        trial.check(1 <= attempts <= kills + 1, f"record shows {attempts} attempts after {kills} kills")

        if attempts > MAX_ATTEMPTS:
            trial.check(bool(result.get("error")), "a checkout whose attempts were all killed did not fail")
            trial.check(f"attempted {MAX_ATTEMPTS} times" in str(result.get("error")), f"unexpected error: {result.get('error')}")
            trial.check(record.get("status") == "failed", f"record status {record.get('status')!r}, expected 'failed'")
            trial.leak(len(held_devices), f"devices still reserved after the failed checkout: {sorted(held_devices)}")
            trial.leak(len(held_spaces), "execution spaces still allocated after the failed checkout")
            trial.leak(len(bench.sub_suite_items(testrun_id)), "item keys left in etcd after the failed checkout")
            return

        if not trial.check(result.get("error") is None, f"checkout failed: {result.get('error')}"):
            return
        environments = sub_suites(result)
        serials = sorted(sub_suite["iut"]["serial"] for sub_suite in environments)
        spaces = {sub_suite["executor"]["id"] for sub_suite in environments}
        trial.check(len(environments) == 2, f"{len(environments)} sub-suites instead of 2")
        trial.leak(len(set(held_devices) - set(serials)), f"devices reserved beyond the result: {sorted(set(held_devices) - set(serials))}")
        trial.leak(len(held_spaces - spaces), f"execution spaces allocated beyond the result ({len(external.held_uncollected())} never collected)")
        trial.loss(len(set(serials) - set(held_devices)), "devices of the result that the lab does not show reserved")
        stored = bench.sub_suite_items(testrun_id)
        trial.check(len(stored) == ITEMS_PER_TRIAL, f"{len(stored)} item keys in etcd instead of {ITEMS_PER_TRIAL}")
        for sub_suite in environments:
            suite_key = keys.sub_suite_item(testrun_id, sub_suite["test_suite_started_id"], sub_suite["sub_suite_id"], "suite")
            if bench.database.get(suite_key) is None:
                trial.loss(1, f"sub-suite {sub_suite['sub_suite_id']} of the result is not in etcd")

    def check_release(self, testrun_id: str, lab: DeviceLab, external: ExternalProvider, trial: Trial) -> None:
        bench = self.bench
        report = bench.release(testrun_id)
        trial.check(report.complete, f"release incomplete: {report.failures}")
        trial.leak(len(lab.held()), f"devices reserved after release: {sorted(lab.held())}")
        trial.leak(len(external.held()), "execution spaces allocated after release")
        trial.check(external.state.unknown_stops == 0, f"{external.state.unknown_stops} stops of execution spaces the provider never allocated")
        trial.leak(len(bench.sub_suite_items(testrun_id)), "item keys left in etcd after release")


def run(options: Any) -> list[Row]:
    rng = random.Random(options.seed)
    main_plans, pending_plans = plans(rng, options.scale)
    rows = [
        Row("1. worker SIGKILL mid-checkout (after 0-5 of 6 items, or after the end)"),
        Row("1b. worker SIGKILL while an external request is pending"),
    ]
    with Bench(keep_logs=options.keep_logs) as bench:
        bench.start_worker(concurrency=LANES, name="kill")
        work: queue.Queue[tuple[Row, Plan]] = queue.Queue()
        for plan in main_plans:
            work.put((rows[0], plan))
        for plan in pending_plans:
            work.put((rows[1], plan))
        facts: dict[str, Any] = {}
        lock = threading.Lock()

        def lane_loop() -> None:
            lane = Lane(bench)
            while True:
                try:
                    row, plan = work.get_nowait()
                except queue.Empty:
                    return
                with lock:
                    context = row.trial(f"{plan.kind} at {plan.kill_points}")
                with context as trial:
                    lane.run(plan, trial, facts)

        threads = [threading.Thread(target=lane_loop, name=f"lane-{index}") for index in range(LANES)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        log = bench.stack.workers[0].log_path.read_text(errors="replace")
    kills = facts.get("kills", [])
    rows[0].fact(
        f"{len(kills)} trials, {sum(kills)} kills in all (kill points drawn with seed {options.seed}); "
        f"{log.count('returning the outcome stored in etcd')} kills landed after an attempt had run to the end"
    )
    return rows
