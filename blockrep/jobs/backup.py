"""The backup job: a copy-before-write filter above the source, plus (sync=full) a
background copy of every cluster the guest has not already caused to be copied.

sync=none copies only what the guest overwrites, for as long as the job runs
(until it is cancelled); replication's secondary runs exactly this, and calls
``checkpoint`` to arm every cluster again at each checkpoint.
"""

from __future__ import annotations

import asyncio
import errno

from ..block.copy_before_write import CopyBeforeWriteNode
from ..block.graph import Graph
from ..block.node import Node
from ..errors import BlockError
from .base import Job, JobManager


class BackupJob(Job):
    job_type = "backup"

    def __init__(
        self,
        manager: JobManager,
        job_id: str,
        graph: Graph,
        source: Node,
        target: Node,
        sync: str,
        *,
        filter_node_name: str | None = None,
        on_source_error: str = "report",
        on_target_error: str = "report",
        **kw,
    ) -> None:
        super().__init__(manager, job_id, **kw)
        self.graph = graph
        self.source = source
        self.target = target
        self.sync = sync
        self.filter_node_name = filter_node_name
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.cbw: CopyBeforeWriteNode | None = None
        self._wakeup = asyncio.Event()

    async def install(self) -> None:
        """Insert the filter above the source (before the job starts running)."""
        if self.target.length < self.source.length:
            raise BlockError(errno.EINVAL, "Source and target image have different sizes")
        opts = {
            "driver": "copy-before-write",
            "file": self.source.node_name,
            "target": self.target.node_name,
        }
        if self.filter_node_name:
            opts["node-name"] = self.filter_node_name
        try:
            cbw = await self.graph.add(opts)
        except BlockError as e:
            raise BlockError(e.errno, f"Could not create node: {e.message}") from None
        assert isinstance(cbw, CopyBeforeWriteNode)
        self.graph.replace_node(self.source, cbw)
        self.cbw = cbw
        # every copy counts, the guest's included (QEMU: sync=none shows them too)
        cbw.on_copied.append(self._copied)
        # QEMU: total-progress is the disk length for sync=none as well
        self.total = self.source.length

    def _copied(self, nbytes: int) -> None:
        self.current += nbytes

    def checkpoint(self) -> None:
        """Re-arm the whole copy bitmap (replication's do_checkpoint)."""
        if self.cbw is not None:
            self.cbw.rearm()

    def wake(self) -> None:
        self._wakeup.set()

    async def run(self) -> None:
        cbw = self.cbw
        assert cbw is not None
        if self.sync == "full":
            cs = cbw.cluster_size
            c = 0
            n = cbw.nclusters()
            while c < n:
                await self.pause_point()
                step = min(16, n - c)
                try:
                    await cbw.copy_range(c * cs, min(step * cs, cbw.length - c * cs))
                except BlockError:
                    action = self.on_target_error
                    self.report_error("write", "ignore" if action == "ignore" else "report")
                    if action != "ignore":
                        raise
                # progress comes from the copies themselves; this keeps the rate
                self._rate_bytes += min(step * cs, cbw.length - c * cs)
                await self.progress(0)
                c += step
            return
        # sync=none: copies happen in the guest's write path until cancel
        while True:
            await self.pause_point()
            self._wakeup.clear()
            self.busy = False  # QEMU: an idle sync=none job is not busy
            await self._wakeup.wait()
            self.busy = True

    async def clean(self) -> None:
        cbw = self.cbw
        if cbw is None:
            return
        self.cbw = None
        # let in-flight guest requests through the filter finish, then take it out
        await cbw.drain()
        self.graph.replace_node(cbw, self.source)
        await self.graph.close_node(cbw)
