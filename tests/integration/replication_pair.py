"""Shared setup for the replication end-to-end and QEMU interop tests.

A *pair* is a Primary and a Secondary process, each either a ``blockrep daemon`` or a
real ``qemu-system-x86_64 -machine none`` (QEMU 7.2), started with the command lines of
REFERENCE-QEMU.md §2 and wired with its QMP sequence. The replication link is a unix
socket (REFERENCE-QEMU.md §4.7). Consumers write either through NBD exports of the top
node ``colo-disk0`` (blockrep sides only: an in-process blockrep ``nbd`` client) or with
HMP ``qemu-io`` (both kinds; QEMU's output is invisible, so data is always verified
from files / exports, never from the HMP reply).

``Model`` is the bytearray model of SPEC §1–§5:

* ``p``       — the Primary's disk;
* ``ckpt``    — the secondary disk's state at the last checkpoint;
* ``s_view``  — what S's consumer reads: ``ckpt`` with S's writes since overlaid;
* ``sec``     — the secondary disk file: follows ``p`` while the link is up, and after
  S failover becomes ``ckpt`` + S's writes (and takes S's later writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from qemu.qmp import QMPClient

from blockrep.block import Graph

MiB = 1 << 20
QEMU = "qemu-system-x86_64"
BLOCKREP = [sys.executable, "-m", "blockrep.cli", "daemon"]
TOOL_TIMEOUT = 60


def sha(b: bytes | bytearray) -> str:
    return hashlib.sha256(b).hexdigest()


def first_diff(a: bytes | bytearray, b: bytes | bytearray) -> str:
    if len(a) != len(b):
        return f"length {len(a)} != {len(b)}"
    for off in range(0, len(a), 4096):
        if a[off : off + 4096] != b[off : off + 4096]:
            for i in range(off, min(off + 4096, len(a))):
                if a[i] != b[i]:
                    end = i
                    while end < len(a) and a[end] != b[end]:
                        end += 1
                    return f"first difference at {i} (..{end}): got {a[i]:#x} want {b[i]:#x}"
    return "equal"


def tool(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(args, capture_output=True, text=True, timeout=TOOL_TIMEOUT)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}")
    return r


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class Model:
    """SPEC §1–§5 as bytearrays (see the module doc)."""

    def __init__(self, init: bytes) -> None:
        self.size = len(init)
        self.p = bytearray(init)
        self.ckpt = bytearray(init)
        self.s_view = bytearray(init)
        self.sec = bytearray(init)
        self.link = True  # P's writes reach the secondary disk
        self.s_failed_over = False
        self.p_alive = True
        self.s_alive = True

    def p_write(self, off: int, data: bytes) -> None:
        self.p[off : off + len(data)] = data
        if self.link:
            self.sec[off : off + len(data)] = data

    def s_write(self, off: int, data: bytes) -> None:
        self.s_view[off : off + len(data)] = data
        if self.s_failed_over:
            self.sec[off : off + len(data)] = data

    def checkpoint(self) -> None:
        assert self.link and self.sec == self.p, "a checkpoint needs S identical to P"
        self.ckpt = bytearray(self.p)
        self.s_view = bytearray(self.p)

    def s_failover(self) -> None:
        """P died; S commits active+hidden: secondary disk = checkpoint + S writes."""
        self.link = False
        self.p_alive = False
        self.s_failed_over = True
        self.sec = self.s_view  # one object from now on: S writes land in the disk

    def p_failover(self) -> None:
        """S died; P carries on alone."""
        self.link = False
        self.s_alive = False


# -- processes ------------------------------------------------------------------------------


class Side:
    """One process of a pair (``kind`` = "blockrep" or "qemu"), with a QMP client."""

    def __init__(self, name: str, kind: str, wd: str, drives: list[str]) -> None:
        self.name = name
        self.kind = kind
        self.wd = wd
        self.qmp_path = os.path.join(wd, f"{name}.qmp")
        self.log_path = os.path.join(wd, f"{name}.log")
        qmp_opt = ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if kind == "qemu":
            argv = [QEMU, "-machine", "none", "-nodefaults", "-display", "none", *qmp_opt, *drives]
        else:
            argv = [*BLOCKREP, *qmp_opt, *drives]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=wd)
        self.qmp: QMPClient | None = None
        self.alive = True
        self.nbd_sock: str | None = None

    async def connect(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.qmp_path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.output()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready: {self.output()}")
            await asyncio.sleep(0.02)
        # the socket file can exist a moment before the server listens on it
        while True:
            self.qmp = QMPClient(self.name)
            try:
                await asyncio.wait_for(self.qmp.connect(self.qmp_path), 10)
                return
            except Exception:  # qemu.qmp's ConnectError wraps ConnectionRefusedError
                self.qmp = None
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return read_file(self.log_path).decode(errors="replace")

    async def cmd(self, name: str, args: dict[str, Any] | None = None, timeout: float = 30) -> Any:
        assert self.qmp is not None
        return await asyncio.wait_for(self.qmp.execute(name, args or {}), timeout)

    async def hmp(self, line: str) -> str:
        out = await self.cmd("human-monitor-command", {"command-line": line})
        if self.kind == "blockrep":
            low = out.lower()
            assert "failed" not in low and "error" not in low, f"{self.name} HMP {line!r}: {out}"
        return out

    async def qemu_io(self, node: str, command: str) -> str:
        return await self.hmp(f'qemu-io {node} "{command}"')

    async def kill(self) -> None:
        """The side dies (SIGKILL by pid)."""
        if self.qmp is not None:
            try:
                await asyncio.wait_for(self.qmp.disconnect(), 5)
            except Exception:
                pass
            self.qmp = None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.alive = False

    async def stop(self) -> None:
        if self.qmp is not None:
            try:
                await asyncio.wait_for(self.qmp.disconnect(), 5)
            except Exception:
                pass
            self.qmp = None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()
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
    """A Primary and a Secondary, set up as REFERENCE-QEMU.md §2 describes."""

    def __init__(
        self, p_kind: str, s_kind: str, size: int = 16 * MiB, seed: int = 1, exports: bool = True
    ) -> None:
        import random

        self.size = size
        self.wd = tempfile.mkdtemp(prefix="rp", dir="/tmp")  # short: unix socket paths
        self.p_kind, self.s_kind = p_kind, s_kind
        self.want_exports = exports
        self.prim = os.path.join(self.wd, "prim.raw")
        self.sec = os.path.join(self.wd, "sec.raw")
        self.hidden = os.path.join(self.wd, "hidden.qcow2")
        self.active = os.path.join(self.wd, "active.qcow2")
        self.rep_sock = os.path.join(self.wd, "rep.sock")
        self.init = random.Random(seed).randbytes(size)
        self.model = Model(self.init)
        self.P: Side | None = None
        self.S: Side | None = None
        self.graph = Graph()
        self.p_client = None
        self.s_client = None
        self.s_state = "running"  # running | done (after failover)

    # -- setup ---------------------------------------------------------------------------

    async def start(self) -> None:
        for path in (self.prim, self.sec):
            with open(path, "wb") as f:
                f.write(self.init)
        for path in (self.hidden, self.active):
            tool("qemu-img", "create", "-q", "-f", "qcow2", path, str(self.size))
        wd = self.wd
        self.S = Side(
            "S",
            self.s_kind,
            wd,
            [
                "-drive",
                f"if=none,id=parent0,driver=raw,file.filename={self.sec}",
                "-drive",
                "if=none,id=childs0,driver=replication,mode=secondary,top-id=colo-disk0,"
                f"file.driver=qcow2,file.node-name=active0,file.file.filename={self.active},"
                "file.backing.driver=qcow2,file.backing.node-name=hidden0,"
                f"file.backing.file.filename={self.hidden},file.backing.backing=parent0",
                "-drive",
                "if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0=childs0",
            ],
        )
        self.P = Side(
            "P",
            self.p_kind,
            wd,
            [
                "-drive",
                "if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,"
                f"children.0.file.filename={self.prim},children.0.driver=raw",
            ],
        )
        await self.S.connect()
        await self.P.connect()
        S, P = self.S, self.P
        await S.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": self.rep_sock}}})
        await S.cmd("nbd-server-add", {"device": "parent0", "writable": True})
        await P.cmd(
            "blockdev-add",
            {
                "driver": "replication",
                "node-name": "replication0",
                "mode": "primary",
                "file": {
                    "driver": "nbd",
                    "export": "parent0",
                    "server": {"type": "unix", "path": self.rep_sock},
                },
            },
        )
        await P.cmd("x-blockdev-change", {"parent": "colo-disk0", "node": "replication0"})
        await S.cmd("xen-set-replication", {"enable": True, "primary": False})
        await P.cmd("xen-set-replication", {"enable": True, "primary": True})
        for side in (S, P):
            assert await side.cmd("query-xen-replication-status") == {"error": False}
        if self.want_exports:
            if P.kind == "blockrep":
                sock = os.path.join(wd, "pcons.sock")
                await P.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
                await self._export(P, sock)
                self.p_client = await self._client(sock)
            if S.kind == "blockrep":
                await self._export(S, self.rep_sock)
                self.s_client = await self._client(self.rep_sock)

    async def _export(self, side: Side, sock: str) -> None:
        await side.cmd(
            "block-export-add",
            {
                "type": "nbd",
                "id": "cons0",
                "node-name": "colo-disk0",
                "name": "colo-disk0",
                "writable": True,
            },
        )
        side.nbd_sock = sock

    async def _client(self, sock: str):
        return await self.graph.add(
            {"driver": "nbd", "export": "colo-disk0", "server": {"type": "unix", "path": sock}}
        )

    async def close(self) -> None:
        for c in (self.p_client, self.s_client):
            if c is not None:
                try:
                    await asyncio.wait_for(self.graph.close_node(c), 5)
                except Exception:
                    pass
        self.p_client = self.s_client = None
        for side in (self.P, self.S):
            if side is not None:
                await side.stop()

    def logs(self) -> str:
        return "".join(
            f"--- {s.name} ({s.kind}) ---\n{s.output()[-4000:]}\n" for s in (self.P, self.S) if s
        )

    def cleanup(self) -> None:
        shutil.rmtree(self.wd, ignore_errors=True)

    # -- consumer I/O ------------------------------------------------------------------------

    async def p_write(self, off: int, data: bytes, via: str = "auto") -> None:
        assert self.P is not None and self.P.alive
        if via == "nbd" or (via == "auto" and self.p_client is not None):
            await self.p_client.write(off, data)
        else:
            assert data == bytes([data[0]]) * len(data), "HMP writes are one pattern byte"
            await self.P.qemu_io("colo-disk0", f"write -P {data[0]:#x} {off} {len(data)}")
        self.model.p_write(off, data)

    async def s_write(self, off: int, data: bytes, via: str = "auto") -> None:
        assert self.S is not None and self.S.alive
        if via == "nbd" or (via == "auto" and self.s_client is not None):
            await self.s_client.write(off, data)
        else:
            assert data == bytes([data[0]]) * len(data), "HMP writes are one pattern byte"
            await self.S.qemu_io("colo-disk0", f"write -P {data[0]:#x} {off} {len(data)}")
        self.model.s_write(off, data)

    async def checkpoint(self) -> None:
        """COLO's checkpoint: P's writes are drained (the callers awaited them), S then P."""
        await self.S.cmd("xen-colo-do-checkpoint")
        await self.P.cmd("xen-colo-do-checkpoint")
        self.model.checkpoint()

    # -- failovers --------------------------------------------------------------------------

    async def s_failover(self, write_during: tuple[int, bytes] | list | None = None) -> None:
        """The Primary dies; S stops its NBD server and fails over (REFERENCE §2)."""
        S = self.S
        if self.p_client is not None:
            await self.graph.close_node(self.p_client)
            self.p_client = None
        await self.P.kill()
        if self.s_client is not None:
            await self.graph.close_node(self.s_client)
            self.s_client = None
        await S.cmd("nbd-server-stop")
        await S.cmd("xen-set-replication", {"enable": False, "primary": False, "failover": True})
        self.model.s_failover()
        # S's consumer keeps writing while the commit runs (a tuple or a list of them)
        for w in [write_during] if isinstance(write_during, tuple) else (write_during or []):
            await self.s_write(*w, via="hmp")
        await self.wait_failover_done()
        self.s_state = "done"
        if S.kind == "blockrep" and self.want_exports:
            sock = os.path.join(self.wd, "scons.sock")
            await S.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
            await self._export(S, sock)
            self.s_client = await self._client(sock)

    async def wait_failover_done(self, timeout: float = 30) -> None:
        S = self.S
        deadline = time.monotonic() + timeout
        while True:
            if S.kind == "blockrep":
                r = await S.cmd("query-replication")
                stages = {n["stage"] for n in r if n["mode"] == "secondary"}
                if stages == {"done"}:
                    return
                assert "failover-failed" not in stages, r
            else:
                blocks = await S.cmd("query-block")
                chain = json.dumps([b for b in blocks if b.get("device") == "childs0"])
                if "active.qcow2" not in chain:
                    return
            assert time.monotonic() < deadline, "failover did not finish"
            await asyncio.sleep(0.02)

    async def p_failover(self, probe_write: tuple[int, bytes]) -> None:
        """The Secondary dies; P notices on its next write and drops the replication child."""
        P = self.P
        if self.s_client is not None:
            await self.graph.close_node(self.s_client)
            self.s_client = None
        await self.S.kill()
        self.model.p_failover()
        await self.p_write(*probe_write)  # the consumer sees success, the HA manager an error
        st = await P.cmd("query-xen-replication-status")
        assert st == {"error": True, "desc": "I/O error occurred"}, st
        await P.cmd("xen-set-replication", {"enable": False, "primary": True, "failover": True})
        if P.kind == "blockrep":
            stages = [n["stage"] for n in await P.cmd("query-replication")]
            assert stages == ["done"], stages
        await P.cmd("x-blockdev-change", {"parent": "colo-disk0", "child": "children.1"})
        await P.cmd("blockdev-del", {"node-name": "replication0"})

    # -- observing -------------------------------------------------------------------------

    async def flush_s(self) -> None:
        """Write the qcow2 metadata caches out (REFERENCE §4.2) so files can be read with -U."""
        if self.S.alive and self.s_state == "running":
            await self.S.qemu_io("colo-disk0", "flush")
            await self.S.qemu_io("active0", "flush")
            await self.S.qemu_io("hidden0", "flush")

    def chain_view(self) -> bytes:
        """S's view from the files: active → hidden → secondary disk (after flush_s)."""
        out = os.path.join(self.wd, "view.raw")
        tool(
            "qemu-img",
            "convert",
            "-U",
            "-O",
            "raw",
            chain_json(self.active, self.hidden, self.sec),
            out,
        )
        data = read_file(out)
        os.unlink(out)
        return data

    def qcow2_check(self) -> None:
        for path in (self.hidden, self.active):
            r = tool("qemu-img", "check", "-U", "--output=json", path, check=False)
            info = json.loads(r.stdout or "{}")
            assert r.returncode == 0 and not info.get("corruptions") and not info.get("leaks"), (
                f"qemu-img check {path}: rc={r.returncode} {r.stdout}{r.stderr}"
            )

    async def images(self) -> dict[str, bytes]:
        """Every logical content that can be observed now, by name."""
        await self.flush_s() if self.S.alive else None
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
        imgs = await self.images()
        bad = [
            f"{n}: {first_diff(d, self.expected(n))}"
            for n, d in imgs.items()
            if sha(d) != sha(self.expected(n))
        ]
        assert not bad, f"[{label}] model mismatch: {bad}"
        if self.S.alive:
            self.qcow2_check()
        return {n: sha(d) for n, d in imgs.items()}

    async def status_ok(self) -> None:
        for side in (self.P, self.S):
            if side.alive:
                st = await side.cmd("query-xen-replication-status")
                assert st == {"error": False}, f"{side.name}: {st}"


@contextlib.asynccontextmanager
async def running_pair(p_kind: str, s_kind: str, **kw: Any):
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
