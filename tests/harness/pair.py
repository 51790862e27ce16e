"""The one replication pair of the tests: a Primary and a Secondary, each a ``blockrep
daemon`` or a real ``qemu-system-x86_64 -machine none`` (QEMU 7.2), on separate disks
(REFERENCE-QEMU.md §2) or on one shared disk (the seed's "Shared disk usage" layout).

The replication link is a unix socket (REFERENCE-QEMU.md §4.7). Consumers write either
through NBD exports (blockrep sides only: blockrep's own pipelining NBD connection) or
with HMP ``qemu-io`` (both kinds; QEMU's output is invisible, so data is always verified
from files / exports, never from the HMP reply). ``model`` follows what the pair's own
``p_write`` / ``s_write`` / ``checkpoint`` / failovers did (SPEC §1–§5).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

from blockrep.address import SocketAddress
from blockrep.nbd import proto as nbdp
from blockrep.nbd.client import NBDConnection
from blockrep.testing import (
    Process,
    blockrep_argv,
    drive_args,
    separate_primary_drives,
    separate_secondary_drives,
    shared_primary_drives,
    shared_secondary_drives,
    start_replication,
)
from tests.harness.images import qcow2
from tests.harness.models import ReplicationModel, diff_summary
from tests.harness.qmp import QMPSession
from tests.harness.tools import check_clean, convert_to_raw, read_file, sha

MiB = 1 << 20
QEMU = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none"]


class NBDClient:
    """A pipelining NBD client (blockrep's own connection class) on one export."""

    def __init__(self, conn: NBDConnection) -> None:
        self.conn = conn

    @classmethod
    async def connect(cls, path: str, export: str) -> NBDClient:
        conn = NBDConnection()
        await asyncio.wait_for(conn.connect(SocketAddress.unix(path), export), 10)
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


class Side(QMPSession):
    """One process of a pair (``kind`` = "blockrep" or "qemu") with its QMP session."""

    def __init__(self, name: str, kind: str, wd: str, drives: list[str]) -> None:
        self.kind = kind
        self.wd = wd
        qmp_path = os.path.join(wd, f"{name}.qmp")
        qmp_opt = ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
        head = QEMU if kind == "qemu" else blockrep_argv("daemon")
        argv = [*head, *qmp_opt, *drive_args(drives)]
        process = Process(argv, os.path.join(wd, f"{name}.log"), sock=qmp_path, cwd=wd)
        super().__init__(qmp_path, name, process)
        self.process = process
        self.alive = True

    def output(self) -> str:
        return self.process.output()

    async def qemu_io(self, node: str, command: str) -> str:
        """HMP qemu-io; on blockrep, its reply must not report a failure."""
        out = await self.io(node, command)
        if self.kind == "blockrep":
            low = out.lower()
            assert "failed" not in low and "error" not in low, f"{self.name} HMP {command!r}: {out}"
        return out

    def kill(self) -> None:
        """The side dies (SIGKILL by pid)."""
        self.process.kill(10)
        self.alive = False

    async def stop(self) -> None:
        await self.close()
        self.process.stop(signal.SIGTERM, timeout=10)
        self.alive = False


def chain_json(active: str, hidden: str, sec: str) -> str:
    return "json:" + json.dumps(
        {
            "driver": "qcow2",
            "file": {"driver": "file", "filename": active},
            "backing": {
                "driver": "qcow2",
                "file": {"driver": "file", "filename": hidden},
                "backing": {"driver": "raw", "file": {"driver": "file", "filename": sec}},
            },
        }
    )


class Pair:
    """P and S, replication running; ``mode`` "separate" or "shared".

    Separate disks: P's quorum ``colo-disk0`` over ``prim`` gets the replication child;
    S replicates into ``sec`` through active -> hidden. With ``exports``, the consumers
    write ``colo-disk0`` through NBD (``p_client``, ``s_client``).

    Shared disk: P's ``primary_disk0`` and S's hidden disk's backing file are one raw
    file ``shared``; the consumers write ``primary_disk0`` and ``active-disk0``.

    ``p_drives`` / ``s_drives`` replace the standard -drive options (blkdebug layers...);
    without ``wd`` the pair works in a short /tmp directory of its own (unix socket
    paths), removed by ``cleanup``.
    """

    def __init__(
        self,
        p_kind: str = "blockrep",
        s_kind: str = "blockrep",
        *,
        mode: str = "separate",
        wd: str | os.PathLike[str] | None = None,
        size: int = 16 * MiB,
        init: bytes | None = None,
        seed: int = 1,
        exports: bool = True,
        p_drives: list[str] | None = None,
        s_drives: list[str] | None = None,
        rep_server: dict[str, Any] | None = None,
    ) -> None:
        assert mode in ("separate", "shared"), mode
        self.mode = mode
        self.own_wd = wd is None
        self.wd = str(wd) if wd is not None else tempfile.mkdtemp(prefix="rp", dir="/tmp")
        self.size = size
        self.p_kind, self.s_kind = p_kind, s_kind
        self.want_exports = exports
        if init is None:
            init = random.Random(seed).randbytes(size) if mode == "separate" else bytes(size)
        self.init = init
        self.model = ReplicationModel(init)
        j = lambda name: os.path.join(self.wd, name)  # noqa: E731
        if mode == "separate":
            self.prim, self.sec = j("prim.raw"), j("sec.raw")
            self.hidden, self.active = j("hidden.qcow2"), j("active.qcow2")
            self.rep_sock = j("rep.sock")
            self.p_nbd, self.s_nbd = j("pcons.sock"), self.rep_sock
        else:
            self.shared = self.prim = self.sec = j("1.raw")
            self.hidden, self.active = j("hidden_disk.img"), j("active_disk.img")
            self.p_nbd, self.s_nbd = j("P.nbd"), j("S.nbd")
            self.rep_sock = self.s_nbd
        self.p_drives = p_drives
        self.s_drives = s_drives
        self.rep_server = rep_server
        self.P: Side | None = None
        self.S: Side | None = None
        self.p_client: NBDClient | None = None
        self.s_client: NBDClient | None = None
        self.s_state = "running"  # running | done (after failover)

    # -- setup ---------------------------------------------------------------------------

    def make_files(self) -> None:
        for path in {self.prim, self.sec}:
            with open(path, "wb") as f:
                f.write(self.init)
        for path in (self.hidden, self.active):
            qcow2(path, self.size)

    def _drives(self) -> tuple[list[str], list[str]]:
        if self.mode == "separate":
            p = separate_primary_drives(self.prim)
            s = separate_secondary_drives(self.sec, self.active, self.hidden)
        else:
            p = shared_primary_drives(self.shared)
            s = shared_secondary_drives(self.shared, self.active, self.hidden)
        return self.p_drives or p, self.s_drives or s

    async def start_daemons(self) -> None:
        """The files and both processes, QMP connected; no replication yet."""
        self.make_files()
        p_drives, s_drives = self._drives()
        self.S = Side("S", self.s_kind, self.wd, s_drives)
        self.P = Side("P", self.p_kind, self.wd, p_drives)
        await self.S.open()
        await self.P.open()

    async def start(self, *, consumers: bool = True) -> tuple[Side, Side]:
        """Both processes paired; returns (P, S)."""
        await self.start_daemons()
        P, S = self.P, self.S
        assert P is not None and S is not None
        s_addr = {"type": "unix", "data": {"path": self.rep_sock}}
        if self.mode == "separate":
            p_server = self.rep_server or {"type": "unix", "path": self.rep_sock}
        else:
            p_server = self.rep_server or s_addr  # the seed's SocketAddressLegacy form
        await start_replication(
            P, S, shared=self.mode == "shared", s_addr=s_addr, p_server=p_server
        )
        if self.mode == "separate":
            for side in (S, P):
                assert await side.status() == {"error": False}
        if consumers and self.want_exports:
            await self._start_consumers()
        return P, S

    async def _start_consumers(self) -> None:
        P, S = self.P, self.S
        assert P is not None and S is not None
        if self.mode == "shared":
            await S.run("nbd-server-add", {"device": "active-disk0", "writable": True})
            await self._serve(P, self.p_nbd, "primary_disk0")
            self.p_client = await NBDClient.connect(self.p_nbd, "primary_disk0")
            self.s_client = await NBDClient.connect(self.s_nbd, "active-disk0")
            return
        if P.kind == "blockrep":
            await self._serve(P, self.p_nbd, "colo-disk0")
            self.p_client = await NBDClient.connect(self.p_nbd, "colo-disk0")
        if S.kind == "blockrep":
            await self._export(S, "colo-disk0")
            self.s_client = await NBDClient.connect(self.s_nbd, "colo-disk0")

    async def _serve(self, side: Side, sock: str, device: str) -> None:
        await side.run("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        await self._export(side, device)

    async def _export(self, side: Side, device: str) -> None:
        if self.mode == "shared":
            await side.run("nbd-server-add", {"device": device, "writable": True})
            return
        await side.run(
            "block-export-add",
            {"type": "nbd", "id": "cons0", "node-name": device, "name": device, "writable": True},
        )

    async def close(self) -> None:
        """Consumers closed; live daemons quit cleanly (flushed), dead ones reaped."""
        for c in (self.p_client, self.s_client):
            if c is not None:
                await c.close()
        self.p_client = self.s_client = None
        for side in (self.P, self.S):
            if side is None:
                continue
            if side.process.running and side.kind == "blockrep" and self.mode == "shared":
                await side.quit()
            await side.stop()

    def stop_all(self) -> None:
        """Last resort (finally): stop every process this pair started, by pid."""
        for side in (self.P, self.S):
            if side is not None:
                try:
                    # a shared disk must not see P's late writes after the test (SPEC §3.5)
                    crash = side is self.P and self.mode == "shared"
                    sig = signal.SIGKILL if crash else signal.SIGTERM
                    side.process.stop(sig, timeout=10)
                except Exception:
                    pass

    def logs(self) -> str:
        return "".join(
            f"--- {s.name} ({s.kind}) ---\n{s.output()[-4000:]}\n" for s in (self.P, self.S) if s
        )

    def cleanup(self) -> None:
        if self.own_wd:
            shutil.rmtree(self.wd, ignore_errors=True)

    def sec_bytes(self, offset: int, length: int) -> bytes:
        return read_file(self.sec)[offset : offset + length]

    def prim_bytes(self, offset: int, length: int) -> bytes:
        return read_file(self.prim)[offset : offset + length]

    # -- consumer I/O ------------------------------------------------------------------------

    async def p_write(self, off: int, data: bytes, via: str = "auto") -> None:
        assert self.P is not None and self.P.alive
        if via == "nbd" or (via == "auto" and self.p_client is not None):
            assert self.p_client is not None
            await self.p_client.write(off, data)
        else:
            assert data == bytes([data[0]]) * len(data), "HMP writes are one pattern byte"
            await self.P.qemu_io("colo-disk0", f"write -P {data[0]:#x} {off} {len(data)}")
        self.model.p_write(off, data)

    async def s_write(self, off: int, data: bytes, via: str = "auto") -> None:
        assert self.S is not None and self.S.alive
        if via == "nbd" or (via == "auto" and self.s_client is not None):
            assert self.s_client is not None
            await self.s_client.write(off, data)
        else:
            assert data == bytes([data[0]]) * len(data), "HMP writes are one pattern byte"
            await self.S.qemu_io("colo-disk0", f"write -P {data[0]:#x} {off} {len(data)}")
        self.model.s_write(off, data)

    async def checkpoint(self) -> None:
        """COLO's checkpoint: P's writes are drained (the callers awaited them), S then P."""
        assert self.S is not None and self.P is not None
        await self.S.run("xen-colo-do-checkpoint")
        await self.P.run("xen-colo-do-checkpoint")
        self.model.checkpoint()

    # -- failovers --------------------------------------------------------------------------

    def kill_p(self) -> None:
        assert self.P is not None
        self.P.kill()

    async def failover(self) -> dict[str, Any]:
        """S side, after P died: the seed's nbd-server-stop, then failover, wait for the end."""
        assert self.S is not None
        if self.s_client is not None:
            await self.s_client.close()
            self.s_client = None
        await self.S.run("nbd-server-stop")
        await self.S.run(
            "xen-set-replication", {"enable": False, "primary": False, "failover": True}
        )
        return await self.S.wait_stage(("done", "failover-failed"))

    async def s_view_after_failover(self) -> bytes:
        """Export active-disk0 again (the server was stopped for failover) and read it all."""
        assert self.S is not None
        path = os.path.join(self.wd, "S2.nbd")
        await self.S.run("nbd-server-start", {"addr": {"type": "unix", "data": {"path": path}}})
        await self.S.run("nbd-server-add", {"device": "active-disk0", "writable": True})
        c = await NBDClient.connect(path, "active-disk0")
        try:
            return await c.read(0, self.size)
        finally:
            await c.close()
            await self.S.run("nbd-server-stop")

    async def s_failover(self, write_during: tuple[int, bytes] | list | None = None) -> None:
        """The Primary dies; S stops its NBD server and fails over (REFERENCE §2)."""
        S, P = self.S, self.P
        assert S is not None and P is not None
        if self.p_client is not None:
            await self.p_client.close()
            self.p_client = None
        await P.close()
        P.kill()
        if self.s_client is not None:
            await self.s_client.close()
            self.s_client = None
        await S.run("nbd-server-stop")
        await S.run("xen-set-replication", {"enable": False, "primary": False, "failover": True})
        self.model.s_failover()
        # S's consumer keeps writing while the commit runs (a tuple or a list of them)
        for w in [write_during] if isinstance(write_during, tuple) else (write_during or []):
            await self.s_write(*w, via="hmp")
        await self.wait_failover_done()
        self.s_state = "done"
        if S.kind == "blockrep" and self.want_exports:
            sock = os.path.join(self.wd, "scons.sock")
            await self._serve(S, sock, "colo-disk0")
            self.s_client = await NBDClient.connect(sock, "colo-disk0")

    async def wait_failover_done(self, timeout: float = 30) -> None:
        S = self.S
        assert S is not None
        deadline = time.monotonic() + timeout
        while True:
            if S.kind == "blockrep":
                r = await S.run("query-replication")
                stages = {n["stage"] for n in r if n["mode"] == "secondary"}
                if stages == {"done"}:
                    return
                assert "failover-failed" not in stages, r
            else:
                blocks = await S.run("query-block")
                chain = json.dumps([b for b in blocks if b.get("device") == "childs0"])
                if "active.qcow2" not in chain:
                    return
            assert time.monotonic() < deadline, "failover did not finish"
            await asyncio.sleep(0.02)

    async def p_failover(self, probe_write: tuple[int, bytes]) -> None:
        """The Secondary dies; P notices on its next write and drops the replication child."""
        P, S = self.P, self.S
        assert S is not None and P is not None
        if self.s_client is not None:
            await self.s_client.close()
            self.s_client = None
        await S.close()
        S.kill()
        self.model.p_failover()
        await self.p_write(*probe_write)  # the consumer sees success, the HA manager an error
        st = await P.run("query-xen-replication-status")
        assert st == {"error": True, "desc": "I/O error occurred"}, st
        await P.run("xen-set-replication", {"enable": False, "primary": True, "failover": True})
        if P.kind == "blockrep":
            stages = [n["stage"] for n in await P.run("query-replication")]
            assert stages == ["done"], stages
        await P.run("x-blockdev-change", {"parent": "colo-disk0", "child": "children.1"})
        await P.run("blockdev-del", {"node-name": "replication0"})

    # -- observing -------------------------------------------------------------------------

    async def flush_s(self) -> None:
        """Write the qcow2 metadata caches out (REFERENCE §4.2) so files can be read with -U."""
        assert self.S is not None
        if self.S.alive and self.s_state == "running":
            await self.S.qemu_io("colo-disk0", "flush")
            await self.S.qemu_io("active0", "flush")
            await self.S.qemu_io("hidden0", "flush")

    def chain_view(self) -> bytes:
        """S's view from the files: active → hidden → secondary disk (after flush_s)."""
        source = chain_json(self.active, self.hidden, self.sec)
        return convert_to_raw(source, os.path.join(self.wd, "view.raw"), force_share=True)

    def qcow2_check(self) -> None:
        for path in (self.hidden, self.active):
            check_clean(path, force_share=True)

    async def images(self) -> dict[str, bytes]:
        """Every logical content that can be observed now, by name."""
        assert self.P is not None and self.S is not None
        if self.S.alive:
            await self.flush_s()
        out: dict[str, bytes] = {"prim": read_file(self.prim), "sec": read_file(self.sec)}
        if self.S.alive:
            if self.s_state == "running":
                out["s_view_files"] = self.chain_view()
            else:
                out["s_view_files"] = out["sec"]
            if self.s_client is not None:
                out["s_view_export"] = await self.s_client.read(0, self.size)
        if self.P.alive and self.p_client is not None:
            out["p_export"] = await self.p_client.read(0, self.size)
        return out

    def expected(self, name: str) -> bytearray:
        m = self.model
        return {
            "prim": m.p,
            "p_export": m.p,
            "sec": m.sec,
            "s_view_files": m.s_view,
            "s_view_export": m.s_view,
        }[name]

    async def check(self, label: str) -> dict[str, str]:
        """Every image equals the model; qemu-img check clean. Returns the shas."""
        assert self.S is not None
        imgs = await self.images()
        bad = [
            f"{n}: {diff_summary(d, self.expected(n))}"
            for n, d in imgs.items()
            if sha(d) != sha(self.expected(n))
        ]
        assert not bad, f"[{label}] model mismatch: {bad}"
        if self.S.alive:
            self.qcow2_check()
        return {n: sha(d) for n, d in imgs.items()}

    async def status_ok(self) -> None:
        for side in (self.P, self.S):
            if side is not None and side.alive:
                st = await side.status()
                assert st == {"error": False}, f"{side.name}: {st}"


@contextlib.asynccontextmanager
async def running_pair(p_kind: str, s_kind: str, **kw: Any) -> AsyncIterator[Pair]:
    """A started pair; always stopped (by pid) and cleaned up, logs attached on failure."""
    pair = Pair(p_kind, s_kind, **kw)
    try:
        await asyncio.wait_for(pair.start(), 60)
        yield pair
    except BaseException as e:
        try:
            e.add_note(pair.logs())
        except Exception:
            pass
        raise
    finally:
        await pair.close()
        pair.cleanup()
