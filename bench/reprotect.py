#!/usr/bin/env python3
"""Re-protect benchmark (bench/reprotect, not a test): blockrep vs QEMU's documented
re-protect, same disks, same run.

For each changed fraction (--pcts, default 1 and 10 % of the 1 MiB regions):

blockrep (command lines and ``query-ha-status`` only, as a user would):
 1. two raw disks of --size (default 4 GiB) with the same content, per --fills (default
    "64,full"): 64 = sparse, 64 MiB of seeded pseudo-random data in scattered 1 MiB regions
    and holes elsewhere (QEMU's mirror skips zeroes: its best case); full = seeded random
    data in every region (a full disk);
    ``blockrep secondary`` on B, ``blockrep primary --assume-synced --checkpoint-interval 0``
    on A; wait until both say ready (Protected).
 2. A's consumer writes 64 KiB into --pre-regions regions, ``blockrep checkpoint``, writes
    64 KiB into --tail-regions more (past the checkpoint: rolled back by the failover),
    then A is killed (SIGKILL); ``blockrep failover --qmp`` on B; B's consumer writes
    1 MiB of new random data into each of the changed regions (pct of the disk's regions)
    through B's NBD export. Idle consumer latency is measured on B (alone) here.
 3. B is stopped (SIGTERM). Copies of both disks are taken for QEMU's side (sparse cp).
    A restarts as ``blockrep secondary``, then B as ``blockrep primary`` (swapped roles):
    time from B's start until its status says ``replication: Protected``; bytes from
    ``last-handshake.bytes``. A qd1 consumer probe (4 KiB reads anywhere, 4 KiB writes
    into already-changed regions) runs on B's export from the moment it accepts until
    Protected. Then both stop (SIGTERM) and the two disks are compared with cmp: any
    difference fails the benchmark.

QEMU 7.2 (REFERENCE-QEMU.md; docs/COLO-FT.txt "Primary resume replication"): the returning
node is qemu-storage-daemon exporting its copy of A's disk over NBD (unix socket); the
survivor is ``qemu-system-x86_64 -machine none`` with its copy of B's disk and a consumer
NBD export; ``drive-mirror sync=full mode=existing format=raw`` to the returning node's
export; time from the command to BLOCK_JOB_READY, bytes = the job's ``len``; the same
consumer probe (idle before, during the mirror); ``block-job-cancel`` after READY (as the
doc does), then cmp. QEMU's survivor is already running: its time has no process start,
blockrep's (restart path) does; both are shown.

Activity log cost: 4 KiB random writes, qd 16, --al-seconds (default 10) with fio's nbd
engine against a replicating ``blockrep primary``'s export (default checkpoint interval),
whole disk and a 512 MiB hot window; AL on, and off when ``blockrep primary --help`` offers
``--no-activity-log``.

Results: bench/results/reprotect.json and bench/results/reprotect.md.

Run: .venv/bin/python bench/reprotect.py [--size 4G] [--pcts 1,10] [--fills 64,full]
     [--al-seconds 10]   (needs about 4 x --size free in --dir and /tmp; ~10 min at 4 GiB)
Quick: .venv/bin/python bench/reprotect.py --size 256M --al-seconds 3 --out /tmp/rp/reprotect
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

    def __init__(self, sock: str, size: int, write_regions: list[int], seed: int) -> None:
        self.sock, self.size, self.write_regions = sock, size, write_regions
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
                    if i % 2:
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


async def status_until(node: HANode, pred, timeout: float, what: str) -> tuple[dict, float]:
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
        await asyncio.sleep(0.02)
    raise BenchError(f"{node.name}: timed out ({timeout} s) waiting for {what}; last {last}")


async def blockrep_case(
    a: argparse.Namespace, size: int, fill_b: int, pct_: float, seed: int
) -> dict:
    ha = HA()
    res: dict[str, Any] = {"impl": "blockrep", "pct": pct_}
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
        changed = sorted(rnd.sample(range(nreg), max(1, round(nreg * pct_ / 100))))
        g, bc = await nbd_client(b.export, "disk")
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


def render(res: dict) -> str:
    e = res["env"]
    lines = [
        "# Re-protect benchmark (bench/reprotect.py)",
        "",
        f"{e['date']}; blockrep code: {e.get('code', '?')}; {e['qemu']}; Python {e['python']}; {e['cpus']} CPUs; load average at start "
        f"{' '.join(f'{v:.2f}' for v in e['load_start'])}, at end "
        f"{' '.join(f'{v:.2f}' for v in e['load_end'])}. Both sides in the same run, same disks; "
        "one run of each case, on a machine other test runs shared (see the load): expect "
        "±30 % noise on the timings.",
        "",
        f"Disks: {mib(e['size'])} raw files on {e['disk_fs']}, the same content on both: "
        '"sparse N MiB" = N MiB of seeded random data in scattered 1 MiB regions, holes '
        'elsewhere (QEMU\'s mirror skips zeroes: its best case); "dense" = seeded random data '
        "in every region (a full disk: the usual case). "
        f"The old primary wrote 64 KiB into {e['pre_regions']} regions, checkpointed, wrote 64 KiB "
        f"into {e['tail_regions']} more and was killed (SIGKILL); `blockrep failover`; the survivor's "
        "consumer then wrote 1 MiB of new random data into each changed region (pct of the "
        "disk's 1 MiB regions). QEMU's side ran on sparse copies of the same two disks taken "
        "at that moment. Both pairs were compared with `cmp` afterwards: identical.",
        "",
        "blockrep: restart path (survivor SIGTERM; old primary restarted as `blockrep "
        "secondary`, survivor as `blockrep primary`); time = survivor's process start → "
        "`query-ha-status` says `replication: Protected` (includes Python start and the "
        "handshake). QEMU 7.2: `drive-mirror sync=full mode=existing` from the running "
        "survivor (qemu-system-x86_64) to the returning node's qemu-storage-daemon NBD export "
        "(unix socket); time = command → BLOCK_JOB_READY; bytes = the job's `len`.",
        "",
        "## Time and bytes to re-protect",
        "",
        "| changed | changed bytes | needed: changed ∪ rolled-back tail | design bound: ∪ old "
        "P's AL | blockrep bytes (`last-handshake`) | QEMU bytes (job `len`) | bytes blockrep / "
        "QEMU | blockrep start → Protected (s) | of which start → QMP up (s) | QEMU command → "
        "READY (s) | time blockrep / QEMU | same, from blockrep's QMP up | rule |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in res["cases"]:
        br, q = c["blockrep"], c["qemu"]
        qt = q["command_to_ready_s"]
        tr = br["start_to_protected_s"] / qt
        tr2 = (br["start_to_protected_s"] - br["start_to_qmp_s"]) / qt
        brat = br["bytes"] / q["bytes"] if br.get("bytes") is not None and q["bytes"] else None
        lines.append(
            f"| {label(c, e)} ({br['changed_regions']} regions) | {mib(br['expected_bytes_min'])} "
            f"| {mib(br['expected_bytes_max'])} | {mib(br['expected_bytes_design'])} | "
            f"{mib(br['bytes'])} | {mib(q['bytes'])} | {fmt(brat, '.4f')} | "
            f"{br['start_to_protected_s']:.2f} | {br['start_to_qmp_s']:.2f} | {qt:.2f} | "
            f"{tr:.3f} | {tr2:.3f} | {br['last_handshake'].get('rule', '-')} |"
        )
    lines += [
        "",
        "Targets: bytes proportional to the changed regions; time at 1 % ≤ 1/10 of QEMU's.",
        "",
    ]
    for c in res["cases"]:
        br = c["blockrep"]
        b = br["bytes"]
        within = b is not None and br["expected_bytes_min"] <= b <= br["expected_bytes_design"]
        minimal = b is not None and b <= br["expected_bytes_max"]
        tr = br["start_to_protected_s"] / c["qemu"]["command_to_ready_s"]
        lines.append(
            f"* {label(c, e)}: bytes within [changed, design bound]: "
            f"{'yes' if within else 'NO'}; no more than needed: {'yes' if minimal else 'no'}; "
            f"time ratio {tr:.3f}"
            + (f" ({'meets' if tr <= 0.1 else 'MISSES'} ≤ 0.1)" if c["pct"] == 1 else "")
        )
    lines += [
        "",
        "needed = the regions the survivor changed plus the old primary's writes past its last "
        "checkpoint (rolled back by the failover); design bound = the same ∪ every region of "
        "the old primary's durable activity log (README: survivor's bitmap ∪ old P's AL ∪ its "
        "bitmap).",
        "",
    ]
    if any(
        c["blockrep"]["bytes"] is not None
        and c["blockrep"]["bytes"] > c["blockrep"]["expected_bytes_max"]
        for c in res["cases"]
    ):
        lines[-1:-1] = [
            "The AL keeps regions until evicted (an LRU, as DRBD's): regions a checkpoint "
            "already covered are still in it and were copied again.",
            "",
        ]
    lines += [
        "",
        "## Consumer latency on the survivor's export (qd1, 4 KiB reads anywhere and writes "
        "into changed regions, alternating)",
        "",
        "| changed | impl | idle ops | idle p50 / p99 (ms) | during ops | during p50 / p99 / max (ms) "
        "| during p99 / idle p99 | errors | consumer outage (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in res["cases"]:
        for k in ("blockrep", "qemu"):
            r = c[k]
            i, du = r["idle"], r["during"]
            ratio = du["p99_ms"] / i["p99_ms"] if du["p99_ms"] and i["p99_ms"] else None
            unavail = fmt(r.get("consumer_outage_s"), ".2f") if k == "blockrep" else "0"
            lines.append(
                f"| {label(c, e)} | {k} | {i['ops']} | {fmt(i['p50_ms'], '.2f')} / "
                f"{fmt(i['p99_ms'], '.2f')} | {du['ops']} | {fmt(du['p50_ms'], '.2f')} / "
                f"{fmt(du['p99_ms'], '.2f')} / {fmt(du['max_ms'], '.2f')} | {fmt(ratio, '.2f')} | "
                f"{i['errors'] + du['errors']} | {unavail} |"
            )
        pi = c["blockrep"].get("protected_idle")
        if pi:
            lines.append(
                f"| {label(c, e)} | blockrep, Protected after re-protect (writes forwarded) | "
                f"{pi['ops']} | {fmt(pi['p50_ms'], '.2f')} / {fmt(pi['p99_ms'], '.2f')} | | | | "
                f"{pi['errors']} | |"
            )
    lines += [
        "",
        "Idle = the survivor alone before the re-protect (blockrep: failed over; QEMU: before "
        "drive-mirror). blockrep's restart path closes the survivor's export: outage = "
        "SIGTERM → exit plus the new primary's start → its export accepting (the returning "
        "node's start and the disk copies for QEMU's side left out). blockrep's \"during\" "
        "samples run from the moment the new export accepts until Protected.",
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
    notes = [n for c in res["cases"] for n in c["blockrep"].get("notes", [])]
    if notes or res.get("observations"):
        lines += ["", "## Observations", ""]
        lines += [f"* {n}" for n in (res.get("observations") or []) + notes]
    lines.append("")
    return "\n".join(lines)


def observations(res: dict) -> list[str]:
    e = res["env"]
    obs = []
    for c in res["cases"]:
        br = c["blockrep"]
        if br["bytes"] is None:
            obs.append(f"{label(c, e)}: status has no last-handshake.bytes: {br['last_handshake']}")
        elif br["bytes"] > br["expected_bytes_design"]:
            obs.append(
                f"{label(c, e)}: blockrep copied {br['bytes']} bytes, more than the changed "
                f"regions ∪ the old primary's AL ({br['expected_bytes_design']})"
            )
        elif br["bytes"] > br["expected_bytes_max"]:
            al = br.get("old_primary_al_before_kill") or {}
            obs.append(
                f"{label(c, e)}: blockrep copied {br['bytes'] // MiB} MiB where "
                f"{br['expected_bytes_max'] // MiB} MiB (changed ∪ rolled-back tail) were "
                f"needed: the old primary's activity log still held {al.get('regions')} regions "
                f"at its death ({br['old_primary_written_regions']} written, "
                f"{br['tail_regions']} past the last checkpoint); regions a checkpoint covered "
                "are copied again"
            )
        elif br["bytes"] < br["expected_bytes_min"]:
            obs.append(
                f"{label(c, e)}: blockrep copied {br['bytes']} bytes, fewer than the changed "
                f"regions ({br['expected_bytes_min']}) although the disks compare equal"
            )
        if br.get("status_errors"):
            obs.append(f"{label(c, e)}: status errors after re-protect: {br['status_errors']}")
        if br.get("replication_error"):
            obs.append(f"{label(c, e)}: replication-error: {br['replication_error']}")
        for k in ("blockrep", "qemu"):
            for ph in ("idle", "during"):
                if c[k][ph]["errors"]:
                    obs.append(
                        f"{label(c, e)} {k} {ph}: consumer errors {c[k][ph]['first_errors']}"
                    )
        acc, prot = br.get("export_accepting_after_s"), br["start_to_protected_s"]
        if acc is None or acc >= prot - 0.05:
            obs.append(
                f"{label(c, e)} blockrep: the new primary's consumer export accepted "
                f"{fmt(acc, '.2f')} s after its start, Protected at {prot:.2f} s: the export "
                "opens only after the pairing and its copy, so on the restart path the "
                f"consumer is cut off for the whole re-protect ({br['during']['ops']} requests "
                "in the last moments, none during the copy)"
            )
        span = br["start_to_protected_s"] - br["start_to_qmp_s"]
        if br["bytes"] and br["bytes"] >= 100 * MiB and span > 0:
            obs.append(
                f"{label(c, e)} blockrep: {br['bytes'] // MiB} MiB copied within {span:.2f} s "
                f"of QMP up → Protected: at least {br['bytes'] / MiB / span:.0f} MiB/s (QEMU's "
                f"mirror: {c['qemu']['bytes'] / MiB / c['qemu']['command_to_ready_s']:.0f} "
                "MiB/s of job length)"
            )
        odd = [x for x in br["states_seen"] if x.startswith("Sync") and x.endswith("/connecting")]
        if odd:
            obs.append(
                f"{label(c, e)} blockrep: during the copy the primary's status said "
                f"replication/peer = {', '.join(odd)} (peer `connecting` while it is the sync "
                "source of a connected peer)"
            )
    for c in res["cases"]:
        q = c["qemu"]
        if q["bytes"] and q["bytes"] > e["size"]:
            obs.append(
                f"{label(c, e)} QEMU: the mirror's len ({q['bytes']}) exceeds the disk: it counts "
                "the regions the consumer probe dirtied again during the copy"
            )
            break
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
            br = await blockrep_case(a, size, fill_b, p, seed)
            qa, qb = br.pop("qemu_disks")
            changed = br.pop("changed")  # the probe writes into the same regions
            try:
                q = await qemu_case(a, size, p, qa, qb, changed, seed)
            finally:
                for f in (qa, qb):
                    with contextlib.suppress(OSError):
                        os.unlink(f)
            print(
                f"{p:g} %: blockrep {br['start_to_protected_s']:.2f} s {br['bytes']} B; "
                f"QEMU {q['command_to_ready_s']:.2f} s {q['bytes']} B",
                flush=True,
            )
            res["cases"].append({"pct": p, "fill": fill_b, "blockrep": br, "qemu": q})
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
