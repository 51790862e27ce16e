"""Pairing as it is decided today: what the secondary's hello means, and how the disks
are brought in sync before replication starts.

The decisions are pure functions of the histories and the hello (``judge_hello``,
``plan_sync``, ``secondary_split_brain``) so that they can be read and tested as
tables; the disk checks over the replication link (shared identity, whole-disk
verify, differing regions) are the I/O that carries out the plan.

Histories are compared by content (handshake.compare_histories): a trimmed history
still finds the common epoch, and one side one epoch ahead (a crash between the two
sides' appends) is the same lineage, never a split brain.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..address import SocketAddress
from ..block.graph import Graph
from ..block.node import Node
from ..errors import BlockError
from ..replication.identity import disk_identity
from .bitmap import REGION_SIZE as CHUNK
from .bitmap import RegionBitmap
from .handshake import Comparison, Relation, compare_histories
from .role import PeerStatus
from .states import HistoryEntry


def parse_history(value: Any) -> list[HistoryEntry]:
    """A history as the peer sent it (``["epoch:UUID", ...]``); ValueError if it is not one."""
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ValueError(f"not a list of strings: {str(value)[:60]}")
    out = [HistoryEntry.parse(x) for x in value]
    if not all(e.id for e in out):
        raise ValueError("an entry has no id")
    return out


@dataclass(frozen=True)
class Refusal:
    """Why the primary does not replicate to the secondary that answered its hello."""

    peer: PeerStatus
    message: str
    split_brain: dict[str, Any] | None = None  # status's ``split-brain`` object, if it is one


def judge_hello(
    rel: Comparison, hello: dict[str, Any], mine: list[list[int]], alone_since: str | None
) -> Refusal | None:
    """The primary's verdict on a hello; None: go on and pair.

    ``rel`` compares this node's history with the secondary's; ``mine`` is where this
    node wrote alone (ranges), ``alone_since`` since which generation.
    """
    common = rel.common.id if rel.common is not None else None
    if hello.get("failed-over") or rel.relation in (Relation.SELF_BEHIND, Relation.DIVERGED):
        theirs = hello.get("written", [])
        if rel.relation is Relation.SELF_BEHIND and not mine:
            return Refusal(
                PeerStatus.STALE,
                "the secondary went on without this primary (it failed over at "
                f"{hello.get('alone-since')}); this primary's disk is stale: not replicating",
            )
        return Refusal(
            PeerStatus.SPLIT_BRAIN,
            f"split brain: both nodes wrote since epoch {common}: primary wrote "
            f"{len(mine)} region(s), secondary {len(theirs)} region(s); not replicating, nothing overwritten",
            {
                "common-epoch": common,
                "primary": {"since": alone_since, "written": mine},
                "secondary": {"since": hello.get("alone-since"), "written": theirs},
            },
        )
    if hello.get("stage") not in ("none", None):
        return Refusal(
            PeerStatus.DEGRADED,
            f"the secondary is in stage {hello.get('stage')}; restart it to pair again",
        )
    return None


def secondary_split_brain(
    mine: list[HistoryEntry], theirs: Any, alone_since: HistoryEntry | None, written_regions: int
) -> str | None:
    """The secondary's side of a hello: the error to report when both went on alone."""
    if alone_since is None:
        return None
    try:
        rel = compare_histories(mine, parse_history(theirs))
    except ValueError:
        return None
    if rel.relation is not Relation.DIVERGED:
        return None
    common = rel.common.id if rel.common is not None else None
    return (
        f"split brain: the primary wrote on its own since epoch {common} "
        f"as did this node ({written_regions} MiB region(s)); nothing is overwritten"
    )


