"""What the machine does to memory that the benchmarks' figures depend on.

This machine is a VM whose balloon device has free page reporting on: memory the guest
frees is handed back to the host in blocks, and the next time the guest uses such a
page the host faults it in again. Writing 1 GiB into fresh tmpfs pages ran at
234-309 MiB/s here when the pages came back from the host, and at 1011-1912 MiB/s
when they had been used since (issue 15, 2026-12-02). A replication checkpoint frees
the buffers (both implementations), and the next copies before write allocate new
pages, so how much was handed back in between moves the sequential figures and part
of the random ones from shot to shot. The benchmarks record what they saw.
"""

from __future__ import annotations

import os
import time
from typing import Any, NamedTuple

REPORTING = "/sys/module/page_reporting/parameters"


def page_reporting() -> dict[str, Any] | None:
    """Free page reporting's state: None when the kernel has none."""
    if not os.path.isdir(REPORTING):
        return None
    out: dict[str, Any] = {}
    for name in ("page_reporting_order", "reported_kib"):
        try:
            with open(os.path.join(REPORTING, name)) as f:
                out[name] = int(f.read().strip())
        except (OSError, ValueError):
            pass
    return out or None


def fresh_page_rate(directory: str, mib: int = 256) -> float:
    """MiB/s of 1 MiB writes into a new file in ``directory`` (then removed)."""
    path = os.path.join(directory, f".fresh-pages-{os.getpid()}")
    buf = b"\xa5" * (1 << 20)
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
    try:
        t = time.perf_counter()
        for i in range(mib):
            os.pwrite(fd, buf, i << 20)
        return mib / (time.perf_counter() - t)
    finally:
        os.close(fd)
        os.unlink(path)


def describe(start: dict[str, Any] | None, end: dict[str, Any] | None) -> str:
    """One line for a results file: reporting on or off, and how much went back."""
    if start is None:
        return "free page reporting: none in this kernel"
    gone = None
    if end is not None and "reported_kib" in start and "reported_kib" in end:
        gone = (end["reported_kib"] - start["reported_kib"]) / 1024
    text = (
        f"free page reporting: on (order {start.get('page_reporting_order')}); "
        "a page the guest freed costs a host fault when used again"
    )
    if gone is not None:
        text += f"; {gone:.0f} MiB handed back to the host during the run"
    return text


class Jiffies(NamedTuple):
    """All CPUs' time so far, from /proc/stat (``cpu_jiffies``)."""

    steal: int
    idle: int  # idle and iowait: nothing of the machine's wanted a CPU
    total: int


def cpu_jiffies() -> Jiffies | None:
    """All CPUs' time so far; None without /proc/stat.

    Steal is time a vCPU was runnable but the host ran something else: on a shared
    host it moves every figure, and a design whose threads wake each other often
    pays more for it. Idle is time no process wanted a CPU: with every CPU busy the
    throughput is bound by the CPU each request costs; with idle left, by how the
    processes wait for each other."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: inside user]
    values = [int(v) for v in fields[1:9]]
    return Jiffies(values[7], values[3] + values[4], sum(values))


def _share(before: Jiffies | None, after: Jiffies | None, field: str) -> float | None:
    if before is None or after is None or after.total <= before.total:
        return None
    return (getattr(after, field) - getattr(before, field)) / (after.total - before.total)


def stolen_fraction(before: Jiffies | None, after: Jiffies | None) -> float | None:
    """The share of CPU time the host took between two ``cpu_jiffies()``."""
    return _share(before, after, "steal")


def idle_fraction(before: Jiffies | None, after: Jiffies | None) -> float | None:
    """The share of CPU time nothing wanted between two ``cpu_jiffies()``."""
    return _share(before, after, "idle")


def describe_steal(fractions: list[float | None]) -> str:
    """'median X % [min-max]' of the shots' stolen (or idle) shares, for a results file."""
    vals = sorted(100 * f for f in fractions if f is not None)
    if not vals:
        return "not measured"
    mid = (
        vals[len(vals) // 2]
        if len(vals) % 2
        else (vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2
    )
    return f"median {mid:.0f} % [{vals[0]:.0f}-{vals[-1]:.0f}] of {len(vals)} shots"
