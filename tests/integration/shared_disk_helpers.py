"""Helpers for the shared-disk replication tests (test_shared_disk.py and
faults/test_shared_disk_faults.py): a P/S pair of ``blockrep daemon`` processes on
one shared raw file, laid out as the seed's "Shared disk usage" section, an
in-process NBD client for the consumers' I/O, and the reference model
("last checkpoint + S's writes").
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import blockrep.block  # noqa: F401  (import order: the block layer before the NBD client)
from blockrep.nbd import proto as nbdp
from blockrep.nbd.client import Address, NBDConnection
from tests.daemon_harness import DaemonProc
from tests.helpers import tool
from tests.integration.replication_test_helpers import Q

MiB = 1 << 20
KiB = 1 << 10


def sha256(b: bytes | bytearray) -> str:
    return hashlib.sha256(b).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_clean(path: Path | str) -> None:
    """qemu-img check: no errors, no corruptions, no leaks."""
    r = tool("qemu-img", "check", "--output=json", "-f", "qcow2", str(path), check=False)
    assert r.returncode == 0, (str(path), r.stdout, r.stderr)
    info = json.loads(r.stdout)
    assert info.get("check-errors", 0) == 0 and info.get("corruptions", 0) == 0, info
    assert info.get("leaks", 0) == 0, info


def qcow2_create(path: Path | str, size: int) -> None:
    tool("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size))


# -- QMP ---------------------------------------------------------------------------------


class SQ(Q):
    """One QMP connection to one daemon (replication_test_helpers.Q plus shared-disk queries)."""

    async def status(self) -> dict[str, Any]:
        return await self.run("query-xen-replication-status")

    async def rep(self) -> dict[str, Any]:
        r = await self.run("query-replication")
        assert len(r) == 1, r
        return r[0]

    async def node_names(self) -> list[str]:
        return sorted(n["node-name"] for n in await self.run("query-named-block-nodes"))

    async def wait_stage(
        self, want: str | tuple[str, ...], timeout: float = 20.0
    ) -> dict[str, Any]:
        wanted = (want,) if isinstance(want, str) else want
        deadline = time.monotonic() + timeout
        while True:
            r = await self.rep()
            if r["stage"] in wanted:
                return r
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: stage {r['stage']!r}, waited for {wanted}: {r}")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.c.disconnect(), 5)
        except BaseException:
            pass

    async def quit(self) -> None:
        """Quit the daemon cleanly and wait until it has exited."""
        try:
            await self.run("quit", timeout=10)
        except BaseException:
            pass
        await self.close()
        await asyncio.get_running_loop().run_in_executor(None, self.proc.proc.wait, 20)


# -- the consumers' I/O: an in-process NBD client --------------------------------------------


class NBDRW:
    """A pipelining NBD client (blockrep's own connection class) on one export."""

    def __init__(self, conn: NBDConnection) -> None:
        self.conn = conn

    @classmethod
    async def connect(cls, path: str, export: str) -> NBDRW:
        conn = NBDConnection()
        await asyncio.wait_for(conn.connect(Address("unix", path=path), export), 10)
        return cls(conn)

    @property
    def size(self) -> int:
        return self.conn.size

    async def write(self, offset: int, data: bytes) -> None:
        await self.conn.request(nbdp.CMD_WRITE, offset, len(data), payload=data)

    async def read(self, offset: int, nbytes: int) -> bytes:
        out = bytearray()
        step = 4 * MiB
        for off in range(offset, offset + nbytes, step):
            n = min(step, offset + nbytes - off)
            pend = await self.conn.request(nbdp.CMD_READ, off, n)
            out += pend.data
        return bytes(out)

    async def flush(self) -> None:
        await self.conn.request(nbdp.CMD_FLUSH, 0, 0)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.conn.close(), 5)
        except BaseException:
            pass


# -- the model -------------------------------------------------------------------------------


def random_extents(
    rng: random.Random, size: int, count: int, max_len: int = 160 * KiB
) -> list[tuple[int, int]]:
    """``count`` non-overlapping (offset, length) pairs, any byte alignment, so a batch
    of them may be in flight together with a defined result."""
    out: list[tuple[int, int]] = []
    tries = 0
    while len(out) < count and tries < count * 50:
        tries += 1
        kind = rng.random()
        if kind < 0.3:
            n = rng.randint(1, 600)
        elif kind < 0.7:
            n = rng.randint(512, 16 * KiB)
        else:
            n = rng.randint(16 * KiB, max_len)
        if rng.random() < 0.3:  # sector/cluster aligned ones too
            n = max(512, n & ~511)
            off = rng.randrange(0, size - n + 1) & ~511
        else:
            off = rng.randrange(0, size - n + 1)
        if any(off < o + m and o < off + n for o, m in out):
            continue
        out.append((off, n))
    return out


