"""``Node.try_write``: a write as plain calls and callbacks (the fast path, fastpath.py).

It is ``Node.write`` without a coroutine: the same checks, in-flight count, dirty
bitmap marks and error listeners, and the driver's ``_fast_write`` instead of
``_co_write``. It refuses (False, nothing done) whenever the general path could
differ: a request it would pad or serialise, a driver without a fast path, or one
whose own conditions fail (each driver says which). ``done`` is called exactly once
after True, maybe before try_write returns.

Pass-through nodes (``Node._fast_through``: raw, a filter with nothing to do for this
request) are walked in a loop rather than a call each: every node of the chain is
checked and counts the write in flight, and one callback ends it for all of them,
innermost first, as nested calls would. Issue 15: a call, a closure and a callback
per layer were a tenth of a replicating primary's CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import fastpath
from ..errors import BlockError

if TYPE_CHECKING:
    from .node import Done, Node


def refusal(node: Node, offset: int, nbytes: int) -> str | None:
    """Why ``node`` cannot take a fast write of these bytes now (None: it can): one it
    would refuse, pad or serialise. Every fast path asks it of every node it counts."""
    a = node.request_alignment
    if (
        node.closed
        or node.read_only
        or nbytes == 0
        or offset < 0
        or (offset + nbytes > node.length and not node.growable)
        or node.serialize_overlapping
        or (a != 1 and (offset % a or nbytes % a))
    ):
        return "checks"
    if node._ser_waiting:
        return "a serialising request waits"
    if node._serialising and any(
        t.serialising and t.start < offset + nbytes and offset < t.end for t in node._tracked
    ):
        return "overlapping serialising request"
    return None


def end_one(node: Node, offset: int, nbytes: int, err: BlockError | None) -> None:
    """End one node's part of a fast write; the common end is a decrement."""
    if err is None and not node.dirty_bitmaps and node._fast_quiet is None:
        node._fast_writes -= 1
    else:
        node._fast_write_end(offset, nbytes, err)


def walk(node: Node, offset: int, nbytes: int) -> tuple[list[Any], str | None]:
    """The pass-through chain a fast write takes from ``node``: ``[node, its offset,
    ...]`` down to the node whose ``_fast_write`` decides (the last pair), every node
    asked ``refusal``; or, with the reason, the chain ending at the node that refused.
    Nothing is counted yet."""
    chain: list[Any] = []
    while True:
        why = refusal(node, offset, nbytes)
        chain += (node, offset)
        if why is not None:
            return chain, why
        below = node._fast_through(offset, nbytes)
        if below is None:
            return chain, None
        offset += node.fast_shift
        node = below


def try_write(self: Node, offset: int, data: bytes | memoryview, fua: bool, done: Done) -> bool:
    """``Node.try_write``: see the module's docstring."""
    nbytes = len(data)
    chain, why = walk(self, offset, nbytes)
    leaf, at = chain[-2], chain[-1]
    if why is not None:
        return fastpath.refuse(f"{leaf.driver_name}: {why}")
    for i in range(0, len(chain), 2):
        chain[i]._fast_writes += 1

    def finish(err: BlockError | None) -> None:
        for i in range(len(chain) - 2, -1, -2):  # innermost first, as nested calls end
            end_one(chain[i], chain[i + 1], nbytes, err)
        done(err)

    if not leaf._fast_write(at, data, fua, finish):
        _fast_writes_ended(chain)
        return False
    return True


def _fast_writes_ended(chain: list[Any]) -> None:
    """End the in-flight count of a fast write that its last node refused."""
    for n in chain[::2]:
        n._fast_write_ended()
