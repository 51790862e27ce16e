"""The ``raw`` format (a window ``offset``/``size`` onto its file) and ``null-co``."""

from __future__ import annotations

import errno
from typing import Any

from ..errors import BlockError, OptionError
from .graph import Graph, register
from .node import Extent, Node


@register
class RawNode(Node):
    driver_name = "raw"
    schema = {"file": "ref", "offset": "size", "size": "size"}

    def __init__(self, node_name: str, options: dict[str, Any]) -> None:
        super().__init__(node_name, options)
        self.offset = int(options.get("offset", 0))
        self.fast_shift = self.offset
        self.size_limit: int | None = options.get("size")

    @classmethod
    async def open(cls, graph: Graph, name: str, opts: dict[str, Any], typed: bool) -> RawNode:
        node = cls(name, opts)
        f = await graph.open_child(opts, "file", typed=typed, default_driver="file")
        assert f is not None
        node.attach_child("file", f)
        node.read_only = node.read_only or f.read_only
        flen = f.length
        if node.offset > flen:
            raise OptionError(
                "The sum of offset (%d) and size (0) has to be smaller or equal to the  actual size of the containing file (%d)"
                % (node.offset, flen)
            )
        if node.size_limit is not None:
            if node.offset + node.size_limit > flen:
                raise OptionError(
                    "The sum of offset (%d) and size (%d) has to be smaller or equal to the "
                    " actual size of the containing file (%d)"
                    % (node.offset, node.size_limit, flen)
                )
            node.length = node.size_limit
        else:
            node.length = flen - node.offset
        return node

    def describe_filename(self) -> str:
        return self.file.describe_filename() if self.file else ""

    async def _co_read(self, offset: int, nbytes: int) -> bytes:
        return await self._pass().read(self.offset + offset, nbytes)

    async def _co_write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        await self._pass().write(self.offset + offset, data, fua)

    async def _co_write_zeroes(self, offset: int, nbytes: int, may_unmap: bool, fua: bool) -> None:
        await self._pass().write_zeroes(self.offset + offset, nbytes, may_unmap, fua)

    def _fast_through(self, offset: int, nbytes: int) -> Node:
        return self._pass()

    def _fast_read(self, offset: int, nbytes: int) -> bytes | None:
        return self._pass().try_read(self.offset + offset, nbytes)

    def _file_range(self, offset: int, nbytes: int) -> tuple[int, int] | None:
        return self._pass().file_range(self.offset + offset, nbytes)

    async def _co_discard(self, offset: int, nbytes: int) -> None:
        await self._pass().discard(self.offset + offset, nbytes)

    async def _co_block_status(self, offset: int, nbytes: int) -> list[Extent]:
        out = []
        for e in await self._pass().block_status(self.offset + offset, nbytes):
            out.append(
                Extent(
                    e.start - self.offset, e.length, e.present, e.zero, e.data, 0, e.offset, e.file
                )
            )
        return out

    async def reopen(self, read_only: bool) -> None:
        f = self._pass()
        await f.reopen(read_only)
        self.read_only = read_only


@register
class NullNode(Node):
    """``null-co``: a device of ``size`` bytes that discards writes."""

    driver_name = "null-co"
    schema = {"size": "size", "latency-ns": "int", "read-zeroes": "bool"}

    def __init__(self, node_name: str, options: dict[str, Any]) -> None:
        super().__init__(node_name, options)
        self.read_zeroes = bool(options.get("read-zeroes", False))

    @classmethod
    async def open(cls, graph: Graph, name: str, opts: dict[str, Any], typed: bool) -> NullNode:
        node = cls(name, opts)
        node.length = int(opts.get("size", 1 << 30))
        return node

    async def _co_read(self, offset: int, nbytes: int) -> bytes:
        # Without read-zeroes QEMU leaves the buffer untouched; zeroes are as good.
        return bytes(nbytes)

    async def _co_write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        return None

    async def _co_write_zeroes(self, offset: int, nbytes: int, may_unmap: bool, fua: bool) -> None:
        return None

    async def _co_discard(self, offset: int, nbytes: int) -> None:
        return None

    async def _co_flush(self) -> None:
        return None

    async def _co_block_status(self, offset: int, nbytes: int) -> list[Extent]:
        return [Extent(offset, nbytes, True, self.read_zeroes, not self.read_zeroes, 0, None, None)]

    async def _co_make_empty(self) -> None:
        raise BlockError(errno.ENOTSUP, "null-co has nothing to empty")
