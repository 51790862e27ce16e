#!/usr/bin/env python3
"""Replication benchmark: a blockrep pair vs a QEMU 7.2 pair vs an unreplicated export, one run.

Configurations (issue 5, "Benchmark (bench/replication)"):

* blockrep pair: two ``python -m blockrep.cli daemon`` processes with the command lines and
  the QMP sequence of REFERENCE-QEMU.md §2 (blockrep.testing); replication link (P's NBD client ->
  S's NBD server, export ``parent0``) over TCP on 127.0.0.1 and, separately, a unix socket.
* QEMU pair: the same recipe with ``qemu-system-x86_64 -machine none -nodefaults -display none``
  (QEMU 7.2's NBD server does not set TCP_NODELAY, REFERENCE-QEMU.md §4.7: its TCP figures are
  the reference as shipped, the unix ones show it without that defect).
* blockrep pair, general path (issue 15; --no-general-path leaves it out): the same pair with
  ``BLOCKREP_FAST_PATH=0`` in the environment of P and S, so the fast path of the common
  replicated write is measured against the general coroutine path and QEMU in one run.
* baselines, no replication: a blockrep export of a raw file (the baseline the issue asks for),
  plus P's quorum without its replication child, and the same two with QEMU.

The consumer writes to P through an NBD export of ``colo-disk0`` on a unix socket (nbd-server-start
+ nbd-server-add on P, both implementations), driven by fio's nbd engine. Measured:

* 1 MiB sequential writes at qd 8 over SIZE MiB right after a checkpoint (every cluster needs a
  copy-before-write on S), --seq-shots times with a checkpoint before each (median, min, max;
  single shots of identical code ranged 266-856 MiB/s, issue 15), then again over the same range
  without a checkpoint, --rewrite-shots times (a rewrite: no copies left to make);
* 4 KiB random writes at qd 32 over the same range for RUNTIME seconds, right after a checkpoint,
  --rand-shots times (median), and at qd 1, --qd1-shots times: a synchronous writer (a
  database's commits) sees each write's round trip through P and S, mean latency reported;
* next to each of these: CPU µs per consumer request of P, of S and of fio (bench/cpu.py:
  utime+stime of every thread over the shots, divided by the requests fio made; fio's from
  the children's rusage), and the machine's idle and stolen shares;
* checkpoint time with 0, SIZE/4 and SIZE MiB buffered (``xen-colo-do-checkpoint`` on S, then
  on P; the figure is the wall time of the S call, median of --repeats);
* failover time with SIZE/4 and SIZE MiB buffered, on a fresh pair each (S: nbd-server-stop, then
  xen-set-replication enable=false primary=false failover=true, until done: blockrep polls
  query-replication until the stage is "done", QEMU polls query-block until the image chain of
  childs0 no longer names active.qcow2). Afterwards S's secondary disk must equal the
  checkpointed contents (sha256) - a failover that loses data does not count as fast.

The setups of one link (blockrep, blockrep general path, QEMU, and the shared variant) run at
once and take the throughput shots in turn, round after round, the first of a round rotating,
so a machine that gets busier or quieter weighs on all alike; the baselines likewise among
themselves. Checkpoints and failovers are measured afterwards, one setup at a time (not for the
general path; --no-checkpoints / --no-failover leave them out, they belong to issue 5).

After every consumer run ``query-xen-replication-status`` is asked on P and S, because a
primary replication node reports forwarding errors as success to the consumer.

Results: OUT/NAME.json and OUT/NAME.md (--out, default bench/results; --name, default
replication), with every figure, the ratios blockrep/QEMU and issue 15's goals at the top. A shared-disk variant (issue 6) is prepared behind --shared; it runs the
seed's layout (SPEC.md §3) and records a failure instead of aborting while that mode is missing.

Run: .venv/bin/python bench/replication.py [--quick] [--size-mib 256] [--runtime 8]
     [--dir DIR] [--buffer-dir /dev/shm] [--repeats 3] [--links tcp,unix] [--shared]
     [--seq-shots 10] [--rewrite-shots 3] [--rand-shots 3] [--qd1-shots 3] [--no-general-path]
     [--no-checkpoints] [--no-failover] [--no-baselines] [--out DIR] [--name NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

from cpu import CpuMeter, children_cpu_s, per_request_us, total_per_request_us
from machine import (
    cpu_jiffies,
    describe,
    describe_steal,
    fresh_page_rate,
    idle_fraction,
    page_reporting,
    stolen_fraction,
)
from qemu.qmp import QMPClient

from blockrep.qcow2.create import create_file
from blockrep.testing import (
    drive_args,
    free_port,
    separate_primary_drives,
    separate_secondary_drives,
    start_replication,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

MiB = 1 << 20
QEMU = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none"]
_venv_py = os.path.join(ROOT, ".venv", "bin", "python")
BLOCKREP = [
    _venv_py if os.path.exists(_venv_py) else sys.executable,
    "-m",
    "blockrep.cli",
    "daemon",
]

QMP_TIMEOUT = 60.0  # any single QMP command
START_TIMEOUT = 30.0  # a daemon's QMP socket appearing
STOP_TIMEOUT = 15.0  # SIGTERM -> exit, then SIGKILL

LIVE: dict[
    int, subprocess.Popen
] = {}  # every process we started, by pid, for the last-resort cleanup


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(*args: str, timeout: float = 120) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=timeout).stdout


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# ---------------------------------------------------------------------------------------------
# processes and QMP


class Daemon:
    """One blockrep daemon or QEMU process with a QMP unix socket, stopped by pid."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        qmp_path: str,
        log_path: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.qmp_path = qmp_path
        self.log_path = log_path
        self.qmp: QMPClient | None = None
        if os.path.exists(qmp_path):
            os.unlink(qmp_path)
        self.logf = open(log_path, "wb")
        self.logf.write((" ".join(cmd) + "\n").encode())
        self.logf.flush()
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=self.logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env} if env else None,
        )
        LIVE[self.proc.pid] = self.proc
        self.killed = False

    async def connect(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            if os.path.exists(self.qmp_path):
                try:
                    c = QMPClient(self.name)
                    await asyncio.wait_for(c.connect(self.qmp_path), 10)
                    self.qmp = c
                    return
                except (TimeoutError, OSError, Exception):  # noqa: BLE001 - retried until deadline
                    if time.monotonic() > deadline:
                        raise
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name}: no QMP socket after {START_TIMEOUT}s: {self.tail()}"
                )
            await asyncio.sleep(0.05)

    async def run(
        self, name: str, args: dict[str, Any] | None = None, timeout: float = QMP_TIMEOUT
    ) -> Any:
        assert self.qmp is not None
        try:
            return await asyncio.wait_for(self.qmp.execute(name, args), timeout)
        except TimeoutError:
            raise TimeoutError(f"{self.name}: {name} took longer than {timeout}s") from None
        except Exception as e:
            raise RuntimeError(f"{self.name}: {name} {json.dumps(args)} failed: {e}") from e

    def tail(self, n: int = 3000) -> str:
        with contextlib.suppress(Exception):
            self.logf.flush()
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-n:]
        except OSError:
            return ""

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.disconnect(), 5)
            self.qmp = None
        p = self.proc
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)
            deadline = time.monotonic() + STOP_TIMEOUT
            while p.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if p.poll() is None:
                self.killed = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
        LIVE.pop(p.pid, None)
        with contextlib.suppress(Exception):
            self.logf.close()


def kill_leftovers() -> None:
    for pid, p in list(LIVE.items()):
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                p.wait(5)
        LIVE.pop(pid, None)


