"""Pairing as it is decided today: what the secondary's hello means, and how the disks
are brought in sync before replication starts.

The decisions are pure functions of the histories and the hello (``judge_hello``,
``plan_sync``, ``secondary_split_brain``) so that they can be read and tested as
tables; the disk checks over the replication link (shared identity, whole-disk
verify, differing regions) are the I/O that carries out the plan.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from ..address import SocketAddress
from ..block.graph import Graph
from ..block.node import Node
from ..errors import BlockError
from ..replication.identity import disk_identity
from .role import PeerStatus
from .state import CHUNK, Comparison, compare


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
    if hello.get("failed-over") or rel.relation in ("self-behind", "diverged"):
        theirs = hello.get("written", [])
        if rel.relation == "self-behind" and not mine:
            return Refusal(
                PeerStatus.STALE,
                "the secondary went on without this primary (it failed over at "
                f"{hello.get('alone-since')}); this primary's disk is stale: not replicating",
            )
        return Refusal(
            PeerStatus.SPLIT_BRAIN,
            f"split brain: both nodes wrote since epoch {rel.common}: primary wrote "
            f"{len(mine)} region(s), secondary {len(theirs)} region(s); not replicating, nothing overwritten",
            {
                "common-epoch": rel.common,
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
    mine: list[str], theirs: Any, alone_since: str | None, written_regions: int
) -> str | None:
    """The secondary's side of a hello: the error to report when both went on alone."""
    if not isinstance(theirs, list) or alone_since is None:
        return None
    rel = compare(mine, theirs)
    if rel.relation != "diverged":
        return None
    return (
        f"split brain: the primary wrote on its own since epoch {rel.common} "
        f"as did this node ({written_regions} MiB region(s)); nothing is overwritten"
    )


class SyncPlan(enum.StrEnum):
    """How the primary brings the secondary's disk level with its own before replicating."""

    SHARED_IDENTITY = "shared-identity"  # one shared disk: check both sides see it
    RESYNC_WRITTEN = "resync-written"  # S is behind, only P wrote: copy what P wrote alone
    INITIAL_SYNC = "initial-sync"  # --initial-sync: copy the whole disk
    RESYNC_DIFFERING = "resync-differing"  # same history: copy the regions that differ
    VERIFY = "verify"  # compare the whole disks; refuse at the first difference
    NONE = "none"  # --assume-synced


def plan_sync(
    *,
    shared: bool,
    relation: str,
    alone: bool,
    has_history: bool,
    initial_sync: bool,
    assume_synced: bool,
) -> SyncPlan:
    """``relation``: ``compare``'s (this node vs the secondary); ``alone``: this node went
    on alone; ``has_history``: this node has at least one generation."""
    if shared:
        return SyncPlan.SHARED_IDENTITY
    if relation == "peer-behind" and alone:
        return SyncPlan.RESYNC_WRITTEN
    if initial_sync:
        return SyncPlan.INITIAL_SYNC
    if relation == "same" and has_history and not assume_synced:
        # The histories agree, but the last epoch may not have ended cleanly:
        # writes P made after it may have reached S only in part. S wrote
        # nothing of its own since (its history would show it), so P's disk
        # is the truth: copy the regions that differ.
        return SyncPlan.RESYNC_DIFFERING
    if not assume_synced:
        return SyncPlan.VERIFY
    return SyncPlan.NONE


# -- the disk checks over the replication link ---------------------------------------------


async def check_shared_identity(top: Node, hello: dict[str, Any]) -> None:
    """Shared mode: the secondary's hidden disk must back onto the disk this node serves."""
    theirs = hello.get("identity") or {}
    mine = await disk_identity(top)
    if (theirs.get("device"), theirs.get("inode")) != (mine.get("device"), mine.get("inode")):
        if theirs.get("fingerprint") != mine.get("fingerprint"):
            raise BlockError(22, "the secondary's hidden disk does not back onto this shared disk")


async def open_link(hello: dict[str, Any]) -> Node:
    """The secondary's disk through its NBD link, in a graph of its own (close_all when done)."""
    g = Graph()
    server = SocketAddress.from_str(hello["link"]).to_qapi()
    return await g.add({"driver": "nbd", "server": server, "export": hello["export"]})


async def verify_identical(top: Node, link: Node) -> None:
    """Refuse (BlockError) at the first byte where the two disks differ."""
    step = 4 << 20
    pos = 0
    while pos < top.length:
        n = min(step, top.length - pos)
        a, b = await top.read(pos, n), await link.read(pos, n)
        if a != b:
            i = next(i for i in range(n) if a[i] != b[i])
            raise BlockError(
                22,
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
