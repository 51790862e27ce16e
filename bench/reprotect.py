#!/usr/bin/env python3
"""Re-protect benchmark (bench/reprotect, not a test): blockrep vs QEMU's documented
re-protect, same disks, same run.

For each disk fill (--fills, default "64,full": 64 = sparse, 64 MiB of seeded random data
in scattered 1 MiB regions and holes elsewhere, QEMU's mirror's best case; full = random
data in every region) and changed fraction (--pcts, default 1 and 10 % of the 1 MiB
regions):

blockrep, in-process path (command lines and ``query-ha-status`` only, as a user would):
 1. two raw disks of --size (default 4 GiB) with the same content; one resource file
    (blockrep.testing.HA.resource: unix sockets); ``blockrep up FILE --node a`` and
    ``--node b``; ``blockrep promote FILE --node a --force`` (equal disks: digests only).
 2. a's consumer writes 64 KiB into --pre-regions regions, ``blockrep checkpoint``, writes
    64 KiB into --tail-regions more (rolled back by the failover), a is killed (SIGKILL);
    ``blockrep promote FILE --node b`` (it fails over); b's consumer writes 1 MiB of new
    random data into each changed region through b's NBD export. Sparse copies of both
    disks are taken here for QEMU's side.
 3. A qd1 consumer probe connects to b's export (4 KiB reads anywhere, alternating with
    4 KiB writes into the changed regions) and stays connected: --idle-seconds idle, then
    ``blockrep up FILE --node a`` again; time from that start until b's status says
    ``replication: Protected`` with a new ``last-handshake``; bytes from
    ``last-handshake.bytes`` / ``saved-by-checksums``; the probe's latency idle vs during
    the resync vs after; ``resync`` status samples. Then ``blockrep down`` on b and a, and
    cmp of the two disks: any difference fails the benchmark.
 4. Unless --no-reads-only-variant: the same again on fresh disks with a probe that only
    reads during the resync (no region dirtied again while it runs).
 5. Unless --no-restart-path: the earlier restart path for reference (``blockrep
    secondary``/``primary``, ``blockrep failover``, survivor restarted), on its own disks.

QEMU 7.2 (REFERENCE-QEMU.md; docs/COLO-FT.txt "Primary resume replication"): the returning
node is qemu-storage-daemon exporting its copy of a's disk over NBD (unix socket); the
survivor is ``qemu-system-x86_64 -machine none`` with its copy of b's disk and a consumer
NBD export; ``drive-mirror sync=full mode=existing format=raw`` to the returning node's
export; time from the command to BLOCK_JOB_READY, bytes = the job's ``len``; the same
consumer probe (idle before, during the mirror); ``block-job-cancel`` after READY (as the
doc does), then cmp.

Activity log cost: 4 KiB random writes, qd 16, --al-seconds (default 10) with fio's nbd
engine against a replicating ``blockrep primary``'s export (default checkpoint interval),
whole disk and a 512 MiB hot window; AL on, and off (``--no-activity-log``).

Every process runs on a snapshot copy of blockrep/ taken at the start (the lead edits it
in parallel); the results name its digest and ``git rev-parse HEAD``.

Results: bench/results/reprotect.json and bench/results/reprotect.md.

Run: .venv/bin/python bench/reprotect.py [--size 4G] [--pcts 1,10] [--fills 64,full]
     [--al-seconds 10] [--up-args '--resync-rate 200M']
     (needs about 4 x --size free in --dir and /tmp; ~15 min at 4 GiB)
Quick: .venv/bin/python bench/reprotect.py --size 256M --al-seconds 2 --out /tmp/rp/reprotect
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from qemu.qmp import EventListener, QMPClient

from blockrep.cli.ha import qmp_call
from blockrep.testing import HA, HANode, MiB, accepting, blockrep_argv, nbd_client

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REGION = MiB
BS = 4096
FAST = ["--heartbeat-interval", "0.1"]
SYNC_TIMEOUT = 1200.0  # any re-protect / mirror
STEP_TIMEOUT = 120.0  # anything else


class BenchError(RuntimeError):
    pass


def parse_size(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    s = s.strip().upper().rstrip("B").rstrip("I")
    if s and s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(s)


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(round(p / 100 * (len(ys) - 1))))]


def run(cmd: list[str], timeout: float = STEP_TIMEOUT) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {r.returncode}: {r.stdout}{r.stderr}")
    return r


def cmp_disks(a: str, b: str, what: str) -> float:
    t0 = time.monotonic()
    r = subprocess.run(["cmp", a, b], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise BenchError(f"{what}: DISKS DIFFER after re-protect: {r.stdout}{r.stderr}")
    return time.monotonic() - t0


# -- disks --------------------------------------------------------------------------------------


def make_disks(paths: list[str], size: int, fill: int, seed: int) -> list[int]:
    """Sparse raw disks with the same seeded random data in ``fill`` bytes of 1 MiB regions."""
    nreg = size // REGION
    rnd = random.Random(seed)
    regions = sorted(rnd.sample(range(nreg), min(nreg, fill // REGION)))
    fs = [open(p, "wb") for p in paths]
    try:
        for f in fs:
            f.truncate(size)
        for r in regions:
            data = rnd.randbytes(REGION)
            for f in fs:
                f.seek(r * REGION)
                f.write(data)
        for f in fs:
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in fs:
            f.close()
    return regions


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


# -- consumer probe -----------------------------------------------------------------------------


class Probe:
    """qd1 consumer: alternating 4 KiB reads (anywhere) and writes (in ``write_regions``),
    each timed. Runs until ``stop`` is set; connects as soon as ``sock`` accepts."""

    def __init__(
        self, sock: str, size: int, write_regions: list[int], seed: int, writes: bool = True
    ) -> None:
        self.sock, self.size, self.write_regions = sock, size, write_regions
        self.writes = writes
        self.rnd = random.Random(seed)
        self.samples: list[tuple[float, str, float]] = []  # (start, kind, seconds)
        self.errors: list[str] = []
        self.connected_at: float | None = None
        self.stop = asyncio.Event()

    async def run(self, deadline: float) -> None:
        while not accepting(self.sock):
            if self.stop.is_set() or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.005)
        g, node = await nbd_client(self.sock, "disk")
        self.connected_at = time.monotonic()
        payload = self.rnd.randbytes(BS)
        try:
            i = 0
            while not self.stop.is_set() and time.monotonic() < deadline:
                t = time.monotonic()
                try:
                    if i % 2 and self.writes:
                        r = self.rnd.choice(self.write_regions)
                        off = r * REGION + self.rnd.randrange(REGION // BS) * BS
                        await asyncio.wait_for(node.write(off, payload), 30)
                        kind = "write"
                    else:
                        off = self.rnd.randrange(self.size // BS) * BS
                        await asyncio.wait_for(node.read(off, BS), 30)
                        kind = "read"
                except Exception as e:  # noqa: BLE001 - reported, never hidden
                    self.errors.append(f"{type(e).__name__}: {e}")
                    if len(self.errors) > 20:
                        return
                    continue
                self.samples.append((t, kind, time.monotonic() - t))
                i += 1
        finally:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(g.close_all(), 5)

    def longest_gap(self, t0: float, t1: float) -> float | None:
        """The longest time in [t0, t1) the consumer waited: between one request's start
        and the next's (a request still open at t1 counts up to t1)."""
        ts = [t for (t, _, _) in self.samples if t0 <= t < t1]
        if not ts:
            return None
        edges = [t0, *ts, t1]
        return max(b - a for a, b in zip(edges, edges[1:], strict=False))

    def stats(self, t0: float = 0.0, t1: float = float("inf")) -> dict[str, Any]:
        lat = [d for (t, _, d) in self.samples if t0 <= t < t1]
        rd = [d for (t, k, d) in self.samples if t0 <= t < t1 and k == "read"]
        wr = [d for (t, k, d) in self.samples if t0 <= t < t1 and k == "write"]
        ms = 1000.0

        def f(x: float | None) -> float | None:
            return None if x is None else x * ms

        return {
            "ops": len(lat),
            "p50_ms": f(pct(lat, 50)),
            "p99_ms": f(pct(lat, 99)),
            "max_ms": f(max(lat) if lat else None),
            "read_p99_ms": f(pct(rd, 99)),
            "write_p99_ms": f(pct(wr, 99)),
            "errors": len(self.errors),
            "first_errors": self.errors[:3],
        }


