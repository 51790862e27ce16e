"""Node, Child and the generic request layer (QEMU's BlockDriverState and block/io.c).

Every driver is a subclass of Node that implements the ``_co_*`` hooks it needs.
The public coroutines (``read``, ``write``, ...) are the one place that checks
bounds and read-only state, pads requests to the driver's alignment and tracks
in-flight requests, so no driver repeats that logic.
"""

from __future__ import annotations

import asyncio
import enum
import errno
from collections.abc import Callable
from typing import Any, ClassVar

from .. import fastpath
from ..errors import BlockError
from . import fast_write
from .extent import Extent, is_zero, merge_extents

__all__ = [
    "MAX_LENGTH",
    "Child",
    "DirtyBitmap",
    "Done",
    "EmptyStyle",
    "Extent",
    "Node",
    "PreparedEmpty",
    "is_zero",
    "merge_extents",
]

# QEMU's BDRV_MAX_LENGTH: offsets and lengths beyond this are refused with EIO.
MAX_LENGTH = (1 << 63) - 1 - (1 << 30)

# How a fast-path request ends (``Node.try_write``): None, or the error to report.
Done = Callable[[BlockError | None], None]


class EmptyStyle(enum.Enum):
    """What make_empty does with the storage of a node's old contents.

    SHRINK: QEMU's bdrv_make_empty, byte for byte (the file ends after its tables).
    FRESH_FILE: a new file with those bytes replaces the old one, whose pages are
    freed in the background (flat in what the node held).
    KEEP_PAGES: the metadata QEMU writes, but the file keeps its length: the old
    contents become free space that the next writes overwrite, in pages the system
    already gave (flat too, and no page is freed and asked for again).
    FRESH_FILE and KEEP_PAGES are for nodes whose owner is the only one interested
    in the old contents (replication's active and hidden disks); drivers that
    cannot, do SHRINK.
    """

    SHRINK = "shrink"
    FRESH_FILE = "fresh-file"
    KEEP_PAGES = "keep-pages"


