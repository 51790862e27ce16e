"""Block status extents: what qemu-img map reports for a run of a node's bytes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .node import Node


@dataclass
class Extent:
    """One run of block status, as qemu-img map reports it.

    ``present``: allocated in some layer of the chain (BDRV_BLOCK_ALLOCATED).
    ``depth``: how many backing links below this node the layer that answers is.
    ``offset``: host offset in ``file`` (the protocol node holding the bytes), if any.
    """

    start: int
    length: int
    present: bool
    zero: bool
    data: bool
    depth: int = 0
    offset: int | None = None
    file: Node | None = field(default=None, compare=False)

    def same_kind(self, other: Extent) -> bool:
        if (self.present, self.zero, self.data, self.depth, self.file) != (
            other.present,
            other.zero,
            other.data,
            other.depth,
            other.file,
        ):
            return False
        if self.offset is None or other.offset is None:
            return self.offset is None and other.offset is None
        return self.offset + self.length == other.offset


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """Does a buffer hold only zero bytes?

    Cheap on data: a few sampled bytes reject almost every non-zero buffer before
    a full compare (``data.count(0)`` would scan all of it, ~1 ms per MiB).
    """
    n = len(data)
    if n == 0:
        return True
    if data[0] or data[n - 1] or data[n // 2]:
        return False
    return data == bytes(n)


def merge_extents(extents: Iterable[Extent]) -> list[Extent]:
    """Join adjacent extents that describe the same kind of storage."""
    out: list[Extent] = []
    for e in extents:
        if e.length == 0:
            continue
        if out and out[-1].start + out[-1].length == e.start and out[-1].same_kind(e):
            out[-1].length += e.length
        else:
            out.append(
                Extent(e.start, e.length, e.present, e.zero, e.data, e.depth, e.offset, e.file)
            )
    return out
