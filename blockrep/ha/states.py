"""The states of a node and of a pair (CONTINUITY.md §1), and a history entry.

Values are the names users see in status, events and logs; they are DRBD's where DRBD
has one. Plain data only: the modules that decide (handshake), persist (node_state)
and act (the roles) share these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(enum.StrEnum):
    NONE = "none"  # restarted after a crash, not yet told by its peer what it is
    PRIMARY = "primary"
    SECONDARY = "secondary"


class DiskState(enum.StrEnum):
    UP_TO_DATE = "UpToDate"  # holds the newest data it knows of
    CONSISTENT = "Consistent"  # a valid past state; whether it is the newest is unknown
    OUTDATED = "Outdated"  # known to be behind its peer
    INCONSISTENT = "Inconsistent"  # a resync target mid-copy: not a usable disk


class ReplicationState(enum.StrEnum):
    CONNECTING = "Connecting"
    ESTABLISHED = "Established"  # paired, no epoch yet
    PROTECTED = "Protected"  # checkpointing
    SYNC_SOURCE = "SyncSource"
    SYNC_TARGET = "SyncTarget"
    PAUSED_SYNC = "PausedSync"
    VERIFY_SOURCE = "VerifySource"
    VERIFY_TARGET = "VerifyTarget"
    SPLIT_BRAIN = "SplitBrain"
    UNRELATED = "Unrelated"
    STAND_ALONE = "StandAlone"  # deliberately not pairing


class EntryKind(enum.StrEnum):
    """What started a generation in a node's history."""

    EPOCH = "epoch"  # a checkpoint both nodes agreed on
    FAILOVER = "failover"  # a secondary went on alone after failing over
    DEGRADED = "degraded"  # a primary went on alone after losing its secondary
    RESYNC_FROM = "resync-from"  # this node became a copy of its peer by a resync


@dataclass(frozen=True)
class HistoryEntry:
    kind: EntryKind
    id: str  # a UUID

    def __str__(self) -> str:
        return f"{self.kind}:{self.id}"

    @classmethod
    def parse(cls, text: str) -> HistoryEntry:
        """``epoch:UUID`` etc.; a bare UUID is an epoch (the format before kinds)."""
        kind, sep, ident = text.partition(":")
        if not sep:
            return cls(EntryKind.EPOCH, text)
        return cls(EntryKind(kind), ident)
