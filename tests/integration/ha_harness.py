"""Harness for the HA manager tests: ``blockrep primary|secondary`` processes on loopback.

Every process is started with ``python -m blockrep.cli ROLE ...`` in a short temporary
directory (unix socket paths stay short), logs to a file there, and is killed by pid
when the test ends. Consumers talk to the nodes' NBD exports through blockrep's own
nbd node; control commands go through ``blockrep.cli.ha.qmp_call``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from blockrep.block import Graph
from blockrep.cli.ha import qmp_call

MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# README "The HA manager": `blockrep status --json` keys and their types
PEER_STATES = {
    "connecting",
    "connected",
    "peer-lost",
    "degraded",
    "failed-over",
    "split-brain",
    "stale",
    "refused",
}
STAGES = {"none", "running", "failover", "failover-failed", "done"}
NUM = (int, float)


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def sha_file(path: str) -> str:
    with open(path, "rb") as f:
        return sha(f.read())


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _ranges_ok(v: Any) -> bool:
    return isinstance(v, list) and all(
        isinstance(r, list)
        and len(r) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in r)
        for r in v
    )


def check_status_schema(s: dict[str, Any], role: str | None = None) -> None:
    """Every documented key present with the documented type (README, `blockrep status --json`)."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v: Any) -> bool:
        return isinstance(v, NUM) and not isinstance(v, bool)

    assert isinstance(s, dict), s
    assert s["role"] in ("primary", "secondary"), s["role"]
    if role is not None:
        assert s["role"] == role
    assert s["mode"] in ("separate", "shared"), s["mode"]
    assert isinstance(s["stage"], str) and s["stage"] in STAGES, s["stage"]
    assert isinstance(s["peer"], str) and s["peer"] in PEER_STATES, s["peer"]
    assert is_int(s["epoch"]) and s["epoch"] >= 0
    assert s["epoch-uuid"] is None or isinstance(s["epoch-uuid"], str)
    assert is_num(s["epoch-age"]) and s["epoch-age"] >= 0
    for k in ("hidden-bytes", "active-bytes", "unacked-bytes", "checkpoints"):
        assert is_int(s[k]) and s[k] >= 0, (k, s[k])
    for k in ("last-checkpoint-pause-ms", "checkpoint-pause-p50-ms", "checkpoint-pause-p99-ms"):
        assert is_num(s[k]) and s[k] >= 0, (k, s[k])
    assert s["checkpoint-pause-p50-ms"] <= s["checkpoint-pause-p99-ms"] + 1e-9
    assert s["replication-error"] is None or isinstance(s["replication-error"], str)
    assert isinstance(s["errors"], list) and all(isinstance(e, str) for e in s["errors"])
    af = s["auto-failover"]
    assert (
        isinstance(af, dict) and isinstance(af["enabled"], bool) and isinstance(af["reason"], str)
    ), af
    if "timeout" in af:
        assert is_num(af["timeout"])
    assert s["alone-since"] is None or isinstance(s["alone-since"], str)
    assert _ranges_ok(s["written-alone"]), s["written-alone"]
    if "split-brain" in s:
        sb = s["split-brain"]
        assert sb["common-epoch"] is None or isinstance(sb["common-epoch"], str)
        assert _ranges_ok(sb["primary"]["written"]) and _ranges_ok(sb["secondary"]["written"]), sb
    if "sync" in s:
        sy = s["sync"]
        assert isinstance(sy["what"], str) and is_int(sy["current"]) and is_int(sy["total"]), sy
    assert isinstance(s["jobs"], list)
    for j in s["jobs"]:
        assert (
            isinstance(j["id"], str) and isinstance(j["type"], str) and isinstance(j["status"], str)
        ), j
        assert is_int(j["current"]) and is_int(j["total"]), j


