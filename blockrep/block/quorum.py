"""The ``quorum`` filter: N children, writes to all, reads by fifo or by vote.

Writes go to every child in parallel and succeed when at least vote-threshold
children succeeded; each failed child is reported (QUORUM_REPORT_BAD). If too
few succeed the quorum fails (QUORUM_FAILURE) with the most common error. Fifo
reads try children in order; quorum reads read all children and vote on the
content. Children can be added and removed at runtime (x-blockdev-change).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from ..errors import BlockError, OptionError
from .graph import Graph, register
from .node import Child, Done, Extent, Node
from .stepping import report, resume, resume_later, start_now

log = logging.getLogger("blockrep.block.quorum")


# A write through the whole of P's replicating graph in one call (replication/fused.py,
# which installs it: block/ does not import replication/); False: nothing done.
FusedWrite = Callable[["QuorumNode", int, "bytes | memoryview", bool, Done], bool]
_fused_write: FusedWrite | None = None


def set_fused_write(f: FusedWrite | None) -> None:
    global _fused_write
    _fused_write = f


@register
class QuorumNode(Node):
    driver_name = "quorum"
    is_filter = True
    schema = {
        "children": ("list", "ref"),
        "vote-threshold": "int",
        "blkverify": "bool",
        "rewrite-corrupted": "bool",
        "read-pattern": ("enum", ("quorum", "fifo")),
    }

    def __init__(self, node_name: str, options: dict[str, Any]) -> None:
        super().__init__(node_name, options)
        self.threshold = 0
        self.fifo = False
        self.rewrite = False
        self.next_index = 0
        self._edges: list[Child] | None = None

    @classmethod
    async def open(cls, graph: Graph, name: str, opts: dict[str, Any], typed: bool) -> QuorumNode:
        node = cls(name, opts)
        refs = opts.get("children") or []
        if len(refs) < 1:
            raise OptionError("Number of provided children must be 1 or more")
        if "vote-threshold" not in opts:
            raise OptionError("Parameter 'vote-threshold' is missing")
        node.threshold = opts["vote-threshold"]
        node.fifo = opts.get("read-pattern", "quorum") == "fifo"
        if opts.get("blkverify"):
            raise OptionError("blkverify mode is not supported by blockrep")
        # QEMU validates the threshold whatever the read pattern
        if node.threshold < 1:
            raise OptionError("Parameter 'vote-threshold' expects a value >= 1")
        if node.threshold > len(refs):
            raise OptionError("threshold may not exceed children count")
        # QEMU ignores rewrite-corrupted under read-pattern=fifo (it never votes)
        node.rewrite = bool(opts.get("rewrite-corrupted")) and not node.fifo
        opened: list[Node] = []
        try:
            for i, ref in enumerate(refs):
                child = await graph.open_child(
                    {**opts, f"children.{i}": ref}, f"children.{i}", typed=typed
                )
                assert child is not None
                opened.append(child)
        except BaseException:
            for c in opened:
                if not c.parents and c.node_name not in graph.monitor_owned:
                    await graph.close_node(c)
            raise
        if len({c.length for c in opened}) > 1:
            for c in opened:
                if not c.parents and c.node_name not in graph.monitor_owned:
                    await graph.close_node(c)
            raise BlockError(errno.EIO, "Could not refresh total sector count: Input/output error")
        for i, c in enumerate(opened):
            node.attach_child(f"children.{i}", c)
        node.next_index = len(opened)
        node.length = opened[0].length
        node.read_only = all(c.read_only for c in opened) or node.read_only
        return node

    # -- children ------------------------------------------------------------------

    def child_list(self) -> list[Node]:
        return [c.node for c in self._child_edges()]

    def _child_edges(self) -> list[Child]:
        """The ``children.N`` edges in order, kept until a child is attached or detached
        (an edge's node may change under it: filter insertion, a commit's pivot)."""
        edges = self._edges
        if edges is None:
            edges = [c for role, c in self.children.items() if role.startswith("children.")]
            self._edges = edges
        return edges

    def attach_child(self, role: str, node: Node) -> Child:
        self._edges = None
        return super().attach_child(role, node)

    def detach_child(self, role: str) -> Node:
        self._edges = None
        return super().detach_child(role)

    def add_child(self, node: Node) -> str:
        """x-blockdev-change add: the child gets the next ``children.N`` name."""
        # QEMU does not re-check the length at add time
        role = f"children.{self.next_index}"
        self.next_index += 1
        self.attach_child(role, node)
        return role

    def del_child(self, role: str) -> Node:
        if role not in self.children:
            raise BlockError(errno.ENOENT, f"Node '{self.node_name}' does not have child '{role}'")
        if len(self.child_list()) <= self.threshold:
            raise BlockError(
                errno.EINVAL,
                f"The number of children cannot be lower than the vote threshold {self.threshold}",
            )
        node = self.detach_child(role)
        # QEMU renumbers so that the last index can be reused only if it was the last
        if role == f"children.{self.next_index - 1}":
            self.next_index -= 1
        return node

    def describe_filename(self) -> str:
        return 'json:{"driver": "quorum", ...}'

    # -- events --------------------------------------------------------------------

    def _report_bad(
        self, kind: str, child: Node, offset: int, nbytes: int, err: BlockError | None
    ) -> None:
        data: dict[str, Any] = {"type": kind}
        if err is not None:
            data["error"] = os.strerror(err.errno)
        data.update(
            {
                "node-name": child.node_name,
                "sector-num": offset // 512,
                "sectors-count": -(-(offset % 512 + nbytes) // 512),
            }
        )
        if self.graph is not None:
            self.graph.emit("QUORUM_REPORT_BAD", data)

    def _failure(self, offset: int, nbytes: int) -> None:
        if self.graph is not None:
            ref = self.graph.device_of(self) or self.node_name
            self.graph.emit(
                "QUORUM_FAILURE",
                {
                    "reference": ref,
                    "sector-num": offset // 512,
                    "sectors-count": -(-(offset % 512 + nbytes) // 512),
                },
            )

    # -- I/O -------------------------------------------------------------------------

    async def _all(self, kind: str, offset: int, nbytes: int, op) -> None:
        kids = self.child_list()
        results = await _fan_out([op(c) for c in kids])
        errors: list[BlockError] = []
        for c, r in zip(kids, results, strict=True):
            if isinstance(r, BaseException):
                if not isinstance(r, BlockError):
                    raise r
                errors.append(r)
                self._report_bad(kind, c, offset, nbytes, r)
        if len(kids) - len(errors) >= self.threshold:
            return
        if kind != "flush":  # QEMU's quorum_co_flush emits no QUORUM_FAILURE
            self._failure(offset, nbytes)
        most = _vote_winner([e.errno for e in errors])[0]
        raise BlockError(most, os.strerror(most))

    async def _co_write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        await self._all("write", offset, len(data), lambda c: c.write(offset, data, fua))

    def try_write(self, offset: int, data: bytes | memoryview, fua: bool, done: Done) -> bool:
        """P's whole replicating graph in one call when it is that graph; else the
        layered fast path (Node.try_write)."""
        f = _fused_write
        if f is not None and f(self, offset, data, fua, done):
            return True
        return Node.try_write(self, offset, data, fua, done)

    def _fast_write(self, offset: int, data: bytes | memoryview, fua: bool, done: Done) -> bool:
        """The write to every child as callbacks, voted on as ``_all`` votes.

        Children start in order. One that refuses the fast path before any child has
        started makes the whole request take the general path; after that, it runs its
        general write as a task of its own (its result joins the vote all the same).
        """
        kids = [c.node for c in self._child_edges()]
        n = len(kids)
        results: list[BlockError | None] = [None] * n
        # results[i] is set before left[0] counts it; the last child's answer votes
        left = [n]
        nbytes = len(data)

        def settle(i: int, err: BlockError | None) -> None:
            if err is not None:
                results[i] = err
            left[0] -= 1
            if left[0] == 0:
                done(None if not any(results) else self._vote_write(kids, results, offset, nbytes))

        if not kids[0].try_write(offset, data, fua, partial(settle, 0)):
            return False
        for i in range(1, n):
            c = kids[i]
            try:
                if c.try_write(offset, data, fua, partial(settle, i)):
                    continue
            except Exception as e:  # noqa: BLE001 - a bug in one child: its vote, as _all
                log.exception("fast write to %s failed", c.node_name)
                settle(i, BlockError(errno.EIO, str(e)))
                continue
            # its first step now: what it does before it waits keeps its place in
            # request order (two overlapping writes reach disk and link in one order)
            start_now(report(c.write(offset, data, fua), partial(settle, i), c.node_name))
        return True

    def _vote_write(
        self, kids: list[Node], results: list[BlockError | None], offset: int, nbytes: int
    ) -> BlockError | None:
        errors = [r for r in results if r is not None]
        for c, r in zip(kids, results, strict=True):
            if r is not None:
                self._report_bad("write", c, offset, nbytes, r)
        if len(kids) - len(errors) >= self.threshold:
            return None
        self._failure(offset, nbytes)
        most = _vote_winner([e.errno for e in errors])[0]
        return BlockError(most, os.strerror(most))

    def _fast_read(self, offset: int, nbytes: int) -> bytes | None:
        kids = self.child_list()
        return kids[0].try_read(offset, nbytes) if self.fifo and kids else None

    def _file_range(self, offset: int, nbytes: int) -> tuple[int, int] | None:
        kids = self.child_list()
        return kids[0].file_range(offset, nbytes) if self.fifo and kids else None

    async def _co_write_zeroes(self, offset: int, nbytes: int, may_unmap: bool, fua: bool) -> None:
        await self._all(
            "write", offset, nbytes, lambda c: c.write_zeroes(offset, nbytes, may_unmap, fua)
        )

    async def _co_discard(self, offset: int, nbytes: int) -> None:
        await self._all("write", offset, nbytes, lambda c: c.discard(offset, nbytes))

    async def _co_flush(self) -> None:
        await self._all("flush", 0, 0, lambda c: c.flush())

    async def _co_read(self, offset: int, nbytes: int) -> bytes:
        kids = self.child_list()
        if self.fifo:
            last: BlockError | None = None
            for c in kids:
                try:
                    return await c.read(offset, nbytes)
                except BlockError as e:
                    self._report_bad("read", c, offset, nbytes, e)
                    last = e
            assert last is not None
            raise last
        results = await asyncio.gather(
            *(c.read(offset, nbytes) for c in kids), return_exceptions=True
        )
        errs: list[int] = []
        good: list[tuple[Node, bytes]] = []
        for c, r in zip(kids, results, strict=True):
            if isinstance(r, BlockError):
                self._report_bad("read", c, offset, nbytes, r)
                errs.append(r.errno)
                continue
            if isinstance(r, BaseException):
                raise r
            good.append((c, r))
        if len(good) < self.threshold:
            # QEMU: too few successful reads -> the voted error, QUORUM_FAILURE
            self._failure(offset, nbytes)
            most = _vote_winner(errs)[0]
            raise BlockError(most, os.strerror(most))
        if all(r == good[0][1] for _, r in good[1:]):
            return good[0][1]
        hashes = [hashlib.sha256(r).digest() for _, r in good]
        winner, count = _vote_winner(hashes)
        if count < self.threshold:
            self._failure(offset, nbytes)
            raise BlockError(errno.EIO)
        data = good[hashes.index(winner)][1]
        # QEMU reports (and rewrites) the losers newest version first, each
        # version's children in reverse order
        losers = [i for i in range(len(good)) if hashes[i] != winner]
        first_seen = {h: hashes.index(h) for h in hashes}
        losers.sort(key=lambda i: (-first_seen[hashes[i]], -i))
        for i in losers:
            self._report_bad("read", good[i][0], offset, nbytes, None)
        if self.rewrite:
            for i in losers:
                try:
                    await good[i][0].write(offset, data)
                except BlockError:
                    pass
        return data

    async def _co_block_status(self, offset: int, nbytes: int) -> list[Extent]:
        return [Extent(offset, nbytes, True, False, True, 0, None, None)]

    async def reopen(self, read_only: bool) -> None:
        for c in self.child_list():
            await c.reopen(read_only)
        self.read_only = read_only


def _vote_winner(values: list) -> tuple[Any, int]:
    """QEMU's quorum_get_vote_winner: the most common value; a tie goes to the value
    first seen LAST (versions are inserted at the head of the list and the winner
    needs a strictly greater count)."""
    counts: dict[Any, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    best, n = None, 0
    for v in reversed(list(counts)):
        if counts[v] > n:
            best, n = v, counts[v]
    return best, n


# -- fan-out -------------------------------------------------------------------------
#
# A replicated write fans out to a local file child, which usually completes without
# ever suspending, and a replication child, which waits for the wire. A task per child
# and a gather per request cost more than the local pwrite itself (issue 15: +27 % on
# replicated 4 KiB writes without them). So each child's coroutine is stepped inline:
# one that finishes without suspending needs no task, and the next child starts at
# once; the first one that suspends is resumed inline, and only the children after it
# (if any) get tasks, started before it resumes so that they still overlap with it.
# Children start in list order and are all awaited, as with one task each.


async def _fan_out(coros: list[Coroutine[Any, Any, None]]) -> list[Exception | None]:
    """Run every coroutine to completion; each one's exception, or None, in order.

    Every child takes its first step here, in list order, before any of them resumes:
    what each does before it first waits (a local pwrite, a request queued on the
    replication link) happens in request order, as the fast path's writes do, so two
    overlapping writes reach the local disk and the link in the same order. Then the
    first child that suspended is resumed inline and the others as tasks.

    An exception that is not an ``Exception`` (a cancellation) propagates at once,
    cancelling the children that are still running.
    """
    results: list[Exception | None] = [None] * len(coros)
    suspended: list[tuple[int, Coroutine[Any, Any, None], Any]] = []
    tasks: list[tuple[int, asyncio.Future[None]]] = []
    i = 0
    try:
        for i, c in enumerate(coros):
            try:
                suspended.append((i, c, c.send(None)))
            except StopIteration:
                pass
            except Exception as e:  # noqa: BLE001 - the caller votes on the errors
                results[i] = e
        i = len(coros)
        if suspended:
            (k, first, yielded), rest = suspended[0], suspended[1:]
            tasks = [(j, asyncio.ensure_future(resume_later(c, y))) for j, c, y in rest]
            suspended = [suspended[0]]  # the others belong to their tasks now
            try:
                await resume(first, yielded)
            except Exception as e:  # noqa: BLE001
                results[k] = e
            suspended = []
        for j, t in tasks:
            try:
                await t
            except Exception as e:  # noqa: BLE001
                results[j] = e
    except BaseException:
        for c in coros[i + 1 :]:
            c.close()  # never started
        for _, c, _ in suspended:
            c.close()  # stepped, not yet handed to a task (closing a finished one is a no-op)
        for _, t in tasks:
            t.cancel()
        raise
    return results
