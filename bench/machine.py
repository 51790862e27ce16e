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
from typing import Any

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