async def change_regions(
    export: str, rnd: random.Random, nreg: int, pct: float, res: dict, tail: list[int],
    pre: list[int],
) -> list[int]:  # fmt: skip
    """The survivor's consumer rewrites pct % of the regions; ``res`` gets the counts and
    the byte bounds a re-protect should stay within."""
    changed = sorted(rnd.sample(range(nreg), max(1, round(nreg * pct / 100))))
    g, bc = await nbd_client(export, "disk")
    t0 = time.monotonic()
    for r in changed:
        await bc.write(r * REGION, rnd.randbytes(REGION))
    await bc.flush()
    res["change_write_s"] = time.monotonic() - t0
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(g.close_all(), 5)
    res["changed_regions"] = len(changed)
    res["tail_regions"] = len(tail)
    res["expected_bytes_min"] = len(changed) * REGION
    res["expected_bytes_max"] = len(set(changed) | set(tail)) * REGION
    res["expected_bytes_design"] = len(set(changed) | set(tail) | set(pre)) * REGION
    res["old_primary_written_regions"] = len(set(pre) | set(tail))
    return changed


async def probe_for(sock: str, size: int, regions: list[int], seconds: float, seed: int):
    p = Probe(sock, size, regions, seed)
    await p.run(time.monotonic() + seconds)
    return p.stats()


# -- blockrep side ------------------------------------------------------------------------------


def cli(*args: str, timeout: float = STEP_TIMEOUT) -> str:
    return run(blockrep_argv(*args), timeout).stdout


def sigterm(node: HANode, timeout: float = 60) -> int:
    rc = node.process.stop(signal.SIGTERM, timeout)
    return rc


async def status_until(
    node: HANode, pred, timeout: float, what: str, poll: float = 0.02
) -> tuple[dict, float]:
    """Poll ``query-ha-status`` (the socket may not exist yet) until ``pred``."""
    deadline = time.monotonic() + timeout
    last: dict = {}
    first_qmp: float | None = None
    while time.monotonic() < deadline:
        if node.proc.poll() is not None:
            raise BenchError(f"{node.name} exited {node.proc.returncode}:\n{node.log_text()}")
        try:
            last = await asyncio.to_thread(qmp_call, node.qmp, "query-ha-status", None, 10)
            if first_qmp is None:
                first_qmp = time.monotonic()
            if pred(last):
                return last, first_qmp
        except (OSError, ConnectionError, RuntimeError, ValueError):
            pass
        await asyncio.sleep(poll)
    raise BenchError(f"{node.name}: timed out ({timeout} s) waiting for {what}; last {last}")


def is_protected(before: Any):
    def pred(s: dict) -> bool:
        return s.get("replication") == "Protected" and s.get("last-handshake") != before

    return pred


async def up_case(
    a: argparse.Namespace,
    size: int,
    fill_b: int,
    pct_: float,
    seed: int,
    probe_writes: bool = True,
    copies: bool = True,
) -> dict:
    """The in-process path: two ``blockrep up`` nodes; the survivor is never restarted.
    ``probe_writes``: the consumer probe also writes (into the changed regions) during
    the resync; else it only reads. ``copies``: copy the disks for QEMU's side."""
    ha = HA()
    res: dict[str, Any] = {
        "impl": "blockrep",
        "path": "in-process",
        "pct": pct_,
        "probe_writes": probe_writes,
    }
    nreg = size // REGION
    rnd = random.Random(seed)
    try:
        A, B = ha.disk("a.raw"), ha.disk("b.raw")
        fill = make_disks([A, B], size, fill_b, seed)
        res["fill_regions"] = len(fill)
        rf = ha.resource(checkpoint_interval=a.checkpoint_interval)
        up_extra = [*FAST, *a.up_args.split()]
        # 1. both up (role none); promote --force on a (equal disks: digests, no data)
        an, bn = ha.up(rf, "a", extra=up_extra), ha.up(rf, "b", extra=up_extra)
        await asyncio.gather(an.wait_ready(STEP_TIMEOUT), bn.wait_ready(STEP_TIMEOUT))
        t0 = time.monotonic()
        cli("promote", rf, "--node", "a", "--force")
        st, _ = await status_until(an, is_protected(None), SYNC_TIMEOUT, "Protected")
        res["initial_promote_force_s"] = time.monotonic() - t0
        res["initial_handshake"] = st.get("last-handshake")
        await bn.wait_status(lambda s: s["role"] == "secondary", 30, "b secondary")
        # 2. a writes and checkpoints, writes more, dies (SIGKILL)
        g, ac = await nbd_client(an.export, "disk")
        picks = rnd.sample(range(nreg), a.pre_regions + a.tail_regions)
        pre, tail = picks[: a.pre_regions], picks[a.pre_regions :]
        for r in pre:
            await ac.write(r * REGION, rnd.randbytes(64 * 1024))
        cli("checkpoint", "--qmp", f"unix:{an.qmp}")
        ck0 = (await an.astatus())["checkpoints"]
        for r in tail:
            await ac.write(r * REGION + 128 * 1024, rnd.randbytes(64 * 1024))
        sa = await an.astatus()
        an.kill()
        res["old_primary_al_before_kill"] = sa.get("al")
        if sa["checkpoints"] != ck0:
            res.setdefault("notes", []).append(
                "a periodic checkpoint fell between the tail writes and the kill: the tail "
                "was not rolled back"
            )
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(g.close_all(), 5)
        await bn.wait_status(lambda s: s["peer"] != "connected", 30, "b lost a")
        t0 = time.monotonic()
        cli("promote", rf, "--node", "b")
        await bn.wait_status(lambda s: s["role"] == "primary", 30, "b primary")
        res["promote_s"] = time.monotonic() - t0
        # b's consumer changes pct % of the regions
        changed = await change_regions(bn.export, rnd, nreg, pct_, res, tail, pre)
        st = await bn.astatus()
        res["survivor_before"] = {
            k: st.get(k)
            for k in ("role", "replication", "peer", "out-of-sync-bytes", "written-alone")
        }
        res["survivor_out_of_sync_bytes"] = st.get("out-of-sync-bytes")
        hs_before = st.get("last-handshake")
        res["status_errors_before"] = st.get("errors")
        # copies of both disks for QEMU's side (b is idle and flushed)
        qa, qb = os.path.join(a.qemu_dir, "qa.raw"), os.path.join(a.qemu_dir, "qb.raw")
        if copies:
            run(["cp", "--sparse=always", A, qa], 600)
            run(["cp", "--sparse=always", B, qb], 600)
        # 3. one consumer on b's export from idle through the resync to Protected and after
        probe = Probe(bn.export, size, changed, seed + 2, writes=probe_writes)
        pt = asyncio.create_task(probe.run(time.monotonic() + SYNC_TIMEOUT))
        while probe.connected_at is None and not pt.done():
            await asyncio.sleep(0.01)
        t_idle = time.monotonic()
        await asyncio.sleep(a.idle_seconds)
        samples: list[dict] = []
        seen: set[str] = set()
        transitions: list[tuple[float, str]] = []

        def done(s: dict) -> bool:
            state = f"{s.get('replication')}/{s.get('peer')}"
            seen.add(state)
            if not transitions or transitions[-1][1] != state:
                transitions.append((round(time.monotonic() - t_start, 3), state))
            if "resync" in s:
                samples.append({"t": time.monotonic() - t_start, **s["resync"]})
            return (
                s.get("replication") == "Protected"
                and s.get("role") == "primary"
                and s.get("last-handshake") != hs_before
            )

        t_start = time.monotonic()
        a2 = ha.up(rf, "a", extra=up_extra)
        ready_log: list[float] = []
        ready_qmp: list[float] = []

        async def returning_ready() -> None:
            """When the returning node is ready: its log line "ready (role none)" appears,
            or its QMP answers, whichever comes first (polled every 5 ms; both kept)."""
            deadline = time.monotonic() + SYNC_TIMEOUT
            while time.monotonic() < deadline and not (ready_log and ready_qmp):
                now = time.monotonic() - t_start
                if not ready_log and " ready (role none)" in a2.log_text():
                    ready_log.append(now)
                if not ready_qmp and accepting(a2.qmp):
                    with contextlib.suppress(OSError, ConnectionError, RuntimeError, ValueError):
                        await asyncio.to_thread(qmp_call, a2.qmp, "query-ha-status", None, 5)
                        ready_qmp.append(now)
                if a2.proc.poll() is not None:
                    return
                await asyncio.sleep(0.005)

        rt = asyncio.create_task(returning_ready())
        try:
            st, _ = await status_until(bn, done, SYNC_TIMEOUT, "Protected", a.poll_interval)
            t_prot = time.monotonic()
            await asyncio.sleep(a.idle_seconds)
            t_after = time.monotonic()
        finally:
            probe.stop.set()
            await asyncio.wait_for(pt, 60)
        res["start_to_protected_s"] = t_prot - t_start
        rt.cancel()
        with contextlib.suppress(BaseException):
            await rt
        res["returning_ready_log_s"] = ready_log[0] if ready_log else None
        res["returning_qmp_s"] = ready_qmp[0] if ready_qmp else None
        readies = ready_log[:1] + ready_qmp[:1]
        res["returning_ready_s"] = min(readies) if readies else None
        res["ready_to_protected_s"] = (
            res["start_to_protected_s"] - res["returning_ready_s"] if readies else None
        )
        res["states_seen"] = sorted(seen)
        res["transitions"] = transitions
        res["resync_samples"] = samples
        hs = st.get("last-handshake") or {}
        res["last_handshake"] = hs
        res["bytes"] = hs.get("bytes")
        res["saved_by_checksums"] = hs.get("saved-by-checksums")
        res["status_errors"] = st.get("errors")
        res["replication_error"] = st.get("replication-error")
        res["probe_connected_before_start"] = probe.connected_at is not None
        res["idle"] = probe.stats(t_idle, t_start)
        res["during"] = probe.stats(t_start, t_prot)
        res["protected_idle"] = probe.stats(t_prot, t_after)
        res["probe_errors"] = probe.errors[:5]
        res["consumer_outage_s"] = probe.longest_gap(t_start, t_prot)
        res["survivor_pid_kept"] = bn.proc.poll() is None
        s2 = await a2.astatus()
        res["returning_after"] = {k: s2.get(k) for k in ("role", "disk-state", "replication")}
        # 4. orderly stop (the primary first), then the disks must be identical
        for n in (bn, a2):
            r = subprocess.run(
                blockrep_argv("down", "--qmp", f"unix:{n.qmp}"),
                capture_output=True,
                text=True,
                timeout=STEP_TIMEOUT,
            )
            rc = await n.wait_exit(60)
            if r.returncode or rc:
                res.setdefault("notes", []).append(
                    f"`blockrep down` on {n.name}: exit {r.returncode} {r.stderr.strip()[-200:]}"
                    f"; process exit {rc}"
                )
        res["cmp_s"] = cmp_disks(A, B, f"blockrep in-process {pct_} %")
        res["identical"] = True
        res["qemu_disks"] = (qa, qb)
        res["changed"] = changed
        return res
    except BaseException:
        for n in ha.nodes:
            print(f"--- {n.name} log:\n{n.log_text()[-4000:]}", file=sys.stderr)
        raise
    finally:
        await ha.aclose()


