"""What both roles share: the daemon, the state file, the consumer export, status, tracking.

Each role (``Primary``, ``Secondary``) runs a Daemon and builds SPEC §2/§3's graph
itself; this base class holds what does not depend on which side a node is.

The durable state is node_state.NodeState (checksummed; a corrupt file is an error,
never reset). A node writing alone marks the peer bitmap before each write reaches its
disk (I1): the consumer export awaits the mark, and a write whose mark cannot be made
durable fails with EIO instead of being issued.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..address import SocketAddress
from ..block.node import DirtyBitmap, Node
from ..daemon import Daemon
from ..errors import BlockError
from ..nbd.server import NBDServer
from ..replication.filter import ReplicationNode
from . import auth, metrics, qmp, view, volumes
from .activity_log import ActivityLog
from .bitmap import REGION_SIZE
from .config import RoleConfig, VolumeSpec
from .consumer import ConsumerGroup, Stats
from .node_state import NodeState, StateFileError
from .states import EntryKind
from .states import Role as RoleName

log = logging.getLogger("blockrep.ha")

AL_SUFFIX = ".blockrep-al"


def al_path(disk: str) -> str:
    """The activity log of a disk's primary: next to the disk (a ring of 8 pages)."""
    return disk + AL_SUFFIX


class PeerStatus(enum.StrEnum):
    """What this node knows of its peer: status's ``peer`` (README lists the values)."""

    CONNECTING = "connecting"  # not paired yet
    SYNCING = "syncing"  # P: paired, bringing the peer level before replicating
    CONNECTED = "connected"  # replicating
    PEER_LOST = "peer-lost"  # S: no word from P for --failover-timeout
    DEGRADED = "degraded"  # P: serving alone after losing (or not finding) S
    FAILED_OVER = "failed-over"  # S: went on alone; never a secondary again
    SPLIT_BRAIN = "split-brain"  # both wrote alone since a common epoch
    STALE = "stale"  # P: S went on without it; this disk is behind
    REFUSED = "refused"  # P: S (or the disks) refused the pairing


@dataclass
class Host:
    """What outlives a role: the daemon (graph, QMP, jobs), the durable state, the
    consumer's server and export, the errors. ``blockrep up`` (node.py) keeps one while
    its role changes, so the consumer's connections and the QMP socket stay open."""

    d: Daemon
    state: NodeState
    consumers: list[NBDServer] = field(default_factory=list)  # one per export address
    export: ConsumerGroup | None = None
    errors: list[str] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    was_clean: bool = True  # the node's last life ended in an orderly stop (state.start)

    @classmethod
    def load(cls, state_file: str) -> Host:
        return cls(Daemon(), NodeState.load(state_file))