class DirtyBitmap:
    """Chunks of a node written since the bitmap was (last) cleared.

    The generic request layer marks every bitmap of a node after a write,
    write_zeroes or discard; jobs (mirror, active commit) copy what is marked.
    """

    def __init__(self, granularity: int, length: int) -> None:
        self.granularity = granularity
        self.length = length
        self.dirty: set[int] = set()
        self.changed = asyncio.Event()

    def mark(self, offset: int, nbytes: int) -> None:
        if nbytes <= 0:
            return
        g = self.granularity
        self.dirty.update(range(offset // g, (offset + nbytes - 1) // g + 1))
        self.changed.set()

    def mark_all(self) -> None:
        self.mark(0, self.length)

    def take(self, limit: int) -> list[int]:
        """Up to ``limit`` dirty chunks, in order, cleared from the bitmap."""
        chunks = sorted(self.dirty)[:limit]
        self.dirty.difference_update(chunks)
        if not self.dirty:
            self.changed.clear()
        return chunks

    def count(self) -> int:
        return len(self.dirty)


class Child:
    """An edge of the graph: ``parent`` uses ``node`` in the role ``name``.

    ``parent`` is None for users outside the graph (exports, jobs).
    """

    def __init__(self, parent: Node | None, name: str, node: Node) -> None:
        self.parent = parent
        self.name = name
        self.node = node
        node.parents.append(self)

    def detach(self) -> None:
        if self in self.node.parents:
            self.node.parents.remove(self)

    def replace(self, node: Node) -> None:
        """Point this edge at another node (commit pivot, filter insertion)."""
        self.detach()
        self.node = node
        node.parents.append(self)


class _Tracked:
    """An in-flight request. Its event is made only when someone has to wait for it:
    most requests finish with nobody waiting, and an Event per request per layer
    is a measurable share of a 4 KiB request's cost."""

    __slots__ = ("start", "end", "_done", "serialising", "finished")

    def __init__(self, start: int, end: int, serialising: bool) -> None:
        self.start = start
        self.end = end
        self.serialising = serialising
        self._done: asyncio.Event | None = None
        self.finished = False

    async def wait(self) -> None:
        if self.finished:
            return
        if self._done is None:
            self._done = asyncio.Event()
        await self._done.wait()

    def finish(self) -> None:
        self.finished = True
        if self._done is not None:
            self._done.set()


class Node:
    """A block node. Subclasses set ``driver_name`` and implement the hooks."""

    driver_name: ClassVar[str] = ""
    # Option schema of the driver (see options.py); merged with the common options.
    schema: ClassVar[dict[str, Any]] = {}
    # The smallest unit the driver can do I/O in; the generic layer pads to it.
    request_alignment: int = 1
    # Filters and formats that need overlapping requests ordered set this.
    serialize_overlapping: bool = False
    # True for format drivers with a backing chain (qcow2).
    supports_backing: ClassVar[bool] = False
    is_filter: ClassVar[bool] = False
    # Protocol nodes under a format may be read and written past their end (the
    # format grows its file); QEMU checks bounds only at the BlockBackend.
    growable: ClassVar[bool] = False

    def __init__(self, node_name: str, options: dict[str, Any]) -> None:
        self.node_name = node_name
        self.options = options
        self.children: dict[str, Child] = {}
        self.parents: list[Child] = []
        self.read_only: bool = bool(options.get("read-only", False))
        self.length: int = 0
        self._tracked: list[_Tracked] = []
        self._serialising = 0  # how many of _tracked are serialising
        # Fast-path writes in flight are counted, not tracked one by one: a serialising
        # request waits for all of them, and none starts while one waits (_ser_waiting).
        self._fast_writes = 0
        self._fast_quiet: asyncio.Event | None = None
        self._ser_waiting = 0
        self.closed = False
        self.graph: Any = None  # set by Graph.add; drivers emit events through it
        self.dirty_bitmaps: list[DirtyBitmap] = []
        # set while an operation forbids management commands on the node (QEMU's op blockers)
        self.op_blocker: str | None = None
        # Called with the BlockError of a write, write_zeroes or discard that the
        # driver failed (not one the generic checks refused): a user that must know
        # of lost writes it did not issue itself listens here (copy-before-write's
        # job; replication's secondary, for the pre-images P writes into hidden).
        self.write_error_listeners: list[Callable[[BlockError], None]] = []
        # How make_empty treats the old contents' storage (see EmptyStyle).
        self.empty_style = EmptyStyle.SHRINK

    # -- graph helpers --------------------------------------------------------

    def attach_child(self, role: str, node: Node) -> Child:
        child = Child(self, role, node)
        self.children[role] = child
        return child

    def detach_child(self, role: str) -> Node:
        child = self.children.pop(role)
        child.detach()
        return child.node

    @property
    def file(self) -> Node | None:
        c = self.children.get("file")
        return c.node if c else None

    @property
    def backing(self) -> Node | None:
        c = self.children.get("backing")
        return c.node if c else None

    def filtered(self) -> Node | None:
        """The node a filter passes I/O to (None for non-filters)."""
        return self.file if self.is_filter else None

    def describe_filename(self) -> str:
        """What QEMU shows as this node's filename."""
        f = self.file
        return f.describe_filename() if f is not None else ""

    # -- generic request layer ------------------------------------------------

    def _check(self, offset: int, nbytes: int, write: bool) -> None:
        if self.closed:
            raise BlockError(errno.EIO, "Node is closed")
        if offset < 0 or nbytes < 0 or nbytes > MAX_LENGTH or offset > MAX_LENGTH - nbytes:
            raise BlockError(errno.EIO, f"Invalid request offset {offset} length {nbytes}")
        if offset + nbytes > self.length and not self.growable:
            raise BlockError(
                errno.EIO,
                f"Request beyond end of device: offset {offset} length {nbytes} size {self.length}",
            )
        if write and self.read_only:
            raise BlockError(errno.EPERM, f"Node '{self.node_name}' is read-only")

    async def _begin(self, start: int, end: int, serialising: bool) -> _Tracked:
        serialising = serialising or self.serialize_overlapping
        req = _Tracked(start, end, serialising)
        # a serialising request waits for every overlapping one, and every request waits
        # for overlapping serialising ones (QEMU's bdrv_wait_serialising_requests)
        if serialising:
            self._ser_waiting += 1  # no fast-path write starts from now on
            try:
                while True:
                    if self._fast_writes:
                        await self._fast_writes_done()
                        continue
                    blocker = next(
                        (t for t in self._tracked if t.start < end and start < t.end), None
                    )
                    if blocker is None:
                        break
                    await blocker.wait()
                self._serialising += 1
                self._tracked.append(req)
            finally:
                self._ser_waiting -= 1
            return req
        if self._serialising:
            while True:
                blocker = next(
                    (t for t in self._tracked if t.start < end and start < t.end and t.serialising),
                    None,
                )
                if blocker is None:
                    break
                await blocker.wait()
        self._tracked.append(req)
        return req

    async def _fast_writes_done(self) -> None:
        if self._fast_quiet is None:
            self._fast_quiet = asyncio.Event()
        await self._fast_quiet.wait()

    def _end(self, req: _Tracked) -> None:
        self._tracked.remove(req)
        if req.serialising:
            self._serialising -= 1
        req.finish()

    def _end_write(self, req: _Tracked, offset: int, nbytes: int) -> None:
        # marked even when the request failed: the data may have changed partly
        for bm in self.dirty_bitmaps:
            bm.mark(offset, nbytes)
        self._end(req)

    def _write_failed(self, err: BlockError) -> None:
        for listener in list(self.write_error_listeners):
            listener(err)

    def in_flight(self) -> int:
        return len(self._tracked) + self._fast_writes

    async def drain(self) -> None:
        """Wait until every request that is in flight now has finished."""
        while self._tracked or self._fast_writes:
            if self._tracked:
                await self._tracked[0].wait()
            else:
                await self._fast_writes_done()

    async def read(self, offset: int, nbytes: int) -> bytes:
        self._check(offset, nbytes, False)
        if nbytes == 0:
            return b""
        a = self.request_alignment
        req = await self._begin(offset, offset + nbytes, self.serialize_overlapping)
        try:
            if a == 1 or (offset % a == 0 and nbytes % a == 0):
                return await self._co_read(offset, nbytes)
            start = offset - offset % a
            end = -(-(offset + nbytes) // a) * a
            buf = await self._co_read(start, end - start)
            return buf[offset - start : offset - start + nbytes]
        finally:
            self._end(req)

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        nbytes = len(data)
        self._check(offset, nbytes, True)
        if nbytes == 0:
            return
        a = self.request_alignment
        if a == 1 or (offset % a == 0 and nbytes % a == 0):
            req = await self._begin(offset, offset + nbytes, False)
            try:
                # bytes and memoryviews pass through uncopied; a bytearray the
                # caller may reuse is frozen first
                await self._co_write(
                    offset, bytes(data) if isinstance(data, bytearray) else data, fua
                )
            except BlockError as e:
                self._write_failed(e)
                raise
            finally:
                self._end_write(req, offset, nbytes)
            return
        # Read-modify-write of the partial head/tail blocks; serialised so that two
        # unaligned writes sharing a block cannot lose each other's bytes.
        start = offset - offset % a
        end = -(-(offset + nbytes) // a) * a
        req = await self._begin(start, end, True)
        try:
            buf = bytearray(await self._co_read(start, end - start))
            buf[offset - start : offset - start + nbytes] = data
            await self._co_write(start, bytes(buf), fua)
        except BlockError as e:
            self._write_failed(e)
            raise
        finally:
            self._end_write(req, offset, nbytes)

    # -- the fast path (fastpath.py; ``try_write`` is fast_write.py's) -------------------

    try_write = fast_write.try_write

    def _fast_write_end(self, offset: int, nbytes: int, err: BlockError | None) -> None:
        """A fast write through this node ended (``try_write``), as ``_end_write`` ends one."""
        if err is not None:
            self._write_failed(err)
        # marked even when the request failed: the data may have changed partly
        for bm in self.dirty_bitmaps:
            bm.mark(offset, nbytes)
        self._fast_write_ended()

    # How much a pass-through node adds to an offset on the way to the node below.
    fast_shift: int = 0

    def _fast_through(self, offset: int, nbytes: int) -> Node | None:
        """The node a fast write goes on to unchanged (but for ``fast_shift``), when this
        node has nothing of its own to do for it right now; None: ``_fast_write`` decides."""
        return None

    def _fast_write_ended(self) -> None:
        self._fast_writes -= 1
        if not self._fast_writes and self._fast_quiet is not None:
            self._fast_quiet.set()
            self._fast_quiet = None

    def _fast_write(self, offset: int, data: bytes | memoryview, fua: bool, done: Done) -> bool:
        """The driver's write as plain calls; False (nothing done) when it cannot."""
        return fastpath.refuse(f"{self.driver_name}: no fast path")

    def try_read(self, offset: int, nbytes: int) -> bytes | None:
        """``read`` done synchronously, or None (nothing done): take the general path.

        Not tracked: it is over before anything else runs, so nobody can wait for it.
        """
        a = self.request_alignment
        if (
            self.closed
            or nbytes <= 0
            or offset < 0
            or (offset + nbytes > self.length and not self.growable)
            or self.serialize_overlapping
            or (a != 1 and (offset % a or nbytes % a))
        ):
            return None
        if self._serialising:
            end = offset + nbytes
            if any(t.serialising and t.start < end and offset < t.end for t in self._tracked):
                return None
        return self._fast_read(offset, nbytes)

    def _fast_read(self, offset: int, nbytes: int) -> bytes | None:
        return None

    def file_range(self, offset: int, nbytes: int) -> tuple[int, int] | None:
        """(fd, file offset) when this node's bytes [offset, offset+nbytes) are exactly
        that descriptor's bytes there right now (for sendfile); None otherwise."""
        if (
            self.closed
            or nbytes <= 0
            or offset < 0
            or offset + nbytes > self.length
            or self._serialising
        ):
            return None
        return self._file_range(offset, nbytes)

    def _file_range(self, offset: int, nbytes: int) -> tuple[int, int] | None:
        return None

    async def write_zeroes(
        self, offset: int, nbytes: int, may_unmap: bool = False, fua: bool = False
    ) -> None:
        self._check(offset, nbytes, True)
        if nbytes == 0:
            return
        a = self.request_alignment
        if a != 1 and (offset % a or nbytes % a):
            await self.write(offset, bytes(nbytes), fua)
            return
        req = await self._begin(offset, offset + nbytes, False)
        try:
            await self._co_write_zeroes(offset, nbytes, may_unmap, fua)
        except BlockError as e:
            self._write_failed(e)
            raise
        finally:
            self._end_write(req, offset, nbytes)

    async def discard(self, offset: int, nbytes: int) -> None:
        self._check(offset, nbytes, True)
        if nbytes == 0:
            return
        req = await self._begin(offset, offset + nbytes, False)
        try:
            await self._co_discard(offset, nbytes)
        except BlockError as e:
            self._write_failed(e)
            raise
        finally:
            self._end_write(req, offset, nbytes)

    async def flush(self) -> None:
        if self.closed:
            raise BlockError(errno.EIO, "Node is closed")
        await self._co_flush()

    async def block_status(self, offset: int, nbytes: int) -> list[Extent]:
        self._check(offset, nbytes, False)
        if nbytes == 0:
            return []
        return merge_extents(await self._co_block_status(offset, nbytes))

    async def make_empty(self) -> None:
        if self.read_only:
            raise BlockError(errno.EPERM, f"Node '{self.node_name}' is read-only")
        await self._co_make_empty()

    def prepare_make_empty(self) -> PreparedEmpty:
        """make_empty in steps, so that several nodes are emptied all or nothing.

        See ``PreparedEmpty``: replication empties its active and hidden disks at
        every checkpoint, and a failure half-way must leave both as they were.
        """
        if self.read_only:
            raise BlockError(errno.EPERM, f"Node '{self.node_name}' is read-only")
        return self._prepare_make_empty()

    def _prepare_make_empty(self) -> PreparedEmpty:
        return PreparedEmpty(self)

    async def close(self) -> None:
        """Release what this node holds (not its children: the graph closes those)."""
        self.closed = True

    # -- driver hooks (defaults pass through to ``file`` for filters) ----------

    def _pass(self) -> Node:
        f = self.file
        if f is None:
            raise BlockError(errno.ENOTSUP, f"Driver '{self.driver_name}' does not support this")
        return f

    async def _co_read(self, offset: int, nbytes: int) -> bytes:
        return await self._pass().read(offset, nbytes)

    async def _co_write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        await self._pass().write(offset, data, fua)

    async def _co_write_zeroes(self, offset: int, nbytes: int, may_unmap: bool, fua: bool) -> None:
        await self._pass().write_zeroes(offset, nbytes, may_unmap, fua)

    async def _co_discard(self, offset: int, nbytes: int) -> None:
        await self._pass().discard(offset, nbytes)

    async def _co_flush(self) -> None:
        for child in list(self.children.values()):
            if child.name != "backing":
                await child.node.flush()

    async def _co_block_status(self, offset: int, nbytes: int) -> list[Extent]:
        return await self._pass().block_status(offset, nbytes)

    async def _co_make_empty(self) -> None:
        raise BlockError(errno.ENOTSUP, f"Driver '{self.driver_name}' does not support make_empty")

    def supports_make_empty(self) -> bool:
        return type(self)._co_make_empty is not Node._co_make_empty

    async def replace_contents(self, content: bytes) -> None:
        """Make ``content`` the node's whole contents and drop the old ones at once.

        Unlike writing ``content`` and discarding the rest, the cost does not grow
        with what the node held (a format empties its image this way); a driver
        that can do it says so in ``supports_replace_contents``.
        """
        raise BlockError(
            errno.ENOTSUP, f"Driver '{self.driver_name}' does not support replacing contents"
        )

    def supports_replace_contents(self) -> bool:
        return False

    def memory_backed(self) -> bool:
        """Whether the node's storage is memory (tmpfs): no writeback behind it."""
        return False

    async def reopen(self, read_only: bool) -> None:
        """Switch between read-only and read-write (QEMU's bdrv_reopen)."""
        self.read_only = read_only

    def info(self) -> dict[str, Any]:
        """Driver-specific information for query-named-block-nodes / img info."""
        return {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.node_name!r} len={self.length}>"


class PreparedEmpty:
    """One node's make_empty, split so that a set of nodes empties all or nothing.

    ``commit`` empties the node in one step that either succeeds or leaves the node
    reading as before. To empty several nodes atomically, ``stage`` every node but
    the last (the part that may fail for want of descriptors, space or I/O: after
    it the node still reads as before, ``undo`` takes it back, and ``finish`` can
    no longer fail to empty it), then ``commit`` the last, then ``finish`` the
    staged ones — or ``undo`` them if the commit raised.

    This default cannot undo (``undoable`` is false): ``stage`` does nothing and
    ``finish`` is a plain make_empty, which may fail after the others committed.
    """

    undoable: ClassVar[bool] = False

    def __init__(self, node: Node) -> None:
        self.node = node

    async def commit(self) -> None:
        await self.node._co_make_empty()

    async def stage(self) -> None:
        return None

    async def undo(self) -> None:
        return None

    async def finish(self) -> None:
        await self.node._co_make_empty()
