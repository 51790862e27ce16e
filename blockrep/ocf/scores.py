"""What a node's status means to Pacemaker: monitor's exit code and the promotion score.

Pure functions of ``blockrep status --json`` (README's status table), after DRBD's
policy (``drbd.ocf``): a primary with good data scores highest, so Pacemaker keeps it
promoted; a paired or bereaved secondary medium, so it is the one promoted when the
primary is gone; a node that never met its peer since it started low (Pacemaker still
promotes one of two such nodes on a cold start); a disk that must never be promoted
(Outdated, Inconsistent) or a pair whose histories do not join (SplitBrain, Unrelated)
gets **no** score: Pacemaker never promotes a node without one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .codes import OcfExit

PRIMARY = 10000  # promoted with UpToDate data: stay where it is
SECONDARY = 1000  # a secondary that was (or is) protected by a primary: next in line
ALONE = 5  # role none, or a Consistent disk: promotable, last choice

NEVER_PROMOTE_DISKS = frozenset({"Outdated", "Inconsistent"})
NEVER_PROMOTE_REPLICATION = frozenset({"SplitBrain", "Unrelated"})


def promotion_score(status: Mapping[str, Any]) -> int | None:
    """The score for ``crm_attribute --promotion``; None: delete it (never promote)."""
    disk = status.get("disk-state")
    if disk in NEVER_PROMOTE_DISKS or status.get("replication") in NEVER_PROMOTE_REPLICATION:
        return None
    if status.get("peer") == "split-brain":
        return None
    if disk != "UpToDate":
        return ALONE  # Consistent (or a state this agent does not know): last choice
    role = status.get("role")
    if role == "primary":
        return PRIMARY
    if role == "secondary":
        return SECONDARY
    return ALONE


def monitor_exit(status: Mapping[str, Any]) -> OcfExit:
    """Running promoted (8) for a primary, running unpromoted (0) for none/secondary."""
    return OcfExit.RUNNING_PROMOTED if status.get("role") == "primary" else OcfExit.SUCCESS
