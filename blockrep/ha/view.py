"""What a user sees of a node's states (CONTINUITY.md §8): one pure mapping.

``view`` turns what a role knows — its role, what it knows of its peer (``peer``),
the replication node's stage, the persisted disk state, whether a sync runs and in
which direction, and the bytes its peer bitmap marks — into status's ``disk-state``,
``peer-role``, ``peer-disk-state``, ``replication`` and ``out-of-sync-bytes``. Both
roles' status() call it; the table in tests/unit/test_ha_status_view.py is its spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .states import DiskState, ReplicationState, Role

# status's ``peer`` values (role.PeerStatus), by value: this module imports no role
CONNECTING = "connecting"
SYNCING = "syncing"
CONNECTED = "connected"
PEER_LOST = "peer-lost"
DEGRADED = "degraded"
FAILED_OVER = "failed-over"
SPLIT_BRAIN = "split-brain"
STALE = "stale"
REFUSED = "refused"

SYNC_SOURCE = "source"
SYNC_TARGET = "target"


@dataclass(frozen=True)
class Facts:
    role: Role
    peer: str  # role.PeerStatus value
    stage: str  # the replication node's stage ("none", "running", ...)
    disk_state: DiskState = DiskState.CONSISTENT  # persisted (NodeState.disk_state)
    sync: str | None = None  # "source" / "target" while a sync runs, else None
    sync_left: int = 0  # bytes the running sync has still to copy
    sync_paused: bool = False  # the running sync is paused (source side)
    bitmap_bytes: int = 0  # bytes the peer bitmap (and writes alone) mark
    reconnect: bool = False  # P: --reconnect (a degraded node tries to pair again)


@dataclass(frozen=True)
class View:
    disk_state: DiskState
    peer_role: Role | None
    peer_disk_state: DiskState | None
    replication: ReplicationState
    out_of_sync_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "disk-state": self.disk_state.value,
            "peer-role": self.peer_role.value if self.peer_role is not None else None,
            "peer-disk-state": self.peer_disk_state.value if self.peer_disk_state else None,
            "replication": self.replication.value,
            "out-of-sync-bytes": self.out_of_sync_bytes,
        }


def _replication(f: Facts) -> ReplicationState:
    if f.sync is not None and f.sync_paused:
        return ReplicationState.PAUSED_SYNC
    if f.sync == SYNC_SOURCE:
        return ReplicationState.SYNC_SOURCE
    if f.sync == SYNC_TARGET:
        return ReplicationState.SYNC_TARGET
    if f.peer == CONNECTED:
        return ReplicationState.PROTECTED if f.stage == "running" else ReplicationState.ESTABLISHED
    if f.peer == SPLIT_BRAIN:
        return ReplicationState.SPLIT_BRAIN
    if f.peer == REFUSED:  # the disks or their histories do not belong together
        return ReplicationState.UNRELATED
    if f.peer == SYNCING:
        return ReplicationState.ESTABLISHED  # paired; a sync, when there is one, is above
    if f.peer in (CONNECTING, PEER_LOST):
        return ReplicationState.CONNECTING
    if f.peer == DEGRADED and f.reconnect:
        return ReplicationState.CONNECTING
    return ReplicationState.STAND_ALONE  # degraded without --reconnect, failed over, stale


def _disk_state(f: Facts) -> DiskState:
    if f.sync == SYNC_TARGET or f.disk_state is DiskState.INCONSISTENT:
        return DiskState.INCONSISTENT
    if f.peer == STALE or f.disk_state is DiskState.OUTDATED:
        return DiskState.OUTDATED  # its peer went on without it: known to be behind
    if f.role is Role.PRIMARY:
        return DiskState.UP_TO_DATE  # serving: it holds the newest data it knows of
    if f.peer in (CONNECTED, PEER_LOST, FAILED_OVER, SPLIT_BRAIN):
        return DiskState.UP_TO_DATE  # paired (disk + buffers), or alone after its peer
    return f.disk_state  # not paired yet in this life: what it persisted


def view(f: Facts) -> View:
    """The §8 states of a node from what it knows (pure: no I/O, no clock)."""
    rep = _replication(f)
    peer_role: Role | None = None
    peer_disk: DiskState | None = None
    if f.peer in (CONNECTED, SYNCING) or f.sync is not None:
        peer_role = Role.SECONDARY if f.role is Role.PRIMARY else Role.PRIMARY
        if rep is ReplicationState.SYNC_SOURCE or (
            rep is ReplicationState.PAUSED_SYNC and f.sync == SYNC_SOURCE
        ):
            peer_disk = DiskState.INCONSISTENT
        elif rep in (ReplicationState.SYNC_TARGET, ReplicationState.PROTECTED):
            peer_disk = DiskState.UP_TO_DATE
    if rep is ReplicationState.PROTECTED:
        oos = 0
    elif f.sync is not None:
        oos = max(f.sync_left, 0)
    else:
        oos = f.bitmap_bytes
    return View(_disk_state(f), peer_role, peer_disk, rep, oos)
