"""Statistics, etcd's Prometheus counters and the peak memory of processes, for the benchmarks."""

from __future__ import annotations

import math
import os
import re
import statistics
import urllib.request
from collections import defaultdict
from pathlib import Path

# `name{labels} value` or `name value` in the Prometheus text format.
METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)$")
LABEL = re.compile(r'(\w+)="([^"]*)"')

# Counters of etcd 3.5 read before and after a checkout; `requests.<Method>` are added per gRPC method.
ETCD_COUNTERS = {
    "etcd_mvcc_put_total": "key puts",
    "etcd_mvcc_range_total": "key ranges",
    "etcd_mvcc_txn_total": "transactions",
    "etcd_debugging_mvcc_total_put_size_in_bytes": "key-value bytes put",
    "etcd_network_client_grpc_received_bytes_total": "gRPC bytes received",
    "etcd_disk_wal_write_bytes_total": "WAL bytes written",
    "etcd_disk_wal_fsync_duration_seconds_count": "WAL fsyncs",
}


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], share: float) -> float:
    """Return the nearest-rank percentile; with fewer than 20 values the 95th is the largest."""
    ordered = sorted(values)
    rank = max(1, math.ceil(share / 100 * len(ordered)))
    return ordered[rank - 1]


def read_etcd_counters(port: int) -> dict[str, float]:
    """Read etcd's /metrics on 127.0.0.1:`port`; return the counters named in ETCD_COUNTERS and requests per gRPC method.

    `requests.<Method>` counts request messages received, so a lease
    keep-alive stream counts each keep-alive and a unary call counts once.
    """
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    counters: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        match = METRIC_LINE.match(line)
        if not match:
            continue
        name, labels, value = match.groups()
        if name in ETCD_COUNTERS:
            counters[ETCD_COUNTERS[name]] += float(value)
        elif name == "grpc_server_msg_received_total":
            method = dict(LABEL.findall(labels or "")).get("grpc_method", "?")
            counters[f"requests.{method}"] += float(value)
    return dict(counters)


def difference(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Return after minus before for every counter, dropping those that did not change."""
    names = set(before) | set(after)
    changes = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in names}
    return {name: change for name, change in changes.items() if change}


def total_requests(counters: dict[str, float]) -> float:
    return sum(value for name, value in counters.items() if name.startswith("requests."))


def children_of(pid: int) -> list[int]:
    """Return the ids of the direct child processes of `pid`, found through /proc."""
    children = []
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(status.parent.name))
    return sorted(children)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU seconds a process has used so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3, utime and stime are fields 14 and 15 of proc(5).
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """Return the CPU seconds all processors have spent busy since boot, from /proc/stat."""
    values = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle, iowait = values[3], values[4]
    # Fields 9 and 10 (guest time) are already counted in user and nice.
    return (sum(values[:8]) - idle - iowait) / CLOCK_TICKS


def cpu_by_process_group(groups: dict[str, list[int]]) -> dict[str, float]:
    """Return the CPU seconds used so far by each named group of processes, plus the whole machine as `machine`."""
    usage = {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in groups.items()}
    usage["machine"] = machine_busy_seconds()
    return usage


def peak_rss_kib(pid: int) -> int | None:
    """Return VmHWM (the peak resident set size, in KiB) of a live process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def worker_peak_rss(pid: int) -> dict[str, int]:
    """Return the peak RSS in KiB of a Celery worker's main process and each of its pool children."""
    peaks = {}
    main = peak_rss_kib(pid)
    if main is not None:
        peaks[f"main process {pid}"] = main
    for child in children_of(pid):
        peak = peak_rss_kib(child)
        if peak is not None:
            peaks[f"pool child {child}"] = peak
    return peaks