async def restart_case(
    a: argparse.Namespace, size: int, fill_b: int, pct_: float, seed: int
) -> dict:
    """The restart path (``blockrep primary`` / ``blockrep secondary``), kept for reference."""
    ha = HA()
    res: dict[str, Any] = {"impl": "blockrep", "path": "restart", "pct": pct_}
    nreg = size // REGION
    rnd = random.Random(seed)
    try:
        A, B = ha.disk("a.raw"), ha.disk("b.raw")
        fill = make_disks([A, B], size, fill_b, seed)
        res["fill_regions"] = len(fill)
        # 1. B secondary, A primary
        b = ha.secondary(name="b", disk=B, extra=FAST)
        p_extra = [*FAST, "--assume-synced", "--checkpoint-interval", "0"]
        ap = ha.primary(f"unix:{ha.path('b.ctl')}", name="a", disk=A, extra=p_extra)
        await b.wait_ready(STEP_TIMEOUT)
        await ap.wait_ready(STEP_TIMEOUT)
        st, _ = await status_until(ap, lambda s: s["replication"] == "Protected", 30, "Protected")
        # 2. A writes and checkpoints, writes more, dies
        g, ac = await nbd_client(ap.export, "disk")
        picks = rnd.sample(range(nreg), a.pre_regions + a.tail_regions)
        pre, tail = picks[: a.pre_regions], picks[a.pre_regions :]
        for r in pre:
            await ac.write(r * REGION, rnd.randbytes(64 * 1024))
        cli("checkpoint", "--qmp", f"unix:{ap.qmp}")
        for r in tail:
            await ac.write(r * REGION + 128 * 1024, rnd.randbytes(64 * 1024))
        res["old_primary_al_before_kill"] = (await ap.astatus()).get("al")
        ap.kill()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(g.close_all(), 5)
        cli("failover", "--qmp", f"unix:{b.qmp}")
        await b.wait_status(lambda s: s["peer"] == "failed-over", 60, "failed-over")
        # B's consumer changes pct % of the regions
        changed = await change_regions(b.export, rnd, nreg, pct_, res, tail, pre)
        st = await b.astatus()
        res["survivor_out_of_sync_bytes"] = st.get("out-of-sync-bytes")
        res["idle"] = await probe_for(b.export, size, changed, a.idle_seconds, seed + 1)
        # 3. stop B; copies for QEMU's side; restart in swapped roles
        t_term = time.monotonic()
        rc = sigterm(b)
        res["survivor_stop_s"] = time.monotonic() - t_term
        if rc != 0:
            res.setdefault("notes", []).append(f"B (failed over) exited {rc} on SIGTERM")
        qa, qb = os.path.join(a.qemu_dir, "qa.raw"), os.path.join(a.qemu_dir, "qb.raw")
        run(["cp", "--sparse=always", A, qa], 600)
        run(["cp", "--sparse=always", B, qb], 600)
        t_a2 = time.monotonic()
        a2 = ha.secondary(name="a", disk=A, extra=FAST)
        deadline = time.monotonic() + STEP_TIMEOUT
        while not accepting(ha.path("a.ctl")):
            if a2.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"A as secondary did not listen:\n{a2.log_text()}")
            await asyncio.sleep(0.01)
        res["returning_start_to_listen_s"] = time.monotonic() - t_a2
        b_extra = [*FAST, "--checkpoint-interval", str(a.checkpoint_interval)]
        t_start = time.monotonic()
        b2 = ha.primary(f"unix:{ha.path('a.ctl')}", name="b", disk=B, extra=b_extra)
        probe = Probe(b2.export, size, changed, seed + 2)
        pt = asyncio.create_task(probe.run(time.monotonic() + SYNC_TIMEOUT))
        seen: set[str] = set()

        def protected(s: dict) -> bool:
            seen.add(f"{s.get('replication')}/{s.get('peer')}")
            return s.get("replication") == "Protected"

        try:
            st, first_qmp = await status_until(b2, protected, SYNC_TIMEOUT, "Protected")
        finally:
            t_prot = time.monotonic()
            probe.stop.set()
            await asyncio.wait_for(pt, 60)
        res["start_to_protected_s"] = t_prot - t_start
        res["start_to_qmp_s"] = first_qmp - t_start
        res["export_accepting_after_s"] = (
            probe.connected_at - t_start if probe.connected_at is not None else None
        )
        res["states_seen"] = sorted(seen)
        if probe.connected_at is not None:
            # the consumer's outage on the restart path: SIGTERM -> exit, then the new
            # process's start -> its export accepting (copies and A's start left out)
            res["consumer_outage_s"] = res["survivor_stop_s"] + res["export_accepting_after_s"]
        hs = st.get("last-handshake") or {}
        res["last_handshake"] = hs
        res["bytes"] = hs.get("bytes")
        res["status_errors"] = st.get("errors")
        res["replication_error"] = st.get("replication-error")
        res["during"] = probe.stats(t_start, t_prot)
        # protected idle, after the re-protect (writes forwarded to A)
        res["protected_idle"] = await probe_for(b2.export, size, changed, a.idle_seconds, seed + 3)
        res["b_log_rule"] = "failover-discard" in b2.log_text()
        rc_b, rc_a = sigterm(b2), sigterm(a2)
        if rc_b or rc_a:
            res.setdefault("notes", []).append(f"SIGTERM exits: B {rc_b}, A {rc_a}")
        res["cmp_s"] = cmp_disks(A, B, f"blockrep {pct_} %")
        res["identical"] = True
        res["qemu_disks"] = (qa, qb)
        res["changed"] = changed
        return res
    except BaseException:
        for n in ha.nodes:
            print(f"--- {n.name} log:\n{n.log_text()[-4000:]}", file=sys.stderr)
        raise
    finally:
        await ha.aclose()


