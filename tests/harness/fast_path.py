"""What the fast-path tests share (issue 15): a write issued the way the NBD server issues
it — ``try_write`` first, the general coroutine path when it refuses — and in-process
graphs: raw over a file, and P's quorum of raw + replication(primary) -> nbd linked to
an in-process blockrep NBD server over a unix socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from blockrep import fastpath
from blockrep.block import Graph
from blockrep.block.node import Node
from blockrep.errors import BlockError
from blockrep.export import Export
from blockrep.jobs.base import JobManager
from blockrep.nbd.server import NBDServer
from blockrep.replication.control import ReplicationControl
from blockrep.replication.filter import ReplicationMode, ReplicationNode


@contextlib.contextmanager
def fast_path_on() -> Iterator[None]:
    """The switch on and the counters at zero in this process, whatever the environment
    says (``make test`` runs some files again with ``BLOCKREP_FAST_PATH=0``); restored
    afterwards. For tests of the fast path itself."""
    old = fastpath.enabled()
    fastpath.set_enabled(True)
    fastpath.COUNTERS.reset()
    try:
        yield
    finally:
        fastpath.set_enabled(old)
        fastpath.COUNTERS.reset()


class GeneralExport(Export):
    """An export that never offers the fast path: the server takes the general path."""

    def try_write(self, offset: int, data: Any, fua: bool, done: Any) -> bool:
        return False

    def try_read(self, offset: int, nbytes: int) -> bytes | None:
        return None

    def file_range(self, offset: int, nbytes: int) -> tuple[int, int] | None:
        return None


class GatedExport(GeneralExport):
    """A general-path export whose writes wait for ``hold`` (a reply the test holds back)."""

    def __init__(self, name: str, node: Node) -> None:
        super().__init__(name, node, writable=True)
        self.hold = asyncio.Event()
        self.hold.set()
        self.arrived = 0

    async def _held_write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        self.arrived += 1
        await self.hold.wait()
        await self.child.node.write(offset, data, fua=fua)

    def write(self, offset: int, data: bytes | memoryview, fua: bool) -> Awaitable[None]:
        return self._held_write(offset, data, fua)


class Issuer:
    """Issues requests on ``node``: with ``fast``, as the NBD server does (try_write, and
    node.write when it refuses); without, through the general path only. Every ``done``
    of an accepted try_write must be called exactly once."""

    def __init__(self, node: Node, fast: bool) -> None:
        self.node = node
        self.fast = fast
        self.taken = 0
        self.refused = 0
        self.fast_reads = 0
        self.done_calls: list[int] = []

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        if self.fast:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[BlockError | None] = loop.create_future()
            i = len(self.done_calls)
            self.done_calls.append(0)

            def done(err: BlockError | None) -> None:
                self.done_calls[i] += 1
                if not fut.done():
                    fut.set_result(err)

            if self.node.try_write(offset, data, fua, done):
                self.taken += 1
                err = await fut
                if err is not None:
                    raise err
                return
            assert self.done_calls[i] == 0, "a refused try_write called done"
            self.done_calls[i] = 1
            self.refused += 1
        await self.node.write(offset, data, fua)

    async def read(self, offset: int, nbytes: int) -> bytes:
        if self.fast:
            data = self.node.try_read(offset, nbytes)
            if data is not None:
                self.fast_reads += 1
                return data
        return await self.node.read(offset, nbytes)

    def check_done_once(self) -> None:
        bad = [i for i, n in enumerate(self.done_calls) if n != 1]
        assert not bad, f"done called {[self.done_calls[i] for i in bad]} times for requests {bad}"


async def wait_until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``pred`` on the loop until it holds; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


def short_dir(prefix: str = "fp") -> str:
    """A directory short enough for unix socket paths."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def zero_file(path: str, size: int, data: bytes | None = None) -> None:
    with open(path, "wb") as f:
        if data is None:
            f.truncate(size)
        else:
            f.write(data)


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class Secondary:
    """An in-process NBD server exporting ``disk`` (raw over ``path``, or any node)."""

    def __init__(self, sock: str) -> None:
        self.sock = sock
        self.graph = Graph()
        self.server: NBDServer | None = None
        self.export: Export | None = None

    async def start(
        self,
        node_opts: dict[str, Any],
        export_class: Callable[..., Export] = Export,
    ) -> Node:
        node = await self.graph.add(node_opts)
        if export_class is GatedExport:
            self.export = GatedExport("disk", node)
        else:
            self.export = export_class("disk", node, writable=True)
        self.server = NBDServer({"disk": self.export})
        await self.server.listen_unix(self.sock)
        return node

    async def close(self) -> None:
        if isinstance(self.export, GatedExport):
            self.export.hold.set()  # a held write must not hold the close
        if self.server is not None:
            await asyncio.wait_for(self.server.close(), 10)
        if self.export is not None:
            self.export.release()
        await asyncio.wait_for(self.graph.close_all(), 10)


def raw_file(path: str, node_name: str | None = None) -> dict[str, Any]:
    opts: dict[str, Any] = {"driver": "raw", "file": {"driver": "file", "filename": path}}
    if node_name:
        opts["node-name"] = node_name
    return opts


def nbd_opts(sock: str, node_name: str = "link") -> dict[str, Any]:
    return {
        "driver": "nbd",
        "node-name": node_name,
        "server": {"type": "unix", "path": sock},
        "export": "disk",
    }


class Primary:
    """P's graph: quorum ``q`` (fifo, vote-threshold 1) over raw(``p_path``) and
    replication ``rep`` (primary) -> nbd ``link`` to ``sock``; events recorded."""

    def __init__(self) -> None:
        self.graph = Graph()
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.graph.emit = lambda name, data: self.events.append((name, data))
        self.lost_forwards = 0

    async def open(self, p_path: str, sock: str, *, start: bool = True, threshold: int = 1) -> Node:
        q = await self.graph.add(
            {
                "driver": "quorum",
                "node-name": "q",
                "read-pattern": "fifo",
                "vote-threshold": threshold,
                "children": [
                    raw_file(p_path, "local"),
                    {
                        "driver": "replication",
                        "node-name": "rep",
                        "mode": "primary",
                        "file": nbd_opts(sock),
                    },
                ],
            }
        )
        rep = self.rep
        rep.state.on_lost_forward = self._lost
        if start:
            control = ReplicationControl(self.graph, JobManager(lambda n, d: None))
            await control.start(rep, ReplicationMode.PRIMARY)
        return q

    def _lost(self) -> None:
        self.lost_forwards += 1

    @property
    def rep(self) -> ReplicationNode:
        node = self.graph.get_node("rep")
        assert isinstance(node, ReplicationNode)
        return node

    async def close(self) -> None:
        await asyncio.wait_for(self.graph.close_all(), 10)


def remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
