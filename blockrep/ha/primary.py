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

from ..address import SocketAddress
from ..block.node import Node
from ..errors import BlockError, ReplicationError
from ..replication.filter import ReplicationMode
from . import channel, pairing, qmp, watchdog
from .activity_log import ActivityLog, ActivityLogError
from .bitmap import REGION_SIZE as CHUNK
from .config import PrimaryConfig
from .handshake import Comparison, compare_histories
from .node_state import StateFileError
from .resync import SyncKind, SyncProgress, all_chunks, copy_chunks
from .role import BaseRole, PeerStatus, al_path, esc
from .states import EntryKind, HistoryEntry
from .states import Role as RoleName

log = logging.getLogger("blockrep.ha")


class Primary(BaseRole):
    role = RoleName.PRIMARY
    cfg: PrimaryConfig

    def __init__(self, cfg: PrimaryConfig) -> None:
        super().__init__(cfg)
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

    async def setup(self) -> None:
        d = self.d
        if self.shared:
            await d.blockdev.drive_add(
                f"if=none,id=primary_disk0,driver=raw,file.filename={esc(self.disk)}"
            )
            self.top_device = "primary_disk0"
        else:
            await d.blockdev.drive_add(
                "if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,"
                f"children.0.driver=raw,children.0.file.filename={esc(self.disk)}"
            )
            self.top_device = "colo-disk0"
        assert self.top is not None
        self.state.ensure_disk_id(self.top.length)  # StateFileError: another disk's state
        # I1 while replicating: a region is durably in the activity log before a write
        # to it is issued; the set a crash left behind stays active (copied on pairing)
        self.al = ActivityLog.open(al_path(self.disk), on_full=self._al_full)
        if self.state.alone_since is not None:
            # went on alone in an earlier life: keep recording where it writes
            self.track_alone_writes(EntryKind.DEGRADED)
        qmp.register_primary(self)
        qmp.register_resolve(self, lambda: self.peer_history)
        await self.start_qmp()
        self.start_metrics()
        await self.connect_and_replicate(first=True)
        await self.start_consumer_export()
        assert self.consumer_export is not None
        self.consumer_export.activity_log = self.al
        self.tasks.append(asyncio.create_task(watchdog.heartbeat_loop(self)))
        if self.cfg.checkpoint_interval > 0:
            self.tasks.append(asyncio.create_task(self._checkpoint_loop()))

    # -- pairing ----------------------------------------------------------------------------------

    async def connect_and_replicate(self, first: bool) -> bool:
        """Pair with the secondary and start replicating; False: serving alone (status says why).

        The first attempt keeps trying for --connect-timeout and a refusal by the disks
        (pairing.PairingRefused: they differ) ends the process; later ones (--reconnect)
        try once. A failure of the data path after the handshake (the link unreachable,
        a copy or the start failing) leaves this node serving alone (degraded).
        """
        cfg = self.cfg
        ch = channel.Client()
        deadline = time.monotonic() + (cfg.connect_timeout if first else 1.0)
        assert self.top is not None
        while True:
            try:
                await ch.connect(cfg.secondary, self.tls_client)
                hello = await ch.call(
                    "hello",
                    size=self.top.length,
                    shared=self.shared,
                    history=[str(e) for e in self.state.history],
                )
                break
            except channel.ChannelError as e:
                if not ch.closed:  # the secondary answered: a real refusal
                    await ch.close()
                    self.peer = PeerStatus.REFUSED
                    self.error(f"secondary refused pairing: {e}")
                    return False
                # the channel died before an answer (secondary not up yet, a proxy,
                # a TLS mismatch): a transport failure, retried like a failed connect
                await ch.close()
                ch = channel.Client()
                err: Exception = e
            except (OSError, TimeoutError) as e:
                err = e
            if time.monotonic() >= deadline:
                self.peer = PeerStatus.DEGRADED
                self.error(f"cannot reach the secondary at {cfg.secondary}: {err}")
                if first:
                    self.track_alone_writes(EntryKind.DEGRADED)
                return False
            await asyncio.sleep(0.2)
        try:
            theirs = pairing.parse_history(hello.get("history"))
        except ValueError as e:
            await ch.close()
            self.peer = PeerStatus.REFUSED
            self.error(f"secondary refused pairing: its history is not valid: {e}")
            return False
        rel = compare_histories(self.state.history, theirs)
        self.peer_history = theirs
        self.flush_alone_writes()
        alone = self.state.alone_since
        refusal = pairing.judge_hello(
            rel, hello, self.state.peer_bitmap.ranges(), str(alone) if alone else None
        )
        if refusal is not None:
            self.peer = refusal.peer
            if refusal.split_brain is not None:
                self.split_brain = refusal.split_brain
            self.error(refusal.message)
            # this node keeps serving its consumer: from here on it writes alone
            self.track_alone_writes(EntryKind.DEGRADED)
            await ch.close()
            return False
        # a live consumer waits while the disks are brought in sync and replication
        # starts: a write landing on an already copied region would be lost on S
        exp = self.consumer_export
        if exp is not None:
            await exp.quiesce()
        try:
            await self._bring_in_sync(hello, rel)
            await self._start_replication(hello, ch)
        except pairing.PairingRefused as e:
            self.peer = PeerStatus.REFUSED
            self.error(e.message)
            await ch.close()
            if first:
                raise
            return False
        except (BlockError, OSError, channel.ChannelError, ReplicationError) as e:
            self.replicating, self.ch = True, ch  # what degrade() undoes, wherever it failed
            await self.degrade(f"pairing failed: {getattr(e, 'message', None) or e}", e)
            return False
        finally:
            if exp is not None:
                exp.resume()
        return True

    async def _bring_in_sync(self, hello: dict[str, Any], rel: Comparison) -> None:
        top = self.top
        assert top is not None
        alone = self.state.alone_since
        plan = pairing.plan_sync(
            shared=self.shared,
            relation=rel.relation,
            lost_append=bool(rel.theirs_after),
            alone=alone is not None,
            failed_over=alone is not None and alone.kind is EntryKind.FAILOVER,
            has_history=bool(self.state.history),
            initial_sync=self.cfg.initial_sync,
            assume_synced=self.cfg.assume_synced,
        )
        rule = pairing.rule_name(plan, hello)
        self.last_handshake = {"rule": rule, "direction": "none", "bytes": 0}
        if rule == pairing.DISCARD_LOCAL:  # split brain resolved: the secondary gave up its writes
            log.warning("pairing by rule discard-local (split brain resolved)")
            self.split_brain = None
        if plan is pairing.SyncPlan.SHARED_IDENTITY:
            await pairing.check_shared_identity(top, hello)
            return
        link = await pairing.open_link(hello)
        try:
            if plan is pairing.SyncPlan.FAILOVER_DISCARD:
                # this node failed over: what it rolled back and kept (I2) and wrote
                # alone, and whatever the old primary may have written past the common
                # epoch (its activity log and bitmap) go from here to it
                try:
                    regions = pairing.failover_discard_regions(
                        self.state.peer_bitmap, self.al.regions() if self.al else (), hello
                    )
                except ValueError as e:
                    raise pairing.PairingRefused(f"failover-discard refused: {e}") from None
                log.warning(
                    "pairing by rule failover-discard: copying %d region(s) to the old primary",
                    len(regions),
                )
                await self._copy(link, regions, SyncKind.RESYNC)
            elif plan is pairing.SyncPlan.RESYNC_WRITTEN:
                # this node wrote since the secondary's last epoch: copy that, and what
                # the secondary says it may hold differently (a discard-local resolve)
                regions = pairing.peer_behind_regions(self.state.peer_bitmap, hello)
                await self._copy(link, regions, SyncKind.RESYNC)
            elif plan is pairing.SyncPlan.INITIAL_SYNC:
                await self._copy(link, all_chunks(top.length), SyncKind.INITIAL)
            elif plan is pairing.SyncPlan.RESYNC_DIFFERING:
                differ = await pairing.differing_chunks(top, link)
                if differ:
                    self.error(
                        f"{len(differ)} MiB differed after an unfinished epoch; resynchronising them"
                    )
                    await self._copy(link, differ, SyncKind.RESYNC)
            elif plan is pairing.SyncPlan.VERIFY:
                await pairing.verify_identical(top, link)
        finally:
            await link.graph.close_all()

    async def _copy(self, link: Node, chunks: list[int], what: SyncKind) -> None:
        assert self.top is not None
        progress = SyncProgress(what, total=len(chunks) * CHUNK)
        self.sync_progress = progress
        try:
            await copy_chunks(self.top, link, chunks, progress, self.cfg.progress)
        finally:
            self.sync_progress = None  # status shows "sync" only during a sync (README)
            if self.last_handshake is not None:
                self.last_handshake["direction"] = "local-to-peer"
                self.last_handshake["bytes"] += progress.current

    async def _start_replication(self, hello: dict[str, Any], ch: channel.Client) -> None:
        d = self.d
        server = SocketAddress.from_str(hello["link"]).to_qapi()
        opts: dict[str, Any] = {
            "driver": "replication",
            "node-name": "replication0",
            "mode": "primary",
            "file": {"driver": "nbd", "export": hello["export"], "server": server},
        }
        if self.shared:
            opts.update({"shared-disk": True, "shared-disk-id": "primary_disk0"})
        await d.graph.add(opts, monitor=True)
        if not self.shared:
            d.blockdev.blockdev_change("colo-disk0", None, "replication0")
        # the secondary first (its buffers and copy-before-write must be ready)
        gen = str(uuid.uuid4())
        await ch.call("start", history=[str(e) for e in self.state.history])
        await d.replication.start_all(ReplicationMode.PRIMARY)
        self.ch = ch
        self.replicating = True
        self.peer = PeerStatus.CONNECTED
        # the first epoch, agreed by both (the consumer is held: every write is in it)
        mark = self.al.checkpoint_mark() if self.al is not None else 0
        await ch.call("checkpoint", gen=gen)
        self.agreed_epoch(gen)
        if self.al is not None:
            self.al.checkpoint_acked(mark)

    # -- checkpoints ------------------------------------------------------------------------------

    async def checkpoint(self) -> dict[str, Any]:
        if not self.replicating or self.ch is None:
            raise channel.ChannelError(f"not replicating (peer: {self.peer})")
        async with self.ckpt_lock:
            exp = self.consumer_export
            t0 = time.perf_counter()
            if exp is not None:
                await exp.quiesce()  # in flight done ⇒ every forwarded write acknowledged
            mark = self.al.checkpoint_mark() if self.al is not None else 0
            try:
                self.d.replication.get_error_all()
                gen = str(uuid.uuid4())
                await self.ch.call(
                    "checkpoint", gen=gen, timeout=max(5.0, self.cfg.heartbeat_timeout)
                )
                await self.d.replication.do_checkpoint_all()
            except (channel.ChannelError, ReplicationError) as e:
                await self.degrade(f"checkpoint failed: {e}", e)
                raise
            finally:
                if exp is not None:
                    exp.resume()
                pause = (time.perf_counter() - t0) * 1000
            # after resume(): the state file's fsyncs run once the consumer is moving
            self.agreed_epoch(gen)
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
        d = self.d
        try:
            await d.replication.stop_all(True)
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

    async def status(self) -> dict[str, Any]:
        s = await super().status()
        if self.last_handshake is not None:
            s["last-handshake"] = dict(self.last_handshake)
        if self.al is not None:
            s["al"] = self.al.stats()
        if self.split_brain is not None:
            s["split-brain"] = self.split_brain
        if self.sync_progress is not None:
            s["sync"] = self.sync_progress.as_dict()
        return s