# -- QEMU side ----------------------------------------------------------------------------------


class QProc:
    def __init__(self, name: str, cmd: list[str], log: str, sock: str | None = None) -> None:
        self.name, self.log = name, log
        if sock and os.path.exists(sock):
            os.unlink(sock)
        self.logf = open(log, "wb")
        self.proc = subprocess.Popen(
            cmd, stdout=self.logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def text(self) -> str:
        with contextlib.suppress(Exception):
            self.logf.flush()
        with open(self.log, "rb") as f:
            return f.read().decode(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.logf.close()


async def wait_sock(path: str, p: QProc, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not accepting(path):
        if p.proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"{p.name}: {path} did not appear:\n{p.text()}")
        await asyncio.sleep(0.02)


async def qemu_case(
    a: argparse.Namespace, size: int, pct_: float, qa: str, qb: str, changed: list[int], seed: int
) -> dict:
    d = tempfile.mkdtemp(prefix="rpq-", dir="/tmp")
    res: dict[str, Any] = {"impl": "qemu", "pct": pct_}
    procs: list[QProc] = []
    qmp: QMPClient | None = None
    try:
        ret_sock = os.path.join(d, "ret.nbd")
        ret = QProc(
            "qsd-returning",
            [
                "qemu-storage-daemon",
                "--blockdev",
                f"driver=file,node-name=f0,filename={qa},aio=threads",
                "--blockdev",
                "driver=raw,node-name=parent0,file=f0",
                "--nbd-server",
                f"addr.type=unix,addr.path={ret_sock}",
                "--export",
                "type=nbd,id=e0,node-name=parent0,name=parent0,writable=on",
            ],
            os.path.join(d, "qsd.log"),
            ret_sock,
        )
        procs.append(ret)
        qmp_sock, cons_sock = os.path.join(d, "s.qmp"), os.path.join(d, "cons.nbd")
        surv = QProc(
            "qemu-survivor",
            [
                "qemu-system-x86_64",
                "-machine",
                "none",
                "-nodefaults",
                "-display",
                "none",
                "-qmp",
                f"unix:{qmp_sock},server=on,wait=off",
                "-blockdev",
                f"driver=file,node-name=f0,filename={qb},aio=threads",
                "-blockdev",
                "driver=raw,node-name=colo-disk0,file=f0",
            ],
            os.path.join(d, "qemu.log"),
            qmp_sock,
        )
        procs.append(surv)
        await wait_sock(ret_sock, ret)
        await wait_sock(qmp_sock, surv)
        qmp = QMPClient("survivor")
        await asyncio.wait_for(qmp.connect(qmp_sock), 20)

        async def x(cmd: str, args: dict | None = None, timeout: float = STEP_TIMEOUT) -> Any:
            assert qmp is not None
            return await asyncio.wait_for(qmp.execute(cmd, args), timeout)

        await x("nbd-server-start", {"addr": {"type": "unix", "data": {"path": cons_sock}}})
        await x(
            "block-export-add",
            {
                "type": "nbd",
                "id": "cons",
                "node-name": "colo-disk0",
                "name": "disk",
                "writable": True,
            },
        )
        res["idle"] = await probe_for(cons_sock, size, changed, a.idle_seconds, seed + 1)
        listener = EventListener(("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR"))
        qmp.register_listener(listener)
        probe = Probe(cons_sock, size, changed, seed + 2)
        t0 = time.monotonic()
        pt = asyncio.create_task(probe.run(t0 + SYNC_TIMEOUT))
        try:
            await x(
                "drive-mirror",
                {
                    "device": "colo-disk0",
                    "job-id": "resync",
                    "target": f"nbd+unix:///parent0?socket={ret_sock}",
                    "mode": "existing",
                    "format": "raw",
                    "sync": "full",
                },
            )
            ev = await asyncio.wait_for(listener.get(), SYNC_TIMEOUT)
            t_ready = time.monotonic()
            if ev["event"] != "BLOCK_JOB_READY":
                raise BenchError(f"QEMU mirror: {ev}")
        finally:
            probe.stop.set()
            await asyncio.wait_for(pt, 60)
        res["command_to_ready_s"] = t_ready - t0
        res["ready_event"] = ev["data"]
        res["bytes"] = ev["data"].get("len")
        jobs = await x("query-block-jobs")
        res["jobs_at_ready"] = jobs
        res["during"] = probe.stats(t0, t_ready)
        res["source_allocated_bytes"] = allocated(qb)
        await x("stop")
        await x("block-job-cancel", {"device": "resync"})
        while True:
            ev = await asyncio.wait_for(listener.get(), STEP_TIMEOUT)
            if ev["event"] == "BLOCK_JOB_COMPLETED":
                res["completed_event"] = ev["data"]
                break
        qmp.remove_listener(listener)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(qmp.execute("quit"), 10)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(qmp.disconnect(), 5)
        qmp = None
        for p in procs:
            p.stop()
        res["cmp_s"] = cmp_disks(qa, qb, f"QEMU {pct_} %")
        res["identical"] = True
        return res
    except BaseException:
        for p in procs:
            print(f"--- {p.name} log:\n{p.text()}", file=sys.stderr)
        raise
    finally:
        if qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(qmp.disconnect(), 5)
        for p in procs:
            with contextlib.suppress(Exception):
                p.stop()
        shutil.rmtree(d, ignore_errors=True)


# -- activity log cost --------------------------------------------------------------------------


def fio_randwrite(sock: str, size: int, seconds: float, qd: int) -> dict:
    cmd = [
        "fio",
        "--name=al",
        "--ioengine=nbd",
        f"--uri=nbd+unix:///disk?socket={sock}",
        "--rw=randwrite",
        "--bs=4k",
        f"--iodepth={qd}",
        f"--size={size}",
        "--time_based",
        f"--runtime={int(seconds)}",
        "--randrepeat=1",
        "--output-format=json",
    ]
    r = run(cmd, seconds * 10 + 120)
    out = r.stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    w = job["write"]
    pc = w["clat_ns"].get("percentile", {})
    return {
        "iops": w["iops"],
        "mib_s": w["bw"] / 1024.0,
        "clat_p50_ms": pc.get("50.000000", 0) / 1e6,
        "clat_p99_ms": pc.get("99.000000", 0) / 1e6,
        "errors": job.get("error", 0),
    }


async def al_case(a: argparse.Namespace, size: int, window: int, al_on: bool) -> dict:
    ha = HA()
    try:
        A, B = ha.disk("a.raw"), ha.disk("b.raw")
        make_disks([A, B], size, 64 * MiB, 7)
        b = ha.secondary(name="b", disk=B, extra=FAST)
        extra = [*FAST, "--assume-synced", "--checkpoint-interval", str(a.al_checkpoint_interval)]
        if not al_on:
            extra.append("--no-activity-log")
        p = ha.primary(f"unix:{ha.path('b.ctl')}", name="a", disk=A, extra=extra)
        await b.wait_ready(STEP_TIMEOUT)
        await p.wait_ready(STEP_TIMEOUT)
        await status_until(p, lambda s: s["replication"] == "Protected", 30, "Protected")
        s0 = await p.astatus()
        r = await asyncio.to_thread(fio_randwrite, p.export, window, a.al_seconds, 16)
        s1 = await p.astatus()
        al0, al1 = s0.get("al") or {}, s1.get("al") or {}
        r.update(
            al_on=al_on,
            window_bytes=window,
            al_commits=(al1.get("commits", 0) - al0.get("commits", 0)) if al1 else None,
            al_at_end=al1,
            checkpoints=s1["checkpoints"] - s0["checkpoints"],
            pause_p99_ms=s1.get("checkpoint-pause-p99-ms"),
            peer=s1["peer"],
            replication=s1["replication"],
            replication_error=s1.get("replication-error"),
            status_errors=s1.get("errors"),
        )
        return r
    except BaseException:
        for n in ha.nodes:
            print(f"--- {n.name} log:\n{n.log_text()[-4000:]}", file=sys.stderr)
        raise
    finally:
        await ha.aclose()


# -- main ---------------------------------------------------------------------------------------


def fmt(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def mib(x: Any) -> str:
    return "-" if x is None else f"{x / MiB:.0f} MiB"


def label(c: dict, e: dict) -> str:
    data = "dense" if c["fill"] >= e["size"] else f"sparse {c['fill'] // MiB} MiB"
    return f"{c['pct']:g} %, {data}"


def sync_seen(br: dict) -> float | None:
    """Seconds from the returning node's start to the first status poll showing a sync."""
    for t, state in br.get("transitions") or []:
        if "Sync" in state:
            return t
    return None


def ratio(x: Any, y: Any) -> float | None:
    return x / y if x is not None and y else None


def render(res: dict) -> str:
    e = res["env"]
    lines = [
        "# Re-protect benchmark (bench/reprotect.py)",
        "",
        f"{e['date']}; blockrep code: {e.get('code', '?')}, HEAD {e.get('commit') or '?'}; {e['qemu']}; Python {e['python']}; "
        f"{e['cpus']} CPUs; load average at start "
        f"{' '.join(f'{v:.2f}' for v in e['load_start'])}, at end "
        f"{' '.join(f'{v:.2f}' for v in e['load_end'])}. Both sides in the same run, same disks; "
        "one run of each case, on a machine other test runs may share (see the load): expect "
        "±30 % noise on the timings.",
        "",
        f"Disks: {mib(e['size'])} raw files on {e['disk_fs']}, the same content on both: "
        '"sparse N MiB" = N MiB of seeded random data in scattered 1 MiB regions, holes '
        'elsewhere (QEMU\'s mirror skips zeroes: its best case); "dense" = seeded random data '
        "in every region (a full disk: the usual case).",
        "",
        "blockrep, in-process path: two `blockrep up` nodes on one resource file (unix "
        f"sockets, checkpoint-interval {e['checkpoint_interval']:g} s, `blockrep up` extra "
        f"arguments: `{' '.join(e.get('up_args_all') or []) or 'none'}`); `blockrep promote "
        "--force` on a (equal disks: digests only); a wrote 64 KiB into "
        f"{e['pre_regions']} regions, `blockrep checkpoint`, 64 KiB into {e['tail_regions']} "
        "more, and was killed (SIGKILL); `blockrep promote` on b (it fails over); b's consumer "
        "wrote 1 MiB of new random data into each changed region (pct of the disk's 1 MiB "
        "regions). Then `blockrep up` on a again: **time = that start → b's `query-ha-status` "
        "says `replication: Protected` with a new `last-handshake`** (polled every "
        f"{e.get('poll_interval', 0.05):g} s; includes a's Python start, pairing and the "
        "background resync); **ready → Protected** = from the moment a is ready (its log line "
        '"ready (role none)" appears or its QMP answers, whichever first; polled every 5 ms) '
        "to the same Protected: without a's Python start-up, which QEMU's figure also "
        "excludes (its processes are already running when drive-mirror is issued), so "
        "**ready → Protected / QEMU is the like-for-like ratio**; the from-start one adds "
        "a's process start. bytes = `last-handshake.bytes` (data sent) and "
        "`saved-by-checksums` (regions whose digests matched). b is never restarted and its "
        "consumer stays connected throughout. Afterwards `blockrep down` on b then a, and "
        "`cmp` of the two disks: identical (the run fails loudly otherwise).",
        "",
        'QEMU 7.2 (REFERENCE-QEMU.md; docs/COLO-FT.txt "Primary resume replication"), on '
        "sparse copies of the same two disks taken just before a's restart: `drive-mirror "
        "sync=full mode=existing` from the running survivor (qemu-system-x86_64 -machine none) "
        "to the returning node's qemu-storage-daemon NBD export (unix socket); time = command "
        "→ BLOCK_JOB_READY; bytes = the job's `len`; `cmp` after `block-job-cancel`: identical.",
        "",
        "## Time and bytes to re-protect (in-process: the survivor keeps serving)",
        "",
        "| changed | changed bytes | needed: changed ∪ rolled-back tail | design bound: ∪ old "
        "P's AL | blockrep bytes sent (`last-handshake.bytes`) | saved by checksums | QEMU "
        "bytes (job `len`) | bytes blockrep / QEMU | blockrep `up` → Protected (s) | QEMU "
        "command → READY (s) | time from start / QEMU | of which `up` → a ready (s) | "
        "blockrep a ready → Protected (s) | **ready → Protected / QEMU (like for like)** | "
        "`up` → resync seen (s) | "
        "resync rate mean / peak (MiB/s) | rule |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in res["cases"]:
        br, q = c["blockrep"], c["qemu"]
        qt = q["command_to_ready_s"]
        rates = [s.get("rate") for s in br.get("resync_samples", []) if s.get("rate")]
        span = br["start_to_protected_s"]
        mean = br["bytes"] / MiB / span if br.get("bytes") and span else None
        peak = max(rates) / MiB if rates else None
        lines.append(
            f"| {label(c, e)} ({br['changed_regions']} regions) | {mib(br['expected_bytes_min'])} "
            f"| {mib(br['expected_bytes_max'])} | {mib(br['expected_bytes_design'])} | "
            f"{mib(br['bytes'])} | {mib(br.get('saved_by_checksums'))} | {mib(q['bytes'])} | "
            f"{fmt(ratio(br['bytes'], q['bytes']), '.4f')} | {span:.2f} | {qt:.2f} | "
            f"{fmt(ratio(span, qt), '.3f')} | {fmt(br.get('returning_ready_s'), '.2f')} | "
            f"{fmt(br.get('ready_to_protected_s'), '.2f')} | "
            f"**{fmt(ratio(br.get('ready_to_protected_s'), qt), '.3f')}** | "
            f"{fmt(sync_seen(br), '.2f')} | "
            f"{fmt(mean, '.0f')} / {fmt(peak, '.0f')} | "
            f"{br['last_handshake'].get('rule', '-')} |"
        )
    runs = [r for c in res["cases"] for r in (c["blockrep"], c.get("reads_only")) if r]
    gaps = [
        r["returning_ready_log_s"] - r["returning_qmp_s"]
        for r in runs
        if r.get("returning_ready_log_s") is not None and r.get("returning_qmp_s") is not None
    ]
    if gaps:
        first = sum(g > 0 for g in gaps)
        lines += [
            "",
            f"a ready: its QMP answered before its log line in {first} of {len(gaps)} in-process "
            f"runs (log line − first QMP answer: {min(gaps):.3f} … {max(gaps):.3f} s); the "
            "earlier of the two is used.",
        ]
    lines += [
        "",
        "Targets (issue): bytes proportional to the changed regions; time at 1 % ≤ 1/10 of QEMU's.",
        "",
    ]
    for c in res["cases"]:
        br = c["blockrep"]
        b = br["bytes"]
        within = b is not None and br["expected_bytes_min"] <= b <= br["expected_bytes_design"]
        minimal = b is not None and b <= br["expected_bytes_max"]
        qt = c["qemu"]["command_to_ready_s"]
        tr = br["start_to_protected_s"] / qt
        trr = ratio(br.get("ready_to_protected_s"), qt)

        def verdict(t: float, one: bool = c["pct"] == 1) -> str:
            return f" ({'meets' if t <= 0.1 else 'MISSES'} ≤ 0.1)" if one else ""

        text = (
            f"* {label(c, e)}, consumer writing during the resync: bytes within [changed, "
            f"design bound]: {'yes' if within else 'NO'}; no more than needed: "
            f"{'yes' if minimal else 'no'}; time ratio from start {tr:.3f}{verdict(tr)}, "
            f"ready → Protected (like for like) {fmt(trr, '.3f')}"
            f"{verdict(trr) if trr is not None else ''}"
        )
        ro = c.get("reads_only")
        if ro and ro.get("bytes") is not None:
            rb = ro["bytes"]
            rw = ro["expected_bytes_min"] <= rb <= ro["expected_bytes_design"]
            rt = ro["start_to_protected_s"] / qt
            rtr = ratio(ro.get("ready_to_protected_s"), qt)
            text += (
                f". Consumer only reading: bytes within: {'yes' if rw else 'NO'}; no more "
                f"than needed: {'yes' if rb <= ro['expected_bytes_max'] else 'no'}; time ratio "
                f"from start {rt:.3f}{verdict(rt)}, ready → Protected (like for like) "
                f"{fmt(rtr, '.3f')}{verdict(rtr) if rtr is not None else ''}"
            )
        lines.append(text)
    lines += [
        "",
        "needed = the regions the survivor changed plus the old primary's writes past its last "
        "checkpoint (rolled back by the failover); design bound = the same ∪ every region of "
        "the old primary's durable activity log (README: survivor's bitmap ∪ old P's AL ∪ its "
        "bitmap); bytes sent + saved by checksums = the regions compared. The mean rate is "
        "bytes sent / (`up` → Protected); the peak is the highest `resync.rate` the survivor's "
        "status showed.",
        "",
    ]
    if any(c.get("reads_only") for c in res["cases"]):
        lines += [
            "### The same, the survivor's consumer only reading during the resync",
            "",
            "A second in-process run of each case (its own disks, same seed and changed "
            "regions): the probe only reads (4 KiB, qd1), so no region is dirtied again while "
            "the resync runs. QEMU's time is the case's above.",
            "",
            "| changed | bytes sent | saved by checksums | `up` → Protected (s) | time from "
            "start / QEMU | of which `up` → a ready / → resync seen (s) | a ready → Protected "
            "(s) | **ready → Protected / QEMU (like for like)** | read p99 idle / during (ms) | "
            "during p99 / idle p99 | rule |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in res["cases"]:
            r = c.get("reads_only")
            if not r:
                continue
            t = r["start_to_protected_s"]
            i, du = r["idle"], r["during"]
            lines.append(
                f"| {label(c, e)} ({r['changed_regions']} regions) | {mib(r['bytes'])} | "
                f"{mib(r.get('saved_by_checksums'))} | {t:.2f} | "
                f"{fmt(ratio(t, c['qemu']['command_to_ready_s']), '.3f')} | "
                f"{fmt(r.get('returning_ready_s'), '.2f')} / {fmt(sync_seen(r), '.2f')} | "
                f"{fmt(r.get('ready_to_protected_s'), '.2f')} | "
                f"**{fmt(ratio(r.get('ready_to_protected_s'), c['qemu']['command_to_ready_s']), '.3f')}** | "
                f"{fmt(i['p99_ms'], '.2f')} / {fmt(du['p99_ms'], '.2f')} | "
                f"{fmt(ratio(du['p99_ms'], i['p99_ms']), '.2f')} | "
                f"{r['last_handshake'].get('rule', '-')} |"
            )
        lines.append("")
    if not any(c.get("restart") for c in res["cases"]):
        lines += [
            "The restart path (`blockrep secondary`/`primary`, survivor restarted) was not run "
            "this time (`--no-restart-path`); see an earlier reprotect.md in git for it.",
            "",
        ]
    if any(c.get("restart") for c in res["cases"]):
        lines += [
            "### For reference: the restart path (same scenario, own disks)",
            "",
            "`blockrep secondary` + `blockrep primary --assume-synced`, `blockrep failover`; "
            "the survivor is stopped (SIGTERM), a restarts as `blockrep secondary` and b as "
            "`blockrep primary`; time = b's process start → Protected; the consumer is cut off "
            "from the SIGTERM until the new export accepts. QEMU's time is the in-process "
            "case's (same disk kind and changed fraction). Its clock starts later than the "
            "in-process one: a was already started and listening (its start is not counted), "
            "where the in-process time includes a's whole `blockrep up` start.",
            "",
            "| changed | restart: bytes | restart: b start → Protected (s) | of which start → "
            "QMP up (s) | time / QEMU | consumer outage (s) | rule |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in res["cases"]:
            r = c.get("restart")
            if not r:
                continue
            lines.append(
                f"| {label(c, e)} ({r['changed_regions']} regions) | {mib(r['bytes'])} | "
                f"{r['start_to_protected_s']:.2f} | {r['start_to_qmp_s']:.2f} | "
                f"{fmt(ratio(r['start_to_protected_s'], c['qemu']['command_to_ready_s']), '.3f')}"
                f" | {fmt(r.get('consumer_outage_s'), '.2f')} | "
                f"{r['last_handshake'].get('rule', '-')} |"
            )
        lines.append("")
    lines += [
        "## Consumer latency on the survivor's export (qd1, 4 KiB reads anywhere and writes "
        "into changed regions, alternating)",
        "",
        "| changed | impl | idle ops | idle p50 / p99 (ms) | during ops | during p50 / p99 / "
        "max (ms) | **during p99 / idle p99** | after (Protected) ops, p50 / p99 (ms) | errors "
        "| longest wait (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in res["cases"]:
        for k in ("blockrep", "qemu"):
            r = c[k]
            i, du = r["idle"], r["during"]
            rr = ratio(du["p99_ms"], i["p99_ms"])
            pi = r.get("protected_idle")
            after = (
                f"{pi['ops']}, {fmt(pi['p50_ms'], '.2f')} / {fmt(pi['p99_ms'], '.2f')}"
                if pi
                else ""
            )
            errs = i["errors"] + du["errors"] + (pi["errors"] if pi else 0)
            gap = fmt(r.get("consumer_outage_s"), ".3f") if k == "blockrep" else "-"
            lines.append(
                f"| {label(c, e)} | {k} | {i['ops']} | {fmt(i['p50_ms'], '.2f')} / "
                f"{fmt(i['p99_ms'], '.2f')} | {du['ops']} | {fmt(du['p50_ms'], '.2f')} / "
                f"{fmt(du['p99_ms'], '.2f')} / {fmt(du['max_ms'], '.2f')} | **{fmt(rr, '.2f')}** "
                f"| {after} | {errs} | {gap} |"
            )
    lines += [
        "",
        "blockrep: one NBD connection to b's export from before a's restart until "
        f"{e['idle_seconds']:g} s after Protected; idle = the {e['idle_seconds']:g} s before "
        "`blockrep up` on a (b primary, alone), during = `up` → Protected (the background "
        "resync), after = Protected, writes forwarded to a. Longest wait = the longest time "
        "between two request starts during the resync (a consumer cut off would show here). "
        "QEMU: idle = before drive-mirror, during = command → READY.",
        "",
        "## Activity log cost (fio nbd engine, 4 KiB random writes, qd 16)",
        "",
        f"A replicating `blockrep primary` (checkpoint interval {e['al_checkpoint_interval']:g} s), "
        f"{e['al_seconds']:g} s per case.",
        "",
        "| window | AL | IOPS | MiB/s | clat p50 / p99 (ms) | AL commits | checkpoints "
        "| checkpoint pause p99 (ms) | IOPS off / on |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for w in res["al"]:
        on = w.get("on")
        off = w.get("off")
        for tag, r in (("on", on), ("off", off)):
            if r is None:
                continue
            rel = f"{off['iops'] / on['iops']:.2f}" if (tag == "off" and on) else ""
            lines.append(
                f"| {mib(w['window'])} | {tag} | {r['iops']:.0f} | {r['mib_s']:.2f} | "
                f"{r['clat_p50_ms']:.2f} / {r['clat_p99_ms']:.2f} | {fmt(r['al_commits'], 'd')} | "
                f"{r['checkpoints']} | {fmt(r['pause_p99_ms'])} | {rel} |"
            )
    if not res["env"]["no_activity_log_option"]:
        lines += [
            "",
            "`blockrep primary --help` has no `--no-activity-log` option in this build: AL on "
            "only, the off column is missing.",
        ]
    notes = [
        f"{label(c, res['env'])} {k}: {n}"
        for c in res["cases"]
        for k in ("blockrep", "reads_only", "restart")
        for n in (c.get(k) or {}).get("notes", [])
    ]
    if notes or res.get("observations"):
        lines += ["", "## Observations", ""]
        lines += [f"* {n}" for n in (res.get("observations") or []) + notes]
    lines.append("")
    return "\n".join(lines)


def byte_obs(name: str, br: dict) -> list[str]:
    obs = []
    b = br.get("bytes")
    if b is None:
        obs.append(f"{name}: status has no last-handshake.bytes: {br['last_handshake']}")
    elif b > br["expected_bytes_design"]:
        obs.append(
            f"{name}: blockrep sent {b} bytes, more than the changed regions ∪ the old "
            f"primary's AL ({br['expected_bytes_design']})"
        )
    elif b > br["expected_bytes_max"]:
        al = br.get("old_primary_al_before_kill") or {}
        obs.append(
            f"{name}: blockrep sent {b // MiB} MiB where {br['expected_bytes_max'] // MiB} MiB "
            f"(changed ∪ rolled-back tail) were needed: the old primary's activity log still "
            f"held {al.get('regions')} regions at its death ({br['old_primary_written_regions']} "
            f"written, {br['tail_regions']} past the last checkpoint)"
        )
    elif b < br["expected_bytes_min"]:
        obs.append(
            f"{name}: blockrep sent {b} bytes, fewer than the changed regions "
            f"({br['expected_bytes_min']}) although the disks compare equal"
        )
    new = [
        x for x in br.get("status_errors") or [] if x not in (br.get("status_errors_before") or [])
    ]
    if new:
        obs.append(f"{name}: new status errors during the re-protect: {new}")
    if br.get("replication_error"):
        obs.append(f"{name}: replication-error: {br['replication_error']}")
    return obs


def observations(res: dict) -> list[str]:
    e = res["env"]
    obs = []
    for c in res["cases"]:
        br, q = c["blockrep"], c["qemu"]
        obs += byte_obs(f"{label(c, e)} in-process", br)
        if c.get("restart"):
            obs += byte_obs(f"{label(c, e)} restart path", c["restart"])
        if c.get("reads_only"):
            obs += byte_obs(f"{label(c, e)} in-process, reads-only consumer", c["reads_only"])
        for k in ("blockrep", "qemu"):
            for ph in ("idle", "during", "protected_idle"):
                if ph in c[k] and c[k][ph]["errors"]:
                    obs.append(
                        f"{label(c, e)} {k} {ph}: consumer errors {c[k][ph]['first_errors']}"
                    )
        ih = br.get("initial_handshake") or {}
        if br.get("initial_promote_force_s") is not None:
            obs.append(
                f"{label(c, e)}: `blockrep promote --force` on two equal disks took "
                f"{br['initial_promote_force_s']:.1f} s to Protected (sent {mib(ih.get('bytes'))}, "
                f"saved by checksums {mib(ih.get('saved-by-checksums'))}, rule {ih.get('rule')})"
            )
        ro = c.get("reads_only")
        if br.get("bytes") and br["bytes"] > br["expected_bytes_max"] and ro and ro.get("bytes"):
            extra = br["bytes"] - ro["bytes"]
            writes = br["during"]["ops"] // 2
            obs.append(
                f"{label(c, e)} in-process: with the probe writing during the resync blockrep "
                f"sent {br['bytes'] // MiB} MiB and took {br['start_to_protected_s']:.2f} s; "
                f"with a reading probe {ro['bytes'] // MiB} MiB and "
                f"{ro['start_to_protected_s']:.2f} s. The {extra // MiB} MiB more come from "
                f"~{writes} 4 KiB consumer writes into {br['changed_regions']} regions during "
                "the resync: each re-dirties a 1 MiB region that the chase copies again whole "
                "until the final pass (≤ ~32 regions, consumer held; blockrep/ha/reprotect.py "
                "final_threshold, CONVERGE_FOR)"
            )
        if not br.get("survivor_pid_kept", True):
            obs.append(f"{label(c, e)}: the survivor's process was gone after the re-protect")
        gap = br.get("consumer_outage_s")
        if gap is not None and gap > 1.0:
            obs.append(
                f"{label(c, e)} in-process: the survivor's consumer waited {gap:.2f} s at once "
                "during the resync"
            )
        if br["during"]["ops"] == 0:
            obs.append(f"{label(c, e)} in-process: no consumer request completed during the resync")
        ss = br.get("resync_samples") or []
        if br.get("bytes") and br["bytes"] >= 64 * MiB and not ss:
            obs.append(
                f"{label(c, e)} in-process: {br['bytes'] // MiB} MiB resynced but the survivor's "
                "status never showed a `resync` key in the polls"
            )
        pcts = [s.get("percent") for s in ss if s.get("percent") is not None]
        if pcts and pcts != sorted(pcts):
            obs.append(f"{label(c, e)} in-process: resync percent went backwards: {pcts}")
        odd = [
            x
            for x in br["states_seen"]
            if x.startswith("Sync") and x.split("/")[1] in ("connecting", "degraded")
        ]
        if odd:
            obs.append(
                f"{label(c, e)} in-process: during the resync the survivor's status said "
                f"replication/peer = {', '.join(odd)} (the peer is connected and being synced)"
            )
        ahead = [
            x
            for x in ss
            if x.get("percent") == 100.0 and x.get("done-bytes", 0) < x.get("total-bytes", 0)
        ]
        if ahead:
            x = ahead[0]
            obs.append(
                f"{label(c, e)} in-process: `resync.percent` said 100.0 while done-bytes "
                f"{x['done-bytes']} < total-bytes {x['total-bytes']} ({len(ahead)} polls)"
            )
        if q["bytes"] and q["bytes"] > e["size"]:
            obs.append(
                f"{label(c, e)} QEMU: the mirror's len ({q['bytes']}) exceeds the disk: it counts "
                "the regions the consumer probe dirtied again during the copy"
            )
    for w in res["al"]:
        on, off = w.get("on"), w.get("off")
        if on and off and off["iops"] > 1.5 * on["iops"]:
            obs.append(
                f"AL, {mib(w['window'])} of random 4 KiB writes: {on['iops']:.0f} IOPS with the "
                f"activity log, {off['iops']:.0f} without ({off['iops'] / on['iops']:.2f}x); the "
                f"window has {w['window'] // REGION} regions, the log holds "
                f"{(on.get('al_at_end') or {}).get('limit')}: cold writes wait for AL commits and "
                "for room that only a checkpoint's ack makes"
            )
        for r in (on, off):
            if r and r.get("pause_p99_ms") and r["pause_p99_ms"] > 100:
                obs.append(
                    f"AL case {mib(w['window'])} al_on={r['al_on']}: checkpoint pause p99 "
                    f"{r['pause_p99_ms']:.0f} ms under this load (fio clat p99 "
                    f"{r['clat_p99_ms']:.0f} ms)"
                )
        for r in (w.get("on"), w.get("off")):
            if r and (r["errors"] or r["replication_error"] or r["replication"] != "Protected"):
                obs.append(
                    f"AL case {mib(w['window'])} al_on={r['al_on']}: fio errors {r['errors']}, "
                    f"replication {r['replication']}, error {r['replication_error']}"
                )
    return obs


SNAP_ENV = "BLOCKREP_BENCH_CODE"


def code_digest(root: str) -> str:
    """sha256 over blockrep/**/*.py (paths and contents) under ``root``."""
    import hashlib

    h = hashlib.sha256()
    base = os.path.join(root, "blockrep")
    for d, dirs, files in sorted(os.walk(base)):
        dirs.sort()
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(d, f)
                h.update(os.path.relpath(path, base).encode())
                with open(path, "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()[:12]


def reexec_on_snapshot() -> None:
    """The lead edits blockrep while benchmarks run: run every process of this benchmark on
    one copy of the package (PYTHONPATH and cwd), taken now."""
    snap = tempfile.mkdtemp(prefix="reprotect-code-", dir="/tmp")
    shutil.copytree(
        os.path.join(ROOT, "blockrep"),
        os.path.join(snap, "blockrep"),
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    env = {**os.environ, SNAP_ENV: snap, "PYTHONPATH": snap}
    os.chdir(snap)
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)


def git_head() -> str | None:
    """The commit checked out in the work tree (`git rev-parse HEAD`, read only)."""
    r = subprocess.run(
        ["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30
    )
    return r.stdout.strip() or None


def write_results(res: dict, out: str) -> None:
    res["observations"] = observations(res)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(res, f, indent=2, default=str)
    text = render(res)
    with open(out + ".md", "w") as f:
        f.write(text)
    print(text)


async def main(a: argparse.Namespace) -> int:
    out = a.out or os.path.join(HERE, "results", "reprotect")
    if a.render_only:
        with open(out + ".json") as f:
            write_results(json.load(f), out)
        return 0
    size = parse_size(a.size)
    if size % REGION:
        raise SystemExit("--size must be a multiple of 1 MiB")
    for tool in ("fio", "qemu-system-x86_64", "qemu-storage-daemon", "cmp"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (apt-get install qemu-system-x86 qemu-utils fio)")
    snap = os.environ.get(SNAP_ENV)
    import blockrep

    code_root = os.path.dirname(os.path.dirname(os.path.abspath(blockrep.__file__)))
    if snap and code_root != snap:
        raise SystemExit(f"imported blockrep from {code_root}, not the snapshot {snap}")
    probe_code = run([sys.executable, "-c", "import blockrep; print(blockrep.__file__)"]).stdout
    if snap and not probe_code.startswith(snap):
        raise SystemExit(f"child processes import blockrep from {probe_code.strip()}, not {snap}")
    digest = code_digest(code_root)
    help_text = cli("primary", "--help")
    no_al = "--no-activity-log" in help_text
    tmp = a.dir or tempfile.gettempdir()
    free = shutil.disk_usage(tmp).free
    if free < 4 * size:
        raise SystemExit(f"{tmp}: {free} bytes free, want 4 x {size} (sparse, to be safe)")
    a.qemu_dir = tempfile.mkdtemp(prefix="reprotect-", dir=tmp)
    df = subprocess.run(["df", "-T", tmp], capture_output=True, text=True).stdout.splitlines()
    res: dict[str, Any] = {
        "env": {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_start": os.getloadavg(),
            "qemu": run(["qemu-system-x86_64", "--version"]).stdout.splitlines()[0],
            "fio": run(["fio", "--version"]).stdout.strip(),
            "size": size,
            "pre_regions": a.pre_regions,
            "tail_regions": a.tail_regions,
            "checkpoint_interval": a.checkpoint_interval,
            "poll_interval": a.poll_interval,
            "up_args_all": [*FAST, *a.up_args.split()],
            "commit": git_head(),
            "al_checkpoint_interval": a.al_checkpoint_interval,
            "al_seconds": a.al_seconds,
            "idle_seconds": a.idle_seconds,
            "disk_fs": df[-1].split()[1] if len(df) > 1 else "?",
            "no_activity_log_option": no_al,
            "command": " ".join(sys.argv),
            "code": f"snapshot of blockrep/ taken at the start, sha256 {digest}"
            if snap
            else f"the working tree, sha256 {digest}",
        },
        "cases": [],
        "al": [],
    }
    try:
        cases = [(f, float(p)) for f in a.fills.split(",") for p in a.pcts.split(",")]
        for i, (fill, p) in enumerate(cases):
            seed = 100 + i
            fill_b = size if fill == "full" else min(size, int(fill) * MiB)
            br = await up_case(a, size, fill_b, p, seed)
            qa, qb = br.pop("qemu_disks")
            changed = br.pop("changed")  # the probe writes into the same regions
            try:
                q = await qemu_case(a, size, p, qa, qb, changed, seed)
            finally:
                for f in (qa, qb):
                    with contextlib.suppress(OSError):
                        os.unlink(f)
            ro = None
            if a.reads_only_variant:
                ro = await up_case(a, size, fill_b, p, seed, probe_writes=False, copies=False)
                ro.pop("changed")
                ro.pop("qemu_disks")
            rs = None
            if a.restart_path:
                rs = await restart_case(a, size, fill_b, p, seed)
                rs.pop("changed")
                for f in rs.pop("qemu_disks"):
                    with contextlib.suppress(OSError):
                        os.unlink(f)
            print(
                f"{p:g} % fill {fill}: blockrep {br['start_to_protected_s']:.2f} s "
                f"(ready → Protected {fmt(br.get('ready_to_protected_s'), '.2f')} s) "
                f"{br['bytes']} B (saved {br['saved_by_checksums']}); QEMU "
                f"{q['command_to_ready_s']:.2f} s {q['bytes']} B"
                + (f"; reads-only {ro['start_to_protected_s']:.2f} s {ro['bytes']} B" if ro else "")
                + (f"; restart path {rs['start_to_protected_s']:.2f} s" if rs else ""),
                flush=True,
            )
            res["cases"].append(
                {
                    "pct": p,
                    "fill": fill_b,
                    "blockrep": br,
                    "qemu": q,
                    "reads_only": ro,
                    "restart": rs,
                }
            )
        windows = [size] + ([512 * MiB] if size > 512 * MiB else [])
        for w in windows:
            row: dict[str, Any] = {"window": w}
            row["on"] = await al_case(a, size, w, True)
            if no_al:
                row["off"] = await al_case(a, size, w, False)
            print(f"AL window {w // MiB} MiB: {row}", flush=True)
            res["al"].append(row)
    finally:
        shutil.rmtree(a.qemu_dir, ignore_errors=True)
    res["env"]["load_end"] = os.getloadavg()
    if snap:
        now = code_digest(ROOT)
        if now != digest:
            res["env"]["code"] += f" (the working tree changed during the run, now {now})"
        shutil.rmtree(snap, ignore_errors=True)
    write_results(res, out)
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="4G", help="disk size (4G; 256M for a quick run)")
    ap.add_argument("--pcts", default="1,10", help="changed %% of the 1 MiB regions")
    ap.add_argument(
        "--fills",
        default="64,full",
        help="random data on the disks: MiB in scattered 1 MiB regions, or full (dense)",
    )
    ap.add_argument("--pre-regions", type=int, default=16)
    ap.add_argument("--tail-regions", type=int, default=4)
    ap.add_argument("--checkpoint-interval", type=float, default=2.0, help="re-protected pair")
    ap.add_argument("--al-checkpoint-interval", type=float, default=2.0)
    ap.add_argument("--al-seconds", type=float, default=10.0)
    ap.add_argument("--idle-seconds", type=float, default=3.0)
    ap.add_argument(
        "--up-args", default="", help="extra `blockrep up` arguments (e.g. '--resync-rate 200M')"
    )
    ap.add_argument("--poll-interval", type=float, default=0.05, help="survivor status polls (s)")
    ap.add_argument(
        "--no-reads-only-variant",
        dest="reads_only_variant",
        action="store_false",
        help="skip the second in-process run whose consumer only reads during the resync",
    )
    ap.add_argument(
        "--no-restart-path",
        dest="restart_path",
        action="store_false",
        help="skip the restart-path reference rows",
    )
    ap.add_argument("--dir", default="/var/tmp", help="where QEMU's disk copies go")
    ap.add_argument("--out", default=None, help="results path without extension")
    ap.add_argument(
        "--render-only", action="store_true", help="rewrite the .md from the .json, run nothing"
    )
    ap.add_argument(
        "--no-snapshot", action="store_true", help="run the working tree's code as it changes"
    )
    args = ap.parse_args()
    if not (args.render_only or args.no_snapshot or os.environ.get(SNAP_ENV)):
        reexec_on_snapshot()
    sys.exit(asyncio.run(main(args)))
