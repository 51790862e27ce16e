"""The ``replication`` filter: the data path of COLO block replication (SPEC §4).

This module decides where each request goes for the node's mode and stage; the
control operations (start, checkpoint, stop/failover) are in ``control.py``,
which drives the jobs the stages need. All that replication keeps per node is
the node's ``state`` (a ``ReplicationState``), here.

I/O status by stage (``<0`` fail with EIO, ``0`` normal, ``1`` failover-failed routing):

    stage            primary  secondary
    none             EIO      EIO
    running          0        0
    failover         EIO      0
    failover-failed  EIO      1
    done             EIO      0

Primary mode forwards writes to its ``file`` (the NBD link to the secondary);
reads always fail; a failed forward is recorded (``error``) and reported as
success, so the consumer never sees the secondary's trouble. Writes are
forwarded byte for byte — QEMU 7.2 pads sub-sector writes with zeros instead.
Secondary mode passes I/O and its errors through to the active disk.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from .. import fastpath
from ..block.graph import Graph, register
from ..block.node import Done, Extent, Node
from ..errors import BlockError, OptionError

if TYPE_CHECKING:
    from ..jobs.backup import BackupJob
    from ..jobs.base import Job


class ReplicationMode(StrEnum):
    """QAPI's ReplicationMode."""

    PRIMARY = "primary"
    SECONDARY = "secondary"

    @property
    def number(self) -> int:
        """The QAPI enum value, which QEMU's messages print."""
        return 0 if self is ReplicationMode.PRIMARY else 1


class ReplicationStage(StrEnum):
    """QEMU's ReplicationStage; the values are what query-replication shows."""

    NONE = "none"
    RUNNING = "running"
    FAILOVER = "failover"
    FAILOVER_FAILED = "failover-failed"
    DONE = "done"


# A request's way through the filter: ``op(node, offset, nbytes)``.
_WriteOp = Callable[[Node, int, int], Awaitable[None]]


@dataclass(eq=False)
class ReplicationState:
    """Everything replication keeps about one node (QEMU's BDRVReplicationState).

    The options are fixed at open; the rest is the control plane's, which changes
    it only through the operations in ``control.py``.
    """

    mode: ReplicationMode
    top_id: str | None = None
    shared_disk: bool = False
    shared_disk_id: str | None = None
    # secondary: whether a checkpoint leaves active and hidden at their length, to
    # be overwritten (EmptyStyle.KEEP_PAGES), instead of swapping in fresh files;
    # None (auto): keep where the buffer's file is memory (tmpfs)
    keep_buffer_pages: bool | None = None
    stage: ReplicationStage = ReplicationStage.NONE
    error: int = 0  # an errno, 0 when all is well
    error_message: str = ""
    epoch: int = 0
    backup_job: BackupJob | None = None
    commit_job: Job | None = None
    # secondary: the root whose management commands the backup job blocks (top-id)
    top: Node | None = None
    # primary, shared disk: the disk P's copy-before-write runs above
    shared: Node | None = None
    # secondary: whether hidden and secondary disks were read-only before start
    orig_read_only: dict[str, bool] = field(default_factory=dict)
    # primary: bytes forwarded to the secondary and not yet acknowledged
    unacked_bytes: int = 0
    # primary: called (before the write completes) when a write's forward failed or
    # could not be made; the HA manager's failover-point latest then holds the
    # consumer's acknowledgement until the secondary is outdated (None: QEMU's way)
    on_lost_forward: Callable[[], None] | None = None

    def record_error(self, err: BlockError) -> None:
        """Keep the first error: it is the one get_error and query-replication report."""
        if not self.error:
            self.error = err.errno or errno.EIO
            self.error_message = err.message

    def forward_ended(self, nbytes: int, err: BlockError | None) -> None:
        """A primary's fast forward of ``nbytes`` ended. The consumer is not to see the
        secondary's trouble: an error is recorded (and reported), never returned."""
        self.unacked_bytes -= nbytes
        if err is not None:
            self.record_error(err)
            if self.on_lost_forward is not None:
                self.on_lost_forward()

    def incoming_write_failed(self, err: BlockError) -> None:
        """A write this side did not issue failed (a copy-before-write, or a pre-image
        P sent into hidden): while running, this side's view is lost, an error."""
        if self.stage == ReplicationStage.RUNNING:
            self.record_error(err)

    def io_status(self) -> int:
        st = self.stage
        if st == ReplicationStage.NONE:
            return -errno.EIO
        if st == ReplicationStage.RUNNING:
            return 0
        if self.mode == ReplicationMode.PRIMARY:
            return -errno.EIO
        return 1 if st == ReplicationStage.FAILOVER_FAILED else 0


