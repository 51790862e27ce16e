"""``blockrep secondary``: the node that answers.

It builds SPEC §2/§3's secondary graph (hidden/active overlays in --buffer-dir),
serves the replication link (NBD) next to its control address, answers the primary's
hello/start/checkpoint/heartbeat, watches the heartbeat (watchdog.py), and fails
over — by hand (``blockrep failover``) or, with ``--auto-failover``, after
``--fence-command`` succeeded.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable
from typing import Any

from ..errors import BlockError
from ..replication.filter import ReplicationMode
from ..replication.identity import disk_identity
from . import buffers, channel, failover, link, outdate, pairing, qmp, verbs, watchdog
from .activity_log import ActivityLogError, convert
from .activity_log import load as load_al
from .bitmap import REGION_SIZE, RegionBitmap
from .config import FailoverPoint, SecondaryConfig, default_buffer_dir
from .node_state import ResyncPosition
from .resync import digests_of
from .role import BaseRole, Host, PeerStatus, al_path
from .states import DiskState, EntryKind, HistoryEntry, ReplicationState
from .states import Role as RoleName
from .volumes import esc


class Secondary(BaseRole):
    role = RoleName.SECONDARY
    cfg: SecondaryConfig

    def __init__(self, cfg: SecondaryConfig, host: Host | None = None) -> None:
        super().__init__(cfg, host)
        self.last_heard = 0.0
        # ``blockrep up`` (node.py): the primary's clean handover (demote, switchover)
        # is passed on; None: ``blockrep secondary`` refuses it (it cannot change role)
        self.on_handover: Callable[[bool], None] | None = None
        self.connections = 0  # control connections open now (a primary that hung up: 0)
        self.started = False
        # a node that failed over in an earlier life is a plain disk: never a secondary again
        alone = self.state.alone_since
        self.failed_over = alone is not None and alone.kind is EntryKind.FAILOVER
        self.link_addr = ""
        self.link_export = ""
        self.buffers: buffers.Buffers | None = None  # the overlays, made in setup()
        self.fence = watchdog.FenceState()
        self.failover_lock = asyncio.Lock()
        self.server: asyncio.AbstractServer | None = None
        self.gate: channel.Gate | None = None  # the control channel's door (auth, caps)
        self.peer_history: list[HistoryEntry] | None = None  # a split-brain hello's (resolve.py)

    @property
    def shown_role(self) -> RoleName:
        if self.on_handover is not None and not self.started and not self.failed_over:
            return RoleName.NONE  # `blockrep up`: no primary has paired with it yet
        return self.role

    @property
    def hidden(self) -> str:
        assert self.buffers is not None
        return self.buffers.hidden

    @property
    def active(self) -> str:
        assert self.buffers is not None
        return self.buffers.active

    def _mark_before_write(self, offset: int, nbytes: int) -> None:
        """failover-point latest: the consumer's export is read-only until failover (its
        writes would be speculative, and the failover drops the buffers they go to)."""
        if self.cfg.failover_point is FailoverPoint.LATEST and not self.failed_over and nbytes:
            raise BlockError(
                errno.EPERM, "read-only until failover (failover-point latest: nothing speculative)"
            )
        super()._mark_before_write(offset, nbytes)

    def auto_failover_status(self) -> dict[str, Any]:
        return watchdog.auto_failover_status(self.cfg, self.fence)

    async def status(self) -> dict[str, Any]:
        out = await super().status()
        if self.cfg.auto_failover and self.cfg.fence_command:
            out["fence"] = self.fence.as_dict()  # attempts since the primary went silent
        out["link"] = self.link_addr or None  # where the replication link listens for the peer
        out["failover-point"] = self.cfg.failover_point.value
        return out

    async def shutdown(self) -> None:
        await super().shutdown()
        # the overlays are throw-away buffers (a restart makes new ones): free the tmpfs
        if self.buffers is not None:
            self.buffers.remove()

    async def _build(self) -> None:
        size = sum(size for _, _, size in self.volume_bases())
        bdir = self.cfg.buffer_dir or default_buffer_dir(self.disk)
        # what a killed earlier run of this disk's secondary left behind (never a live one's)
        buffers.remove_stale(bdir, self.disk)
        self.buffers = await buffers.create(bdir, self.disk, size)
        watchdog.check_fence_command(self)
        await self._build_graph()
        if not self.failed_over:
            await link.start_if_unix(self)

    async def _listen(self) -> None:
        self.gate = channel.Gate(self.security, self._on_conn)
        self.server = await channel.listen(self.cfg.listen, self.gate)
        self.tasks.append(asyncio.create_task(watchdog.watch_primary(self)))

    async def setup(self) -> None:
        """``blockrep secondary``: build, serve the consumer and QMP, listen for the primary."""
        await self._build()
        await self.start_consumer_export()  # refuses a state file of another disk
        self.host.was_clean = self.state.start(self.role)  # clean-shutdown cleared
        qmp.register_secondary(self)
        outdate.register_outdate(self)
        qmp.register_resolve(self, lambda: self.peer_history)
        await self.start_qmp()
        self.start_metrics()
        await self._listen()

    async def activate(self) -> None:
        """A role change (``blockrep up``, node.py): the host's export moves here."""
        await self._build()
        await self.start_consumer_export()
        await self._listen()

    async def release(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        await super().release()
        if self.buffers is not None:
            self.buffers.remove()
            self.buffers = None

    async def _build_graph(self) -> None:
        d = self.d
        if self.failed_over:
            # this node went on alone before: it is a plain disk now, never a secondary
            await d.blockdev.drive_add("if=none,id=colo-disk0," + self.base_keyval(""))
            self.top_device = "colo-disk0"
            self.peer = PeerStatus.FAILED_OVER
        elif not self.shared:
            await d.blockdev.drive_add("if=none,id=parent0," + self.base_keyval(""))
            await d.blockdev.drive_add(
                "if=none,id=childs0,driver=replication,mode=secondary,top-id=colo-disk0,"
                f"keep-buffer-pages={self.cfg.keep_buffer_pages},"
                f"file.driver=qcow2,file.node-name=active0,file.file.filename={esc(self.active)},"
                f"file.backing.driver=qcow2,file.backing.node-name=hidden0,"
                f"file.backing.file.filename={esc(self.hidden)},file.backing.backing=parent0"
            )
            await d.blockdev.drive_add(
                "if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0=childs0"
            )
            self.top_device = "colo-disk0"
            self.link_export = "parent0"
        else:
            await d.blockdev.drive_add(
                f"if=none,driver=qcow2,file.filename={esc(self.hidden)},id=hidden_disk0,"
                f"backing.driver=raw,backing.file.filename={esc(self.disk)}"
            )
            await d.blockdev.drive_add(
                "if=none,id=active-disk0,driver=replication,mode=secondary,file.driver=qcow2,"
                f"keep-buffer-pages={self.cfg.keep_buffer_pages},"
                f"top-id=active-disk0,file.file.filename={esc(self.active)},file.backing=hidden_disk0,shared-disk=on"
            )
            self.top_device = "active-disk0"
            self.link_export = "hidden_disk0"

    # -- control channel ---------------------------------------------------------------------

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def heard() -> None:
            self.last_heard = time.monotonic()

        self.connections += 1
        try:
            await channel.serve(
                reader,
                writer,
                {
                    "hello": lambda msg: self._hello(msg, writer),
                    "start": self._start,
                    "checkpoint": self._checkpoint,
                    "heartbeat": self._heartbeat,
                    "handover": self._handover,
                    "sync-target": self._sync_target,
                    "digests": self._digests,
                    "outdate": self._outdate,
                },
                on_message=heard,
            )
        finally:
            self.connections -= 1
            if not self.connections and self.started and self.peer is PeerStatus.CONNECTED:
                # the primary hung up (killed, or its link dropped): say so now, not
                # after --failover-timeout; a promote may fail over at once
                self.peer = PeerStatus.PEER_LOST
                self.error("peer-lost: the primary closed the control connection")

    async def _hello(self, msg: dict[str, Any], writer: asyncio.StreamWriter) -> dict[str, Any]:
        assert self.top is not None
        h = verbs.hello(msg)
        if h.size != self.top.length:
            raise RuntimeError(f"disk sizes differ: primary {h.size}, secondary {self.top.length}")
        if h.shared != self.shared:
            raise RuntimeError("one side runs shared-disk mode and the other does not")
        self.flush_alone_writes()
        split = pairing.secondary_split_brain(
            self.state.history,
            msg.get("history"),
            self.state.alone_since,
            len(self.state.peer_bitmap),
        )
        if split is not None:
            # both went on alone: the primary refuses too; say so here as well
            self.peer = PeerStatus.SPLIT_BRAIN
            self.peer_history = pairing.parse_history(msg.get("history"))
            self.error(split)
        if self.failed_over:
            address, name = "", ""  # nothing to write into: it goes on alone
        else:
            address, name = await link.open_for_peer(self, writer)
        reply: dict[str, Any] = {
            "node-id": self.state.node_id,
            "history": [str(e) for e in self.state.history],
            "alone-since": str(alone) if (alone := self.state.alone_since) else None,
            "written": self.state.peer_bitmap.ranges(),
            # what this node may have written as a primary past the common epoch
            "al": self._stale_al(),
            "failover-point": self.cfg.failover_point.value,  # what a failover here keeps
            "link": address,
            "export": name,  # the link's secret export name, new at every hello
            "stage": (await self.status())["stage"],
            "failed-over": self.failed_over,
            # Outdated: `resolve --discard-local` gave up this node's writes (rule discard-local)
            "disk-state": self.state.disk_state.value,
            # the rest of what the handshake's decision reads (handshake.Side)
            "history-trimmed": self.state.history_trimmed,
            "clean-shutdown": self.host.was_clean,
            "last-role": self.state.last_role.value,
            "fenced-peer": self.state.fenced_peer_at is not None,
            "resync-source": self.state.resync.peer_node_id if self.state.resync else None,
        }
        if self.shared:
            hidden = self.d.graph.find("hidden_disk0")
            if hidden is not None and hidden.backing is not None:
                reply["identity"] = await disk_identity(hidden.backing)
        return reply

    def _stale_al(self) -> list[int]:
        """The activity log this disk's primary left (a crash: regions it may have
        written that the peer lacks), in REGION_SIZE regions; cleared once paired."""
        try:
            rec = load_al(al_path(self.disk)).newest
        except ActivityLogError as e:
            raise RuntimeError(f"cannot read this disk's {e.message}") from None
        if not rec.seq:
            return []
        return sorted(convert(rec.regions, rec.region_size, REGION_SIZE))

    def _refuse_if_failed_over(self, op: str) -> None:
        """A node that failed over (or is failing over) answers no verb of the old primary:
        its history, peer bitmap and disk are its own now. The reply's code tells the old
        primary to stop claiming it replicates (it goes on alone, ``peer: stale``)."""
        if self.failed_over or self.failover_lock.locked():
            alone = self.state.alone_since
            since = f" at {alone}" if alone is not None else ""
            raise channel.ChannelError(
                f"{op} refused: this secondary failed over{since} and goes on without "
                "this primary; nothing was changed here",
                channel.FAILED_OVER,
            )

    async def _start(self, msg: dict[str, Any]) -> dict[str, Any]:
        self._refuse_if_failed_over("start")
        history = verbs.start(msg)
        if history is not None:
            self.state.adopt_history(history)
        self.common_epoch = str(self.state.current) if self.state.current else None
        if self.state.resync is not None:
            self.state.finish_resync(DiskState.CONSISTENT)  # the resync into it is complete
        if self.state.disk_state in (DiskState.OUTDATED, DiskState.INCONSISTENT):
            # the primary copied what this node gave up (discard-local): level with it again
            with self.state.update():
                self.state.disk_state = DiskState.CONSISTENT
        await self.d.replication.start_all(ReplicationMode.SECONDARY)
        self.sync_target = False
        self.started = True
        self.peer = PeerStatus.CONNECTED
        self.last_heard = time.monotonic()
        return {}

    async def _checkpoint(self, msg: dict[str, Any]) -> dict[str, Any]:
        self._refuse_if_failed_over("checkpoint")
        gen = verbs.checkpoint(msg)  # checked before the buffers are touched
        self.d.replication.get_error_all()
        await self.d.replication.do_checkpoint_all()
        self._refuse_if_failed_over("checkpoint")  # a failover began meanwhile: no epoch
        self.agreed_epoch(gen)
        self.stats.checkpoints += 1
        return {"epoch": len(self.state.history)}

    async def _heartbeat(self, msg: dict[str, Any]) -> dict[str, Any]:
        self._refuse_if_failed_over("heartbeat")
        if self.peer == PeerStatus.PEER_LOST:
            self.peer = PeerStatus.CONNECTED
        r = self.replication_node()
        if r is None:
            return {"stage": "none", "error": False}
        return {"stage": r.state.stage.value, "error": bool(r.state.error)}

    async def _sync_target(self, msg: dict[str, Any]) -> dict[str, Any]:
        """A resync into this disk begins: it is Inconsistent (never promoted, I3) until
        replication starts after the final pass."""
        self._refuse_if_failed_over("sync-target")
        gen, source = verbs.sync_target(msg)
        pb = self.state.peer_bitmap
        remaining = RegionBitmap(pb.region_size, pb.length)
        self.state.begin_resync(  # Inconsistent, and from whom (the handshake's resume rule)
            ResyncPosition(ReplicationState.SYNC_TARGET, gen, remaining, source)
        )
        self.sync_target = True
        return {}

    async def _digests(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Checksum-first resync: the digests of regions of this disk (resync.py)."""
        self._refuse_if_failed_over("digests")
        assert self.top is not None
        regions = verbs.digests(msg, -(-self.top.length // REGION_SIZE))
        node = self.d.graph.find(self.link_export)
        if node is None:
            raise channel.ChannelError("digests: this node has no replication link")
        return {"digests": await digests_of(node, regions)}

    async def _outdate(self, msg: dict[str, Any]) -> dict[str, Any]:
        """The primary goes on alone without this node (failover-point latest)."""
        return outdate.outdate_secondary(self, "the primary goes on alone")

    async def _handover(self, msg: dict[str, Any]) -> dict[str, Any]:
        """The primary hands over cleanly after a final checkpoint (demote, switchover,
        down): ``promote`` true: this node becomes primary. The change runs after the
        reply (it closes this channel)."""
        self._refuse_if_failed_over("handover")
        promote = verbs.handover(msg)
        if self.on_handover is None:
            raise channel.ChannelError(
                "handover refused: this node runs as `blockrep secondary` and cannot "
                "change its role (run it with `blockrep up`)"
            )
        self.started = False  # the primary leaves on purpose: not a lost peer
        self.peer = PeerStatus.CONNECTING
        self.on_handover(promote)
        return {}

    # -- losing the primary --------------------------------------------------------------------

    async def failover(self) -> None:
        """Stop the link, fail over, and go on alone (failover.py)."""
        await failover.fail_over(self)
