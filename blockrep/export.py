"""Block exports: a node served under a name (QEMU's BlockExport over a BlockBackend).

The NBD server (``nbd/server``) knows an export only through the ``NBDExport``
protocol; this module is where that protocol meets the block graph, so the NBD
codec and server never import the block layer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from . import fastpath
from .block.node import Child, Done, Extent, Node
from .errors import BlockError


class Export:
    """A node served under a name.

    The export holds its node through a graph edge with no parent node, so it is a
    user of the node (``Graph.has_backend``) and follows it when a filter is
    inserted above it or a commit pivots the graph.
    """

    def __init__(
        self, name: str, node: Node, writable: bool = False, description: str = "", id: str = ""
    ) -> None:
        self.name = name
        self.child = Child(None, f"export:{id or name}", node)
        self.writable = writable
        self.description = description
        self.id = id or name
        self.clients: set[Any] = set()
        # quiescing (checkpoints): new requests wait at the gate, in-flight ones finish
        self.gate = asyncio.Event()
        self.gate.set()
        self.active = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def enter(self) -> None:
        await self.gate.wait()
        self.active += 1
        self.idle.clear()

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self.idle.set()

    async def quiesce(self) -> None:
        """Hold new requests back and wait until none is in flight."""
        self.gate.clear()
        await self.idle.wait()

    def resume(self) -> None:
        self.gate.set()

    @property
    def node(self) -> Node:
        return self.child.node

    def release(self) -> None:
        self.child.detach()

    @property
    def size(self) -> int:
        return self.node.length

    # The data path. Each returns the node's own coroutine rather than awaiting it, so
    # a request costs no extra coroutine frame here; the node is looked up per call
    # because the edge follows graph changes (filter insertion, commit pivot).

    def read(self, offset: int, nbytes: int) -> Awaitable[bytes]:
        return self.child.node.read(offset, nbytes)

    def write(self, offset: int, data: bytes | memoryview, fua: bool) -> Awaitable[None]:
        return self.child.node.write(offset, data, fua=fua)

    def write_zeroes(self, offset: int, nbytes: int, may_unmap: bool, fua: bool) -> Awaitable[None]:
        return self.child.node.write_zeroes(offset, nbytes, may_unmap=may_unmap, fua=fua)

    def discard(self, offset: int, nbytes: int) -> Awaitable[None]:
        return self.child.node.discard(offset, nbytes)

    def flush(self) -> Awaitable[None]:
        return self.child.node.flush()

    def block_status(self, offset: int, nbytes: int) -> Awaitable[list[Extent]]:
        return self.child.node.block_status(offset, nbytes)

    # The fast path (fastpath.py): a request as plain calls, or a refusal that leaves
    # nothing done so the server takes the general path above.

    def try_write(self, offset: int, data: bytes | memoryview, fua: bool, done: Done) -> bool:
        """A write in flight on the export (enter..leave) until ``done`` is called."""
        if not fastpath.enabled():
            return False
        if not self.gate.is_set():
            return fastpath.refuse("export: quiesced")
        if not self.active:
            self.idle.clear()
        self.active += 1
        settled = False

        def finish(err: BlockError | None) -> None:
            nonlocal settled
            if not settled:
                settled = True
                self.leave()
                done(err)

        try:
            taken = self.child.node.try_write(offset, data, fua, finish)
        except BaseException:
            # a bug below: this request is lost (the server drops the connection), the
            # export's count is not — a checkpoint's quiesce must not wait for it
            if not settled:
                settled = True
                self.leave()
            raise
        if not taken:
            settled = True
            self.leave()
            return False
        counts = fastpath.COUNTERS.taken
        counts["write"] = counts.get("write", 0) + 1
        return True

    def try_read(self, offset: int, nbytes: int) -> bytes | None:
        if not fastpath.enabled() or not self.gate.is_set():
            return None
        data = self.child.node.try_read(offset, nbytes)
        if data is not None:
            fastpath.COUNTERS.take("read")
        return data

    def file_range(self, offset: int, nbytes: int) -> tuple[int, int] | None:
        if not fastpath.enabled() or not self.gate.is_set():
            return None
        return self.child.node.file_range(offset, nbytes)
