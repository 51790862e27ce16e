"""What ``blockrep demo``, the benchmarks and the tests share: free ports, processes run
by pid with a log file, readiness by connecting, an HA pair of ``blockrep primary`` /
``blockrep secondary`` processes on loopback, and the COLO pair's command lines.

bench/ never imports tests/, so everything the benchmarks need lives here; this module
must import without the test extras (qemu.qmp, pytest): the demo runs from a plain install.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .block import Graph, Node
from .cli.ha import qmp_call

MiB = 1 << 20


def blockrep_argv(*args: str) -> list[str]:
    """The command line of ``blockrep ARGS`` in this interpreter (a venv needs no PATH)."""
    return [sys.executable, "-m", "blockrep.cli", *args]


# -- ports and sockets ----------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accepting(address: str | tuple[str, int]) -> bool:
    """Whether a unix socket path or a (host, port) accepts a connection now.

    A unix socket file appears at bind(), a moment before listen(): only a connection
    proves the server is ready.
    """
    try:
        if isinstance(address, str):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(address)
        else:
            socket.create_connection(address, 0.5).close()
        return True
    except OSError:
        return False


def wait_accepting(
    address: str | tuple[str, int],
    proc: subprocess.Popen | None = None,
    timeout: float = 20.0,
    what: Callable[[], str] = lambda: "",
) -> None:
    """Wait until ``address`` accepts; fail early when ``proc`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}):\n{what()}")
        if accepting(address):
            return
        time.sleep(0.02)
    raise TimeoutError(f"{address} did not appear:\n{what()}")


# -- processes by pid -------------------------------------------------------------------------


class Process:
    """One child process with its output in a log file, stopped by pid."""

    def __init__(
        self,
        argv: Sequence[str],
        log_path: str,
        *,
        sock: str | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.sock = sock
        if sock and os.path.exists(sock):
            os.unlink(sock)  # a stale socket must not look like a ready server
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=env,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, path: str | None = None, timeout: float = 20.0) -> None:
        """Until the socket (``path`` or the one given at start) accepts connections."""
        address = path or self.sock
        assert address is not None, "no socket to wait for"
        wait_accepting(address, self.proc, timeout, self.output)

    def kill(self, timeout: float = 20.0) -> None:
        """SIGKILL (a crash), and reap it."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send ``sig``; SIGKILL after ``timeout``. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode


async def nbd_client(path: str, export: str) -> tuple[Graph, Node]:
    """blockrep's own nbd node on a unix socket, in a graph of its own."""
    g = Graph()
    node = await g.add(
        {"driver": "nbd", "server": {"type": "unix", "path": path}, "export": export}
    )
    return g, node


# -- images ---------------------------------------------------------------------------------


def random_image(path: str, size: int, seed: int = 1) -> bytes:
    """A raw image of seeded random bytes; returns its contents."""
    data = random.Random(seed).randbytes(size)
    with open(path, "wb") as f:
        f.write(data)
    return data


# -- the COLO pair's -drive options (REFERENCE-QEMU.md §2 and the seed's shared-disk layout) --


def drive_args(drives: Sequence[str]) -> list[str]:
    """``-drive D`` for each D."""
    return [arg for d in drives for arg in ("-drive", d)]


def separate_secondary_drives(sec: str, active: str, hidden: str) -> list[str]:
    """S of a pair on separate disks: parent0, replication over active -> hidden -> parent0."""
    return [
        f"if=none,id=parent0,driver=raw,file.filename={sec}",
        "if=none,id=childs0,driver=replication,mode=secondary,top-id=colo-disk0,"
        f"file.driver=qcow2,file.node-name=active0,file.file.filename={active},"
        "file.backing.driver=qcow2,file.backing.node-name=hidden0,"
        f"file.backing.file.filename={hidden},file.backing.backing=parent0",
        "if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0=childs0",
    ]


def separate_primary_drives(prim: str) -> list[str]:
    """P of a pair on separate disks: a quorum over the local disk (the link is added later)."""
    return [
        "if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,"
        f"children.0.file.filename={prim},children.0.driver=raw",
    ]


def shared_secondary_drives(shared: str, active: str, hidden: str) -> list[str]:
    """S of a shared-disk pair (the seed's command line, paths changed)."""
    return [
        f"if=none,driver=qcow2,file.filename={hidden},id=hidden_disk0,"
        f"backing.driver=raw,backing.file.filename={shared}",
        "if=virtio,id=active-disk0,driver=replication,mode=secondary,"
        f"file.driver=qcow2,top-id=active-disk0,file.file.filename={active},"
        "file.backing=hidden_disk0,shared-disk=on",
    ]


def shared_primary_drives(shared: str) -> list[str]:
    return [f"if=virtio,id=primary_disk0,file.filename={shared},driver=raw"]


class QMPSide(Protocol):
    async def run(self, cmd: str, args: dict[str, Any] | None = None) -> Any: ...


def primary_replication_node(shared: bool, server: dict[str, Any]) -> dict[str, Any]:
    """The blockdev-add of P's replication node, linked to S's NBD ``server``."""
    if shared:
        return {
            "driver": "replication",
            "node-name": "rep",
            "mode": "primary",
            "shared-disk-id": "primary_disk0",
            "shared-disk": True,
            "file": {"driver": "nbd", "export": "hidden_disk0", "server": server},
        }
    return {
        "driver": "replication",
        "node-name": "replication0",
        "mode": "primary",
        "file": {"driver": "nbd", "export": "parent0", "server": server},
    }


async def start_replication(
    P: QMPSide, S: QMPSide, *, shared: bool, s_addr: dict[str, Any], p_server: dict[str, Any]
) -> None:
    """The QMP sequence that pairs P and S: S exports, P links, S enables, then P."""
    await S.run("nbd-server-start", {"addr": s_addr})
    export = "hidden_disk0" if shared else "parent0"
    await S.run("nbd-server-add", {"device": export, "writable": True})
    await P.run("blockdev-add", primary_replication_node(shared, p_server))
    if not shared:
        await P.run("x-blockdev-change", {"parent": "colo-disk0", "node": "replication0"})
    await S.run("xen-set-replication", {"enable": True, "primary": False})
    await P.run("xen-set-replication", {"enable": True, "primary": True})


# -- an HA pair: blockrep primary / blockrep secondary -----------------------------------------


class HANode:
    """One ``blockrep primary|secondary`` process with its sockets and files."""

    def __init__(
        self, role: str, name: str, process: Process, disk: str, qmp: str, export: str, state: str
    ) -> None:
        self.role, self.name, self.process = role, name, process
        self.proc = process.proc
        self.log = process.log_path
        self.disk, self.qmp, self.export, self.state = disk, qmp, export, state

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.process.output()

    def status(self) -> dict[str, Any]:
        return qmp_call(self.qmp, "query-ha-status", timeout=20)

    async def astatus(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.status)

    async def qmp_async(
        self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 60
    ) -> Any:
        try:
            return await asyncio.to_thread(qmp_call, self.qmp, cmd, args, timeout)
        except RuntimeError as e:
            raise AssertionError(f"{self.name}: {cmd}: {e}\n{self.log_text()}") from None

    def _exited(self) -> AssertionError:
        return AssertionError(f"{self.name} exited ({self.proc.returncode}):\n{self.log_text()}")

    async def wait_status(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 15.0, what: str = ""
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        s: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._exited()
            s = await self.astatus()
            if pred(s):
                return s
            await asyncio.sleep(0.05)
        raise AssertionError(
            f"{self.name}: timed out waiting for {what}; last status {s}\n{self.log_text()}"
        )

    async def wait_ready(self, timeout: float = 40.0) -> None:
        """Until the log says ``blockrep ROLE: ready`` (paired, disks verified; ``up``:
        serving with role none)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            if f"blockrep {self.role}: ready" in text or (
                self.role == "up" and " ready (role none)" in text
            ):
                return
            if self.proc.poll() is not None:
                raise self._exited()
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
        self.process.kill()

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

    async def client(self) -> tuple[Graph, Node]:
        return await nbd_client(self.export, "disk")


class HA:
    """A short temporary directory with disks, and the HA processes started in it.

    Unix socket paths must stay short, hence /tmp. ``close`` kills every process by pid.
    """

    node_class: type[HANode] = HANode

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="ha-", dir="/tmp")
        self.tag = os.path.basename(self.dir)
        self.nodes: list[HANode] = []
        self.graphs: list[Graph] = []

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

    def _node(
        self, role: str, name: str, disk: str, args: list[str], extra: Sequence[str]
    ) -> HANode:
        qmp, export, state = (self.path(f"{name}.{x}") for x in ("qmp", "nbd", "state"))
        argv = blockrep_argv(
            role,
            "--disk",
            disk,
            *args,
            "--export",
            f"unix:{export}",
            "--qmp",
            f"unix:{qmp}",
            "--state-file",
            state,
            *extra,
        )
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = Process(argv, self.path(f"{name}.log"), env=env)
        n = self.node_class(role, name, proc, disk, qmp, export, state)
        self.nodes.append(n)
        return n

    def psk_file(self) -> str:
        """The pair's shared secret (one per HA dir, mode 0600)."""
        path = self.path("pair.psk")
        if not os.path.exists(path):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(os.urandom(32).hex() + "\n")
        return path

    def _secure(self, address: str, extra: Sequence[str]) -> list[str]:
        """A pair on TCP must authenticate: the dir's psk-file unless the test chose
        (--psk-file, --tls-dir or --insecure in ``extra``)."""
        chosen = {"--psk-file", "--tls-dir", "--insecure"} & set(extra)
        if address.startswith("unix:") or chosen:
            return []
        return ["--psk-file", self.psk_file()]

    def secondary(
        self,
        name: str = "s",
        disk: str | None = None,
        listen: str | None = None,
        extra: Sequence[str] = (),
    ) -> HANode:
        buffers = "/dev/shm" if os.path.isdir("/dev/shm") else self.dir
        listen = listen or f"unix:{self.path(name + '.ctl')}"
        args = ["--listen", listen, "--buffer-dir", buffers, *self._secure(listen, extra)]
        if not listen.startswith("unix:") and "--link-port" not in extra:
            args += ["--link-port", str(free_port())]  # the default (port + 1) may be taken
        return self._node("secondary", name, disk or self.disk("s.raw"), args, extra)

    def primary(
        self,
        secondary: str,
        name: str = "p",
        disk: str | None = None,
        extra: Sequence[str] = (),
    ) -> HANode:
        args = ["--secondary", secondary, "--connect-timeout", "20"]
        args += self._secure(secondary, extra)
        return self._node("primary", name, disk or self.disk("p.raw"), args, extra)

    def resource(
        self,
        name: str = "r0",
        nodes: tuple[str, ...] = ("a", "b"),
        disks: dict[str, list[str]] | None = None,
        checkpoint_interval: float = 0.5,
        node_keys: dict[str, list[str]] | None = None,
    ) -> str:
        """A resource file for ``blockrep up``: unix sockets in this dir, one volume per
        node (``disks`` to say otherwise), ``node_keys`` lines added to a node's table.
        Returns its path."""
        lines = [
            "[resource]",
            f'name = "{name}"',
            'mode = "separate"',
            f"checkpoint-interval = {checkpoint_interval}",
        ]
        for n in nodes:
            vols = (disks or {}).get(n) or [self.disk(f"{n}.raw")]
            exports = [f"nbd+unix:///disk?socket={self.path(n)}.nbd"] + [
                f"nbd+unix:///disk{i}?socket={self.path(n)}.nbd" for i in range(1, len(vols))
            ]
            lines += [
                f"[nodes.{n}]",
                f'address = "unix:{self.path(n)}.ctl"',
                f'qmp = "unix:{self.path(n)}.qmp"',
                'buffer-dir = "/dev/shm"' if os.path.isdir("/dev/shm") else "",
                "disks = [" + ", ".join(f'"{v}"' for v in vols) + "]",
                "exports = [" + ", ".join(f'"{e}"' for e in exports) + "]",
                *(node_keys or {}).get(n, []),
            ]
        path = self.path(f"{name}.toml")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def up(self, resource: str, name: str, extra: Sequence[str] = ()) -> HANode:
        """``blockrep up FILE --node NAME`` (role none until promoted or paired)."""
        argv = blockrep_argv("up", resource, "--node", name, *extra)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        life = sum(1 for n in self.nodes if n.name == name)  # a log per life: ready is this one's
        proc = Process(argv, self.path(f"{name}.{life}.log"), env=env)
        disk = self.disk(f"{name}.raw")
        state = disk + ".blockrep-state.json"
        n = self.node_class("up", name, proc, disk, self.path(f"{name}.qmp"),
                            self.path(f"{name}.nbd"), state)  # fmt: skip
        self.nodes.append(n)
        return n

    async def client(self, node: HANode) -> Node:
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
            if n.role in ("secondary", "up"):
                remove_overlays(os.path.basename(n.disk))
        self.nodes.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


def remove_overlays(disk_stem: str) -> None:
    """Remove the /dev/shm overlays a SIGKILLed secondary could not remove."""
    d = "/dev/shm"
    if not os.path.isdir(d):
        return
    for f in os.listdir(d):
        if f.startswith(f"blockrep-{disk_stem}-") and f.endswith(".qcow2"):
            try:
                os.unlink(os.path.join(d, f))
            except OSError:
                pass
