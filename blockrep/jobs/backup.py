"""The backup job: a copy-before-write filter above the source, plus (sync=full) a
background copy of every cluster the guest has not already caused to be copied.

sync=none copies only what the guest overwrites, for as long as the job runs
(until it is cancelled); replication runs exactly this, and awaits ``checkpoint``
to begin a new epoch of pre-images at each checkpoint.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..block.copy_before_write import CopyBeforeWriteNode
from ..errors import BlockError
from .base import CopyJob


@dataclass(frozen=True)
class BackupOptions:
    """The arguments of QMP's blockdev-backup that the job itself acts on."""

    sync: str
    filter_node_name: str | None = None
    on_source_error: str = "report"
    on_target_error: str = "report"


class BackupJob(CopyJob):
    job_type = "backup"

    def __init__(self, *args: Any, options: BackupOptions, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.options = options
        self.cbw: CopyBeforeWriteNode | None = None
        # Called with the BlockError of every incoming write that failed, in its
        # copy-before-write or on the source: the guest sees it, and replication's
        # secondary reports it to the HA manager too (SPEC §6, failures 3 and 4).
        self.on_write_error: list[Callable[[BlockError], None]] = []

    async def install(self) -> None:
        """Insert the filter above the source (before the job starts running)."""
        if self.target.length < self.source.length:
            raise BlockError(errno.EINVAL, "Source and target image have different sizes")
        opts = {
            "driver": "copy-before-write",
            "file": self.source.node_name,
            "target": self.target.node_name,
        }
        if self.options.filter_node_name:
            opts["node-name"] = self.options.filter_node_name
        try:
            cbw = await self.graph.add(opts)
        except BlockError as e:
            raise BlockError(e.errno, f"Could not create node: {e.message}") from None
        assert isinstance(cbw, CopyBeforeWriteNode)
        self.graph.replace_node(self.source, cbw)
        self.cbw = cbw
        # every copy counts, the guest's included (QEMU: sync=none shows them too)
        cbw.on_copied.append(self._copied)
        cbw.write_error_listeners.append(self._write_failed)
        # QEMU: total-progress is the disk length for sync=none as well
        self.total = self.source.length

    def _copied(self, nbytes: int) -> None:
        self.current += nbytes

    def _write_failed(self, err: BlockError) -> None:
        for listener in list(self.on_write_error):
            listener(err)

    @property
    def clusters_copied(self) -> int:
        """Clusters preserved in the target since the last checkpoint."""
        return self.cbw.clusters_copied if self.cbw is not None else 0

    async def checkpoint(self) -> None:
        """Begin a new epoch: every cluster is copied again before its next write.

        The requests in the filter finish first, and nothing runs between that and
        the re-arm: a copy still in flight from the old epoch must not land after it.
        """
        cbw = self.cbw
        if cbw is not None:
            await cbw.drain()
            cbw.rearm()

    async def run(self) -> None:
        cbw = self.cbw
        assert cbw is not None
        if self.options.sync == "full":
            cs = cbw.cluster_size
            c = 0
            n = cbw.nclusters()
            while c < n:
                await self.pause_point()
                step = min(16, n - c)
                try:
                    await cbw.copy_range(c * cs, min(step * cs, cbw.length - c * cs))
                except BlockError:
                    action = self.options.on_target_error
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