class SyncPlan(enum.StrEnum):
    """How the primary brings the secondary's disk level with its own before replicating."""

    SHARED_IDENTITY = "shared-identity"  # one shared disk: check both sides see it
    RESYNC_WRITTEN = "resync-written"  # S is behind, only P wrote: copy what P wrote alone
    # this node failed over, the old primary returns (CONTINUITY.md §5): copy this node's
    # bitmap (I2 marks + alone writes) ∪ the old primary's activity log ∪ its bitmap
    FAILOVER_DISCARD = "failover-discard"
    INITIAL_SYNC = "initial-sync"  # --initial-sync: copy the whole disk
    # same history: copy what the primary's activity log (a crash mid-epoch) and the
    # secondary's marks (its stale AL as an earlier primary) say may differ
    RESYNC_AL = "resync-al"
    RESYNC_DIFFERING = "resync-differing"  # same history, no activity log: compare the disks
    VERIFY = "verify"  # compare the whole disks; refuse at the first difference
    NONE = "none"  # --assume-synced


def plan_sync(
    *,
    shared: bool,
    relation: str,
    lost_append: bool = False,
    alone: bool,
    failed_over: bool = False,
    has_history: bool,
    initial_sync: bool,
    assume_synced: bool,
    has_al: bool = False,
) -> SyncPlan:
    """``relation``: ``compare_histories``' (this node vs the secondary); ``lost_append``:
    the secondary holds an epoch this node lacks (this node crashed before appending
    it); ``alone``: this node went on alone (``failed_over``: by failing over, so the
    secondary is the old primary, whose writes past the common epoch are discarded);
    ``has_history``: it has a generation; ``has_al``: this node keeps an activity log,
    so a crash mid-epoch left the regions it may have written in it (I1)."""
    if shared:
        return SyncPlan.SHARED_IDENTITY
    if relation == Relation.PEER_BEHIND and alone:
        # after a lost append this node's bitmap does not cover the epoch it crashed in:
        # compare the whole disks rather than copy only what it wrote alone
        if lost_append:
            return SyncPlan.RESYNC_DIFFERING
        return SyncPlan.FAILOVER_DISCARD if failed_over else SyncPlan.RESYNC_WRITTEN
    if initial_sync:
        return SyncPlan.INITIAL_SYNC
    if relation == Relation.SAME and has_history and not assume_synced:
        # The histories agree, but the last epoch may not have ended cleanly:
        # writes P made after it may have reached S only in part. S wrote
        # nothing of its own since (its history would show it), so P's disk
        # is the truth: copy what the activity log says may differ or, without
        # one, the regions whose bytes differ.
        return SyncPlan.RESYNC_AL if has_al else SyncPlan.RESYNC_DIFFERING
    if not assume_synced:
        return SyncPlan.VERIFY
    return SyncPlan.NONE