def _check_options(graph: Graph, opts: dict[str, Any]) -> None:
    """QEMU's replication_open checks, in its order and with its texts."""
    mode = opts.get("mode")
    if mode is None:
        raise OptionError("Missing the option mode")
    if mode not in (ReplicationMode.PRIMARY, ReplicationMode.SECONDARY):
        raise OptionError("The option mode's value should be primary or secondary")
    primary = mode == ReplicationMode.PRIMARY
    if primary and "top-id" in opts:
        raise OptionError("The primary side does not support option top-id")
    if not primary and "top-id" not in opts:
        raise OptionError("Missing the option top-id")
    if primary and "keep-buffer-pages" in opts:
        raise OptionError("The primary side does not support option keep-buffer-pages")
    if not primary and "shared-disk-id" in opts:
        raise OptionError("The secondary side does not support option shared-disk-id")
    if primary and opts.get("shared-disk") and "shared-disk-id" not in opts:
        raise OptionError("Missing the option shared-disk-id")
    if primary and "shared-disk-id" in opts and not opts.get("shared-disk"):
        raise OptionError("The option shared-disk-id needs shared-disk=on")
    # before the child opens: a failed open must leave no NBD link behind
    if primary and opts.get("shared-disk") and graph.find(opts["shared-disk-id"]) is None:
        disk_id = opts["shared-disk-id"]
        raise OptionError(f"Cannot find device='{disk_id}' nor node-name='{disk_id}'")


