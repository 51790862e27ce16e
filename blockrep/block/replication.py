"""The ``replication`` filter: the data path of COLO block replication (SPEC §4).

This module decides where each request goes for the node's mode and stage; the
control operations (start, checkpoint, stop/failover) live in
``blockrep/replication.py``, which drives the jobs the stages need.

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
from typing import Any

from ..errors import BlockError, OptionError
from .graph import Graph, register
from .node import Extent, Node

NONE, RUNNING, FAILOVER, FAILOVER_FAILED, DONE = (
    "none",
    "running",
    "failover",
    "failover-failed",
    "done",
)
PRIMARY, SECONDARY = "primary", "secondary"
MODE_NUMBER = {PRIMARY: 0, SECONDARY: 1}  # QAPI ReplicationMode values, used in QEMU's messages


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
    }

    def __init__(self, node_name: str, options: dict[str, Any]) -> None:
        super().__init__(node_name, options)
        self.mode: str = options["mode"]
        self.top_id: str | None = options.get("top-id")
        self.shared_disk = bool(options.get("shared-disk", False))
        self.shared_disk_id: str | None = options.get("shared-disk-id")
        self.stage = NONE
        self.error = 0  # an errno, 0 when all is well
        self.error_message = ""
        # set by the control plane (blockrep/replication.py)
        self.backup_job: Any = None
        self.commit_job: Any = None
        self.epoch = 0
        self.orig_ro: dict[str, bool] = {}
        # primary: bytes forwarded to the secondary and not yet acknowledged
        self.unacked_bytes = 0

    @classmethod
    async def open(
        cls, graph: Graph, name: str, opts: dict[str, Any], typed: bool
    ) -> ReplicationNode:
        mode = opts.get("mode")
        if mode is None:
            raise OptionError("Missing the option mode")
        if mode not in (PRIMARY, SECONDARY):
            raise OptionError("The option mode's value should be primary or secondary")
        if mode == PRIMARY and "top-id" in opts:
            raise OptionError("The primary side does not support option top-id")
        if mode == SECONDARY and "top-id" not in opts:
            raise OptionError("Missing the option top-id")
        if mode == SECONDARY and "shared-disk-id" in opts:
            raise OptionError("The secondary side does not support option shared-disk-id")
        if mode == PRIMARY and opts.get("shared-disk") and "shared-disk-id" not in opts:
            raise OptionError("Missing the option shared-disk-id")
        if mode == PRIMARY and "shared-disk-id" in opts and not opts.get("shared-disk"):
            raise OptionError("The option shared-disk-id needs shared-disk=on")
        if mode == PRIMARY and opts.get("shared-disk"):
            # before the child opens: a failed open must leave no NBD link behind
            if graph.find(opts["shared-disk-id"]) is None:
                raise OptionError(
                    f"Cannot find device='{opts['shared-disk-id']}' nor node-name='{opts['shared-disk-id']}'"
                )
        node = cls(name, opts)
        f = await graph.open_child(opts, "file", typed=typed)
        assert f is not None
        node.attach_child("file", f)
        node.length = f.length
        node.read_only = node.read_only or f.read_only
        return node

    # -- helpers for the control plane ---------------------------------------------------

    @property
    def active_disk(self) -> Node | None:
        return self.file if self.mode == SECONDARY else None

    def child_node(self, role: str) -> Node | None:
        c = self.children.get(role)
        return c.node if c else None

    def io_status(self) -> int:
        if self.stage == NONE:
            return -errno.EIO
        if self.stage == RUNNING:
            return 0
        if self.stage == FAILOVER_FAILED:
            return -errno.EIO if self.mode == PRIMARY else 1
        # failover, done
        return -errno.EIO if self.mode == PRIMARY else 0

    def record_error(self, err: BlockError) -> None:
        if not self.error:
            self.error = err.errno or errno.EIO
            self.error_message = err.message

    # -- I/O --------------------------------------------------------------------------------

    async def _co_read(self, offset: int, nbytes: int) -> bytes:
        if self.mode == PRIMARY:
            raise BlockError(errno.EIO, "Primary replication nodes do not serve reads")
        st = self.io_status()
        if st < 0:
            raise BlockError(-st, "Block replication is not running")
        return await self._pass().read(offset, nbytes)

    async def _forward(self, op, offset: int, nbytes: int) -> None:
        """Run a write-like request in the mode's way (see the module doc)."""
        st = self.io_status()
        if st < 0:
            raise BlockError(-st, "Block replication is not running")
        if st == 0:
            if self.mode == SECONDARY:
                await op(self._pass(), offset, nbytes)
                return
            self.unacked_bytes += nbytes
            try:
                await op(self._pass(), offset, nbytes)
            except BlockError as e:
                # the consumer is not to see the secondary's trouble: record, succeed
                self.record_error(e)
            finally:
                self.unacked_bytes -= nbytes
            return
        await self._failover_failed_write(op, offset, nbytes)

    async def _failover_failed_write(self, op, offset: int, nbytes: int) -> None:
        """Ranges already in active/hidden go to active, the rest to the secondary disk."""
        active = self._pass()
        secondary = self.child_node("secondary")
        if secondary is None:
            await op(active, offset, nbytes)
            return
        for e in await active.block_status(offset, nbytes):
            in_buffers = e.present and e.depth < 2
            await op(active if in_buffers else secondary, e.start, e.length)

    async def _co_write(self, offset: int, data: bytes, fua: bool) -> None:
        mv = memoryview(data)

        async def op(node: Node, off: int, n: int) -> None:
            await node.write(off, mv[off - offset : off - offset + n], fua)

        await self._forward(op, offset, len(data))

    async def _co_write_zeroes(self, offset: int, nbytes: int, may_unmap: bool, fua: bool) -> None:
        async def op(node: Node, off: int, n: int) -> None:
            await node.write_zeroes(off, n, may_unmap, fua)

        await self._forward(op, offset, nbytes)

    async def _co_discard(self, offset: int, nbytes: int) -> None:
        # QEMU drops discards here (the filter has no discard callback), so the two
        # sides can diverge. The primary forwards them as write-zeroes: the local
        # disk reads zeroes after a discard, and so will the secondary.
        async def op(node: Node, off: int, n: int) -> None:
            if self.mode == PRIMARY:
                await node.write_zeroes(off, n, may_unmap=True)
            else:
                await node.discard(off, n)

        await self._forward(op, offset, nbytes)

    async def _co_flush(self) -> None:
        f = self._pass()
        if self.mode == PRIMARY:
            if self.io_status() < 0:
                return
            try:
                await f.flush()
            except BlockError as e:
                self.record_error(e)
            return
        await f.flush()

    async def _co_block_status(self, offset: int, nbytes: int) -> list[Extent]:
        if self.mode == PRIMARY:
            return [Extent(offset, nbytes, True, False, True, 0, None, None)]
        return await self._pass().block_status(offset, nbytes)

    async def reopen(self, read_only: bool) -> None:
        self.read_only = read_only

    def describe_filename(self) -> str:
        f = self.file
        return f.describe_filename() if f is not None else ""

    async def close(self) -> None:
        if self.graph is not None and getattr(self.graph, "replication", None) is not None:
            await self.graph.replication.on_close(self)
        await super().close()