class Model:
    """P's disk (``p``), the last checkpoint (``ckpt``) and S's view (``s`` = ckpt + S writes)."""

    def __init__(self, initial: bytes) -> None:
        self.p = bytearray(initial)
        self.ckpt = bytes(initial)
        self.s = bytearray(initial)

    def p_write(self, off: int, data: bytes) -> None:
        self.p[off : off + len(data)] = data

    def s_write(self, off: int, data: bytes) -> None:
        self.s[off : off + len(data)] = data

    def checkpoint(self) -> None:
        self.ckpt = bytes(self.p)
        self.s = bytearray(self.p)


def diff_summary(got: bytes, want: bytes, limit: int = 5) -> str:
    """Where two images differ (first few runs of differing 512-byte sectors)."""
    if len(got) != len(want):
        return f"length {len(got)} != {len(want)}"
    runs: list[list[int]] = []
    for off in range(0, len(got), 512):
        if got[off : off + 512] != want[off : off + 512]:
            if runs and runs[-1][1] == off:
                runs[-1][1] = off + 512
            else:
                runs.append([off, off + 512])
                if len(runs) > limit:
                    break
    return "differs at sectors " + ", ".join(f"[{a:#x}, {b:#x})" for a, b in runs[:limit])


# -- the pair ---------------------------------------------------------------------------------


def seed_p_drive(shared: Path | str) -> str:
    """The seed's primary command line (path changed)."""
    return f"if=virtio,id=primary_disk0,file.filename={shared},driver=raw"


def seed_s_drives(d: Path, shared: Path | str) -> list[str]:
    """The seed's secondary command line (paths changed)."""
    return [
        f"if=none,driver=qcow2,file.filename={d}/hidden_disk.img,id=hidden_disk0,"
        f"backing.driver=raw,backing.file.filename={shared}",
        "if=virtio,id=active-disk0,driver=replication,mode=secondary,"
        f"file.driver=qcow2,top-id=active-disk0,file.file.filename={d}/active_disk.img,"
        "file.backing=hidden_disk0,shared-disk=on",
    ]


def start_daemon(d: Path, name: str, drives: list[str]) -> DaemonProc:
    args = ["-qmp", f"unix:{d}/{name}.qmp,server=on,wait=off"]
    for dr in drives:
        args += ["-drive", dr]
    return DaemonProc(args, f"{d}/{name}.qmp", f"{d}/{name}.log")


def rep_args(server: dict[str, Any]) -> dict[str, Any]:
    """The seed's blockdev-add of the primary replication node."""
    return {
        "driver": "replication",
        "node-name": "rep",
        "mode": "primary",
        "shared-disk-id": "primary_disk0",
        "shared-disk": True,
        "file": {"driver": "nbd", "export": "hidden_disk0", "server": server},
    }