@register
class ReplicationNode(Node):
    driver_name = "replication"
    is_filter = True
    schema = {
        "file": "ref",
        "mode": "str",
        "top-id": "str",
        "shared-disk": "bool",
        "shared-disk-id": "str",
        "keep-buffer-pages": ("enum", ("on", "off", "auto")),
    }

    def __init__(self, node_name: str, options: dict[str, Any]) -> None:
        super().__init__(node_name, options)
        self.state = ReplicationState(
            mode=ReplicationMode(options["mode"]),
            top_id=options.get("top-id"),
            shared_disk=bool(options.get("shared-disk", False)),
            shared_disk_id=options.get("shared-disk-id"),
            keep_buffer_pages={"on": True, "off": False}.get(
                options.get("keep-buffer-pages", "auto")
            ),
        )
        # Run when the node closes, before it lets go of its children: the registry
        # that tracks the node stops a running replication here (QEMU's replication_close).
        self.close_listeners: list[Callable[[ReplicationNode], Awaitable[None]]] = []

    @classmethod
    async def open(
        cls, graph: Graph, name: str, opts: dict[str, Any], typed: bool
    ) -> ReplicationNode:
        _check_options(graph, opts)
        node = cls(name, opts)
        f = await graph.open_child(opts, "file", typed=typed)
        assert f is not None
        node.attach_child("file", f)
        node.length = f.length
        node.read_only = node.read_only or f.read_only
        return node

    def child_node(self, role: str) -> Node | None:
        c = self.children.get(role)
        return c.node if c else None

    # -- I/O --------------------------------------------------------------------------------

    async def _co_read(self, offset: int, nbytes: int) -> bytes:
        if self.state.mode == ReplicationMode.PRIMARY:
            raise BlockError(errno.EIO, "Primary replication nodes do not serve reads")
        st = self.state.io_status()
        if st < 0:
            raise BlockError(-st, "Block replication is not running")
        return await self._pass().read(offset, nbytes)

    async def _forward(self, op: _WriteOp, offset: int, nbytes: int) -> None:
        """Run a write-like request in the mode's way (see the module doc)."""
        s = self.state
        st = s.io_status()
        if st < 0:
            if s.mode == ReplicationMode.PRIMARY and s.on_lost_forward is not None:
                s.on_lost_forward()
            raise BlockError(-st, "Block replication is not running")
        if st == 0:
            if s.mode == ReplicationMode.SECONDARY:
                await op(self._pass(), offset, nbytes)
                return
            s.unacked_bytes += nbytes
            try:
                await op(self._pass(), offset, nbytes)
            except BlockError as e:
                # the consumer is not to see the secondary's trouble: record, succeed
                s.record_error(e)
                if s.on_lost_forward is not None:
                    s.on_lost_forward()
            finally:
                s.unacked_bytes -= nbytes
            return
        await self._failover_failed_write(op, offset, nbytes)

    async def _failover_failed_write(self, op: _WriteOp, offset: int, nbytes: int) -> None:
        """Ranges already in active/hidden go to active, the rest to the secondary disk."""
        active = self._pass()
        secondary = self.child_node("secondary")
        if secondary is None:
            await op(active, offset, nbytes)
            return
        for e in await active.block_status(offset, nbytes):
            in_buffers = e.present and e.depth < 2
            await op(active if in_buffers else secondary, e.start, e.length)

    async def _co_write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        mv = memoryview(data)

        async def op(node: Node, off: int, n: int) -> None:
            await node.write(off, mv[off - offset : off - offset + n], fua)

        await self._forward(op, offset, len(data))

    def _fast_through(self, offset: int, nbytes: int) -> Node | None:
        """A running secondary's write goes on to its child as it is."""
        s = self.state
        if s.mode == ReplicationMode.SECONDARY and s.io_status() == 0:
            return self._pass()
        return None

    def _fast_write(self, offset: int, data: bytes | memoryview, fua: bool, done: Done) -> bool:
        """A running primary's ``_forward`` of a write, as callbacks (the secondary's
        is ``_fast_through``; any other stage is refused)."""
        s = self.state
        if s.io_status() != 0 or s.mode != ReplicationMode.PRIMARY:
            return fastpath.refuse("replication: not running")
        child = self._pass()
        nbytes = len(data)
        s.unacked_bytes += nbytes

        def forwarded(err: BlockError | None) -> None:
            s.forward_ended(nbytes, err)
            done(None)

        if not child.try_write(offset, data, fua, forwarded):
            s.unacked_bytes -= nbytes
            return False
        return True

    def _fast_read(self, offset: int, nbytes: int) -> bytes | None:
        if self.state.mode == ReplicationMode.PRIMARY or self.state.io_status() != 0:
            return None
        return self._pass().try_read(offset, nbytes)

    async def _co_write_zeroes(self, offset: int, nbytes: int, may_unmap: bool, fua: bool) -> None:
        async def op(node: Node, off: int, n: int) -> None:
            await node.write_zeroes(off, n, may_unmap, fua)

        await self._forward(op, offset, nbytes)

    async def _co_discard(self, offset: int, nbytes: int) -> None:
        # QEMU drops discards here (the filter has no discard callback), so the two
        # sides can diverge. The primary forwards them as write-zeroes: the local
        # disk reads zeroes after a discard, and so will the secondary.
        primary = self.state.mode == ReplicationMode.PRIMARY

        async def op(node: Node, off: int, n: int) -> None:
            if primary:
                await node.write_zeroes(off, n, may_unmap=True)
            else:
                await node.discard(off, n)

        await self._forward(op, offset, nbytes)

    async def _co_flush(self) -> None:
        f = self._pass()
        if self.state.mode == ReplicationMode.PRIMARY:
            if self.state.io_status() < 0:
                return
            try:
                await f.flush()
            except BlockError as e:
                self.state.record_error(e)
            return
        await f.flush()

    async def _co_block_status(self, offset: int, nbytes: int) -> list[Extent]:
        if self.state.mode == ReplicationMode.PRIMARY:
            return [Extent(offset, nbytes, True, False, True, 0, None, None)]
        return await self._pass().block_status(offset, nbytes)

    async def reopen(self, read_only: bool) -> None:
        self.read_only = read_only

    async def close(self) -> None:
        for listener in list(self.close_listeners):
            await listener(self)
        await super().close()
