"""The replicating primary's write in one call: quorum -> (local file, replication -> nbd).

P's graph (SPEC §2) is a quorum over the local disk and the replication filter, whose
child is the NBD link to S. The layered fast path (block/fast_write.py) runs a write
through it as five ``try_write`` calls with a closure each, and a callback per layer on
the way back; in-process that was ~8 µs of a request's ~20 (issue 15). Here the quorum
asks every node of exactly that graph the same questions (``fast_write.refusal``, each
driver's own conditions), counts the write in flight on each, forwards it, writes the
local file, and ends each node's part as the layered path would: the local chain when
its ``pwrite`` returns, the link, the filter and the quorum (its vote) on S's reply.

Anything else (another graph, FUA, a link that cannot take the request now, a filter
not running as primary) returns False with nothing done, and the quorum's layered fast
path, then the general path, take the write. Imports point down: the quorum (block/)
knows this module only as the hook it installs (``quorum.set_fused_write``).

This reaches around layers, which DESIGN.md §1 says nothing should: it is the one place
that does, for the one request that matters most, and it owns no rule of its own.
What each node does is the node's code, shared with the layered path: the checks
(``fast_write.refusal``), the ends (``end_one``), the local write
(``FileNode.pwrite_now``), the forward's end (``ReplicationState.forward_ended``), the
reply (``NBDNode.write_replied``) and the vote (``QuorumNode._vote_write``).
test_fast_path_writes runs every test on both paths.
"""

from __future__ import annotations

from .. import fastpath
from ..block.fast_write import end_one, refusal, walk
from ..block.file import FileNode
from ..block.nbd import NBDNode
from ..block.node import Done
from ..block.quorum import QuorumNode, set_fused_write
from ..errors import BlockError
from ..nbd import proto as p
from .filter import ReplicationMode, ReplicationNode


def try_fused_write(
    q: QuorumNode, offset: int, data: bytes | memoryview, fua: bool, done: Done
) -> bool:
    """The write through P's whole graph, or False with nothing done (see above)."""
    nbytes = len(data)
    if fua or nbytes > p.MAX_BUFFER or refusal(q, offset, nbytes) is not None:
        return False
    edges = q._child_edges()
    if len(edges) != 2:
        return False
    rep = edges[1].node
    if type(rep) is not ReplicationNode or refusal(rep, offset, nbytes) is not None:
        return False
    s = rep.state
    if s.mode != ReplicationMode.PRIMARY or s.io_status() != 0:
        return False
    link = rep.file
    if type(link) is not NBDNode or refusal(link, offset, nbytes) is not None:
        return False
    conn = link.conn
    if conn is None or conn.closed:
        return False
    # the local chain: pass-through nodes (raw) down to the file, as try_write walks it
    chain, why = walk(edges[0].node, offset, nbytes)
    if why is not None:
        return False
    leaf, at = chain[-2], chain[-1]
    if type(leaf) is not FileNode or leaf.threads or leaf.direct:
        return False

    local_err: BlockError | None = None  # set before any reply can arrive

    def forwarded(err: BlockError | None) -> None:
        end_one(link, offset, nbytes, err)
        s.forward_ended(nbytes, err)
        end_one(rep, offset, nbytes, None)
        # the local part ended first (it is synchronous): the quorum votes, ends last
        verdict = None
        if local_err is not None:
            verdict = q._vote_write([chain[0], rep], [local_err, None], offset, nbytes)
        end_one(q, offset, nbytes, verdict)
        done(verdict)

    # (two closures, neither naming itself: a function in its own cell would make every
    # request a reference cycle, left to the garbage collector)
    def replied(err: BaseException | None) -> None:
        link.write_replied(err, offset, data, 0, forwarded)

    if not conn.try_request(p.CMD_WRITE, offset, nbytes, 0, data, replied):
        return False  # nothing sent: the layered path decides (it runs the link's write)
    # taken: in flight on every node from here, as the layered path counts them
    q._fast_writes += 1
    rep._fast_writes += 1
    link._fast_writes += 1
    s.unacked_bytes += nbytes
    for i in range(0, len(chain), 2):
        chain[i]._fast_writes += 1
    local_err = leaf.pwrite_now(at, data)
    for i in range(len(chain) - 2, -1, -2):
        end_one(chain[i], chain[i + 1], nbytes, local_err)
    counts = fastpath.COUNTERS.taken
    counts["fused write"] = counts.get("fused write", 0) + 1
    return True


def install() -> None:
    set_fused_write(try_fused_write)