class BaseRole:
    """The part of a node that is the same on both sides of the pair."""

    role: ClassVar[RoleName]

    def __init__(self, cfg: RoleConfig, host: Host | None = None) -> None:
        self.cfg = cfg
        self.disk = cfg.disk
        self.shared = cfg.shared
        self.host = host if host is not None else Host.load(cfg.state_file)
        self.state = self.host.state
        self.d = self.host.d
        self.peer = PeerStatus.CONNECTING
        self.errors = self.host.errors
        self.stats = Stats()
        self.epoch_started = time.monotonic()
        self.top_device = ""  # the consumer's device; its root may change (filters)
        self.alone_bitmap: DirtyBitmap | None = None
        self.al: ActivityLog | None = None  # the primary's activity log (I1), when open
        self.stale_al_cleared = False  # a secondary: the disk's old AL was removed
        self.sync_target = False  # a secondary a resync copies into (until replication starts)
        self.common_epoch: str | None = None  # status's history.common: met the peer there
        self.stopping = self.host.stopping
        self.tasks: list[asyncio.Task] = []
        self.state_error: str | None = None  # the last save of the state file failed
        pair, where = SocketAddress.from_str(cfg.pair_address), f"blockrep {self.role.value}"
        self.security = auth.for_pair(pair, cfg.psk_file, cfg.tls_dir, cfg.insecure, where)

    @property
    def shown_role(self) -> RoleName:
        """The role status shows: ``none`` for a node of ``blockrep up`` that has not
        learnt its role yet (a secondary no primary has paired with)."""
        return self.role

    def error(self, text: str) -> None:
        if self.errors and self.errors[-1] == text:
            return  # a retry loop's same failure again: said once
        log.warning("%s", text)
        self.errors.append(text)
        del self.errors[:-20]

    # -- QMP, consumer export, metrics ---------------------------------------------------

    async def start_qmp(self) -> None:
        qmp.register_status(self)
        if self.cfg.qmp:
            await qmp.listen(self.d, self.cfg.qmp)

    @property
    def top(self) -> Node | None:
        return self.d.graph.devices.get(self.top_device)

    @property
    def consumer_export(self) -> ConsumerGroup | None:
        return self.host.export

    def volume_bases(self) -> list[tuple[VolumeSpec, int, int]]:
        return volumes.bases(self.cfg.volume_specs())

    def base_keyval(self, prefix: str) -> str:
        return volumes.base_keyval(self.cfg.volume_specs(), prefix)

    async def start_consumer_export(self) -> None:
        """Serve the consumer's exports on this role's top node; a host that already
        serves them (a role change) keeps their connections: the exports move to the new
        top, their write guard to this role (the activity log is set by the primary)."""
        assert self.top is not None
        self._attach_write_bitmap()
        if self.host.export is not None:
            self.host.export.attach(self.top, self._mark_before_write, None)
            return
        self.host.export, self.host.consumers = await volumes.serve(
            self.top, self.volume_bases(), self._mark_before_write, self.cfg.export_tls_dir
        )

    def start_metrics(self) -> None:
        if self.cfg.metrics:
            self.tasks.append(metrics.serve(self.cfg.metrics, self.status))

    # -- going alone (failover / degraded) ------------------------------------------------

    def _attach_write_bitmap(self) -> None:
        """Track the consumer's writes since the last agreed checkpoint (and while alone)."""
        if self.top is not None and self.alone_bitmap is None:
            # the state's disk-id and peer bitmap are of this disk (a size mismatch or a
            # bitmap that does not fit raises StateFileError: setup reports it)
            self.state.ensure_disk_id(self.top.length)
            bm = DirtyBitmap(REGION_SIZE, self.top.length)
            self.top.dirty_bitmaps.append(bm)
            self.alone_bitmap = bm

    def save_state(self) -> None:
        """Save the state file; a failure is reported (status ``errors`` and
        ``state-file-error`` until a save succeeds: each epoch retries), not raised."""
        try:
            self.state.save()
            self.state_error = None
        except StateFileError as e:
            self.state_error = e.message
            self.error(e.message)

    def agreed_epoch(self, gen: str) -> None:
        """Both nodes hold the same data now: a new epoch, nothing written since.

        The state file is written in the next turn of the event loop (its fsyncs are
        not part of the consumer's pause). A crash in between leaves one node one
        epoch ahead: a lost append to handshake.compare_histories, never split brain.
        """
        self.state.new_epoch(gen, save=False)
        asyncio.get_running_loop().call_soon(self.save_state)
        if self.al is not None:
            self.al.set_alone(None)  # paired: regions leave once a checkpoint covers them
        elif self.role is RoleName.SECONDARY and not self.stale_al_cleared:
            # the activity log this disk's primary left was sent in the hello and its
            # regions copied: both disks are equal now, so it no longer says anything
            self.stale_al_cleared = True
            try:
                os.unlink(al_path(self.disk))
            except FileNotFoundError:
                pass
            except OSError as e:
                self.error(f"cannot remove the old activity log {al_path(self.disk)}: {e}")
        if self.alone_bitmap is not None:
            self.alone_bitmap.dirty.clear()
        self.epoch_started = time.monotonic()

    def track_alone_writes(self, kind: EntryKind) -> None:
        """From now on this node writes without its peer: record where.

        What the consumer wrote since the last agreed checkpoint counts too, and so do
        the writes in flight now: the peer may not hold them (P: forwards that failed
        before the loss was noticed; S: its own writes, kept by the failover commit).
        From here on every write is marked before it is issued (``_mark_before_write``).
        """
        self.state.go_alone(kind)
        self._attach_write_bitmap()
        self.flush_alone_writes()
        if self.al is not None:
            # no checkpoint will come: a full log hands its regions to the peer bitmap
            self.al.set_alone(self._al_to_bitmap)

    def _al_to_bitmap(self, regions: Sequence[int]) -> None:
        """The activity log's regions go to the persisted peer bitmap (alone, log full)."""
        self.state.mark_regions(regions)

    def _mark_before_write(self, offset: int, nbytes: int) -> None:
        """I1 for a node alone: the region's mark is durable before the write is issued."""
        if self.state.alone_since is None or nbytes <= 0:
            return
        try:
            self.state.mark_before_write(offset, nbytes)
        except ValueError:
            return  # beyond the disk: the node refuses the request itself
        except StateFileError as e:
            self.error(f"write refused, its region could not be marked: {e.message}")
            raise BlockError(errno.EIO, e.message) from None

    def flush_alone_writes(self) -> None:
        """Persist the marks of writes made since the last agreed checkpoint and in flight."""
        bm = self.alone_bitmap
        if bm is None or self.state.alone_since is None:
            return
        regions = set(bm.dirty)
        if self.consumer_export is not None:
            for off, n in self.consumer_export.in_flight_ranges():
                regions.update(range(off // REGION_SIZE, (off + max(n, 1) - 1) // REGION_SIZE + 1))
        nregions = self.state.peer_bitmap.nregions
        self.state.mark_regions(r for r in regions if 0 <= r < nregions)

    def written_alone(self) -> list[list[int]]:
        """Status's ``written-alone``: the persisted marks, and while alone the newer writes."""
        marks = self.state.peer_bitmap.copy()
        if self.alone_bitmap is not None and self.state.alone_since is not None:
            marks.mark_regions(r for r in self.alone_bitmap.dirty if r < marks.nregions)
        return marks.ranges()

    # -- status ------------------------------------------------------------------------------

    def replication_node(self) -> ReplicationNode | None:
        return self.d.replication.nodes[0] if self.d.replication.nodes else None

    async def status(self) -> dict[str, Any]:
        """``query-ha-status`` / ``blockrep status --json``: keys and types as README documents."""
        r = self.replication_node()
        rs = await self.d.replication.status(r) if r is not None else {}
        jobs = [
            {
                "id": j.id,
                "type": j.job_type,
                "status": j.status,
                "current": j.current,
                "total": j.total,
            }
            for j in self.d.jobs.jobs.values()
        ]
        out: dict[str, Any] = {
            "role": self.shown_role.value,
            "mode": self.cfg.mode.value,
            "security": self.security.method.value,
            "stage": rs.get("stage", "none"),
            "peer": self.peer.value,
            "epoch": len(self.state.history),
            "epoch-uuid": self.state.current.id if self.state.current else None,
            "epoch-age": round(time.monotonic() - self.epoch_started, 3),
            "hidden-bytes": rs.get("hidden-allocated-bytes", 0),
            "active-bytes": rs.get("active-allocated-bytes", 0),
            "keep-buffer-pages": rs.get("keep-buffer-pages"),  # None but on a running secondary
            "unacked-bytes": r.state.unacked_bytes if r is not None else 0,
            **self.stats.summary(),
            "replication-error": rs.get("error"),
            "errors": list(self.errors),
            "state-file-error": self.state_error,
            "auto-failover": self.auto_failover_status(),
            "alone-since": str(alone) if (alone := self.state.alone_since) else None,
            "history": {
                "current": str(self.state.current) if self.state.current else None,
                "common": self.common_epoch,
                "length": len(self.state.history),
                "trimmed": self.state.history_trimmed,
            },
            "written-alone": self.written_alone(),
            "jobs": jobs,
        }
        out.update(self.states_view(out["stage"]))
        return out

    def states_view(self, stage: str) -> dict[str, Any]:
        """Status's CONTINUITY §8 keys (view.py maps) and ``volumes``."""
        prog = getattr(self, "sync_progress", None)  # the primary's running sync, if any
        marks = self.written_alone()
        facts = view.Facts(
            role=self.shown_role,
            peer=self.peer.value,
            stage=stage,
            disk_state=self.state.disk_state,
            sync=view.SYNC_SOURCE
            if prog is not None
            else (view.SYNC_TARGET if self.sync_target else None),
            sync_paused=self.sync_paused(),
            sync_left=prog.total - prog.current if prog is not None else 0,
            bitmap_bytes=sum(n for _, n in marks),
            reconnect=bool(getattr(self.cfg, "reconnect", False)),
        )
        volumes = [
            {
                "volume": i,
                "disk": v.disk,
                "size": size,
                "offset": base,
                "export": v.export,
                "export-name": v.export_name,
            }  # fmt: skip
            for i, (v, base, size) in enumerate(self.volume_bases())
        ]
        return {**view.view(facts).as_dict(), "volumes": volumes}

    def auto_failover_status(self) -> dict[str, Any]:
        return {"enabled": False, "reason": "not applicable on the primary"}

    def sync_paused(self) -> bool:
        """A resync this node runs is paused (``blockrep resync pause``)."""
        return False

    # -- life ----------------------------------------------------------------------------------

    async def setup(self) -> None:
        """``blockrep primary|secondary``: the whole node, this role for its life."""
        raise NotImplementedError

    async def activate(self) -> None:
        """A role change (node.py): this role on the host another role released."""
        raise NotImplementedError

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        waiter = asyncio.create_task(self.stopping.wait())
        quitter = asyncio.create_task(self.d.shutdown_event.wait())
        await asyncio.wait({waiter, quitter}, return_when=asyncio.FIRST_COMPLETED)
        await self.shutdown()

    async def shutdown(self) -> None:
        for t in self.tasks:
            t.cancel()
        try:
            self.flush_alone_writes()
        except StateFileError as e:
            self.error(e.message)
        for server in self.host.consumers:
            await server.close()
        await self.d.shutdown()
        try:
            self.state.stop()  # an orderly stop: the next handshake may trust it
        except StateFileError as e:
            log.warning("%s", e.message)

    async def release(self) -> None:
        """Give the host back for another role (node.py): this role's tasks stop, its
        graph closes (flushed), the consumer's export stays open — its caller holds it
        quiesced and points it at the next role's top."""
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()
        try:
            self.flush_alone_writes()
        except StateFileError as e:
            self.error(e.message)
        d = self.d
        if d.block_exports.nbd is not None:
            await d.block_exports.nbd_server_stop()
        await d.jobs.cancel_all()
        if self.host.export is not None:
            self.host.export.detach()
        if self.top is not None and self.alone_bitmap in self.top.dirty_bitmaps:
            self.top.dirty_bitmaps.remove(self.alone_bitmap)
        await d.graph.close_all()
