"""The ``copy-before-write`` filter: preserve a point-in-time image in ``target``.

Before a write, write_zeroes or discard reaches the source (``file``), the
original contents of every cluster it touches are copied to the target — once per
cluster per epoch: a bitmap of *armed* clusters says which still need it, and a
copy disarms its cluster. A second request to a cluster whose copy is in flight
waits for that copy. If a copy fails, the guest request fails too
(``on-cbw-error=break-guest-write``, the default) or the snapshot is marked broken
and the request proceeds (``break-snapshot``). ``rearm`` (a checkpoint) arms
every cluster again. The copy unit is max(64 KiB, target cluster size).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .. import fastpath
from ..errors import BlockError, OptionError
from .graph import Graph, register
from .node import Done, Extent, Node, is_zero

MIN_CLUSTER = 64 << 10
MAX_RUN = 1 << 20  # contiguous armed clusters copied in one read/write


def cluster_size_of(node: Node) -> int:
    info = node.info()
    cs = int(info.get("cluster-size", 0) or 0)
    return max(MIN_CLUSTER, cs)


@register
class CopyBeforeWriteNode(Node):
    driver_name = "copy-before-write"
    is_filter = True
    schema = {
        "file": "ref",
        "target": "ref",
        "bitmap": "any",
        "on-cbw-error": ("enum", ("break-guest-write", "break-snapshot")),
        "cbw-timeout": "int",
    }

    def __init__(self, node_name: str, options: dict[str, Any]) -> None:
        super().__init__(node_name, options)
        self.cluster_size = MIN_CLUSTER
        self.armed = bytearray()
        self.inflight: dict[int, asyncio.Future] = {}
        self.break_guest_write = (
            options.get("on-cbw-error", "break-guest-write") == "break-guest-write"
        )
        self.snapshot_error: BlockError | None = None
        self.clusters_copied = 0  # this epoch
        # called with the byte count of every copy (a backup job's progress, as
        # QEMU's block-copy feeds the job's progress meter); a failed request, copy
        # or source write, reaches the node's write_error_listeners
        self.on_copied: list[Callable[[int], None]] = []

    @classmethod
    async def open(
        cls, graph: Graph, name: str, opts: dict[str, Any], typed: bool
    ) -> CopyBeforeWriteNode:
        if opts.get("bitmap") is not None:
            raise OptionError("copy-before-write bitmaps are not supported by blockrep")
        node = cls(name, opts)
        src = await graph.open_child(opts, "file", typed=typed)
        tgt = await graph.open_child(opts, "target", typed=typed)
        assert src is not None and tgt is not None
        node.attach_child("file", src)
        node.attach_child("target", tgt)
        node.length = src.length
        node.read_only = src.read_only
        node.cluster_size = cluster_size_of(tgt)
        node.rearm()
        return node

    @property
    def source(self) -> Node:
        return self.children["file"].node

    @property
    def target(self) -> Node:
        return self.children["target"].node

    def nclusters(self) -> int:
        return -(-self.length // self.cluster_size)

    def rearm(self) -> None:
        """Arm every cluster again (a new epoch begins)."""
        self.armed = bytearray(b"\x01") * self.nclusters()
        self.clusters_copied = 0
        self.snapshot_error = None

    def armed_count(self) -> int:
        return self.armed.count(1)

    # -- the copy ------------------------------------------------------------------

    async def copy_range(self, offset: int, nbytes: int) -> None:
        """Make sure the clusters touching [offset, offset+nbytes) were preserved."""
        cs = self.cluster_size
        first = offset // cs
        last = (offset + max(nbytes, 1) - 1) // cs
        c = first
        while c <= last:
            if not self.armed[c]:
                c += 1
                continue
            fut = self.inflight.get(c)
            if fut is not None:
                await asyncio.shield(fut)
                continue  # look again: the copy may have failed and left it armed
            # claim a run of armed, idle clusters and copy them in one go
            run = 1
            while (
                c + run <= last
                and run * cs < MAX_RUN
                and self.armed[c + run]
                and (c + run) not in self.inflight
            ):
                run += 1
            await self._copy_run(c, run)
            c += run

    async def _copy_run(self, first: int, n: int) -> None:
        cs = self.cluster_size
        fut = asyncio.get_running_loop().create_future()
        for c in range(first, first + n):
            self.inflight[c] = fut
        try:
            start = first * cs
            length = min(n * cs, self.length - start)
            # The source is read as it is, with no block-status query first: on tmpfs
            # a SEEK_DATA/SEEK_HOLE walks the page cache up to the next hole, ~1 ms per
            # copy on a filled secondary disk (issue 15: 44 % of S's time under 4 KiB
            # random writes), where reading a hole costs microseconds. Zeroes, read
            # from a hole or not, reach the target as write_zeroes, as before.
            data = await self.source.read(start, length)
            if is_zero(data):
                await self.target.write_zeroes(start, length, may_unmap=False)
            else:
                await self.target.write(start, data)
            for c in range(first, first + n):
                self.armed[c] = 0
            self.clusters_copied += n
            for cb in self.on_copied:
                cb(length)
        finally:
            for c in range(first, first + n):
                del self.inflight[c]
            fut.set_result(None)

    async def _before_write(self, offset: int, nbytes: int) -> None:
        if self.snapshot_error is not None:
            return
        try:
            await self.copy_range(offset, nbytes)
        except BlockError as e:
            if self.break_guest_write:
                raise
            self.snapshot_error = e

    # -- I/O -------------------------------------------------------------------------

    async def _co_read(self, offset: int, nbytes: int) -> bytes:
        return await self.source.read(offset, nbytes)

    async def _co_write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        await self._before_write(offset, len(data))
        await self.source.write(offset, data, fua)

    def _fast_through(self, offset: int, nbytes: int) -> Node | None:
        """Straight to the source once every cluster the write touches was copied (or the
        snapshot is broken): nothing to copy first."""
        if self.snapshot_error is None:
            cs = self.cluster_size
            if self.armed.find(1, offset // cs, (offset + nbytes - 1) // cs + 1) >= 0:
                return None
        return self.source

    def _fast_write(self, offset: int, data: bytes | memoryview, fua: bool, done: Done) -> bool:
        """Reached only when ``_fast_through`` declined: a cluster still armed, or being
        copied (it stays armed until its copy is done), takes the general path."""
        return fastpath.refuse("copy-before-write: cluster to copy")

    def _fast_read(self, offset: int, nbytes: int) -> bytes | None:
        return self.source.try_read(offset, nbytes)

    async def _co_write_zeroes(self, offset: int, nbytes: int, may_unmap: bool, fua: bool) -> None:
        await self._before_write(offset, nbytes)
        await self.source.write_zeroes(offset, nbytes, may_unmap, fua)

    async def _co_discard(self, offset: int, nbytes: int) -> None:
        await self._before_write(offset, nbytes)
        await self.source.discard(offset, nbytes)

    async def _co_flush(self) -> None:
        await self.source.flush()
        await self.target.flush()

    async def _co_block_status(self, offset: int, nbytes: int) -> list[Extent]:
        return await self.source.block_status(offset, nbytes)

    async def reopen(self, read_only: bool) -> None:
        await self.source.reopen(read_only)
        self.read_only = read_only

    def describe_filename(self) -> str:
        return self.source.describe_filename()

    def info(self) -> dict[str, Any]:
        return {}
