"""CPU time of the processes a benchmark measures, for "CPU µs per request" figures (issue 15).

A sample is taken of each process before and after one shot; the difference is the CPU the
whole process (every thread, user + system) spent during the shot. Two sources, because each
has a blind spot:

* ``/proc/PID/task/TID/schedstat``: ns on the CPU per thread - fine resolution, but the time
  of a thread that exited between the samples is lost (QEMU's worker threads come and go);
* ``/proc/PID/stat`` utime+stime: the whole thread group including exited threads, but in
  clock ticks (``SC_CLK_TCK``, usually 10 ms).

The schedstat sum is used unless a thread seen before is gone afterwards, or the tick count
grew by more than the schedstat sum plus two ticks (a thread born and dead in between): then
the tick figure is the honest one.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSample:
    """One look at a process: stat ticks and per-thread schedstat ns."""

    ticks: int
    threads: dict[int, int] = field(default_factory=dict)


def _stat_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    # comm (field 2) may hold spaces and parentheses: the fields that follow start after the
    # last ")"; utime and stime are fields 14 and 15, i.e. 12th and 13th after comm
    rest = text[text.rindex(")") + 2 :].split()
    return int(rest[11]) + int(rest[12])


def _thread_ns(pid: int) -> dict[int, int]:
    out: dict[int, int] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread exited while we listed; sample() notices via the tick check
    return out


def sample(pid: int) -> CpuSample | None:
    """The process's CPU counters now, or None when it is gone."""
    try:
        ticks = _stat_ticks(pid)
    except (OSError, ValueError, IndexError):
        return None
    return CpuSample(ticks, _thread_ns(pid))


def cpu_seconds(before: CpuSample | None, after: CpuSample | None) -> float | None:
    """CPU seconds the process spent between two samples (None when either is missing)."""
    if before is None or after is None:
        return None
    tick_s = (after.ticks - before.ticks) / CLK_TCK
    if not before.threads or not after.threads:
        return tick_s
    exited = any(t not in after.threads for t in before.threads)
    ns = sum(v - before.threads.get(t, 0) for t, v in after.threads.items())
    fine_s = ns / 1e9
    if exited or tick_s > fine_s + 2.0 / CLK_TCK:
        return tick_s
    return fine_s


class CpuMeter:
    """CPU seconds of several named processes (e.g. {"P": pid, "S": pid}) across one shot."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self.before: dict[str, CpuSample | None] = {}

    def start(self) -> None:
        self.before = {name: sample(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float | None]:
        return {
            name: cpu_seconds(self.before.get(name), sample(pid)) for name, pid in self.pids.items()
        }


def children_cpu_s() -> float:
    """CPU seconds of this process's children that have exited and been waited for.

    Around one consumer run (fio, started and reaped by the benchmark) the difference is
    the consumer's own CPU, all of its threads: on a machine of few CPUs the consumer
    shares them with the processes it measures."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def per_request_us(cpu_s: dict[str, float | None], requests: int) -> dict[str, float | None]:
    """CPU µs per request of each process, for a shot of ``requests`` client requests."""
    return {
        name: (s * 1e6 / requests if s is not None and requests > 0 else None)
        for name, s in cpu_s.items()
    }


def total_per_request_us(shots: list[dict], key: str = "cpu_s") -> dict[str, float | None]:
    """CPU µs per request over several shots: their CPU summed over their requests summed.

    Summing first keeps the tick fallback's 10 ms grain small against the total."""
    names = sorted({n for s in shots for n in (s.get(key) or {})})
    out: dict[str, float | None] = {}
    for n in names:
        pairs = [(s[key].get(n), s.get("requests") or 0) for s in shots if s.get(key)]
        if not pairs or any(c is None for c, _ in pairs):
            out[n] = None
            continue
        reqs = sum(r for _, r in pairs)
        out[n] = sum(c or 0.0 for c, _ in pairs) * 1e6 / reqs if reqs else None
    return out
