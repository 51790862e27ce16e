"""The secondary's failover: I2 (mark what the commit changes), the commit, going on alone.

A refused failover changes nothing (the link stays up, the primary can still pair); a
failed one is reported with the stage it ended in.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from ..errors import BlockError, ReplicationError
from ..replication.filter import ReplicationNode, ReplicationStage
from .bitmap import REGION_SIZE
from .config import FailoverPoint
from .node_state import StateFileError
from .role import PeerStatus
from .states import DiskState, EntryKind

if TYPE_CHECKING:
    from .secondary import Secondary

FAILOVER_WAIT = 3600.0  # seconds the failover commit may take before it counts as failed


async def _mark_failover_regions(self: Secondary, r: ReplicationNode) -> None:
    """I2: mark the regions allocated in the hidden and active overlays (and what
    the consumer wrote since the last agreed checkpoint) in the persisted peer bitmap."""
    regions: set[int] = set(self.alone_bitmap.dirty) if self.alone_bitmap else set()
    for node in (r.child_node("hidden"), r.file):
        if node is None or node.closed or node.length == 0:
            continue
        for e in await node.block_status(0, node.length):
            if e.present and e.depth == 0 and e.length > 0:
                end = e.start + e.length
                regions.update(range(e.start // REGION_SIZE, -(-end // REGION_SIZE)))
    nregions = self.state.peer_bitmap.nregions
    try:
        self.state.mark_regions(n for n in regions if 0 <= n < nregions)
    except StateFileError as e:
        self.error(f"failover refused: its regions could not be marked (I2): {e.message}")
        raise ReplicationError(f"failover refused: {e.message}") from None


async def _drop_buffers(self: Secondary, r: ReplicationNode) -> None:
    """failover-point latest: the secondary disk (or the shared disk) already holds
    every write the primary acknowledged; the hidden buffer's pre-images and the
    active buffer (read-only before failover: empty) are dropped, so the commit that
    follows changes nothing and the disk keeps the latest writes."""
    for name, node in (("hidden", r.child_node("hidden")), ("active", r.file)):
        if node is None or node.closed:
            continue
        try:
            await node.make_empty()
        except BlockError as e:
            self.error(f"failover (latest): emptying the {name} buffer failed: {e.message}")
            raise ReplicationError(f"failover failed: {e.message}") from None


async def fail_over(self: Secondary) -> None:
    """Stop the link, fail over, and go on alone: S now holds checkpoint + own writes."""
    async with self.failover_lock:
        if self.failed_over:
            return
        if self.state.disk_state in (DiskState.INCONSISTENT, DiskState.OUTDATED):
            raise ReplicationError(
                f"failover refused (I3): this disk is {self.state.disk_state.value}; "
                "nothing was changed"
            )
        d = self.d
        r = self.replication_node()
        # refuse before touching anything: a refused failover leaves the link up, so the
        # primary can still pair (or go on checkpointing) as if it had never been asked
        if r is None or r.state.stage not in (ReplicationStage.RUNNING, ReplicationStage.DONE):
            stage = r.state.stage.value if r is not None else "none"
            raise ReplicationError(
                f"failover refused: replication is not running (stage {stage}); "
                "nothing was changed and the link stays up"
            )
        # I2: before the commit, the peer bitmap durably holds every region it
        # changes: P's writes it rolls back (hidden) and this node's own it keeps
        # (active). Once before the link stops (a failure refuses with the link
        # up), once after (P's last forwards may have landed in between).
        await _mark_failover_regions(self, r)
        if d.block_exports.nbd is not None:
            await d.block_exports.nbd_server_stop()
        await _mark_failover_regions(self, r)
        if self.cfg.failover_point is FailoverPoint.LATEST:
            await _drop_buffers(self, r)
        await d.replication.stop_all(True)
        deadline = time.monotonic() + FAILOVER_WAIT
        while (
            r is not None
            and r.state.stage == ReplicationStage.FAILOVER
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.02)
        if r is not None and r.state.stage != ReplicationStage.DONE:
            st = r.state
            self.error(f"failover ended in stage {st.stage.value}: {st.error_message}")
            raise ReplicationError(f"failover failed: {st.error_message or st.stage.value}")
        self.failed_over = True
        self.peer = PeerStatus.FAILED_OVER
        self.track_alone_writes(EntryKind.FAILOVER)
