"""What both roles share: the daemon, the state file, the consumer export, status, tracking.

Each role (``Primary``, ``Secondary``) runs a Daemon (graph, QMP, jobs, replication
registry) in its own process and builds SPEC §2/§3's graph itself; this base class
holds what does not depend on which side of the pair a node is.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import signal
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..address import SocketAddress
from ..block.node import DirtyBitmap, Node
from ..daemon import Daemon
from ..export import Export
from ..nbd.server import NBDServer
from ..replication.filter import ReplicationNode
from . import channel, metrics, qmp
from .config import RoleConfig
from .state import CHUNK, NodeState, chunks_to_ranges
from .states import EntryKind
from .states import Role as RoleName

log = logging.getLogger("blockrep.ha")


class PeerStatus(enum.StrEnum):
    """What this node knows of its peer: status's ``peer`` (README lists the values)."""

    CONNECTING = "connecting"  # not paired yet
    CONNECTED = "connected"  # replicating
    PEER_LOST = "peer-lost"  # S: no word from P for --failover-timeout
    DEGRADED = "degraded"  # P: serving alone after losing (or not finding) S
    FAILED_OVER = "failed-over"  # S: went on alone; never a secondary again
    SPLIT_BRAIN = "split-brain"  # both wrote alone since a common epoch
    STALE = "stale"  # P: S went on without it; this disk is behind
    REFUSED = "refused"  # P: S (or the disks) refused the pairing


def esc(value: str) -> str:
    """Escape a value for QEMU keyval syntax (``,`` → ``,,``)."""
    return value.replace(",", ",,")


@dataclass
class Stats:
    """Checkpoints taken and the consumer pause each one cost."""

    pauses_ms: list[float] = field(default_factory=list)
    checkpoints: int = 0
    last_checkpoint: float = 0.0

    def summary(self) -> dict[str, Any]:
        p = sorted(self.pauses_ms)
        return {
            "checkpoints": self.checkpoints,
            "last-checkpoint-pause-ms": round(self.pauses_ms[-1], 3) if self.pauses_ms else 0.0,
            "checkpoint-pause-p50-ms": round(statistics.median(p), 3) if p else 0.0,
            "checkpoint-pause-p99-ms": round(p[min(len(p) - 1, int(len(p) * 0.99))], 3)
            if p
            else 0.0,
        }


class BaseRole:
    """The part of a node that is the same on both sides of the pair."""

    role: ClassVar[RoleName]

    def __init__(self, cfg: RoleConfig) -> None:
        self.cfg = cfg
        self.disk = cfg.disk
        self.shared = cfg.shared
        self.state = NodeState.load(cfg.state_file)
        self.d = Daemon()
        self.peer = PeerStatus.CONNECTING
        self.errors: list[str] = []
        self.stats = Stats()
        self.epoch_started = time.monotonic()
        self.top_device = ""  # the consumer's device; its root may change (filters)
        self.consumer: NBDServer | None = None
        self.consumer_export: Export | None = None
        self.alone_bitmap: DirtyBitmap | None = None
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.tls_server, self.tls_client = channel.tls_contexts(cfg.tls_dir)

    def error(self, text: str) -> None:
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

    async def start_consumer_export(self) -> None:
        assert self.top is not None
        self._attach_write_bitmap()
        self.consumer_export = Export("disk", self.top, writable=True, id="consumer")
        self.consumer = NBDServer({"disk": self.consumer_export})
        addr = SocketAddress.from_str(self.cfg.export)
        if addr.type == "unix":
            if os.path.exists(addr.path):
                os.unlink(addr.path)
            await self.consumer.listen_unix(addr.path)
        else:
            await self.consumer.listen_tcp(addr.host, int(addr.port))

    def start_metrics(self) -> None:
        if self.cfg.metrics:
            self.tasks.append(metrics.serve(self.cfg.metrics, self.status))

    # -- going alone (failover / degraded) ------------------------------------------------

    def _attach_write_bitmap(self) -> None:
        """Track the consumer's writes since the last agreed checkpoint (and while alone)."""
        if self.top is not None and self.alone_bitmap is None:
            bm = DirtyBitmap(CHUNK, self.top.length)
            self.top.dirty_bitmaps.append(bm)
            self.alone_bitmap = bm
            self.tasks.append(asyncio.create_task(self._persist_alone_writes()))

    def agreed_epoch(self, gen: str) -> None:
        """Both nodes hold the same data now: a new epoch, nothing written since.

        The state file is written in the next turn of the event loop: after the
        checkpoint's reply went out (S) and after the consumer was let go (P), so
        its fsyncs are not part of the consumer's pause. A crash in between leaves
        one node one epoch behind, which pairing treats as "behind", never as split brain.
        """
        self.state.new_epoch(gen, save=False)
        asyncio.get_running_loop().call_soon(self.state.save)
        if self.alone_bitmap is not None:
            self.alone_bitmap.dirty.clear()
        self.epoch_started = time.monotonic()

    def track_alone_writes(self, kind: EntryKind) -> None:
        """From now on this node writes without its peer: record where.

        What the consumer wrote since the last agreed checkpoint counts too: the peer
        may not hold it (P: forwards that failed before the loss was noticed; S: its
        own writes, kept by the failover commit).
        """
        self.state.go_alone(kind.value)
        self._attach_write_bitmap()
        self.flush_alone_writes()

    async def _persist_alone_writes(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.flush_alone_writes()

    def flush_alone_writes(self) -> None:
        bm = self.alone_bitmap
        if bm is None or self.state.alone_since is None:
            return
        new = bm.dirty - self.state.written_chunks
        if new:
            self.state.written_chunks |= new
            self.state.save()

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
            "role": self.role.value,
            "mode": self.cfg.mode.value,
            "stage": rs.get("stage", "none"),
            "peer": self.peer.value,
            "epoch": len(self.state.generations),
            "epoch-uuid": self.state.current,
            "epoch-age": round(time.monotonic() - self.epoch_started, 3),
            "hidden-bytes": rs.get("hidden-allocated-bytes", 0),
            "active-bytes": rs.get("active-allocated-bytes", 0),
            "unacked-bytes": r.state.unacked_bytes if r is not None else 0,
            **self.stats.summary(),
            "replication-error": rs.get("error"),
            "errors": list(self.errors),
            "auto-failover": self.auto_failover_status(),
            "alone-since": self.state.alone_since,
            "written-alone": chunks_to_ranges(
                self.state.written_chunks
                | (
                    self.alone_bitmap.dirty
                    if self.alone_bitmap and self.state.alone_since
                    else set()
                )
            ),
            "jobs": jobs,
        }
        return out

    def auto_failover_status(self) -> dict[str, Any]:
        return {"enabled": False, "reason": "not applicable on the primary"}

    # -- life ----------------------------------------------------------------------------------

    async def setup(self) -> None:
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
        self.flush_alone_writes()
        if self.consumer is not None:
            await self.consumer.close()
        await self.d.shutdown()
