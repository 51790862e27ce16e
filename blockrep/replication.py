"""COLO block replication, control plane: start, checkpoint, stop/failover, get_error.

Every replication node registers here when it opens. The ``*_all`` operations
walk the nodes newest first and stop at the first error (no rollback), so a
checkpoint over several disks is one operation (SPEC §4). Each operation
follows QEMU's block/replication.c in its checks, their order and their texts,
except where QEMU 7.2 is wrong (README: "Differences from QEMU 7.2").
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from .block.graph import Graph
from .block.node import Node
from .block.replication import (
    DONE,
    FAILOVER,
    FAILOVER_FAILED,
    MODE_NUMBER,
    NONE,
    PRIMARY,
    RUNNING,
    SECONDARY,
    ReplicationNode,
)
from .errors import BlockError, ReplicationError
from .jobs import launch
from .jobs.base import Job, JobManager

log = logging.getLogger("blockrep.replication")

BACKUP_BLOCKER = "Block device is in use by internal backup job"


def _contains(top: Node, node: Node) -> bool:
    if top is node:
        return True
    return any(_contains(c.node, node) for c in top.children.values())


async def _allocated_bytes(node: Node | None) -> int:
    """Bytes an overlay holds in its own layer (depth 0), not in its backing chain."""
    if node is None or node.closed or node.length == 0:
        return 0
    return sum(
        e.length for e in await node.block_status(0, node.length) if e.present and e.depth == 0
    )


async def disk_identity(node: Node) -> dict[str, Any]:
    """What identifies the shared disk, so both sides can be checked to use the same one.

    ``device``/``inode`` of the file under the node (equal on both nodes of one host,
    or of one shared file system); ``fingerprint``: sha256 of the first 64 KiB and
    of 64 KiB at a few fixed offsets, read through the node.
    """
    import hashlib
    import os

    f: Node | None = node
    while f is not None and getattr(f, "fd", None) is None:
        f = f.file or f.backing
    ident: dict[str, Any] = {"size": node.length}
    if f is not None and getattr(f, "fd", -1) >= 0:
        st = os.fstat(f.fd)  # type: ignore[attr-defined]
        ident["device"] = st.st_dev
        ident["inode"] = st.st_ino
        ident["filename"] = f.describe_filename()
    h = hashlib.sha256()
    for frac in (0, 1, 2, 3):
        off = (node.length * frac // 4) & ~0xFFFF
        n = min(65536, node.length - off)
        if n > 0:
            h.update(await node.read(off, n))
    ident["fingerprint"] = h.hexdigest()
    return ident


def _watch_preimages(s: ReplicationNode, hidden: Node) -> None:
    """Shared disk, secondary: while running, only P's forwarded pre-images write the
    hidden disk (S's own writes go to the active disk). One that fails to land is a
    failed copy-before-write (SPEC §6 case 3): P records it, and so must S, whose view
    of that cluster is lost — S's get_error reports it.
    """
    hidden._preimage_watcher = s  # type: ignore[attr-defined]
    if getattr(hidden, "_preimage_watched", False):
        return
    hidden._preimage_watched = True  # type: ignore[attr-defined]
    for meth in ("_co_write", "_co_write_zeroes"):
        orig = getattr(hidden, meth)

        async def watched(*args: Any, _orig: Any = orig, **kw: Any) -> Any:
            try:
                return await _orig(*args, **kw)
            except BlockError as e:
                w = getattr(hidden, "_preimage_watcher", None)
                if w is not None and w.stage == RUNNING:
                    w.record_error(e)
                raise

        setattr(hidden, meth, watched)


class ReplicationRegistry:
    def __init__(self, graph: Graph, jobs: JobManager) -> None:
        self.graph = graph
        self.jobs = jobs
        self.nodes: list[ReplicationNode] = []  # newest first
        graph.replication = self  # type: ignore[attr-defined]
        graph.on_open.append(self._on_open)

    def _on_open(self, node: Node) -> None:
        if isinstance(node, ReplicationNode):
            self.nodes.insert(0, node)

    async def on_close(self, node: ReplicationNode) -> None:
        """QEMU's replication_close: stop a running replication, cancel a failover."""
        if (
            node.stage == RUNNING
            and node.mode == SECONDARY
            and node.backup_job is None
            and not node.shared_disk
        ):
            node.stage = DONE  # shutting down: the jobs are gone already, nothing to stop
        if node.stage == RUNNING:
            try:
                await self.stop(node, False)
            except ReplicationError as e:
                log.warning("stopping %s on close: %s", node.node_name, e)
        if node.stage == FAILOVER and node.commit_job is not None:
            node.commit_job.cancel(force=False)
            await node.commit_job.done.wait()
        if node in self.nodes:
            self.nodes.remove(node)

    # -- *_all ---------------------------------------------------------------------------

    async def start_all(self, mode: str) -> None:
        for n in list(self.nodes):
            await self.start(n, mode)

    async def do_checkpoint_all(self) -> None:
        for n in list(self.nodes):
            await self.do_checkpoint(n)

    def get_error_all(self) -> None:
        for n in list(self.nodes):
            self.get_error(n)

    async def stop_all(self, failover: bool) -> None:
        for n in list(self.nodes):
            await self.stop(n, failover)

    # -- start -----------------------------------------------------------------------------

    async def start(self, s: ReplicationNode, mode: str) -> None:
        if s.stage != NONE:
            if s.stage in (FAILOVER, DONE):
                return  # ignored, as QEMU's start of a finished replication
            raise ReplicationError("Block replication is running or done")
        if s.mode != mode:
            raise ReplicationError(
                f"The parameter mode's value is invalid, needs {MODE_NUMBER[s.mode]}, but got {MODE_NUMBER[mode]}"
            )
        if s.mode == SECONDARY:
            await (self._start_secondary_shared(s) if s.shared_disk else self._start_secondary(s))
        elif s.shared_disk:
            await self._start_primary_shared(s)
        s.stage = RUNNING
        s.epoch = 0
        if s.mode == SECONDARY:
            await self._secondary_checkpoint(s)
        s.error = 0
        s.error_message = ""

    def _check_buffers(self, s: ReplicationNode, shared: bool) -> tuple[Node, Node, Node]:
        """SPEC §5's start checks on active → hidden → disk, in QEMU's order.

        The user the check demands is the secondary disk's (non-shared: P's NBD
        export or a drive) or, in shared mode, the hidden disk's (the export P
        writes pre-images to).
        """
        active = s.file
        if active is None or active.backing is None:
            raise ReplicationError("Active disk doesn't have backing file")
        hidden = active.backing
        if hidden.backing is None:
            raise ReplicationError("Hidden disk doesn't have backing file")
        disk = hidden.backing
        if shared and not self.graph.has_backend(hidden):
            raise ReplicationError("The hidden disk doesn't have block backend")
        if not shared and not self.graph.has_backend(disk):
            raise ReplicationError("The secondary disk doesn't have block backend")
        if not (active.length == hidden.length == disk.length):
            raise ReplicationError(
                "Active disk, hidden disk, secondary disk's length are not the same"
            )
        if not active.supports_make_empty() or not hidden.supports_make_empty():
            raise ReplicationError("Active disk or hidden disk doesn't support make_empty")
        return active, hidden, disk

    @staticmethod
    def _private_buffers(*nodes: Node) -> None:
        """Active and hidden are replication's own buffers: let a checkpoint swap in
        fresh files instead of truncating (flat in what they held)."""
        for n in nodes:
            if hasattr(n, "swap_on_empty"):
                n.swap_on_empty = True  # type: ignore[attr-defined]

    def _valid_top(self, s: ReplicationNode) -> Node | None:
        top = self.graph.find(s.top_id or "")
        if top is None or not self.graph.is_root(top) or not _contains(top, s):
            return None
        return top

    async def _start_secondary(self, s: ReplicationNode) -> None:
        active, hidden, secondary = self._check_buffers(s, shared=False)
        self._private_buffers(active, hidden)
        await self._reopen_backing(s, hidden, secondary, writable=True)
        top = self._valid_top(s)
        if top is None:
            await self._reopen_backing(s, hidden, secondary, writable=False)
            raise ReplicationError("No top_bs or it is invalid")
        # the replication node holds the hidden and secondary disks itself, so they
        # stay open through the failover commit that takes them out of the chain
        s.attach_child("hidden", hidden)
        s.attach_child("secondary", secondary)
        top.op_blocker = BACKUP_BLOCKER  # type: ignore[attr-defined]
        s.top = top  # type: ignore[attr-defined]
        try:
            job = await launch.start_backup(
                self.graph,
                self.jobs,
                {
                    "job-id": f"replication-backup-{s.node_name.lstrip('#')}",
                    "device": secondary.node_name,
                    "target": hidden.node_name,
                    "sync": "none",
                },
                internal=True,
            )
        except Exception as e:
            top.op_blocker = None  # type: ignore[attr-defined]
            s.detach_child("hidden")
            s.detach_child("secondary")
            await self._reopen_backing(s, hidden, secondary, writable=False)
            raise ReplicationError(str(getattr(e, "message", e))) from None
        s.backup_job = job
        job.on_conclude.append(lambda j: self._backup_completed(s, j))
        if job.cbw is not None:
            # a failed incoming write (its copy-before-write, or the secondary disk
            # itself) is reported to the HA manager (SPEC §6, failures 3 and 4)
            job.cbw.on_error.append(lambda e: self._incoming_write_failed(s, e))

    def _incoming_write_failed(self, s: ReplicationNode, err: BlockError) -> None:
        if s.stage == RUNNING:
            s.record_error(err)

    async def _start_primary_shared(self, s: ReplicationNode) -> None:
        """Shared disk, primary: copy-before-write on the shared disk, into S's hidden disk.

        The filter's target is this replication node, whose forwarding path records
        a failure and reports success: so a copy S could not take never fails P's
        consumer (SPEC §6 case 2), and a consumer write reaches the shared disk only
        after S acknowledged the original contents.
        """
        disk = self.graph.find(s.shared_disk_id or "")
        if disk is None:
            raise ReplicationError(
                f"Cannot find device='{s.shared_disk_id}' nor node-name='{s.shared_disk_id}'"
            )
        if disk.length != s.length:
            raise ReplicationError("The shared disk and the hidden disk's length are not the same")
        s.stage = RUNNING  # the filter's target (this node) must accept writes from now on
        try:
            job = await launch.start_backup(
                self.graph,
                self.jobs,
                {
                    "job-id": f"replication-backup-{s.node_name.lstrip('#')}",
                    "device": disk.node_name,
                    "target": s.node_name,
                    "sync": "none",
                },
                internal=True,
            )
        except Exception as e:
            s.stage = NONE
            raise ReplicationError(str(getattr(e, "message", e))) from None
        s.backup_job = job
        s.shared = disk  # type: ignore[attr-defined]
        job.on_conclude.append(lambda j: self._backup_completed(s, j))

    async def _start_secondary_shared(self, s: ReplicationNode) -> None:
        """Shared disk, secondary: no backup job; P writes pre-images into hidden.

        Checks, in order: active has a backing file (the hidden disk); the hidden
        disk has one (the shared disk); the hidden disk has a user (the NBD export
        P writes to); equal lengths; make_empty support; top-id valid.
        """
        active, hidden, shared = self._check_buffers(s, shared=True)
        self._private_buffers(active, hidden)
        if self._valid_top(s) is None:
            raise ReplicationError("No top_bs or it is invalid")
        s.attach_child("hidden", hidden)
        s.attach_child("secondary", shared)
        _watch_preimages(s, hidden)

    async def _reopen_backing(
        self, s: ReplicationNode, hidden: Node, secondary: Node, writable: bool
    ) -> None:
        if writable:
            s.orig_ro = {"hidden": hidden.read_only, "secondary": secondary.read_only}
        for key, node in (("hidden", hidden), ("secondary", secondary)):
            if s.orig_ro.get(key) and not node.closed:
                await node.reopen(not writable)

    def _backup_completed(self, s: ReplicationNode, job: Job) -> None:
        if s.stage not in (FAILOVER, DONE):
            # the backup job went away while replication needed it
            s.error = errno.EIO
            s.error_message = job.error or "Backup job was cancelled unexpectedly"
        s.backup_job = None
        top = getattr(s, "top", None)
        if top is not None:
            top.op_blocker = None
        hidden, secondary = s.child_node("hidden"), s.child_node("secondary")
        if hidden is not None and secondary is not None and s.stage != FAILOVER:
            import asyncio

            asyncio.ensure_future(self._reopen_backing(s, hidden, secondary, writable=False))

    # -- checkpoint ---------------------------------------------------------------------------

    async def do_checkpoint(self, s: ReplicationNode) -> None:
        if s.stage in (DONE, FAILOVER):
            return
        if s.mode == SECONDARY:
            await self._secondary_checkpoint(s)
        elif s.stage == RUNNING:
            if s.backup_job is not None:
                # shared disk: P's writes are drained; a new epoch of copies begins
                await s.backup_job.cbw.drain()
                s.backup_job.checkpoint()
            s.epoch += 1

    async def _secondary_checkpoint(self, s: ReplicationNode) -> None:
        job = s.backup_job
        if job is None and not s.shared_disk:
            raise ReplicationError("Backup job was cancelled unexpectedly")
        active, hidden = s.file, s.child_node("hidden")
        assert active is not None and hidden is not None
        # No request may be half-way while the buffers are emptied: a copy landing
        # in hidden after the re-arm would be a pre-image from the wrong epoch.
        if job is not None and job.cbw is not None:
            await job.cbw.drain()
        await active.drain()
        await hidden.drain()
        if job is not None:
            job.checkpoint()
        try:
            await active.make_empty()
        except BlockError as e:
            s.record_error(e)  # the checkpoint failed: reported to the HA manager (SPEC §6.6)
            raise ReplicationError(f"Failed to empty the active disk: {e.message}") from None
        try:
            await hidden.make_empty()
        except BlockError as e:
            s.record_error(e)
            raise ReplicationError(f"Failed to empty the hidden disk: {e.message}") from None
        s.epoch += 1

    # -- get_error -------------------------------------------------------------------------------

    def get_error(self, s: ReplicationNode) -> None:
        if s.stage == NONE:
            raise ReplicationError("Block replication is not running")
        if s.error:
            raise ReplicationError("I/O error occurred")

    # -- stop / failover ----------------------------------------------------------------------------

    async def stop(self, s: ReplicationNode, failover: bool) -> None:
        if s.stage == NONE:
            raise ReplicationError("Block replication is not running")
        if s.stage in (FAILOVER, DONE):
            return
        if s.stage == FAILOVER_FAILED:
            raise ReplicationError("Block replication is not running")
        if s.mode == PRIMARY:
            s.stage = DONE
            s.error = 0
            await self._cancel_backup(s)
            return
        if not failover and s.shared_disk:
            await self._secondary_checkpoint(s)
            s.stage = DONE
            s.error = 0
            return
        if not failover:
            # QEMU 7.2 cancels the backup job first and then fails its own
            # checkpoint ("Backup job was cancelled unexpectedly"), leaving the
            # buffers full. The designed behaviour: checkpoint, then stop cleanly.
            await self._secondary_checkpoint(s)
            s.stage = DONE
            await self._cancel_backup(s)
            s.error = 0
            return
        s.stage = FAILOVER
        await self._cancel_backup(s)
        active = s.file
        secondary = s.child_node("secondary")
        assert active is not None and secondary is not None
        try:
            job = await launch.start_commit(
                self.graph,
                self.jobs,
                {
                    "job-id": f"replication-commit-{s.node_name.lstrip('#')}",
                    "device": active.node_name,
                    "base-node": secondary.node_name,
                },
                internal=True,
                auto_complete=True,
            )
        except Exception as e:
            s.stage = FAILOVER_FAILED
            s.error = errno.EIO
            s.error_message = str(getattr(e, "message", e))
            return
        s.commit_job = job
        job.on_conclude.append(lambda j: self._commit_done(s, j))

    async def _cancel_backup(self, s: ReplicationNode) -> None:
        job = s.backup_job
        if job is not None:
            job.cancel(force=True)
            await job.done.wait()

    def _commit_done(self, s: ReplicationNode, job: Job) -> None:
        s.commit_job = None
        if job.error is None and not job.cancel_requested:
            s.stage = DONE
            s.error = 0
            for role in ("hidden", "secondary"):
                if role in s.children:
                    s.detach_child(role)
        else:
            s.stage = FAILOVER_FAILED
            s.error = errno.EIO
            s.error_message = job.error or "failover commit was cancelled"

    # -- status -------------------------------------------------------------------------------------

    async def status(self, s: ReplicationNode) -> dict[str, Any]:
        job_ids = [j.id for j in (s.backup_job, s.commit_job) if j is not None]
        hidden = s.child_node("hidden")
        active = (
            s.file
            if s.mode == SECONDARY and s.stage in (RUNNING, FAILOVER, FAILOVER_FAILED)
            else None
        )
        cbw = getattr(s.backup_job, "cbw", None)
        out: dict[str, Any] = {
            "node-name": s.node_name,
            "mode": s.mode,
            "stage": s.stage,
            "error": (s.error_message or "I/O error occurred") if s.error else None,
            "epoch": s.epoch,
            "hidden-allocated-bytes": await _allocated_bytes(hidden) if active is not None else 0,
            "active-allocated-bytes": await _allocated_bytes(active),
            "clusters-copied": cbw.clusters_copied if cbw is not None else 0,
            "jobs": job_ids,
        }
        if s.shared_disk:
            out["shared-disk"] = True
            disk = getattr(s, "shared", None) if s.mode == PRIMARY else s.child_node("secondary")
            if disk is None and s.mode == PRIMARY:
                disk = self.graph.find(s.shared_disk_id or "")
            if disk is None and s.mode == SECONDARY and s.stage == NONE:
                # before start, so that the operator can check the pair first:
                # the shared disk is the hidden disk's backing file
                hidden = s.file.backing if s.file is not None else None
                disk = hidden.backing if hidden is not None else None
            if disk is not None:
                out["shared-disk-identity"] = await disk_identity(disk)
        return out