async def run_proc(cmd: list[str], timeout: float) -> tuple[int, str, str]:
    """Run a helper (fio) with a deadline; it is killed by pid on timeout or cancellation."""
    p = await asyncio.create_subprocess_exec(
        *cmd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        out, err = await asyncio.wait_for(p.communicate(), timeout)
    except TimeoutError:
        raise TimeoutError(f"{cmd[0]} took longer than {timeout:.0f}s: {' '.join(cmd)}") from None
    finally:
        if p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(p.wait(), 5)
    return p.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


# ---------------------------------------------------------------------------------------------
# fio through the consumer export


async def fio(uri: str, args: list[str], timeout: float) -> dict[str, Any]:
    cmd = ["fio", "--name=c", "--ioengine=nbd", f"--uri={uri}", "--output-format=json", *args]
    rc, out, err = await run_proc(cmd, timeout)
    if "{" not in out:
        raise RuntimeError(f"fio failed (rc {rc}): {err.strip()[-2000:]} {out.strip()[-2000:]}")
    job = json.loads(out[out.index("{") :])["jobs"][0]
    if rc != 0 or job.get("error"):
        raise RuntimeError(f"fio error {job.get('error')} (rc {rc}): {err.strip()[-2000:]}")
    w = job["write"]
    pct = w.get("clat_ns", {}).get("percentile", {})
    p99 = pct.get("99.000000")
    mean = w.get("clat_ns", {}).get("mean")
    return {
        "clat_mean_us": mean / 1e3 if mean is not None else None,
        "mib_s": w["bw"] / 1024.0,
        "iops": w["iops"],
        "io_mib": w["io_bytes"] / MiB,
        "runtime_s": w["runtime"] / 1000.0,
        "requests": int(w["total_ios"]),
        "clat_p99_ms": p99 / 1e6 if p99 is not None else None,
    }


async def fio_seq(uri: str, mib: int, fsync: bool) -> dict[str, Any]:
    args = ["--rw=write", "--bs=1M", "--iodepth=8", "--offset=0", f"--size={mib}M"]
    if fsync:
        args.append("--end_fsync=1")
    # 0.5 MiB/s is far below anything acceptable; beyond that something hangs
    return await fio(uri, args, timeout=120 + 2 * mib)


async def fio_rand(uri: str, mib: int, runtime: int, depth: int = 32) -> dict[str, Any]:
    args = [
        "--rw=randwrite",
        "--bs=4k",
        f"--iodepth={depth}",
        "--offset=0",
        f"--size={mib}M",
        "--time_based",
        f"--runtime={runtime}",
        "--randrepeat=1",
    ]
    return await fio(uri, args, timeout=runtime * 4 + 120)


# ---------------------------------------------------------------------------------------------
# images


class Images:
    """The raw disks (identical at the start) and the empty qcow2 buffers of one pair."""

    def __init__(self, data_dir: str, buf_dir: str, golden: str, size_mib: int) -> None:
        self.d = tempfile.mkdtemp(prefix="pair-", dir=data_dir)
        self.bd = tempfile.mkdtemp(prefix="buf-", dir=buf_dir)
        self.size = size_mib * MiB
        self.prim = os.path.join(self.d, "prim.raw")
        self.sec = os.path.join(self.d, "sec.raw")
        self.hidden = os.path.join(self.bd, "hidden.qcow2")
        self.active = os.path.join(self.bd, "active.qcow2")
        self.golden = golden

    async def make(self, raws: tuple[str, ...] = ("prim", "sec"), qcow2: bool = True) -> None:
        for r in raws:
            shutil.copyfile(self.golden, getattr(self, r))
        if qcow2:
            for q in (self.hidden, self.active):
                await create_file(q, self.size)

    def sock(self, name: str) -> str:
        return os.path.join(self.d, name)

    def remove(self) -> None:
        shutil.rmtree(self.d, ignore_errors=True)
        shutil.rmtree(self.bd, ignore_errors=True)


def make_golden(path: str, size_mib: int) -> str:
    """A non-zero, non-repeating-per-MiB raw image (written, not sparse), and its sha256."""
    h = hashlib.sha256()
    seed = hashlib.sha256(b"blockrep-bench").digest()
    with open(path, "wb") as f:
        for i in range(size_mib):
            block = hashlib.sha256(seed + i.to_bytes(4, "little")).digest() * (MiB // 32)
            f.write(block)
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# configurations


class Setup:
    """A running configuration: P (and S for replicated ones) with the consumer export on P."""

    impl: str  # "blockrep" | "qemu"
    replicated: bool
    shared: bool = False

    def __init__(self, impl: str, link: str | None, img: Images, general: bool = False) -> None:
        self.impl = impl
        self.link = link
        self.img = img
        # blockrep with its fast path switched off (BLOCKREP_FAST_PATH=0 on every process):
        # the general coroutine path, the reference the fast path is measured against
        self.general = general
        self.P: Daemon | None = None
        self.S: Daemon | None = None
        self.consumer_sock = img.sock("consumer.sock")
        self.consumer_export = "colo-disk0"

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.consumer_export}?socket={self.consumer_sock}"

    def daemon(self, role: str, args: list[str]) -> Daemon:
        qmp = self.img.sock(f"{role}.qmp")
        cmd = [
            *(BLOCKREP if self.impl == "blockrep" else QEMU),
            "-qmp",
            f"unix:{qmp},server=on,wait=off",
            *args,
        ]
        env = {"BLOCKREP_FAST_PATH": "0"} if self.general else None
        return Daemon(
            f"{self.impl}{'-general' if self.general else ''}-{role}",
            cmd,
            qmp,
            os.path.join(self.img.d, f"{role}.log"),
            env,
        )

    async def start(self) -> None:
        raise NotImplementedError

    async def polling(self) -> dict[str, Any]:
        """blockrep: each process's polling after I/O (x-blockrep-fast-path), by role."""
        if self.impl != "blockrep":
            return {}
        return {
            role: (await d.run("x-blockrep-fast-path"))["polling"]
            for role, d in (("P", self.P), ("S", self.S))
            if d is not None
        }

    def pids(self) -> dict[str, int]:
        """The processes whose CPU a shot is charged to, by role."""
        return {role: d.proc.pid for role, d in (("P", self.P), ("S", self.S)) if d is not None}

    async def export_consumer(self, device: str) -> None:
        assert self.P is not None
        self.consumer_export = device
        await self.P.run(
            "nbd-server-start", {"addr": {"type": "unix", "data": {"path": self.consumer_sock}}}
        )
        await self.P.run("nbd-server-add", {"device": device, "writable": True})

    async def stop(self) -> None:
        for d in (self.P, self.S):
            if d is not None:
                await d.stop()

    def killed(self) -> list[str]:
        return [d.name for d in (self.P, self.S) if d is not None and d.killed]

    def logs(self) -> str:
        return "\n".join(
            f"--- {d.name} log tail ---\n{d.tail(1500)}" for d in (self.P, self.S) if d is not None
        )


class Baseline(Setup):
    """No replication: a raw file ("raw"), or P's quorum without its replication child ("quorum")."""

    replicated = False

    def __init__(self, impl: str, layout: str, img: Images) -> None:
        super().__init__(impl, None, img)
        self.layout = layout

    async def start(self) -> None:
        await self.img.make(("prim",), qcow2=False)
        if self.layout == "raw":
            args = ["-drive", f"if=none,id=disk0,driver=raw,file.filename={self.img.prim}"]
            dev = "disk0"
        else:
            args = [
                "-drive",
                "if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,"
                f"children.0.file.filename={self.img.prim},children.0.driver=raw",
            ]
            dev = "colo-disk0"
        self.P = self.daemon("P", args)
        await self.P.connect()
        await self.export_consumer(dev)


class Pair(Setup):
    """Non-shared COLO pair, REFERENCE-QEMU.md §2, command lines and QMP sequence."""

    replicated = True

    def link_addrs(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(nbd-server-start addr on S, blockdev-add server on P)."""
        if self.link == "tcp":
            port = str(free_port())
            return (
                {"type": "inet", "data": {"host": "127.0.0.1", "port": port}},
                {"type": "inet", "host": "127.0.0.1", "port": port},
            )
        path = self.img.sock("link.sock")
        return {"type": "unix", "data": {"path": path}}, {"type": "unix", "path": path}

    async def start(self) -> None:
        i = self.img
        await i.make()
        self.S = self.daemon("S", drive_args(separate_secondary_drives(i.sec, i.active, i.hidden)))
        self.P = self.daemon("P", drive_args(separate_primary_drives(i.prim)))
        await self.S.connect()
        await self.P.connect()
        s_addr, p_server = self.link_addrs()
        await start_replication(self.P, self.S, shared=False, s_addr=s_addr, p_server=p_server)
        await self.check_status("start")
        await self.export_consumer("colo-disk0")

    async def check_status(self, step: str) -> None:
        """query-xen-replication-status on both: forwarding errors are invisible to the consumer."""
        for d in (self.S, self.P):
            assert d is not None
            st = await d.run("query-xen-replication-status")
            if st.get("error"):
                raise RuntimeError(f"{d.name} replication status after {step}: {st}")

    async def checkpoint(self) -> tuple[float, float]:
        assert self.S is not None and self.P is not None
        t0 = time.perf_counter()
        await self.S.run("xen-colo-do-checkpoint")
        t1 = time.perf_counter()
        await self.P.run("xen-colo-do-checkpoint")
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    async def buffered_info(self) -> dict[str, Any] | None:
        """blockrep only: what S holds in hidden/active (proves the buffering happened)."""
        if self.impl != "blockrep":
            return None
        assert self.S is not None
        nodes = await self.S.run("query-replication")
        return {
            n["node-name"]: {
                k: n.get(k)
                for k in (
                    "stage",
                    "epoch",
                    "hidden-allocated-bytes",
                    "active-allocated-bytes",
                    "clusters-copied",
                )
            }
            for n in nodes
        }

    # -- failover on S ----------------------------------------------------------------------------

    def chain_text(self, blocks: list[dict[str, Any]], device: str) -> str | None:
        for b in blocks:
            if b.get("device") == device or b.get("qdev") == device:
                return json.dumps(b.get("inserted", {}))
        return None

    async def failover(self, timeout: float, poll: float = 0.01) -> dict[str, Any]:
        assert self.S is not None
        S = self.S
        active_name = os.path.basename(self.img.active)
        if self.impl == "qemu":
            chain = self.chain_text(await S.run("query-block"), "childs0")
            if chain is None or active_name not in chain:
                raise RuntimeError(f"cannot detect the end of failover: childs0 chain is {chain}")
        if self.shared:
            # SPEC §3.5: P must be gone before S commits into the shared disk; it crashes here
            assert self.P is not None
            await self.P.stop(signal.SIGKILL)
        t0 = time.perf_counter()
        await S.run("nbd-server-stop")
        t_stop = time.perf_counter()
        await S.run(
            "xen-set-replication",
            {"enable": False, "primary": False, "failover": True},
            timeout=timeout,
        )
        t_call = time.perf_counter()
        deadline = t0 + timeout
        polls = 0
        final: Any = None
        while True:
            polls += 1
            if self.impl == "blockrep":
                nodes = await S.run("query-replication")
                stages = [n["stage"] for n in nodes]
                final = nodes
                if all(s in ("done", "failover-failed") for s in stages):
                    break
            else:
                chain = self.chain_text(await S.run("query-block"), "childs0")
                final = chain
                if chain is not None and active_name not in chain:
                    break
            if time.perf_counter() > deadline:
                raise TimeoutError(f"failover not done after {timeout}s: {final}")
            await asyncio.sleep(poll)
        t_done = time.perf_counter()
        out: dict[str, Any] = {
            "s": t_done - t0,
            "nbd_server_stop_s": t_stop - t0,
            "xen_set_replication_call_s": t_call - t_stop,
            "polls": polls,
        }
        if self.impl == "blockrep":
            out["stage"] = [n["stage"] for n in final]
            out["error"] = [n.get("error") for n in final if n.get("error")]
        else:
            out["stage"] = ["done"]
            out["status"] = await S.run("query-xen-replication-status")
        return out


class SharedPair(Pair):
    """Shared-disk pair (issue 6 hook): the seed's layout, SPEC.md §3, both on one raw file.

    Not implemented in blockrep yet; run with --shared. The consumer writes P's primary_disk0;
    the failover result is checked on the shared file itself."""

    shared = True

    async def start(self) -> None:
        i = self.img
        await i.make(("prim",))  # prim.raw is the shared disk
        self.S = self.daemon(
            "S",
            [
                "-drive",
                f"if=none,driver=qcow2,file.filename={i.hidden},id=hidden_disk0,"
                f"backing.driver=raw,backing.file.filename={i.prim}",
                "-drive",
                "if=none,id=active-disk0,driver=replication,mode=secondary,file.driver=qcow2,"
                f"top-id=active-disk0,file.file.filename={i.active},file.backing=hidden_disk0,shared-disk=on",
            ],
        )
        self.P = self.daemon(
            "P", ["-drive", f"if=none,id=primary_disk0,driver=raw,file.filename={i.prim}"]
        )
        await self.S.connect()
        await self.P.connect()
        s_addr, _ = self.link_addrs()
        # the seed's SocketAddressLegacy form on P too
        server = {"type": s_addr["type"], "data": s_addr["data"]}
        await start_replication(self.P, self.S, shared=True, s_addr=s_addr, p_server=server)
        await self.check_status("start")
        await self.export_consumer("primary_disk0")

    @property
    def result_disk(self) -> str:
        return self.img.prim


# ---------------------------------------------------------------------------------------------
# the measurements


class Bench:
    def __init__(self, args: argparse.Namespace, data_dir: str, buf_dir: str) -> None:
        self.a = args
        self.data_dir = data_dir
        self.buf_dir = buf_dir
        self.size = args.size_mib
        self.golden = os.path.join(data_dir, "golden.raw")
        log(f"writing the {self.size} MiB golden image")
        self.golden_sha = make_golden(self.golden, self.size)
        self.ckpt_sizes = sorted({0, max(1, self.size // 4), self.size})
        self.failover_sizes = sorted({max(1, self.size // 4), self.size})

    def images(self) -> Images:
        return Images(self.data_dir, self.buf_dir, self.golden, self.size)

    async def with_setup(
        self, make: Callable[[Images], Setup], body: Callable[[Setup], Any]
    ) -> Any:
        img = self.images()
        st = make(img)
        try:
            await st.start()
            return await body(st)
        except BaseException as e:
            if isinstance(e, Exception):
                e.args = (*e.args, st.logs())  # keep the daemons' own words with the failure
            raise
        finally:
            await st.stop()
            if st.killed():
                log(
                    f"WARNING: {st.killed()} did not exit on SIGTERM within {STOP_TIMEOUT}s, killed"
                )
            img.remove()

    async def shot(self, st: Setup, kind: str) -> dict[str, Any]:
        """One fio run on the consumer export, with the CPU of every process of the setup."""
        if isinstance(st, Pair) and kind in ("seq", "rand", "qd1"):
            await st.checkpoint()  # every cluster written next needs a copy-before-write on S
        polled = await st.polling()
        meter = CpuMeter(st.pids())
        jiffies = cpu_jiffies()
        consumer = children_cpu_s()
        meter.start()
        if kind == "rand":
            r = await fio_rand(st.uri, self.size, self.a.runtime)
        elif kind == "qd1":
            r = await fio_rand(st.uri, self.size, self.a.runtime, depth=1)
        else:
            r = await fio_seq(st.uri, self.size, self.a.fsync)
        r["cpu_s"] = {**meter.stop(), CONSUMER: children_cpu_s() - consumer}
        after = cpu_jiffies()
        r["steal"] = stolen_fraction(jiffies, after)
        r["idle"] = idle_fraction(jiffies, after)
        r["polled"] = polled_share(polled, await st.polling())
        r["cpu_us_per_req"] = per_request_us(r["cpu_s"], r["requests"])
        if isinstance(st, Pair):
            if kind == "seq":
                r["buffered"] = await st.buffered_info()
            await st.check_status(KIND_LABEL[kind])
        return r

    async def shots_in_turn(self, setups: dict[str, Setup], res: dict[str, dict[str, Any]]) -> None:
        """Each kind of shot, round after round, every setup taking its turn in each round.

        The first setup of a round rotates, so a machine that gets busier or quieter weighs
        on all alike. A setup whose shot fails leaves the rotation; the others go on."""
        kinds = [(k, n) for k, n in self.shot_counts() if n > 0]
        shots: dict[str, dict[str, list[dict[str, Any]]]] = {n: {} for n in setups}
        live = list(setups)
        for kind, count in kinds:
            for i in range(count):
                for name in rotated(live, i):
                    if name not in live:
                        continue
                    try:
                        r = await self.shot(setups[name], kind)
                    except asyncio.CancelledError:
                        raise
                    except Exception as e:  # noqa: BLE001 - one broken setup must not hide others
                        record_failure(res[name], e, setups[name])
                        live.remove(name)
                        continue
                    shots[name].setdefault(kind, []).append(r)
                    cpu = ", ".join(
                        f"{role} {fnum(v, ' us/req', 1)}" for role, v in r["cpu_us_per_req"].items()
                    )
                    value = (
                        f"{r['iops']:.0f} IOPS (p99 {r['clat_p99_ms'] or 0:.1f} ms)"
                        if kind == "rand"
                        else f"{r['iops']:.0f} IOPS (mean {r['clat_mean_us'] or 0:.0f} us)"
                        if kind == "qd1"
                        else f"{r['mib_s']:.0f} MiB/s"
                    )
                    steal, idle = (
                        "-" if r[k] is None else f"{100 * r[k]:.0f} %" for k in ("steal", "idle")
                    )
                    log(
                        f"  {name} {KIND_LABEL[kind]} shot {i + 1}/{count}: {value}; CPU {cpu}; "
                        f"host steal {steal}, idle {idle}"
                    )
        for name, by_kind in shots.items():
            for kind, xs in by_kind.items():
                res[name][KIND_KEY[kind]] = summarise(xs)
            if "seq" in by_kind:
                res[name]["buffered_after_seq_write"] = by_kind["seq"][-1].get("buffered")

    def shot_counts(self) -> list[tuple[str, int]]:
        return [
            ("seq", self.a.seq_shots),
            ("rewrite", self.a.rewrite_shots),
            ("rand", self.a.rand_shots),
            ("qd1", self.a.qd1_shots),
        ]

    async def checkpoints(self, st: Pair, res: dict[str, Any]) -> None:
        out = []
        for buf in self.ckpt_sizes:
            row: dict[str, Any] = {
                "buffered_mib": buf,
                "s_ms": [],
                "p_ms": [],
                "fill": [],
                "buffered": [],
            }
            for _ in range(self.a.repeats):
                await st.checkpoint()
                if buf:
                    row["fill"].append(await fio_seq(st.uri, buf, self.a.fsync))
                    await st.check_status(f"buffering {buf} MiB")
                info = await st.buffered_info()
                if info is not None:
                    row["buffered"].append(info)
                ts, tp = await st.checkpoint()
                row["s_ms"].append(ts * 1000)
                row["p_ms"].append(tp * 1000)
            await st.check_status("checkpoints")
            row["s_ms_median"] = median(row["s_ms"])
            row["p_ms_median"] = median(row["p_ms"])
            log(
                f"  checkpoint with {buf} MiB buffered: S {row['s_ms_median']:.1f} ms "
                f"(all {', '.join(f'{x:.1f}' for x in row['s_ms'])}), P {row['p_ms_median']:.1f} ms"
            )
            out.append(row)
        res["checkpoint"] = out

    async def one_failover(self, make: Callable[[Images], Setup], buf: int) -> dict[str, Any]:
        async def body(st: Setup) -> dict[str, Any]:
            assert isinstance(st, Pair)
            await st.checkpoint()
            fill = await fio_seq(st.uri, buf, self.a.fsync)
            await st.check_status(f"buffering {buf} MiB")
            info = await st.buffered_info()
            r = await st.failover(self.a.timeout)
            r.update(
                {
                    "buffered_mib": buf,
                    "fill": fill,
                    "buffered": info,
                    "commit_mib_s": buf / r["s"] if r["s"] > 0 else None,
                }
            )
            await st.stop()  # flush and close before reading the result
            disk = st.result_disk if isinstance(st, SharedPair) else st.img.sec
            r["result_sha256_ok"] = sha256_file(disk) == self.golden_sha
            # a failover that did not finish, or lost data, is not a time to compare
            r["valid"] = r["result_sha256_ok"] and all(x == "done" for x in r["stage"])
            if not r["valid"]:
                r["commit_mib_s_if_valid"] = r["commit_mib_s"]
                r["commit_mib_s"] = None
            return r

        r = await self.with_setup(make, body)
        log(
            f"  failover with {buf} MiB buffered: {r['s'] * 1000:.0f} ms ({fnum(r['commit_mib_s'])} MiB/s), "
            f"stage {r['stage']}, secondary disk = checkpoint: {r['result_sha256_ok']}"
            + ("" if r["valid"] else f"  INVALID: {r.get('error') or ''}")
        )
        return r

    async def run_group(
        self, plan: list[tuple[str, Callable[[Images], Setup]]]
    ) -> dict[str, dict[str, Any]]:
        """Start every setup of the group, take the throughput shots in turn, then checkpoints
        on each pair; failovers afterwards, each on a fresh pair."""
        log("== " + ", ".join(name for name, _ in plan))
        t0 = time.monotonic()
        res: dict[str, dict[str, Any]] = {name: {"name": name} for name, _ in plan}
        setups: dict[str, Setup] = {}
        try:
            for name, make in plan:
                st = make(self.images())
                try:
                    await st.start()
                except asyncio.CancelledError:
                    await self.close(st)
                    raise
                except Exception as e:  # noqa: BLE001 - one broken setup must not hide others
                    record_failure(res[name], e, st)
                    await self.close(st)
                    continue
                setups[name] = st
                res[name].update(
                    impl=st.impl, link=st.link, replicated=st.replicated, general=st.general
                )
            await self.shots_in_turn(setups, res)
            for name, st in setups.items():
                if not (self.a.checkpoints and isinstance(st, Pair)) or st.general:
                    continue
                if res[name].get("failed"):
                    continue
                log(f"== {name}: checkpoints")
                try:
                    await self.checkpoints(st, res[name])
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001
                    record_failure(res[name], e, st)
        finally:
            for st in setups.values():
                await self.close(st)
        for name, make in plan:
            r = res[name]
            if not (self.a.failover and r.get("replicated")) or r.get("general"):
                continue
            if r.get("failed"):
                continue
            log(f"== {name}: failover")
            try:
                r["failover"] = [await self.one_failover(make, buf) for buf in self.failover_sizes]
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                record_failure(r, e, None)
        for r in res.values():
            r["group_wall_s"] = time.monotonic() - t0
        return res

    async def close(self, st: Setup) -> None:
        await st.stop()
        if st.killed():
            log(f"WARNING: {st.killed()} did not exit on SIGTERM within {STOP_TIMEOUT}s, killed")
        st.img.remove()


def record_failure(res: dict[str, Any], e: BaseException, st: Setup | None) -> None:
    """Keep the failure, the daemons' own words and the traceback in the result."""
    logs = st.logs() if st is not None else ""
    if not logs and len(e.args) > 1 and isinstance(e.args[-1], str):
        logs = e.args[-1]  # with_setup appended them
    res["failed"] = f"{type(e).__name__}: {e.args[0] if e.args else e}"
    res["failed_logs"] = logs
    res["traceback"] = traceback.format_exc()
    log(f"  {res['name']} FAILED: {res['failed']}")
    if logs:
        print(logs, flush=True)


def rotated(xs: list[str], i: int) -> list[str]:
    k = i % len(xs) if xs else 0
    return xs[k:] + xs[:k]


# the consumer's role in the CPU figures (fio, nbd engine: its CPU shares the machine's)
CONSUMER = "fio"
KIND_LABEL = {
    "seq": "seq write",
    "rewrite": "seq rewrite",
    "rand": "random writes",
    "qd1": "random writes qd1",
}
KIND_KEY = {
    "seq": "seq_write",
    "rewrite": "seq_rewrite",
    "rand": "randwrite_4k_qd32",
    "qd1": "randwrite_4k_qd1",
}


def polled_share(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float | None]:
    """Of the arrivals each process saw during a shot, the share that found its loop
    polling (blockrep/polling.py)."""
    out: dict[str, float | None] = {}
    for role, a in after.items():
        b = before.get(role) or {}
        events = a["events"] - b.get("events", 0)
        caught = a["events-while-polling"] - b.get("events-while-polling", 0)
        out[role] = caught / events if events > 0 else None
    return out


def summarise(shots: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and range of the shots' figures; CPU per request over all of them."""
    out: dict[str, Any] = {"shots": shots, "n": len(shots)}
    for k in ("mib_s", "iops"):
        xs = [s[k] for s in shots]
        out[k], out[f"{k}_min"], out[f"{k}_max"] = median(xs), min(xs), max(xs)
    out["clat_p99_ms"] = median([s["clat_p99_ms"] for s in shots if s.get("clat_p99_ms")])
    out["requests"] = sum(s["requests"] for s in shots)
    out["cpu_us_per_req"] = total_per_request_us(shots)
    roles_polled = sorted({r for s in shots for r in s.get("polled") or {}})
    out["polled_median"] = {
        r: median([v for s in shots if (v := (s.get("polled") or {}).get(r)) is not None])
        for r in roles_polled
    }
    roles = sorted({r for s in shots for r in s["cpu_us_per_req"]})
    out["cpu_us_per_req_median"] = {
        r: median([v for s in shots if (v := s["cpu_us_per_req"].get(r)) is not None])
        for r in roles
    }
    return out


# ---------------------------------------------------------------------------------------------
# report


def shot_share(
    results: dict[str, Any], share: str, key: str | None = None, config: str | None = None
) -> list[float | None]:
    """The host steal or idle (``share``) of every throughput shot of the run (of one kind
    with ``key``, of one setup with ``config``)."""
    out: list[float | None] = []
    for name, res in results.get("configs", {}).items():
        if config is not None and name != config:
            continue
        for k in KIND_KEY.values():
            if key is None or k == key:
                out += [s.get(share) for s in g(res, k, "shots") or []]
    return out


def ceiling(results: dict[str, Any], links: list[str]) -> dict[str, Any]:
    """4 KiB random writes: the IOPS at which the machine's CPUs would all be busy, at the
    CPU each request cost every process (P, S and the consumer), per setup and link.

    No saving in waiting takes a setup above it; only less CPU per request does. Next
    to it, the idle share of the setup's shots: how far below it the setup ran."""
    cpus = results["machine"]["cpus"]
    out: dict[str, Any] = {}
    for link in links:
        row: dict[str, Any] = {}
        for impl in ("blockrep", "qemu"):
            name = f"{impl}-{link}"
            s = g(results["configs"].get(name), "randwrite_4k_qd32")
            cpu = (s or {}).get("cpu_us_per_req") or {}
            if not cpu or any(v is None for v in cpu.values()):
                continue
            per_req = sum(cpu.values())
            idle = [
                x for x in shot_share(results, "idle", "randwrite_4k_qd32", name) if x is not None
            ]
            row[impl] = {
                "cpu_us_per_req": per_req,
                "ceiling_iops": cpus * 1e6 / per_req,
                "iops": s["iops"],
                "idle_median": statistics.median(idle) if idle else None,
            }
        if "blockrep" in row and "qemu" in row:
            row["blockrep_ceiling_over_qemu"] = ratio(
                row["blockrep"]["ceiling_iops"], row["qemu"]["iops"]
            )
        out[link] = row
    return out


def g(d: dict[str, Any] | None, *path: Any) -> Any:
    for p in path:
        if d is None:
            return None
        if isinstance(p, int):
            d = d[p] if isinstance(d, list) and p < len(d) else None
        else:
            d = d.get(p) if isinstance(d, dict) else None
    return d


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fnum(x: float | None, unit: str = "", prec: int = 0) -> str:
    return "-" if x is None else f"{x:.{prec}f}{unit}"


def frat(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


THROUGHPUT = [
    ("seq write 1M qd8 after checkpoint (MiB/s)", ("seq_write", "mib_s")),
    ("seq rewrite 1M qd8 (MiB/s)", ("seq_rewrite", "mib_s")),
    ("rand write 4k qd32 (IOPS)", ("randwrite_4k_qd32", "iops")),
    ("rand write 4k qd1 (IOPS)", ("randwrite_4k_qd1", "iops")),
]


# issue 15's targets: (throughput row, ratio over the QEMU pair); judged on the unix link, the
# issue's case (QEMU 7.2's NBD server lacks TCP_NODELAY, which would flatter blockrep on TCP)
ISSUE15_GOALS = [
    ("replicated 4 KiB random write qd32", "rand write 4k qd32 (IOPS)", 2.0),
    ("1 MiB sequential write after a checkpoint", "seq write 1M qd8 after checkpoint (MiB/s)", 1.5),
]
ISSUE15_LINK = "unix"


def issue15_goals(results: dict[str, Any], links: list[str]) -> dict[str, Any]:
    fast = results["ratios_blockrep_over_qemu"]
    general = results["ratios_general_path_over_qemu"]
    out: dict[str, Any] = {}
    for what, label, target in ISSUE15_GOALS:
        r = g(fast, ISSUE15_LINK, label)
        out[f"{what}, {ISSUE15_LINK} link, >= {target}x the QEMU pair"] = {
            "ratio": r,
            "general_path_ratio": g(general, ISSUE15_LINK, label),
            "other_links": {k: g(fast, k, label) for k in links if k != ISSUE15_LINK},
            "target": target,
            "met": None if r is None else r >= target,
        }
    return out


def analyse(results: dict[str, Any], links: list[str]) -> None:
    c = results["configs"]
    ratios: dict[str, Any] = {}
    goals: dict[str, Any] = {}
    for link in links:
        b, q = c.get(f"blockrep-{link}"), c.get(f"qemu-{link}")
        r: dict[str, Any] = {}
        for label, path in THROUGHPUT:
            r[label] = ratio(g(b, *path), g(q, *path))
        for i, row in enumerate(g(b, "checkpoint") or []):
            r[f"checkpoint {row['buffered_mib']} MiB (time)"] = ratio(
                row["s_ms_median"], g(q, "checkpoint", i, "s_ms_median")
            )
        for i, row in enumerate(g(b, "failover") or []):
            qrow = g(q, "failover", i) or {}
            both = bool(row.get("valid") and qrow.get("valid"))
            r[f"failover {row['buffered_mib']} MiB (time)"] = (
                ratio(row["s"], qrow.get("s")) if both else None
            )
            r[f"failover {row['buffered_mib']} MiB (commit rate)"] = (
                ratio(row["commit_mib_s"], qrow.get("commit_mib_s")) if both else None
            )
        ratios[link] = r
    results["ratios_blockrep_over_qemu"] = ratios
    results["ratios_general_path_over_qemu"] = {
        link: {
            label: ratio(
                g(c.get(f"blockrep-general-{link}"), *path), g(c.get(f"qemu-{link}"), *path)
            )
            for label, path in THROUGHPUT
        }
        for link in links
    }
    results["goals_issue15"] = issue15_goals(results, links)
    results["ceiling_4k"] = ceiling(results, links)
    # goals of issue 5
    tcp = ratios.get("tcp", {})
    # issue 5's cases: the queue-depth-1 row came later (issue 15)
    tp = {label: tcp.get(label) for label, _ in THROUGHPUT if "qd1" not in label}
    goals["P throughput >= 2x QEMU pair on TCP"] = {
        "ratios": tp,
        "met": (
            all(v is not None and v >= 2.0 for v in tp.values())
            if any(v is not None for v in tp.values())
            else None
        ),
    }
    ck: dict[str, Any] = {}
    for link in links:
        rows = g(c.get(f"blockrep-{link}"), "checkpoint") or []
        ck[link] = {str(r["buffered_mib"]): r["s_ms_median"] for r in rows}
    vals = [v for d in ck.values() for v in d.values() if v is not None]
    flat = []
    for d in ck.values():
        xs = [v for v in d.values() if v is not None]
        if xs:
            flat.append(max(xs) <= max(2.0 * min(xs), min(xs) + 2.0))
    goals["checkpoint <= 10 ms and flat in the buffered size"] = {
        "ms": ck,
        "max_ms": max(vals) if vals else None,
        "met": (max(vals) <= 10.0 and all(flat)) if vals else None,
        "flat_rule": "largest median <= max(2 x smallest, smallest + 2 ms), per link",
    }
    cr: dict[str, Any] = {}
    verdicts = []
    for link in links:
        b, q = c.get(f"blockrep-{link}"), c.get(f"qemu-{link}")
        for i, qrow in enumerate(g(q, "failover") or []):
            brow = g(b, "failover", i)
            if not qrow.get("valid") or brow is None:
                continue  # nothing to compare against
            key = f"{link} {qrow['buffered_mib']} MiB"
            if not brow.get("valid"):
                cr[key] = "blockrep failover invalid"
                verdicts.append(False)
            else:
                cr[key] = ratio(brow["commit_mib_s"], qrow["commit_mib_s"])
                verdicts.append(cr[key] is not None and cr[key] >= 1.0)
    goals["commit at least QEMU's rate"] = {
        "ratios": cr,
        "met": all(verdicts) if verdicts else None,
    }
    results["goals"] = goals


def fo_state(r: dict[str, Any]) -> str:
    if not r:
        return "-"
    if r.get("valid"):
        return "ok"
    err = "; ".join(str(e).splitlines()[0] for e in r.get("error") or [])
    data = "ok" if r.get("result_sha256_ok") else "wrong"
    return f"INVALID: stage {','.join(r.get('stage', []))}, data {data}" + (
        f", {err}" if err else ""
    )


def fcell(s: dict[str, Any] | None, key: str) -> str:
    """A throughput figure: the median, and the range when there were several shots."""
    if not s or s.get(key) is None:
        return "-"
    if s.get("n", 1) > 1:
        return f"{s[key]:.0f} [{s[f'{key}_min']:.0f}-{s[f'{key}_max']:.0f}]"
    return f"{s[key]:.0f}"


def fcpu(s: dict[str, Any] | None) -> str:
    """CPU µs per consumer request of each process, "P x / S y"."""
    cpu = (s or {}).get("cpu_us_per_req") or {}
    return " / ".join(f"{role} {fnum(v, '', 1)}" for role, v in cpu.items()) or "-"


def ceiling_lines(results: dict[str, Any], links: list[str]) -> list[str]:
    """The 4 KiB machine ceiling (``ceiling``), a line per link."""
    cpus = results["machine"]["cpus"]
    L = [
        f"4 KiB random write, the machine's ceiling: {cpus} CPUs / the CPU µs per request of "
        f"P + S + {CONSUMER}, the IOPS with every CPU busy and none idle (the idle share is the "
        "median over the setup's shots, /proc/stat):"
    ]
    for link, row in (results.get("ceiling_4k") or {}).items():
        cells = [
            f"{impl} {v['cpu_us_per_req']:.1f} µs -> {v['ceiling_iops']:.0f} IOPS "
            f"(measured {v['iops']:.0f}, idle {fnum(pct(v['idle_median']), ' %')})"
            for impl, v in row.items()
            if isinstance(v, dict)
        ]
        if "blockrep_ceiling_over_qemu" in row:
            cells.append(
                f"blockrep's ceiling / the QEMU pair's measured IOPS "
                f"{frat(row['blockrep_ceiling_over_qemu'])}x"
            )
        L.append(f"* {link}: " + "; ".join(cells))
    return L


def polling_lines(results: dict[str, Any], links: list[str]) -> list[str]:
    """blockrep's polling after I/O: the share of arrivals that found each loop polling."""
    L = [
        "blockrep's loops poll after I/O (blockrep/polling.py, default settings): the share "
        "of the requests' and replies' arrivals that found the process polling, median over "
        "the shots:"
    ]
    for link in links:
        for name in (f"blockrep-{link}", f"blockrep-general-{link}"):
            res = results["configs"].get(name)
            cells = []
            for label, path in THROUGHPUT:
                polled = (g(res, path[0]) or {}).get("polled_median") or {}
                if polled:
                    shares = " / ".join(f"{r} {fnum(pct(v), ' %')}" for r, v in polled.items())
                    cells.append(f"{label.split(' (')[0]} {shares}")
            if cells:
                L.append(f"* {name}: " + "; ".join(cells))
    return L


def pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def markdown(results: dict[str, Any], links: list[str]) -> str:
    c = results["configs"]
    m = results["machine"]
    a = results["args"]
    L = [
        "# Replication benchmark: blockrep pair vs QEMU 7.2 pair vs unreplicated (same run)",
        "",
        "## Goals (issue 15)",
        "",
    ]
    for name, gl in results["goals_issue15"].items():
        met = {True: "**met**", False: "**not met**", None: "not measured"}[gl["met"]]
        gp = gl["general_path_ratio"]
        extra = [f"general path {frat(gp)}x" if gp is not None else "general path not run"]
        extra += [f"{k} link {frat(v)}x" for k, v in gl["other_links"].items()]
        L.append(f"* {name}: {met} ({frat(gl['ratio'])}x; {', '.join(extra)})")
    L += [
        "",
        f"{results['qemu_version']}; {results['fio_version']}; Python {m['python']}; {m['cpus']} CPUs; "
        f"load average at start {m['loadavg_start']}, at end {m.get('loadavg_end')}; blockrep {results['blockrep_rev']}.",
        f"Memory: {describe(m.get('page_reporting_start'), m.get('page_reporting_end'))}; "
        f"1 MiB writes into fresh pages of the buffer directory at the start: "
        f"{m.get('fresh_page_mib_s')} MiB/s (bench/machine.py).",
        f"Host steal (time the hypervisor ran something else while a vCPU wanted to run, "
        f"/proc/stat, all CPUs) during the 4 KiB random write shots: "
        f"{describe_steal(shot_share(results, 'steal', 'randwrite_4k_qd32'))}; during every shot: "
        f"{describe_steal(shot_share(results, 'steal'))}.",
        f"Disk {a['size_mib']} MiB raw (written, not sparse) in `{a['dir_kind']}`, hidden/active in `{a['buffer_dir_kind']}`; "
        f"random writes {a['runtime']} s; checkpoint figures are medians of {a['repeats']}; "
        f"end_fsync={'on' if a['fsync'] else 'off'}{'; QUICK run (small sizes)' if a['quick'] else ''}.",
        "The consumer (fio, nbd engine) writes to P through an NBD export of colo-disk0 on a unix socket; "
        '"link" is the replication link P -> S (S\'s NBD server, export parent0). '
        "QEMU 7.2's NBD server lacks TCP_NODELAY (REFERENCE-QEMU.md §4.7), which its TCP figures include.",
        "",
        "## P throughput",
        "",
        f"All setups of a link run at once and take their shots in turn (the first of each round "
        f"rotates): sequential write after a checkpoint {a['seq_shots']} shots (a checkpoint before "
        f"each), rewrite {a['rewrite_shots']}, 4 KiB random write {a['rand_shots']} at queue depth 32 "
        f"and {a.get('qd1_shots', 0)} at depth 1 (a checkpoint "
        "before each). Figures: median [min-max]. CPU: µs per consumer request of P, of S and "
        f"of the consumer ({CONSUMER}; utime+stime of all threads over all shots / the requests "
        "fio made). "
        + (
            '"general path": blockrep with BLOCKREP_FAST_PATH=0 on P and S.'
            if a["general_path"]
            else "The general-path column was not run (--no-general-path)."
        ),
        "",
        "| link | case | blockrep | CPU µs/req | blockrep general path | CPU µs/req | QEMU pair "
        "| CPU µs/req | blockrep / QEMU | general / QEMU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in links:
        b, gp, q = (c.get(f"{v}-{k}") for v in ("blockrep", "blockrep-general", "qemu"))
        for label, path in THROUGHPUT:
            sb, sg, sq = (g(x, path[0]) for x in (b, gp, q))
            L.append(
                f"| {k} | {label} | {fcell(sb, path[1])} | {fcpu(sb)} | {fcell(sg, path[1])} | "
                f"{fcpu(sg)} | {fcell(sq, path[1])} | {fcpu(sq)} | "
                f"{frat(ratio(g(b, *path), g(q, *path)))} | {frat(ratio(g(gp, *path), g(q, *path)))} |"
            )
    L += ["", *ceiling_lines(results, links), "", *polling_lines(results, links)]
    bases = [
        ("blockrep-raw", "blockrep raw"),
        ("blockrep-quorum", "blockrep quorum"),
        ("qemu-raw", "QEMU raw"),
        ("qemu-quorum", "QEMU quorum"),
    ]
    if any(c.get(n) for n, _ in bases):
        L += [
            "",
            "Unreplicated (no S: a raw file, or P's quorum without its replication child); "
            "cells: median [min-max], CPU µs/req of P.",
            "",
            "| case | " + " | ".join(t for _, t in bases) + " |",
            "|---|" + "---|" * len(bases),
        ]
        for label, path in THROUGHPUT:
            cells = []
            for n, _ in bases:
                s = g(c.get(n), path[0])
                cells.append(f"{fcell(s, path[1])}, {fcpu(s)}" if s else "-")
            L.append(f"| {label.replace(' after checkpoint', '')} | " + " | ".join(cells) + " |")
    L += [
        "",
        "Replication cost, blockrep P / blockrep unreplicated raw: "
        + "; ".join(
            f"{k} {label.split(' (')[0]} {frat(ratio(g(c.get(f'blockrep-{k}'), *path), g(c.get('blockrep-raw'), *path)))}"
            for k in links
            for label, path in THROUGHPUT
        ),
    ]
    L += ["", "## Goals (issue 5)", ""]
    for name, gl in results["goals"].items():
        met = {True: "**met**", False: "**not met**", None: "not measured"}[gl["met"]]
        L.append(f"* {name}: {met}")
    L += [
        "",
        "## Checkpoint (wall time of xen-colo-do-checkpoint on S; median)",
        "",
        "| link | buffered | blockrep S | QEMU S | ratio | blockrep P | QEMU P | blockrep hidden after buffering |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in links:
        brows = g(c.get(f"blockrep-{k}"), "checkpoint") or []
        qrows = g(c.get(f"qemu-{k}"), "checkpoint") or []
        for i in range(max(len(brows), len(qrows))):
            b = brows[i] if i < len(brows) else {}
            q = qrows[i] if i < len(qrows) else {}
            buf = b.get("buffered_mib", q.get("buffered_mib"))
            hid = g(b, "buffered", 0)
            hid_mib = None
            if hid:
                hid_mib = sum((v.get("hidden-allocated-bytes") or 0) for v in hid.values()) / MiB
            L.append(
                f"| {k} | {buf} MiB | {fnum(b.get('s_ms_median'), ' ms', 1)} | {fnum(q.get('s_ms_median'), ' ms', 1)} | "
                f"{frat(ratio(b.get('s_ms_median'), q.get('s_ms_median')))} | {fnum(b.get('p_ms_median'), ' ms', 1)} | "
                f"{fnum(q.get('p_ms_median'), ' ms', 1)} | {fnum(hid_mib, ' MiB', 1)} |"
            )
    L += [
        "",
        "## Failover on S (nbd-server-stop + xen-set-replication failover, until done)",
        "",
        "| link | buffered | blockrep time | QEMU time | time ratio | blockrep commit MiB/s | QEMU commit MiB/s | rate ratio | stage done and disk = checkpoint (blockrep / QEMU) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in links:
        brows = g(c.get(f"blockrep-{k}"), "failover") or []
        qrows = g(c.get(f"qemu-{k}"), "failover") or []
        for i in range(max(len(brows), len(qrows))):
            b = brows[i] if i < len(brows) else {}
            q = qrows[i] if i < len(qrows) else {}
            buf = b.get("buffered_mib", q.get("buffered_mib"))
            bs = b.get("s")
            qs = q.get("s")
            L.append(
                f"| {k} | {buf} MiB | {fnum(bs and bs * 1000, ' ms')} | {fnum(qs and qs * 1000, ' ms')} | "
                f"{frat(ratio(bs, qs))} | {fnum(b.get('commit_mib_s'))} | {fnum(q.get('commit_mib_s'))} | "
                f"{frat(ratio(b.get('commit_mib_s'), q.get('commit_mib_s')))} | "
                f"{fo_state(b)} / {fo_state(q)} |"
            )
    shared = [v for n, v in c.items() if n.startswith("blockrep-shared")]
    L += ["", "## Shared-disk variant (issue 6)", ""]
    if not shared:
        L.append("Not run (pass --shared; it needs shared-disk mode, SPEC.md §3).")
    else:
        L.append(
            "P writes its own disk (the shared file) after S acknowledged the pre-image; "
            "before each failover P is killed (SIGKILL), as SPEC.md §3.5 requires."
        )
        for v in shared:
            if v.get("failed"):
                L.append(f"* {v['name']}: failed: {v['failed'].splitlines()[0][:300]}")
        ok = [v for v in shared if not v.get("failed")]
        lk = [v["link"] for v in ok]
        L += [
            "",
            "| case | "
            + " | ".join(f"shared {k} | non-shared {k} | shared / non-shared {k}" for k in lk)
            + " | unreplicated raw |",
            "|---|" + "---|---|---|" * len(lk) + "---|",
        ]
        for label, path in THROUGHPUT:
            cells = [label]
            for v in ok:
                ns = g(c.get(f"blockrep-{v['link']}"), *path)
                cells += [fnum(g(v, *path)), fnum(ns), frat(ratio(g(v, *path), ns))]
            cells.append(fnum(g(c.get("blockrep-raw"), *path)))
            L.append("| " + " | ".join(cells) + " |")
        for v in ok:
            for r in v.get("checkpoint", []):
                L.append(
                    f"| {v['link']}: checkpoint, {r['buffered_mib']} MiB buffered (S) | "
                    f"{fnum(r['s_ms_median'], ' ms', 1)} |" + " |" * (3 * len(lk) - 1)
                )
            for r in v.get("failover", []):
                L.append(
                    f"| {v['link']}: failover, {r['buffered_mib']} MiB buffered | "
                    f"{fnum(r['s'] * 1000, ' ms')} ({fo_state(r)}) |" + " |" * (3 * len(lk) - 1)
                )
    failed = [
        v for v in c.values() if v.get("failed") and not v["name"].startswith("blockrep-shared")
    ]
    if failed:
        L += ["", "## Failures", ""]
        for v in failed:
            L.append(f"* {v['name']}: {v['failed'].splitlines()[0][:500]}")
    detail = {**results["goals_issue15"], **results["goals"]}
    L += ["", "## Goals in detail", "", "```", json.dumps(detail, indent=1), "```"]
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------------------------------------


async def amain(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, task.cancel)

    data_dir = tempfile.mkdtemp(prefix="blockrep-replbench-", dir=args.dir)
    buf_dir = (
        tempfile.mkdtemp(prefix="blockrep-replbench-buf-", dir=args.buffer_dir)
        if args.buffer_dir
        else data_dir
    )
    links = [x for x in args.links.split(",") if x]
    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "page_reporting_start": page_reporting(),
            "fresh_page_mib_s": round(fresh_page_rate(buf_dir)),
        },
        "qemu_version": sh("qemu-system-x86_64", "--version").splitlines()[0],
        "fio_version": sh("fio", "--version").strip(),
        "blockrep_rev": subprocess.run(
            ["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True
        ).stdout.strip()
        or "?",
        "args": {
            "size_mib": args.size_mib,
            "runtime": args.runtime,
            "repeats": args.repeats,
            "quick": args.quick,
            "fsync": args.fsync,
            "links": links,
            "dir_kind": os.path.dirname(data_dir),
            "buffer_dir_kind": os.path.dirname(buf_dir)
            if args.buffer_dir
            else os.path.dirname(data_dir),
            "timeout_s": args.timeout,
            "seq_shots": args.seq_shots,
            "rewrite_shots": args.rewrite_shots,
            "rand_shots": args.rand_shots,
            "qd1_shots": args.qd1_shots,
            "general_path": args.general_path,
            "checkpoints": args.checkpoints,
            "failover": args.failover,
        },
        "configs": {},
    }
    t0 = time.monotonic()
    try:
        bench = Bench(args, data_dir, buf_dir)
        groups: list[list[tuple[str, Callable[[Images], Setup]]]] = []
        impls = [x for x in args.impls.split(",") if x]
        for link in links:
            # the setups of one link run at once and take their shots in turn
            group: list[tuple[str, Callable[[Images], Setup]]] = []
            for impl in impls:
                group.append(
                    (f"{impl}-{link}", lambda img, impl=impl, link=link: Pair(impl, link, img))
                )
                if impl == "blockrep" and args.general_path:
                    group.append(
                        (
                            f"blockrep-general-{link}",
                            lambda img, link=link: Pair("blockrep", link, img, general=True),
                        )
                    )
            if args.shared:
                group.append(
                    (
                        f"blockrep-shared-{link}",
                        lambda img, link=link: SharedPair("blockrep", link, img),
                    )
                )
            groups.append(group)
        if args.baselines:
            groups.append(
                [
                    (
                        f"{impl}-{layout}",
                        lambda img, impl=impl, layout=layout: Baseline(impl, layout, img),
                    )
                    for impl in impls
                    for layout in ("raw", "quorum")
                ]
            )
        for group in groups:
            results["configs"].update(await bench.run_group(group))
    finally:
        kill_leftovers()
        shutil.rmtree(data_dir, ignore_errors=True)
        if buf_dir != data_dir:
            shutil.rmtree(buf_dir, ignore_errors=True)
    results["wall_s"] = time.monotonic() - t0
    results["machine"]["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results["machine"]["page_reporting_end"] = page_reporting()
    analyse(results, links)
    md = markdown(results, links)
    out_dir = args.out
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{args.name}.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out_dir, f"{args.name}.md"), "w") as f:
        f.write(md)
    print(md)
    log(f"wrote {out_dir}/{args.name}.json and .md in {results['wall_s']:.0f} s")
    return (
        1
        if any(
            v.get("failed") and not v["name"].startswith("blockrep-shared")
            for v in results["configs"].values()
        )
        else 0
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 32 MiB, 2 s random writes, 1 repeat, 3 sequential shots, 1 of the others",
    )
    ap.add_argument(
        "--size-mib",
        type=int,
        default=None,
        help="disk size = sequential write size = largest buffered size (256)",
    )
    ap.add_argument("--runtime", type=int, default=None, help="seconds of 4 KiB random writes (8)")
    ap.add_argument(
        "--repeats", type=int, default=None, help="checkpoints measured per buffered size (3)"
    )
    ap.add_argument(
        "--dir",
        default=None,
        help="where the raw images go (a temp dir is made inside; default $TMPDIR)",
    )
    ap.add_argument(
        "--buffer-dir",
        default=None,
        help="where hidden/active qcow2 go, e.g. /dev/shm (default: --dir)",
    )
    ap.add_argument("--links", default="tcp,unix", help="replication links to measure")
    ap.add_argument("--impls", default="blockrep,qemu", help="implementations to measure")
    ap.add_argument(
        "--no-baselines", dest="baselines", action="store_false", help="skip the unreplicated runs"
    )
    ap.add_argument(
        "--shared", action="store_true", help="also run the shared-disk variant (issue 6)"
    )
    ap.add_argument(
        "--fsync", action="store_true", help="end every sequential fio run with a flush"
    )
    ap.add_argument(
        "--timeout", type=float, default=600, help="bound on a failover or checkpoint wait (s)"
    )
    ap.add_argument(
        "--seq-shots",
        type=int,
        default=None,
        help="sequential writes after a checkpoint per setup, median taken (10)",
    )
    ap.add_argument("--rewrite-shots", type=int, default=None, help="sequential rewrites (3)")
    ap.add_argument("--rand-shots", type=int, default=None, help="4 KiB random write shots (3)")
    ap.add_argument(
        "--qd1-shots",
        type=int,
        default=None,
        help="4 KiB random write shots at queue depth 1, a synchronous writer's latency (3)",
    )
    ap.add_argument(
        "--general-path",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run a blockrep pair with BLOCKREP_FAST_PATH=0 on P and S (default on)",
    )
    ap.add_argument(
        "--no-checkpoints",
        dest="checkpoints",
        action="store_false",
        help="skip the checkpoint-time measurements (issue 5)",
    )
    ap.add_argument(
        "--no-failover",
        dest="failover",
        action="store_false",
        help="skip the failover measurements (issue 5)",
    )
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="results directory")
    ap.add_argument("--name", default="replication", help="results file name (NAME.json, .md)")
    args = ap.parse_args()
    if args.seq_shots is None:
        args.seq_shots = 3 if args.quick else 10
    if args.rewrite_shots is None:
        args.rewrite_shots = 1 if args.quick else 3
    if args.rand_shots is None:
        args.rand_shots = 1 if args.quick else 3
    if args.qd1_shots is None:
        args.qd1_shots = 1 if args.quick else 3
    if args.size_mib is None:
        args.size_mib = 32 if args.quick else 256
    if args.runtime is None:
        args.runtime = 2 if args.quick else 8
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    for tool in ("fio", "qemu-system-x86_64", "qemu-img"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found (make debs)")
    try:
        rc = asyncio.run(amain(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        kill_leftovers()
        sys.exit("interrupted; every started process was stopped and the temp files removed")
    finally:
        kill_leftovers()
    sys.exit(rc)


if __name__ == "__main__":
    main()
