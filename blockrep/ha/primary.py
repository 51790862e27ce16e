"""``blockrep primary``: the node that drives the pair.

It connects the control channel, checks histories and disks (pairing.py), starts
replication (secondary first), checkpoints periodically — quiescing its consumer's
export, so every forwarded write is acknowledged first — and sends heartbeats
(watchdog.py). Losing the secondary degrades it: it keeps serving and records where
it writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

from ..block.node import DirtyBitmap, Node
from ..errors import BlockError, ReplicationError
from . import channel, outdate, qmp, reprotect, verify, watchdog
from .activity_log import ActivityLog, ActivityLogError
from .config import PrimaryConfig
from .node_state import StateFileError
from .resync import Resync, SyncProgress
from .role import BaseRole, Host, PeerStatus, al_path
from .states import EntryKind, HistoryEntry
from .states import Role as RoleName
from .volumes import esc

log = logging.getLogger("blockrep.ha")


class Primary(BaseRole):
    role = RoleName.PRIMARY
    cfg: PrimaryConfig

    def __init__(self, cfg: PrimaryConfig, host: Host | None = None) -> None:
        super().__init__(cfg, host)
        self.ch: channel.Client | None = None
        self.replicating = False
        self.split_brain: dict[str, Any] | None = None
        self.peer_history: list[HistoryEntry] | None = None  # the last hello's (resolve.py)
        self.ckpt_lock = asyncio.Lock()
        # what a running sync has copied (status shows "sync" only during one)
        self.sync_progress: SyncProgress | None = None
        # status's ``last-handshake``: the rule of the last pairing and what it copied
        self.last_handshake: dict[str, Any] | None = None
        self._early_ckpt: asyncio.Task[None] | None = None
        # a background resync (reprotect.py): the engine, its dirty bitmap, its link
        self.resync: Resync | None = None
        self.resync_dirty: DirtyBitmap | None = None
        self.resync_link: Node | None = None
        self.ckpt_wait: tuple[str, float] | None = None  # a checkpoint waits on: what, since
        self.resync_bar: Any = None  # a tqdm bar with --progress
        self.verify = verify.Verify(self)  # online verify and its repair (verify.py)
        self.freeze = outdate.AckFreeze(
            cfg, self.security, self.error
        )  # failover-point latest's gate

    async def _build(self) -> None:
        """The primary's graph (SPEC §2/§3), its activity log, and alone tracking."""
        d = self.d
        if self.shared:
            await d.blockdev.drive_add(
                f"if=none,id=primary_disk0,driver=raw,file.filename={esc(self.disk)}"
            )
            self.top_device = "primary_disk0"
        else:
            await d.blockdev.drive_add(
                "if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,"
                + self.base_keyval("children.0.")
            )
            self.top_device = "colo-disk0"
        assert self.top is not None
        self.state.ensure_disk_id(self.top.length)  # StateFileError: another disk's state
        # I1 while replicating: a region is durably in the activity log before a write
        # to it is issued; the set a crash left behind stays active (copied on pairing)
        if self.cfg.activity_log:
            self.al = ActivityLog.open(al_path(self.disk), on_full=self._al_full)
        if self.state.alone_since is not None:
            # went on alone in an earlier life (or was just promoted): record where it writes
            self.track_alone_writes(EntryKind.DEGRADED)

    def _start_loops(self) -> None:
        assert self.consumer_export is not None
        self.consumer_export.set_activity_log(self.al)
        # a pairing before the export was served armed the gate without it
        self.consumer_export.set_ack_gate(self.freeze.gate if self.freeze.armed else None)
        self.tasks.append(asyncio.create_task(watchdog.heartbeat_loop(self)))
        if self.cfg.checkpoint_interval > 0:
            self.tasks.append(asyncio.create_task(self._checkpoint_loop()))

    async def setup(self) -> None:
        """``blockrep primary``: build, serve QMP, pair (first attempt), serve the consumer."""
        await self._build()  # refuses a state file of another disk before it is written
        self.host.was_clean = self.state.start(self.role)  # clean-shutdown cleared
        qmp.register_primary(self)
        qmp.register_resolve(self, lambda: self.peer_history)
        await self.start_qmp()
        self.start_metrics()
        alone = self.state.alone_since is not None
        if alone:
            # a survivor restarted as primary (it failed over, or served degraded): its
            # consumer is served while the returning node is brought level (I5); every
            # write is marked before it is issued, so the resync follows it
            await self.start_consumer_export()
        await self.connect_and_replicate(first=True)
        if not alone:
            await self.start_consumer_export()
        self._start_loops()

    async def activate(self) -> None:
        """A role change (``blockrep up``, node.py): the host's export (held quiesced by
        the caller) moves to this graph; pairing runs in the heartbeat loop (reconnect)."""
        await self._build()
        await self.start_consumer_export()
        self._start_loops()

    async def hand_over(self, promote_peer: bool) -> None:
        """A clean handover (demote, switchover, down), the consumer held by the caller:
        a final checkpoint, the secondary told (``promote_peer``: it becomes primary),
        the activity log emptied — an acknowledged checkpoint covers every region, so
        the next pairing copies nothing for it."""
        if not (self.replicating and self.ch is not None):
            if promote_peer:
                raise channel.ChannelError(
                    f"switchover refused: not replicating (peer: {self.peer.value})"
                )
            return
        await self.checkpoint(resume=False)  # a failure degrades and raises: nothing handed over
        self.replicating = False
        await self._drop_replication(failover=False)  # before the peer closes its link
        try:
            await self.ch.call("handover", promote=promote_peer)
        except channel.ChannelError as e:
            # the peer may still be a running secondary: this node goes on alone
            self.peer = PeerStatus.DEGRADED
            self.track_alone_writes(EntryKind.DEGRADED)
            if promote_peer:
                raise channel.ChannelError(f"switchover failed: the secondary: {e}") from None
            log.warning("handover: the secondary did not answer: %s", e)
            return
        if self.al is not None:
            await self.al.clear()

    async def release(self) -> None:
        """Stop replicating (no failover: this node's disk is complete) and give the host back."""
        self.replicating = False
        self.freeze.disarm(self.consumer_export)
        if self.ch is not None:
            await self.ch.close()
            self.ch = None
        await self._drop_replication(failover=False)
        await super().release()
        if self.al is not None:
            try:
                await self.al.aclose()
            except ActivityLogError as e:
                self.error(e.message)
            self.al = None

    # -- pairing ----------------------------------------------------------------------------------

    async def connect_and_replicate(self, first: bool) -> bool:
        """Pair with the secondary and start replicating (reprotect.py)."""
        return await reprotect.connect_and_replicate(self, first)

    # -- checkpoints ------------------------------------------------------------------------------

    async def checkpoint(self, resume: bool = True) -> dict[str, Any]:
        """A checkpoint (SPEC §4): quiesce, cut, resume; ``resume=False`` leaves the
        consumer held (a handover continues under the same pause)."""
        if not self.replicating or self.ch is None:
            raise channel.ChannelError(f"not replicating (peer: {self.peer})")
        async with self.ckpt_lock:
            exp = self.consumer_export
            t0 = time.perf_counter()
            if exp is not None:
                n = sum(m.active for m in exp.members)
                self.ckpt_wait = (f"consumer requests in flight ({n})", time.monotonic())
                await exp.quiesce()  # in flight done ⇒ every forwarded write acknowledged
            mark = self.al.checkpoint_mark() if self.al is not None else 0
            try:
                self.d.replication.get_error_all()
                gen = str(uuid.uuid4())
                self.ckpt_wait = ("the secondary's answer", time.monotonic())
                await self.ch.call(
                    "checkpoint", gen=gen, timeout=max(5.0, self.cfg.heartbeat_timeout)
                )
                self.ckpt_wait = ("the replication filter", time.monotonic())
                await self.d.replication.do_checkpoint_all()
            except (channel.ChannelError, ReplicationError) as e:
                await self.degrade(f"checkpoint failed: {e}", e)
                raise
            finally:
                self.ckpt_wait = None
                if exp is not None and resume:
                    exp.resume()
                pause = (time.perf_counter() - t0) * 1000
            # after resume(): the state file's fsyncs run once the consumer is moving
            self.agreed_epoch(gen)
            if self.verify.progress.out_of_sync:
                # a new epoch clears the peer bitmap; what verify found different stays
                # in it (saved with the epoch) until repaired, so a pairing copies it
                self.state.peer_bitmap.mark_regions(self.verify.progress.out_of_sync)
            if self.al is not None:
                self.al.checkpoint_acked(mark)  # S holds every write finished by the cut
            self.stats.pauses_ms.append(pause)
            del self.stats.pauses_ms[:-10000]
            self.stats.checkpoints += 1
            return {"epoch": len(self.state.history), "pause-ms": round(pause, 3)}

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.checkpoint_interval)
            if self.replicating:
                try:
                    await self.checkpoint()
                except Exception as e:
                    log.warning("checkpoint: %s", e)

    async def degrade(self, why: str, cause: Exception | None = None) -> None:
        """Lose the secondary: stop replicating, keep serving, record what is written.

        ``cause`` a refusal coded ``failed-over``: the secondary went on without this
        node (it was stalled past the failover timeout): ``peer: stale``, and no
        reconnect (the survivor refuses this node's verbs for good).
        The replication node leaves the graph even if the state file cannot be saved
        (reported in ``errors``), so a later reconnect can add it again.
        """
        if not self.replicating:
            return
        self.freeze.freeze(why)  # latest: first of all, no acknowledgement the peer lacks
        self.replicating = False
        if isinstance(cause, channel.ChannelError) and cause.code == channel.FAILED_OVER:
            self.peer = PeerStatus.STALE
            why = (
                f"the secondary failed over without this primary ({cause}); "
                "not replicating: serving alone and marking every write"
            )
        else:
            self.peer = PeerStatus.DEGRADED
        self.error(why)
        if self.ch is not None:
            await self.ch.close()
            self.ch = None
        try:
            self.track_alone_writes(EntryKind.DEGRADED)
        except StateFileError as e:
            # the record stays in memory, unsaved: each write's mark (I1) saves it first
            # or fails with EIO, and a reconnect saves it before pairing
            self.error(f"going alone: {e.message}")
            if self.state.alone_since is None:
                self.state.append(HistoryEntry(EntryKind.DEGRADED, str(uuid.uuid4())), save=False)
        await self._drop_replication(failover=True)

    async def _drop_replication(self, failover: bool) -> None:
        """Stop replicating and take the replication node out of the graph (even when
        something else failed, so a later pairing can add it again)."""
        d = self.d
        try:
            await d.replication.stop_all(failover)
        except (ReplicationError, BlockError):
            pass
        try:
            if not self.shared and d.graph.find("replication0") is not None:
                with contextlib.suppress(BlockError):  # not a child yet (a pairing failed)
                    d.blockdev.blockdev_change("colo-disk0", "children.1", None)
                await d.blockdev.blockdev_del("replication0")
        except BlockError as e:
            log.warning("removing the replication node: %s", e.message)

    def _al_full(self) -> None:
        """The activity log is full of regions no checkpoint covers yet: take one now."""
        if self.replicating and (self._early_ckpt is None or self._early_ckpt.done()):
            self._early_ckpt = asyncio.create_task(self._checkpoint_early())

    async def _checkpoint_early(self) -> None:
        try:
            await self.checkpoint()
        except Exception as e:
            log.warning("checkpoint (activity log full): %s", e)

    async def shutdown(self) -> None:
        await super().shutdown()
        if self.al is not None:
            try:
                await self.al.aclose()
            except ActivityLogError as e:
                log.warning("%s", e.message)

    def sync_paused(self) -> bool:
        return self.resync is not None and self.resync.progress.paused

    def resync_control(self, pause: bool) -> dict[str, Any]:
        """``ha-resync-pause`` / ``ha-resync-resume``: hold or release a running resync."""
        if self.resync is None:
            raise channel.ChannelError("no resync is running")
        if pause:
            self.resync.pause()
        else:
            self.resync.resume()
        return self.resync.progress.as_dict()

    async def status(self) -> dict[str, Any]:
        if self.resync is not None and self.sync_progress is not None:
            # the legacy ``sync`` object follows the engine (the total grows with new writes)
            p = self.resync.progress
            self.sync_progress.total, self.sync_progress.current = p.total_bytes, p.done_bytes
        s = await super().status()
        s.update(self.freeze.status())
        if (wait := self.ckpt_wait) is not None:  # what a checkpoint is waiting on, how long
            s["checkpoint-wait"] = {"on": wait[0], "seconds": round(time.monotonic() - wait[1], 3)}
        if self.last_handshake is not None:
            s["last-handshake"] = dict(self.last_handshake)
        if self.al is not None:
            s["al"] = self.al.stats()
        if self.split_brain is not None:
            s["split-brain"] = self.split_brain
        if self.sync_progress is not None:
            s["sync"] = self.sync_progress.as_dict()
        if self.resync is not None:
            s["resync"] = self.resync.progress.as_dict()
        s["verify"] = self.verify.status()  # CONTINUITY §8: position, mismatches, skipped
        # regions verify found different stay out of sync until repaired, Protected or not (I4)
        s["out-of-sync-bytes"] = max(
            s["out-of-sync-bytes"], s["verify"].get("out-of-sync-bytes", 0)
        )
        return s
