#!/usr/bin/env python3
"""HA manager benchmark (issue 7, "Benchmark (bench/ha)"), all in one run.

* Checkpoint pause p50/p99 at --checkpoint-interval 0.1, 0.5 and 2 s under a 4 KiB random
  write load on P's consumer export (an in-process writer: blockrep's NBD client over a
  unix socket, queue depth --qd), from P's `query-ha-status`.
* Consumer throughput (4 KiB random write IOPS / MiB/s) with those checkpoints on, and off
  (--checkpoint-interval 0, no checkpoint during the run).
* Time from P's death (SIGKILL, under the same load) to S serving as the new disk:
  S runs --auto-failover --fence-command true --failover-timeout F --heartbeat-interval 0.1;
  measured until S's status says stage done / peer failed-over and a write through S's
  export succeeded. The figure includes the failover timeout F (detection), reported too.

Processes: `python -m blockrep.cli primary|secondary` on loopback unix sockets, hidden/active
overlays in /dev/shm (the default). Results: bench/results/ha.json and bench/results/ha.md.

Run: .venv/bin/python bench/ha.py [--size-mib 64] [--seconds 8] [--qd 16] [--failovers 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time

from blockrep.testing import HA, MiB

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BS = 4096


async def load(
    client, size: int, seconds: float, qd: int, seed: int, stop: asyncio.Event | None = None
) -> dict:
    """4 KiB random writes at queue depth ``qd`` for ``seconds``; returns ops and errors."""
    rnd = random.Random(seed)
    end = time.monotonic() + seconds
    ops = errors = 0
    blocks = size // BS
    payload = [rnd.randbytes(BS) for _ in range(64)]

    async def worker(i: int) -> None:
        nonlocal ops, errors
        r = random.Random(seed * 1000 + i)
        while time.monotonic() < end and not (stop and stop.is_set()):
            try:
                await client.write(r.randrange(blocks) * BS, payload[r.randrange(64)])
                ops += 1
            except Exception:  # noqa: BLE001 - the primary may die under us (failover run)
                errors += 1
                return

    t0 = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(qd)))
    dt = time.monotonic() - t0
    return {
        "ops": ops,
        "seconds": dt,
        "iops": ops / dt,
        "mib_s": ops * BS / MiB / dt,
        "errors": errors,
    }


async def pair(ha: HA, interval: float, s_extra=()):
    s = ha.secondary(extra=["--heartbeat-interval", "0.1", *s_extra])
    p = ha.primary(
        f"unix:{ha.path('s.ctl')}",
        extra=["--heartbeat-interval", "0.1", "--checkpoint-interval", str(interval)],
    )
    await s.wait_ready(120)
    await p.wait_ready(120)
    return p, s


async def run_interval(size: int, interval: float, seconds: float, qd: int) -> dict:
    ha = HA()
    try:
        ha.make_disks(size, 1)
        p, s = await pair(ha, interval)
        pc = await ha.client(p)
        before = await p.astatus()
        r = await load(pc, size, seconds, qd, 1)
        st = await p.astatus()
        # the pauses of this run only (the first epoch of the pairing has none)
        r.update(
            interval=interval,
            checkpoints=st["checkpoints"] - before["checkpoints"],
            pause_p50_ms=st["checkpoint-pause-p50-ms"],
            pause_p99_ms=st["checkpoint-pause-p99-ms"],
            last_pause_ms=st["last-checkpoint-pause-ms"],
            peer=st["peer"],
            replication_error=st["replication-error"],
        )
        return r
    finally:
        await ha.aclose()


async def run_failover(size: int, qd: int, timeout: float, seed: int) -> dict:
    ha = HA()
    try:
        ha.make_disks(size, seed)
        p, s = await pair(
            ha,
            0,
            ["--auto-failover", "--fence-command", "true", "--failover-timeout", str(timeout)],
        )
        pc = await ha.client(p)
        sc = await ha.client(s)
        await load(pc, size, 0.5, qd, seed)
        await p.qmp_async("replication-checkpoint")
        stop = asyncio.Event()
        lt = asyncio.create_task(load(pc, size, 30, qd, seed + 1, stop))
        await asyncio.sleep(1.0)
        t_kill = time.monotonic()
        os.kill(p.pid, signal.SIGKILL)
        p.proc.wait(10)
        stop.set()
        st = await s.wait_status(
            lambda x: x["peer"] == "failed-over" and x["stage"] == "done", 60, "failover"
        )
        t_done = time.monotonic() - t_kill
        await sc.write(0, b"\xab" * BS)  # S serves
        t_serving = time.monotonic() - t_kill
        await lt
        return {
            "failover_timeout": timeout,
            "kill_to_failed_over_s": t_done,
            "kill_to_serving_s": t_serving,
            "after_timeout_s": t_serving - timeout,
            "reason": st["auto-failover"]["reason"],
        }
    finally:
        await ha.aclose()


def git_rev() -> str:
    try:
        r = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return r.stdout.strip()
    except OSError:
        return "?"


async def main(a: argparse.Namespace) -> int:
    size = a.size_mib * MiB
    res: dict = {
        "env": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_start": os.getloadavg(),
            "blockrep": git_rev(),
            "size_mib": a.size_mib,
            "seconds": a.seconds,
            "qd": a.qd,
            "block": BS,
            "buffer_dir": "/dev/shm" if os.path.isdir("/dev/shm") else "(disk dir)",
            "writer": "in-process asyncio writer, blockrep NBD client over a unix socket",
        },
        "intervals": [],
    }
    for interval in (0.1, 0.5, 2.0):
        r = await run_interval(size, interval, a.seconds, a.qd)
        print(
            f"interval {interval:g} s: {r['checkpoints']} checkpoints, pause p50 {r['pause_p50_ms']:.1f} ms "
            f"p99 {r['pause_p99_ms']:.1f} ms, {r['iops']:.0f} IOPS",
            flush=True,
        )
        res["intervals"].append(r)
    off = await run_interval(size, 0, a.seconds, a.qd)
    print(f"checkpoints off: {off['iops']:.0f} IOPS", flush=True)
    res["checkpoints_off"] = off
    fos = []
    for i in range(a.failovers):
        f = await run_failover(size, a.qd, a.failover_timeout, 10 + i)
        print(
            f"failover {i}: kill -> serving {f['kill_to_serving_s']:.3f} s "
            f"(timeout {f['failover_timeout']:g} s)",
            flush=True,
        )
        fos.append(f)
    res["failover"] = {
        "runs": fos,
        "kill_to_serving_median_s": statistics.median(f["kill_to_serving_s"] for f in fos),
        "after_timeout_median_s": statistics.median(f["after_timeout_s"] for f in fos),
    }
    res["env"]["load_end"] = os.getloadavg()
    os.makedirs(os.path.join(REPO, "bench", "results"), exist_ok=True)
    with open(os.path.join(REPO, "bench", "results", "ha.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(REPO, "bench", "results", "ha.md"), "w") as f:
        f.write(render(res))
    print(render(res))
    return 0


def render(res: dict) -> str:
    e = res["env"]
    la0 = " ".join(f"{x:.2f}" for x in e["load_start"])
    la1 = " ".join(f"{x:.2f}" for x in e["load_end"])
    lines = [
        "# HA manager benchmark (bench/ha.py)",
        "",
        f"Python {e['python']}; {e['cpus']} CPUs; load average at start {la0}, at end {la1}; blockrep {e['blockrep']}.",
        f"Disk {e['size_mib']} MiB raw; hidden/active in {e['buffer_dir']}; consumer: {e['writer']}, "
        f"4 KiB random writes at qd {e['qd']} for {e['seconds']:g} s per case. Shared 2-core machine: noisy.",
        "",
        "## Checkpoint pause and consumer throughput",
        "",
        "| checkpoint interval | checkpoints | pause p50 (ms) | pause p99 (ms) | IOPS | MiB/s | vs off |",
        "|---|---|---|---|---|---|---|",
    ]
    off = res["checkpoints_off"]
    for r in res["intervals"]:
        lines.append(
            f"| {r['interval']:g} s | {r['checkpoints']} | {r['pause_p50_ms']:.1f} | {r['pause_p99_ms']:.1f} | "
            f"{r['iops']:.0f} | {r['mib_s']:.2f} | {r['iops'] / off['iops']:.2f} |"
        )
    lines.append(
        f"| off (0 = on demand) | 0 | - | - | {off['iops']:.0f} | {off['mib_s']:.2f} | 1.00 |"
    )
    fo = res["failover"]
    lines += [
        "",
        "## Failover: P killed (SIGKILL) under load → S serving",
        "",
        'S: --auto-failover --fence-command true, heartbeat 0.1 s. "serving" = status stage done /'
        " peer failed-over and a write through S's export returned.",
        "",
        "| run | failover timeout (s) | kill → failed over (s) | kill → serving (s) | minus the timeout (s) |",
        "|---|---|---|---|---|",
    ]
    for i, f in enumerate(fo["runs"]):
        lines.append(
            f"| {i} | {f['failover_timeout']:g} | {f['kill_to_failed_over_s']:.3f} | "
            f"{f['kill_to_serving_s']:.3f} | {f['after_timeout_s']:.3f} |"
        )
    lines += [
        "",
        f"Median kill → serving: {fo['kill_to_serving_median_s']:.3f} s "
        f"({fo['after_timeout_median_s']:.3f} s beyond the failover timeout).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--qd", type=int, default=16)
    ap.add_argument("--failovers", type=int, default=3)
    ap.add_argument("--failover-timeout", type=float, default=0.5)
    sys.exit(asyncio.run(main(ap.parse_args())))
