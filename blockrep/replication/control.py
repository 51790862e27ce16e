"""COLO block replication, control plane: QEMU's ReplicationOps for one node.

start, checkpoint, get_error and stop (with or without failover), plus what
QEMU's replication_close does. Each follows QEMU's block/replication.c in its
checks, their order and their texts, except where QEMU 7.2 is wrong (README:
"Differences from QEMU 7.2"). The node's ``state`` is changed here and nowhere
else; the data path (``filter.py``) only reads it and records errors.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from typing import Any

from ..block.graph import Graph
from ..block.node import EmptyStyle, Node
from ..errors import ReplicationError
from ..jobs import launch
from ..jobs.backup import BackupJob
from ..jobs.base import Job, JobManager
from .buffers import EmptyFailed, empty_buffers
from .filter import ReplicationMode, ReplicationNode, ReplicationStage
from .identity import disk_identity

log = logging.getLogger("blockrep.replication")

PRIMARY, SECONDARY = ReplicationMode.PRIMARY, ReplicationMode.SECONDARY
NONE, RUNNING, DONE = ReplicationStage.NONE, ReplicationStage.RUNNING, ReplicationStage.DONE
FAILOVER, FAILOVER_FAILED = ReplicationStage.FAILOVER, ReplicationStage.FAILOVER_FAILED

BACKUP_BLOCKER = "Block device is in use by internal backup job"


def _contains(top: Node, node: Node) -> bool:
    if top is node:
        return True
    return any(_contains(c.node, node) for c in top.children.values())


async def _allocated_bytes(node: Node | None) -> int:
    """Bytes an overlay holds in its own layer (depth 0), not in its backing chain."""
    if node is None or node.closed or node.length == 0:
        return 0
    own = getattr(node, "allocated_in_layer", None)  # qcow2: from its tables, no seeking
    if own is not None:
        return int(await own())
    return sum(
        e.length for e in await node.block_status(0, node.length) if e.present and e.depth == 0
    )


def _own_buffers(s: ReplicationNode, *nodes: Node) -> None:
    """Active and hidden are replication's own buffers: a checkpoint empties them
    in time flat in what they held, keeping their pages for the next epoch's
    writes or swapping in fresh files (keep-buffer-pages; auto keeps them where
    they are memory: on a disk, kept pages would be written back, and the
    checkpoint's flushes would wait for that)."""
    for n in nodes:
        keep = s.state.keep_buffer_pages
        if keep is None:
            keep = n.file is not None and n.file.memory_backed()
        n.empty_style = EmptyStyle.KEEP_PAGES if keep else EmptyStyle.FRESH_FILE


def _job_suffix(s: ReplicationNode) -> str:
    return s.node_name.lstrip("#")


class ReplicationControl:
    """The replication operations on single nodes of one graph."""

    def __init__(self, graph: Graph, jobs: JobManager) -> None:
        self.graph = graph
        self.jobs = jobs

    # -- start -----------------------------------------------------------------------------

    async def start(self, s: ReplicationNode, mode: ReplicationMode) -> None:
        st = s.state
        if st.stage != NONE:
            if st.stage in (FAILOVER, DONE):
                return  # ignored, as QEMU's start of a finished replication
            raise ReplicationError("Block replication is running or done")
        if st.mode != mode:
            raise ReplicationError(
                "The parameter mode's value is invalid, "
                f"needs {st.mode.number}, but got {mode.number}"
            )
        if st.mode == SECONDARY:
            if st.shared_disk:
                await self._start_secondary_shared(s)
            else:
                await self._start_secondary(s)
        elif st.shared_disk:
            await self._start_primary_shared(s)
        st.stage = RUNNING
        st.epoch = 0
        if st.mode == SECONDARY:
            await self._secondary_checkpoint(s)
        st.error = 0
        st.error_message = ""

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

    def _valid_top(self, s: ReplicationNode) -> Node | None:
        top = self.graph.find(s.state.top_id or "")
        if top is None or not self.graph.is_root(top) or not _contains(top, s):
            return None
        return top

    async def _start_backup(self, s: ReplicationNode, device: Node, target: Node) -> BackupJob:
        """The sync=none backup job whose copy-before-write keeps the pre-images."""
        try:
            job = await launch.start_backup(
                self.graph,
                self.jobs,
                {
                    "job-id": f"replication-backup-{_job_suffix(s)}",
                    "device": device.node_name,
                    "target": target.node_name,
                    "sync": "none",
                },
                internal=True,
            )
        except Exception as e:
            raise ReplicationError(str(getattr(e, "message", e))) from None
        s.state.backup_job = job
        job.on_conclude.append(lambda j: self._backup_completed(s, j))
        return job

    async def _start_secondary(self, s: ReplicationNode) -> None:
        st = s.state
        active, hidden, secondary = self._check_buffers(s, shared=False)
        _own_buffers(s, active, hidden)
        await self._reopen_backing(s, hidden, secondary, writable=True)
        top = self._valid_top(s)
        if top is None:
            await self._reopen_backing(s, hidden, secondary, writable=False)
            raise ReplicationError("No top_bs or it is invalid")
        # the replication node holds the hidden and secondary disks itself, so they
        # stay open through the failover commit that takes them out of the chain
        s.attach_child("hidden", hidden)
        s.attach_child("secondary", secondary)
        top.op_blocker = BACKUP_BLOCKER
        st.top = top
        try:
            job = await self._start_backup(s, secondary, hidden)
        except ReplicationError:
            top.op_blocker = None
            st.top = None
            self._detach_buffers(s)
            await self._reopen_backing(s, hidden, secondary, writable=False)
            raise
        # a failed incoming write (its copy-before-write, or the secondary disk
        # itself) is reported to the HA manager (SPEC §6, failures 3 and 4)
        job.on_write_error.append(st.incoming_write_failed)

    async def _start_primary_shared(self, s: ReplicationNode) -> None:
        """Shared disk, primary: copy-before-write on the shared disk, into S's hidden disk.

        The filter's target is this replication node, whose forwarding path records
        a failure and reports success: so a copy S could not take never fails P's
        consumer (SPEC §6 case 2), and a consumer write reaches the shared disk only
        after S acknowledged the original contents.
        """
        st = s.state
        disk = self.graph.find(st.shared_disk_id or "")
        if disk is None:
            raise ReplicationError(
                f"Cannot find device='{st.shared_disk_id}' nor node-name='{st.shared_disk_id}'"
            )
        if disk.length != s.length:
            raise ReplicationError("The shared disk and the hidden disk's length are not the same")
        st.stage = RUNNING  # the filter's target (this node) must accept writes from now on
        try:
            await self._start_backup(s, disk, s)
        except ReplicationError:
            st.stage = NONE
            raise
        st.shared = disk

    async def _start_secondary_shared(self, s: ReplicationNode) -> None:
        """Shared disk, secondary: no backup job; P writes pre-images into hidden.

        Checks, in order: active has a backing file (the hidden disk); the hidden
        disk has one (the shared disk); the hidden disk has a user (the NBD export
        P writes to); equal lengths; make_empty support; top-id valid.
        """
        active, hidden, shared = self._check_buffers(s, shared=True)
        _own_buffers(s, active, hidden)
        if self._valid_top(s) is None:
            raise ReplicationError("No top_bs or it is invalid")
        s.attach_child("hidden", hidden)
        s.attach_child("secondary", shared)
        # While running, only P's forwarded pre-images write the hidden disk (S's own
        # writes go to the active disk). One that fails to land is a failed
        # copy-before-write (SPEC §6 case 3): P records it, and so must S, whose view
        # of that cluster is lost — S's get_error reports it.
        listener = s.state.incoming_write_failed
        if listener not in hidden.write_error_listeners:
            hidden.write_error_listeners.append(listener)

    def _detach_buffers(self, s: ReplicationNode) -> None:
        """Let go of the hidden and secondary disks (and of hidden's write errors)."""
        hidden = s.child_node("hidden")
        if hidden is not None and s.state.incoming_write_failed in hidden.write_error_listeners:
            hidden.write_error_listeners.remove(s.state.incoming_write_failed)
        for role in ("hidden", "secondary"):
            if role in s.children:
                s.detach_child(role)

    async def _reopen_backing(
        self, s: ReplicationNode, hidden: Node, secondary: Node, writable: bool
    ) -> None:
        st = s.state
        if writable:
            st.orig_read_only = {"hidden": hidden.read_only, "secondary": secondary.read_only}
        for key, node in (("hidden", hidden), ("secondary", secondary)):
            if st.orig_read_only.get(key) and not node.closed:
                await node.reopen(not writable)

    def _backup_completed(self, s: ReplicationNode, job: Job) -> None:
        st = s.state
        if st.stage not in (FAILOVER, DONE):
            # the backup job went away while replication needed it
            st.error = errno.EIO
            st.error_message = job.error or "Backup job was cancelled unexpectedly"
        st.backup_job = None
        if st.top is not None:
            st.top.op_blocker = None
            st.top = None
        hidden, secondary = s.child_node("hidden"), s.child_node("secondary")
        if hidden is not None and secondary is not None and st.stage != FAILOVER:
            asyncio.ensure_future(self._reopen_backing(s, hidden, secondary, writable=False))

    # -- checkpoint ---------------------------------------------------------------------------

    async def do_checkpoint(self, s: ReplicationNode) -> None:
        st = s.state
        if st.stage in (DONE, FAILOVER):
            return
        if st.mode == SECONDARY:
            await self._secondary_checkpoint(s)
        elif st.stage == RUNNING:
            if st.backup_job is not None:
                # shared disk: P's writes are drained; a new epoch of copies begins
                await st.backup_job.checkpoint()
            st.epoch += 1

    async def _secondary_checkpoint(self, s: ReplicationNode) -> None:
        st = s.state
        job = st.backup_job
        if job is None and not st.shared_disk:
            raise ReplicationError("Backup job was cancelled unexpectedly")
        active, hidden = s.file, s.child_node("hidden")
        assert active is not None and hidden is not None
        # No request may be half-way while the buffers are emptied: a copy landing
        # in hidden after the empty would be a pre-image from the wrong epoch. So
        # the job's filter is drained first; it is re-armed only once both buffers
        # are empty (draining again, right before the re-arm), because a checkpoint
        # that fails keeps the old epoch: its copies must not be taken again.
        await active.drain()
        await hidden.drain()
        if job is not None and job.cbw is not None:
            await job.cbw.drain()
        try:
            await empty_buffers(active, hidden)
        except EmptyFailed as f:
            st.record_error(
                f.error
            )  # the checkpoint failed: reported to the HA manager (SPEC §6.6)
            raise ReplicationError(
                f"Failed to empty the {f.buffer} disk: {f.error.message}{f.detail}"
            ) from None
        if job is not None:
            await job.checkpoint()
        st.epoch += 1

    # -- get_error -------------------------------------------------------------------------------

    def get_error(self, s: ReplicationNode) -> None:
        if s.state.stage == NONE:
            raise ReplicationError("Block replication is not running")
        if s.state.error:
            raise ReplicationError("I/O error occurred")

    # -- stop / failover ----------------------------------------------------------------------------

    async def stop(self, s: ReplicationNode, failover: bool) -> None:
        st = s.state
        if st.stage == NONE:
            raise ReplicationError("Block replication is not running")
        if st.stage in (FAILOVER, DONE):
            return
        if st.stage == FAILOVER_FAILED:
            raise ReplicationError("Block replication is not running")
        if st.mode == PRIMARY:
            st.stage = DONE
            st.error = 0
            await self._cancel_backup(s)
            return
        if not failover:
            # QEMU 7.2 cancels the backup job first and then fails its own
            # checkpoint ("Backup job was cancelled unexpectedly"), leaving the
            # buffers full. The designed behaviour: checkpoint, then stop cleanly.
            await self._secondary_checkpoint(s)
            st.stage = DONE
            await self._cancel_backup(s)  # none in shared-disk mode
            st.error = 0
            return
        st.stage = FAILOVER
        await self._cancel_backup(s)
        active = s.file
        secondary = s.child_node("secondary")
        assert active is not None and secondary is not None
        try:
            job = await launch.start_commit(
                self.graph,
                self.jobs,
                {
                    "job-id": f"replication-commit-{_job_suffix(s)}",
                    "device": active.node_name,
                    "base-node": secondary.node_name,
                },
                internal=True,
                auto_complete=True,
            )
        except Exception as e:
            st.stage = FAILOVER_FAILED
            st.error = errno.EIO
            st.error_message = str(getattr(e, "message", e))
            return
        st.commit_job = job
        job.on_conclude.append(lambda j: self._commit_done(s, j))

    async def _cancel_backup(self, s: ReplicationNode) -> None:
        job = s.state.backup_job
        if job is not None:
            job.cancel(force=True)
            await job.done.wait()

    def _commit_done(self, s: ReplicationNode, job: Job) -> None:
        st = s.state
        st.commit_job = None
        if job.error is None and not job.cancel_requested:
            st.stage = DONE
            st.error = 0
            self._detach_buffers(s)
        else:
            st.stage = FAILOVER_FAILED
            st.error = errno.EIO
            st.error_message = job.error or "failover commit was cancelled"

    # -- close --------------------------------------------------------------------------------------

    async def close(self, s: ReplicationNode) -> None:
        """QEMU's replication_close: stop a running replication, cancel a failover."""
        st = s.state
        if (
            st.stage == RUNNING
            and st.mode == SECONDARY
            and st.backup_job is None
            and not st.shared_disk
        ):
            st.stage = DONE  # shutting down: the jobs are gone already, nothing to stop
        if st.stage == RUNNING:
            try:
                await self.stop(s, False)
            except ReplicationError as e:
                log.warning("stopping %s on close: %s", s.node_name, e)
        if st.stage == FAILOVER and st.commit_job is not None:
            st.commit_job.cancel(force=False)
            await st.commit_job.done.wait()
        hidden = s.child_node("hidden")
        if hidden is not None and st.incoming_write_failed in hidden.write_error_listeners:
            hidden.write_error_listeners.remove(st.incoming_write_failed)

    # -- status -------------------------------------------------------------------------------------

    async def status(self, s: ReplicationNode) -> dict[str, Any]:
        """One node's entry of query-replication."""
        st = s.state
        job_ids = [j.id for j in (st.backup_job, st.commit_job) if j is not None]
        hidden = s.child_node("hidden")
        active = (
            s.file
            if st.mode == SECONDARY and st.stage in (RUNNING, FAILOVER, FAILOVER_FAILED)
            else None
        )
        out: dict[str, Any] = {
            "node-name": s.node_name,
            "mode": st.mode.value,
            "stage": st.stage.value,
            "error": (st.error_message or "I/O error occurred") if st.error else None,
            "epoch": st.epoch,
            "hidden-allocated-bytes": await _allocated_bytes(hidden) if active is not None else 0,
            "active-allocated-bytes": await _allocated_bytes(active),
            "clusters-copied": st.backup_job.clusters_copied if st.backup_job is not None else 0,
            "jobs": job_ids,
        }
        if active is not None and hidden is not None:
            # what keep-buffer-pages (auto: per file system) came to
            out["keep-buffer-pages"] = hidden.empty_style is EmptyStyle.KEEP_PAGES
        if st.shared_disk:
            out["shared-disk"] = True
            out.update(await self._shared_disk_identity(s))
        return out

    async def _shared_disk_identity(self, s: ReplicationNode) -> dict[str, Any]:
        st = s.state
        if st.mode == PRIMARY:
            disk = st.shared
            if disk is None:
                disk = self.graph.find(st.shared_disk_id or "")
        else:
            disk = s.child_node("secondary")
            if disk is None and st.stage == NONE:
                # before start, so that the operator can check the pair first:
                # the shared disk is the hidden disk's backing file
                hidden = s.file.backing if s.file is not None else None
                disk = hidden.backing if hidden is not None else None
        return {"shared-disk-identity": await disk_identity(disk)} if disk is not None else {}