def hello_regions(hello: dict[str, Any], nregions: int) -> set[int]:
    """The regions a secondary's hello says it may hold differently: its activity log
    (``al``, region numbers: what it may have written as a primary past the common
    epoch) and its peer bitmap (``written``, [offset, length] ranges). ValueError if
    ill-formed."""
    out: set[int] = set()
    al = hello.get("al", [])
    if not isinstance(al, list) or not all(isinstance(n, int) for n in al):
        raise ValueError(f"the secondary's activity log is not a list of regions: {str(al)[:60]}")
    out.update(al)
    written = hello.get("written", [])
    if not isinstance(written, list):
        raise ValueError(f"the secondary's bitmap is not a list of ranges: {str(written)[:60]}")
    for r in written:
        if not (isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r)):
            raise ValueError(f"the secondary's bitmap has a bad range: {str(r)[:60]}")
        off, n = r  # [offset, length] in bytes, as status's written-alone
        out.update(range(off // CHUNK, -(-(off + n) // CHUNK)) if n > 0 and off >= 0 else ())
    return {n for n in out if 0 <= n < nregions}


def failover_discard_regions(
    bitmap: RegionBitmap, own_al: Iterable[int], hello: dict[str, Any]
) -> list[int]:
    """failover-discard's regions: this node's bitmap (I2 marks + alone writes) and
    activity log ∪ what the old primary may have written (its AL and its bitmap)."""
    regions = set(bitmap) | set(own_al) | hello_regions(hello, bitmap.nregions)
    return sorted(n for n in regions if 0 <= n < bitmap.nregions)


DISCARD_LOCAL = "discard-local"  # the rule's name when the secondary gave up its writes


def rule_name(plan: SyncPlan, hello: dict[str, Any], own_al: Iterable[int] = ()) -> str:
    """The rule status and logs name (CONTINUITY §5): ``discard-local`` when the secondary
    says its disk is Outdated (``blockrep resolve --discard-local`` ran there, resolve.py);
    for the same history, by what the marks say: ``crashed-primary`` (this node's
    activity log holds regions), ``crashed-secondary`` (only the secondary's do: it was
    primary before), ``in-sync`` (nothing to copy); otherwise the plan's name."""
    if hello.get("disk-state") == "Outdated" and plan in (
        SyncPlan.RESYNC_WRITTEN,
        SyncPlan.FAILOVER_DISCARD,
    ):
        return DISCARD_LOCAL
    if plan is SyncPlan.RESYNC_AL:
        if any(True for _ in own_al):
            return "crashed-primary"
        try:
            theirs = hello_regions(hello, 1 << 40)
        except ValueError:
            theirs = set()
        return "crashed-secondary" if theirs else "in-sync"
    if plan is SyncPlan.RESYNC_WRITTEN:
        return "peer-behind"
    return plan.value


def peer_behind_regions(
    bitmap: RegionBitmap, hello: dict[str, Any], own_al: Iterable[int] = ()
) -> list[int]:
    """peer-behind's regions: this node's bitmap (what it wrote alone) and activity log
    ∪ what the secondary says it may hold differently (its bitmap: after a discard-local
    resolve, the writes it gave up; its stale activity log)."""
    try:
        theirs = hello_regions(hello, bitmap.nregions)
    except ValueError as e:
        raise PairingRefused(f"peer-behind refused: {e}") from None
    return sorted(n for n in set(bitmap) | set(own_al) | theirs if 0 <= n < bitmap.nregions)


# -- the disk checks over the replication link ---------------------------------------------


class PairingRefused(BlockError):
    """The disks (not the data path) refuse the pairing: the first one ends the process."""

    def __init__(self, message: str) -> None:
        super().__init__(22, message)


async def check_shared_identity(top: Node, hello: dict[str, Any]) -> None:
    """Shared mode: the secondary's hidden disk must back onto the disk this node serves."""
    theirs = hello.get("identity") or {}
    mine = await disk_identity(top)
    if (theirs.get("device"), theirs.get("inode")) != (mine.get("device"), mine.get("inode")):
        if theirs.get("fingerprint") != mine.get("fingerprint"):
            raise PairingRefused("the secondary's hidden disk does not back onto this shared disk")


async def open_link(hello: dict[str, Any]) -> Node:
    """The secondary's disk through its NBD link, in a graph of its own (close_all when done)."""
    g = Graph()
    server = SocketAddress.from_str(hello["link"]).to_qapi()
    return await g.add({"driver": "nbd", "server": server, "export": hello["export"]})


async def verify_identical(top: Node, link: Node) -> None:
    """Refuse (PairingRefused) at the first byte where the two disks differ."""
    step = 4 << 20
    pos = 0
    while pos < top.length:
        n = min(step, top.length - pos)
        a, b = await top.read(pos, n), await link.read(pos, n)
        if a != b:
            i = next(i for i in range(n) if a[i] != b[i])
            raise PairingRefused(
                f"the disks differ at offset {pos + i}: refusing to replicate "
                "(use --initial-sync to copy this disk to the secondary, or --assume-synced)",
            )
        pos += n


async def differing_chunks(top: Node, link: Node) -> list[int]:
    """The regions (CHUNK) whose bytes differ between the two disks."""
    out = []
    for c in range(-(-top.length // CHUNK)):
        off = c * CHUNK
        n = min(CHUNK, top.length - off)
        if await top.read(off, n) != await link.read(off, n):
            out.append(c)
    return out
