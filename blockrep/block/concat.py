"""The ``concat`` driver: several children end to end, as one device (blockrep's own).

A resource of several volumes (a VM's disks) is one consistency group: one
checkpoint, one failover, one history. Replication runs on one device whose
address space holds the volumes one after another — volume ``i`` at the sum of
the lengths before it — so the bitmaps, the activity log and resync need no
notion of volumes; each consumer export is a ``raw`` slice (offset, size) of it.

A request that crosses a boundary is split; each child sees only its own part.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import OptionError
from .graph import Graph, register
from .node import Extent, Node


@register
class ConcatNode(Node):
    driver_name = "concat"
    schema = {"children": ("list", "ref")}

    def __init__(self, node_name: str, options: dict[str, Any]) -> None:
        super().__init__(node_name, options)
        self.parts: list[Node] = []
        self.bases: list[int] = []  # where each child starts in this node's address space

    @classmethod
    async def open(cls, graph: Graph, name: str, opts: dict[str, Any], typed: bool) -> ConcatNode:
        node = cls(name, opts)
        refs = opts.get("children") or []
        if not refs:
            raise OptionError("concat: at least one child is needed")
        base = 0
        for i, ref in enumerate(refs):
            child = await graph.open_child(
                {**opts, f"children.{i}": ref}, f"children.{i}", typed=typed
            )
            assert child is not None
            node.attach_child(f"children.{i}", child)
            node.parts.append(child)
            node.bases.append(base)
            base += child.length
        node.length = base
        node.read_only = node.read_only or any(c.read_only for c in node.parts)
        return node

    def describe_filename(self) -> str:
        return "concat:" + "+".join(p.describe_filename() for p in self.parts)

    def _pieces(self, offset: int, nbytes: int) -> list[tuple[int, int, int]]:
        """(child index, offset in the child, length) covering [offset, offset+nbytes)."""
        out = []
        i = bisect.bisect_right(self.bases, offset) - 1
        end = offset + nbytes
        while offset < end and i < len(self.parts):
            base = self.bases[i]
            n = min(end, base + self.parts[i].length) - offset
            if n > 0:
                out.append((i, offset - base, n))
                offset += n
            i += 1
        return out

    async def _each(
        self, offset: int, nbytes: int, op: Callable[[Node, int, int, int], Awaitable[Any]]
    ) -> list[Any]:
        pieces = self._pieces(offset, nbytes)
        if len(pieces) == 1:
            i, off, n = pieces[0]
            return [await op(self.parts[i], off, n, 0)]
        done = 0
        coros = []
        for i, off, n in pieces:
            coros.append(op(self.parts[i], off, n, done))
            done += n
        return list(await asyncio.gather(*coros))

    async def _co_read(self, offset: int, nbytes: int) -> bytes:
        parts = await self._each(offset, nbytes, lambda c, off, n, _: c.read(off, n))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _co_write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        view = memoryview(data)
        await self._each(
            offset, len(view), lambda c, off, n, at: c.write(off, view[at : at + n], fua)
        )

    async def _co_write_zeroes(self, offset: int, nbytes: int, may_unmap: bool, fua: bool) -> None:
        await self._each(
            offset, nbytes, lambda c, off, n, _: c.write_zeroes(off, n, may_unmap, fua)
        )

    async def _co_discard(self, offset: int, nbytes: int) -> None:
        await self._each(offset, nbytes, lambda c, off, n, _: c.discard(off, n))

    async def _co_flush(self) -> None:
        await asyncio.gather(*(p.flush() for p in self.parts))

    async def _co_block_status(self, offset: int, nbytes: int) -> list[Extent]:
        out: list[Extent] = []
        for i, off, n in self._pieces(offset, nbytes):
            shift = self.bases[i]
            for e in await self.parts[i].block_status(off, n):
                out.append(
                    Extent(
                        e.start + shift,
                        e.length,
                        e.present,
                        e.zero,
                        e.data,
                        e.depth,
                        e.offset,
                        e.file,
                    )  # fmt: skip
                )
        return out

    async def reopen(self, read_only: bool) -> None:
        for p in self.parts:
            await p.reopen(read_only)
        self.read_only = read_only