class Pair:
    """P and S on one shared raw file, replication running, consumers connected over NBD.

    P's consumer writes ``primary_disk0`` through P's NBD export of it; S's consumer
    writes ``active-disk0`` through S's NBD export of it (on the same server as the
    ``hidden_disk0`` export P forwards pre-images to).
    """

    def __init__(
        self,
        d: Path,
        size: int,
        initial: bytes | None = None,
        *,
        p_drives: list[str] | None = None,
        s_drives: list[str] | None = None,
        rep_server: dict[str, Any] | None = None,
    ) -> None:
        self.d = d
        self.size = size
        self.shared = d / "1.raw"
        self.initial = initial if initial is not None else bytes(size)
        self.p_drives = p_drives
        self.s_drives = s_drives
        self.rep_server = rep_server
        self.P: DaemonProc | None = None
        self.S: DaemonProc | None = None
        self.p: SQ | None = None
        self.s: SQ | None = None
        self.pw: NBDRW | None = None
        self.sw: NBDRW | None = None
        self.p_nbd = str(d / "P.nbd")
        self.s_nbd = str(d / "S.nbd")

    def make_files(self) -> None:
        with open(self.shared, "wb") as f:
            f.write(self.initial)
        for n in ("hidden_disk", "active_disk"):
            qcow2_create(self.d / f"{n}.img", self.size)

    async def start_daemons(self) -> None:
        self.make_files()
        self.S = start_daemon(self.d, "S", self.s_drives or seed_s_drives(self.d, self.shared))
        self.P = start_daemon(self.d, "P", self.p_drives or [seed_p_drive(self.shared)])
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.S.wait_ready)
        await loop.run_in_executor(None, self.P.wait_ready)
        self.s = await SQ.connect("S", self.S)
        self.p = await SQ.connect("P", self.P)

    async def start(self, *, consumers: bool = True) -> None:
        await self.start_daemons()
        assert self.s is not None and self.p is not None
        await self.s.run(
            "nbd-server-start", {"addr": {"type": "unix", "data": {"path": self.s_nbd}}}
        )
        await self.s.run("nbd-server-add", {"device": "hidden_disk0", "writable": True})
        server = self.rep_server or {"type": "unix", "data": {"path": self.s_nbd}}
        await self.p.run("blockdev-add", rep_args(server))
        await self.s.run("xen-set-replication", {"enable": True, "primary": False})
        await self.p.run("xen-set-replication", {"enable": True, "primary": True})
        if consumers:
            await self.s.run("nbd-server-add", {"device": "active-disk0", "writable": True})
            await self.p.run(
                "nbd-server-start", {"addr": {"type": "unix", "data": {"path": self.p_nbd}}}
            )
            await self.p.run("nbd-server-add", {"device": "primary_disk0", "writable": True})
            self.pw = await NBDRW.connect(self.p_nbd, "primary_disk0")
            self.sw = await NBDRW.connect(self.s_nbd, "active-disk0")

    async def checkpoint(self) -> None:
        """P's writes are drained by the caller; then S, then P (REFERENCE order)."""
        assert self.s is not None and self.p is not None
        await self.s.run("xen-colo-do-checkpoint")
        await self.p.run("xen-colo-do-checkpoint")

    def kill_p(self) -> None:
        assert self.P is not None
        if self.P.proc.poll() is None:
            os.kill(self.P.proc.pid, signal.SIGKILL)
        self.P.proc.wait(10)

    async def failover(self) -> dict[str, Any]:
        """S side, after P died: the seed's nbd-server-stop, then failover, wait for done."""
        assert self.s is not None
        if self.sw is not None:
            await self.sw.close()
            self.sw = None
        await self.s.run("nbd-server-stop")
        await self.s.run(
            "xen-set-replication", {"enable": False, "primary": False, "failover": True}
        )
        return await self.s.wait_stage(("done", "failover-failed"))

    async def s_view_after_failover(self) -> bytes:
        """Export active-disk0 again (the server was stopped for failover) and read it all."""
        assert self.s is not None
        path = str(self.d / "S2.nbd")
        await self.s.run("nbd-server-start", {"addr": {"type": "unix", "data": {"path": path}}})
        await self.s.run("nbd-server-add", {"device": "active-disk0", "writable": True})
        c = await NBDRW.connect(path, "active-disk0")
        try:
            return await c.read(0, self.size)
        finally:
            await c.close()
            await self.s.run("nbd-server-stop")

    async def close(self) -> None:
        for c in (self.pw, self.sw):
            if c is not None:
                await c.close()
        self.pw = self.sw = None
        for q in (self.p, self.s):
            if q is not None and q.proc.proc.poll() is None:
                await q.quit()
            elif q is not None:
                await q.close()

    def stop_all(self) -> None:
        """Last resort (finally): stop every process this pair started."""
        for dp in (self.P, self.S):
            if dp is not None:
                try:
                    dp.stop(
                        signal.SIGKILL
                        if dp.proc.poll() is None and dp is self.P
                        else signal.SIGTERM,
                        timeout=10,
                    )
                except Exception:
                    pass

    def logs(self) -> str:
        out = []
        for name, dp in (("P", self.P), ("S", self.S)):
            if dp is not None:
                try:
                    out.append(f"--- {name} log ---\n{dp.output()[-3000:]}")
                except Exception:
                    pass
        return "\n".join(out)


def read_file(path: Path | str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def run_async(coro, timeout: float = 120) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def tool_ok(*args: str) -> subprocess.CompletedProcess:
    return tool(*args)
