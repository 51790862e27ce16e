"""Pairing from the primary's side: what the secondary's hello means, and the disk
checks that carry out a decision.

The decision itself is the handshake's table (handshake.decide, CONTINUITY §5): this
module turns what each node keeps into a ``Side`` (``local_side``, ``peer_side``), maps
a decision the primary cannot carry out to a refusal (``refusal_of``: split brain,
unrelated, I3, or the peer's data winning) and names the rule (``rule_name``).
``judge_hello`` keeps the two refusals that are not the table's: a peer that failed
over as ``blockrep secondary`` (a plain disk for good) and a secondary still busy with
another primary. The disk checks over the replication link (shared identity,
whole-disk verify, differing regions) are the I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..address import SocketAddress
from ..block.graph import Graph
from ..block.node import Node
from ..errors import BlockError
from ..replication.identity import disk_identity
from . import link
from .bitmap import REGION_SIZE as CHUNK
from .handshake import Comparison, Decision, Direction, Relation, Rule, Side, compare_histories
from .node_state import NodeState
from .role import PeerStatus
from .states import DiskState, HistoryEntry, Role


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
    if hello.get("failed-over"):
        # a node that failed over as `blockrep secondary` is a plain disk for good: it
        # never becomes a sync target, whatever the table would copy to it
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


DISCARD_LOCAL = "discard-local"  # the rule's name when the secondary gave up its writes


def rule_name(d: Decision, hello: dict[str, Any]) -> str:
    """The rule status and logs name: the decision's (CONTINUITY §5), or ``discard-local``
    when the secondary says its disk is Outdated (``blockrep resolve --discard-local``
    ran there, resolve.py) and its writes are overwritten."""
    copies = d.rule in (Rule.PEER_BEHIND, Rule.FAILOVER_DISCARD, Rule.SPLIT_BRAIN)
    if hello.get("disk-state") == "Outdated" and copies and not d.refused:
        return DISCARD_LOCAL
    return d.rule.value


# -- the handshake's decision (handshake.decide) from what the two nodes keep -------------


def local_side(state: NodeState, al: Iterable[int], size: int, clean: bool) -> Side:
    """This primary's Side: its durable state (CONTINUITY §2) and activity log; ``clean``:
    its last life ended in an orderly stop."""
    return Side(
        node=state.node_id,
        # both nodes' disk ids are made apart (each at its first use): the size, which
        # the hello checks too, is what they share
        disk_id=f"size:{size}",
        last_role=Role.PRIMARY,
        disk_state=state.disk_state,
        history=tuple(state.history),
        history_trimmed=state.history_trimmed,
        clean_shutdown=clean,
        al=frozenset(al),
        bitmap=frozenset(state.peer_bitmap),
        fenced_peer=state.fenced_peer_at is not None,
    )


def peer_side(hello: dict[str, Any], size: int, nregions: int) -> Side:
    """The secondary's Side from its hello; ValueError if a field is ill-formed."""
    history = parse_history(hello.get("history"))
    al = hello.get("al", [])
    if not isinstance(al, list) or not all(isinstance(n, int) for n in al):
        raise ValueError(f"the secondary's activity log is not a list of regions: {str(al)[:60]}")
    written = hello_regions({"written": hello.get("written", [])}, nregions)
    try:
        disk_state = DiskState(hello.get("disk-state") or "Consistent")
        last_role = Role(hello.get("last-role") or "none")
    except ValueError as e:
        raise ValueError(f"the secondary's hello: {e}") from None
    source = hello.get("resync-source")
    return Side(
        node=str(hello.get("node-id") or "the secondary"),
        disk_id=f"size:{size}",
        last_role=last_role,
        disk_state=disk_state,
        history=tuple(history),
        history_trimmed=bool(hello.get("history-trimmed")),
        clean_shutdown=bool(hello.get("clean-shutdown")),
        al=frozenset(n for n in al if 0 <= n < nregions),
        bitmap=frozenset(written),
        resync_source=source if isinstance(source, str) else None,
        fenced_peer=bool(hello.get("fenced-peer")),
        discard_local=disk_state is DiskState.OUTDATED,
    )


def refusal_of(
    d: Decision, hello: dict[str, Any], mine: list[list[int]], alone_since: str | None,
    common: str | None,
) -> Refusal | None:  # fmt: skip
    """What the primary does with a decision it cannot carry out: None when it copies
    (or nothing is to be copied). The peer's data winning means this node is behind."""
    if d.refused and d.rule is Rule.SPLIT_BRAIN:
        theirs = hello.get("written", [])
        return Refusal(
            PeerStatus.SPLIT_BRAIN,
            f"split brain: both nodes wrote since epoch {common}: primary wrote "
            f"{len(mine)} region(s), secondary {len(theirs)} region(s); not replicating, "
            f"nothing overwritten ({d.reason})",
            {
                "common-epoch": common,
                "primary": {"since": alone_since, "written": mine},
                "secondary": {"since": hello.get("alone-since"), "written": theirs},
            },
        )
    if d.refused:
        return Refusal(PeerStatus.REFUSED, f"pairing refused by rule {d.reason}")
    if d.direction is Direction.PEER_TO_LOCAL:
        return Refusal(
            PeerStatus.STALE,
            "the secondary went on without this primary (it failed over at "
            f"{hello.get('alone-since')}); this primary's disk is stale: not replicating "
            f"(rule {d.reason}); demote it or restart it as a secondary to be brought level",
        )
    return None


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


async def open_link(hello: dict[str, Any], tls_dir: str | None) -> Node:
    """The secondary's disk through its NBD link, in a graph of its own (close_all when done)."""
    g = Graph()
    server = SocketAddress.from_str(hello["link"]).to_qapi()
    tls = link.client_options(tls_dir, g.objects)
    return await g.add({"driver": "nbd", "server": server, "export": hello["export"], **tls})


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