def scrape_metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("blockrep_"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


class Node:
    def __init__(
        self,
        ha: HA,
        role: str,
        name: str,
        proc: subprocess.Popen,
        disk: str,
        log: str,
        qmp: str,
        export: str,
        state: str,
    ) -> None:
        self.ha, self.role, self.name, self.proc = ha, role, name, proc
        self.disk, self.log, self.qmp, self.export, self.state = disk, log, qmp, export, state

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def status(self) -> dict[str, Any]:
        s = qmp_call(self.qmp, "query-ha-status", timeout=20)
        check_status_schema(s, self.role)
        return s

    def status_cli(self) -> dict[str, Any]:
        """`blockrep status --json` as a user runs it."""
        r = subprocess.run(
            [sys.executable, "-m", "blockrep.cli", "status", "--qmp", f"unix:{self.qmp}", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert r.returncode == 0, r.stderr
        s = json.loads(r.stdout)
        check_status_schema(s, self.role)
        return s

    async def astatus(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.status)

    async def qmp_async(
        self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 60
    ) -> Any:
        try:
            return await asyncio.to_thread(qmp_call, self.qmp, cmd, args, timeout)
        except RuntimeError as e:
            raise AssertionError(f"{self.name}: {cmd}: {e}\n{self.log_text()}") from None

    async def wait_status(self, pred, timeout: float = 15.0, what: str = "") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        s: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited ({self.proc.returncode}):\n{self.log_text()}"
                )
            s = await self.astatus()
            if pred(s):
                return s
            await asyncio.sleep(0.05)
        raise AssertionError(
            f"{self.name}: timed out waiting for {what}; last status {json.dumps(s)}\n{self.log_text()}"
        )

    async def wait_ready(self, timeout: float = 40.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if f"blockrep {self.role}: ready" in self.log_text():
                return
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited ({self.proc.returncode}):\n{self.log_text()}"
                )
            await asyncio.sleep(0.03)
        raise AssertionError(f"{self.name} not ready after {timeout} s:\n{self.log_text()}")

    async def wait_exit(self, timeout: float = 40.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                return rc
            await asyncio.sleep(0.03)
        raise AssertionError(f"{self.name} still running after {timeout} s:\n{self.log_text()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(20)

    def quit(self) -> None:
        """Clean stop through QMP (flushes), then make sure it is gone."""
        if self.proc.poll() is None:
            try:
                qmp_call(self.qmp, "quit", timeout=10)
            except (OSError, RuntimeError, ConnectionError):
                pass
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    async def client(self) -> tuple[Graph, Any]:
        g = Graph()
        node = await g.add(
            {"driver": "nbd", "server": {"type": "unix", "path": self.export}, "export": "disk"}
        )
        return g, node


class HA:
    """A temp dir with disks, and the processes started in it (killed on close)."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="ha-", dir="/tmp")
        self.tag = os.path.basename(self.dir)
        self.nodes: list[Node] = []
        self.graphs: list[Graph] = []
        self.extra_pids: list[subprocess.Popen] = []

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def disk(self, name: str) -> str:
        """Disk files carry the dir's tag: the overlays in /dev/shm are named after them."""
        return os.path.join(self.dir, f"{self.tag}-{name}")

    def make_disks(
        self, size: int, seed: int = 1, names: tuple[str, ...] = ("p.raw", "s.raw")
    ) -> bytes:
        data = random.Random(seed).randbytes(size)
        for n in names:
            with open(self.disk(n), "wb") as f:
                f.write(data)
        return data

    def _start(self, role: str, name: str, args: list[str]) -> subprocess.Popen:
        log = self.path(f"{name}.log")
        with open(log, "ab") as lf:
            return subprocess.Popen(
                [sys.executable, "-m", "blockrep.cli", role, *args],
                stdout=lf,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def secondary(
        self,
        name: str = "s",
        disk: str | None = None,
        listen: str | None = None,
        extra: list[str] | tuple[str, ...] = (),
    ) -> Node:
        disk = disk or self.disk("s.raw")
        listen = listen or f"unix:{self.path(name + '.ctl')}"
        qmp, export, state = (
            self.path(f"{name}.qmp"),
            self.path(f"{name}.nbd"),
            self.path(f"{name}.state"),
        )
        args = [
            "--disk",
            disk,
            "--listen",
            listen,
            "--export",
            f"unix:{export}",
            "--qmp",
            f"unix:{qmp}",
            "--state-file",
            state,
            "--buffer-dir",
            "/dev/shm" if os.path.isdir("/dev/shm") else self.dir,
            *extra,
        ]
        n = Node(
            self,
            "secondary",
            name,
            self._start("secondary", name, args),
            disk,
            self.path(f"{name}.log"),
            qmp,
            export,
            state,
        )
        self.nodes.append(n)
        return n

    def primary(
        self,
        secondary: str,
        name: str = "p",
        disk: str | None = None,
        extra: list[str] | tuple[str, ...] = (),
    ) -> Node:
        disk = disk or self.disk("p.raw")
        qmp, export, state = (
            self.path(f"{name}.qmp"),
            self.path(f"{name}.nbd"),
            self.path(f"{name}.state"),
        )
        args = [
            "--disk",
            disk,
            "--secondary",
            secondary,
            "--export",
            f"unix:{export}",
            "--qmp",
            f"unix:{qmp}",
            "--state-file",
            state,
            "--connect-timeout",
            "20",
            *extra,
        ]
        n = Node(
            self,
            "primary",
            name,
            self._start("primary", name, args),
            disk,
            self.path(f"{name}.log"),
            qmp,
            export,
            state,
        )
        self.nodes.append(n)
        return n

    async def client(self, node: Node):
        g, c = await node.client()
        self.graphs.append(g)
        return c

    async def aclose(self) -> None:
        for g in self.graphs:
            try:
                await asyncio.wait_for(g.close_all(), 5)
            except BaseException:  # noqa: BLE001 - a dead server may leave the client broken
                pass
        self.graphs.clear()
        self.close()

    def close(self) -> None:
        for n in self.nodes:
            try:
                n.kill()
            except (OSError, subprocess.TimeoutExpired):
                pass
        for n in self.nodes:
            # the overlays of a killed secondary stay in the buffer dir: remove ours
            if n.role == "secondary":
                cleanup_overlays(os.path.basename(n.disk))
        self.nodes.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


def cleanup_overlays(disk_stem: str) -> None:
    """Remove /dev/shm overlays a SIGKILLed secondary could not remove."""
    d = "/dev/shm"
    if not os.path.isdir(d):
        return
    for f in os.listdir(d):
        if f.startswith(f"blockrep-{disk_stem}-") and f.endswith(".qcow2"):
            try:
                os.unlink(os.path.join(d, f))
            except OSError:
                pass


async def random_writes(
    node,
    rnd: random.Random,
    size: int,
    count: int,
    model: bytearray | None = None,
    sizes=(512, 1000, 4096, 16384, 65536),
    concurrent: bool = True,
) -> int:
    """``count`` random writes; with ``model``, written sequentially (the model stays exact)."""
    ops = []
    for _ in range(count):
        n = rnd.choice(sizes)
        off = rnd.randrange(0, size - n)
        ops.append((off, rnd.randbytes(n)))
    if model is not None or not concurrent:
        for off, data in ops:
            await node.write(off, data)
            if model is not None:
                model[off : off + len(data)] = data
    else:
        await asyncio.gather(*(node.write(off, data) for off, data in ops))
    return sum(len(d) for _, d in ops)
