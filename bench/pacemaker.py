#!/usr/bin/env python3
"""blockrep under Pacemaker (issue 14, "Benchmark (bench/pacemaker)"), all in one run.

A real two-node Pacemaker 2.1 + Corosync 3 cluster in network namespaces (the lab of
blockrep/lab/: veth between the nodes, STONITH by a power switch that kills
a node's processes, `priority-fencing-delay` 2 s, dc-deadtime 2 s), `ocf:blockrep:blockrep`
as a promotable clone (failover-point latest, 64 MiB raw disks, checkpoint 0.5 s), a
consumer gate colocated with the Promoted instance and ordered after promote, and an
in-process consumer writing 4 KiB blocks through the promoted node's export (blockrep's
NBD client over a unix socket) — the figures are what that consumer sees:

* crash → serving: the promoted node is powered off (every process SIGKILLed) under the
  write load; until the first write acknowledged by the other node. It holds corosync's
  detection (token + consensus), the fencing (priority-fencing-delay applies: the crashed
  node held the promoted instance), the promote and the gate's start.
* return → protected: the crashed node boots (corosync, pacemakerd), Pacemaker starts its
  instance unpromoted, the survivor pairs and resyncs what it wrote alone; until the
  survivor's status says Protected. The consumer is quiet meanwhile.
* switchover: standby of the promoted node under the write load; until the first write
  acknowledged by the other node (the consumer's pause: its last write on the old node to
  its first on the new one, reported too).

Each with corosync `token` 1000 ms and the default (3000 ms), in the same run, --runs
times each (a fresh cluster per run). Results: bench/results/pacemaker.json and .md.
Needs root and `pacemaker corosync pacemaker-cli-utils resource-agents`.

Run: .venv/bin/python bench/pacemaker.py [--runs 3]  (about 3 minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# the lab is in blockrep/lab (bench never imports tests); it needs only blockrep and the stdlib
from blockrep.lab import (  # noqa: E402
    BlockrepCluster,
    GatedConsumer,
    Lab,
    wait_until,
)

MiB = 1 << 20
SIZE = 64 * MiB
SPAN = 8 * MiB
CLONE = BlockrepCluster.CLONE
OUT = os.path.join(REPO, "bench", "results")


def git_rev() -> str:
    r = subprocess.run(
        ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return r.stdout.strip() or "?"


async def first_ack(c: GatedConsumer, name: str, after: float, timeout: float) -> float:
    """Seconds from ``after`` to the first write ``name`` acknowledged after it."""
    deadline = time.monotonic() + timeout
    while True:
        for t in c.ack_times[name]:
            if t >= after:
                return t - after
        if time.monotonic() > deadline:
            raise TimeoutError(f"no write acknowledged by {name} in {timeout} s: {c.errors[-3:]}")
        await asyncio.sleep(0.01)


async def wait(pred: Any, timeout: float, what: str) -> Any:
    return await asyncio.to_thread(wait_until, pred, timeout, what, 0.05)


async def one_run(token_ms: int | None) -> dict[str, Any]:
    lab = Lab(token_ms=token_ms)
    cl = BlockrepCluster(lab, SIZE)
    consumer: GatedConsumer | None = None
    stop = asyncio.Event()
    task = None
    try:
        data = cl.setup()
        t0 = time.monotonic()
        lab.start("alpha")
        lab.start("beta")
        await asyncio.to_thread(lab.wait_online, timeout=90)
        online = time.monotonic() - t0

        def promoted() -> str | None:
            p = lab.promoted(CLONE)
            if len(p) == 1 and lab.running_on(BlockrepCluster.GATE) == p and cl.protected(p[0]):
                return p[0]
            return None

        p = await wait(promoted, 90, "one Promoted, Protected")
        protected_at_start = time.monotonic() - t0
        u = next(n for n in lab.nodes if n != p)
        consumer = GatedConsumer(cl, data, SPAN)
        task = asyncio.create_task(consumer.run(stop))
        await consumer.wait_writes(p, 300, 60)

        # crash of the promoted node -> the other serving
        t = time.monotonic()
        await asyncio.to_thread(lab.poweroff, p)
        crash = await first_ack(consumer, u, t, 120)
        await consumer.wait_writes(u, 100, 30)

        # the crashed node returns -> protected (a quiet consumer: the copy is what differs)
        stop.set()
        await task
        t = time.monotonic()
        await asyncio.to_thread(lab.start, p)
        s = await wait(lambda: cl.protected(u), 120, f"{u} Protected again")
        back = time.monotonic() - t
        copied = s["last-handshake"]["bytes"]
        await wait(lambda: lab.roles(CLONE) == {u: "Promoted", p: "Unpromoted"}, 60, "unpromoted")

        # switchover: standby of the promoted node (u) under the write load
        stop.clear()
        task = asyncio.create_task(consumer.run(stop))
        await consumer.wait_writes(u, 300, 60)
        t = time.monotonic()
        await asyncio.to_thread(lab.standby, u)
        switch = await first_ack(consumer, p, t, 120)
        last_old = max(x for x in consumer.ack_times[u])
        first_new = min(x for x in consumer.ack_times[p] if x >= t)
        await consumer.wait_writes(p, 50, 30)
        stop.set()
        await task
        return {
            "token_ms": token_ms if token_ms is not None else 3000,
            "token_default": token_ms is None,
            "online_s": round(online, 3),
            "protected_at_start_s": round(protected_at_start, 3),
            "crash_to_serving_s": round(crash, 3),
            "return_to_protected_s": round(back, 3),
            "return_copied_bytes": copied,
            "switchover_s": round(switch, 3),
            "switchover_consumer_pause_s": round(first_new - last_old, 3),
            "consumer_errors": len(consumer.errors),  # the crash's in-flight write at most
            "fencings": {n: lab.fencings(n) for n in lab.nodes},
        }
    finally:
        stop.set()
        if task is not None:
            task.cancel()
        if consumer is not None:
            await consumer.aclose()
        lab.teardown()


def markdown(res: dict[str, Any]) -> str:
    e = res["env"]
    lines = [
        "# blockrep under Pacemaker (bench/pacemaker.py)",
        "",
        f"Python {e['python']}; {e['cpus']} CPUs; load average at start "
        f"{' '.join(f'{x:.2f}' for x in e['load_start'])}, at end "
        f"{' '.join(f'{x:.2f}' for x in e['load_end'])}; blockrep {e['blockrep']}; "
        f"{e['pacemaker']}; {e['corosync']}.",
        "Two nodes in network namespaces on one machine (veth), STONITH by a lab power "
        "switch (SIGKILL of the node's processes), dc-deadtime 2 s, priority-fencing-delay "
        "2 s; ocf:blockrep:blockrep promotable clone, failover-point latest, 64 MiB disks, "
        "checkpoint 0.5 s; consumer: 4 KiB writes through the promoted node's export, "
        "following a gate colocated with the Promoted role. Shared 2-core machine: noisy.",
        "",
        "| corosync token | run | online (s) | crash → serving (s) | return → protected (s) "
        "| copied on return | switchover (s) | consumer pause (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        tok = f"{r['token_ms']} ms" + (" (default)" if r["token_default"] else "")
        lines.append(
            f"| {tok} | {r['run']} | {r['online_s']:.1f} | {r['crash_to_serving_s']:.2f} | "
            f"{r['return_to_protected_s']:.2f} | {r['return_copied_bytes'] / MiB:.0f} MiB | "
            f"{r['switchover_s']:.2f} | {r['switchover_consumer_pause_s']:.2f} |"
        )
    lines += ["", "Medians:", ""]
    for key, m in res["medians"].items():
        lines.append(
            f"* token {key}: crash → serving {m['crash_to_serving_s']:.2f} s, return → "
            f"protected {m['return_to_protected_s']:.2f} s, switchover {m['switchover_s']:.2f} s"
        )
    lines += [
        "",
        "Crash → serving holds corosync's detection (token, then consensus = 1.2 × token), "
        "the priority-fencing-delay (the crashed node held the promoted instance), the "
        "fencing, the promote and the gate's start. Return → protected holds the node's boot "
        "(corosync, pacemakerd, DC join), the instance's start and the resync of what the "
        "survivor wrote alone. The switchover does not depend on the token (no node is lost).",
        "",
    ]
    return "\n".join(lines)


def version(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    return (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr) else "?"


async def main(a: argparse.Namespace) -> int:
    res: dict[str, Any] = {
        "env": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_start": os.getloadavg(),
            "blockrep": git_rev(),
            "pacemaker": version(["pacemakerd", "--version"]),
            "corosync": version(["corosync", "-v"]),
            "size_mib": SIZE // MiB,
            "span_mib": SPAN // MiB,
        },
        "runs": [],
    }
    for token in (1000, None):
        for i in range(a.runs):
            r = await one_run(token)
            r["run"] = i
            print(json.dumps(r), flush=True)
            res["runs"].append(r)
    res["env"]["load_end"] = os.getloadavg()
    res["medians"] = {}
    for token in (1000, 3000):
        rs = [r for r in res["runs"] if r["token_ms"] == token]
        res["medians"][f"{token} ms"] = {
            k: statistics.median(r[k] for r in rs)
            for k in ("crash_to_serving_s", "return_to_protected_s", "switchover_s")
        }
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "pacemaker.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(OUT, "pacemaker.md"), "w") as f:
        f.write(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="fresh clusters per token value")
    sys.exit(asyncio.run(main(ap.parse_args())))
