"""``blockrep resolve --discard-local``: the way out of split brain (CONTINUITY.md §4,
DRBD's ``--discard-my-data``), run on the node whose writes are given up.

It is refused (nothing changed) unless this node is in split brain with a peer whose
history it has seen. Otherwise it records, in one durable save of its NodeState:

* its history cut back to the common epoch (its own alone entry is dropped: what it
  wrote since is not a lineage any more),
* its peer bitmap kept — every region it wrote since the common epoch (and the writes
  in flight, flushed first): the keeping side copies them back along with its own,
* its disk state ``Outdated`` (known to be behind; I3: never promoted like this).

Then the node stops (its consumer is held first: a write after the record would not
be marked). Restarted as ``blockrep secondary``, its hello says ``disk-state:
Outdated`` and a history that is a prefix of the keeping side's: the keeping primary
copies its own bitmap ∪ this node's (rule ``discard-local``), and the pairing's first
epoch makes the two disks identical.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from .handshake import Relation, compare_histories
from .role import PeerStatus
from .states import DiskState, HistoryEntry

if TYPE_CHECKING:
    from .role import BaseRole

log = logging.getLogger("blockrep.ha")

RULE = "discard-local"  # status's last-handshake rule on the keeping side


class ResolveRefused(Exception):
    """``resolve`` does not apply here; nothing was changed."""


def discard_point(mine: list[HistoryEntry], theirs: list[HistoryEntry] | None) -> int:
    """How many entries of ``mine`` stay: up to and including the common epoch.
    ResolveRefused if the two histories are not a split brain."""
    if theirs is None:
        raise ResolveRefused("resolve refused: this node has not met its peer since it went alone")
    rel = compare_histories(mine, theirs)
    if rel.relation is not Relation.DIVERGED or rel.common is None:
        raise ResolveRefused(
            f"resolve refused: the histories are not a split brain ({rel.relation}); "
            "nothing was changed"
        )
    keep = max(i for i, e in enumerate(mine) if e == rel.common) + 1
    return keep


async def discard_local(role: BaseRole, peer_history: list[HistoryEntry] | None) -> dict[str, Any]:
    """Record that this node's writes since the common epoch are discarded, then stop."""
    if role.peer is not PeerStatus.SPLIT_BRAIN:
        raise ResolveRefused(
            f"resolve refused: this node is not in split brain (peer: {role.peer.value}); "
            "nothing was changed"
        )
    keep = discard_point(role.state.history, peer_history)
    exp = role.consumer_export
    if exp is not None:
        await exp.quiesce()  # held until the process stops: no write after the record
    role.flush_alone_writes()  # what it wrote, in flight included, is in the peer bitmap
    state = role.state
    dropped = [str(e) for e in state.history[keep:]]
    with state.update():
        del state.history[keep:]
        state.disk_state = DiskState.OUTDATED
    common = str(state.history[-1])
    regions = len(state.peer_bitmap)
    role.error(
        f"split brain resolved by {RULE}: this node's writes since {common} are discarded "
        f"({regions} region(s) to be copied back, dropped {', '.join(dropped)}); "
        "stopping: restart it as blockrep secondary"
    )
    # the reply goes out first, then the node stops
    asyncio.get_running_loop().call_later(0.2, role.stopping.set)
    return {"rule": RULE, "common-epoch": common, "regions": regions, "dropped": dropped}
