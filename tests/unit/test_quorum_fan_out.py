"""Quorum's write fan-out: children stepped inline, tasks only where a child suspends.

The voting, the events and the concurrency of the children must be those of one task
per child (QEMU's quorum_co_writev waits for every child, then votes).
"""

from __future__ import annotations

import asyncio
import errno
import gc
import itertools
import os
import random
import warnings
from typing import Any

import pytest

from blockrep.block import Graph
from blockrep.block.node import Node
from blockrep.block.quorum import QuorumNode
from blockrep.errors import BlockError
from tests.harness.tools import run

SIZE = 1 << 20


class ScriptedChild(Node):
    """A child whose write completes at once or after a gate opens, and may fail."""

    driver_name = "test-scripted"

    def __init__(self, name: str, log: list[str], suspend: bool, fail: int = 0) -> None:
        super().__init__(name, {})
        self.length = SIZE
        self.log = log
        self.suspend = suspend
        self.fail = fail
        self.gate = asyncio.Event()
        self.done = False
        self.cancelled = False
        self.data = bytearray(SIZE)

    async def _co_write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        self.log.append(f"start {self.node_name}")
        try:
            if self.suspend:
                await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        self.log.append(f"end {self.node_name}")
        self.done = True
        if self.fail:
            raise BlockError(self.fail, os.strerror(self.fail))
        self.data[offset : offset + len(data)] = data


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def emit(self, name: str, data: dict[str, Any]) -> None:
        self.seen.append((name, data))

    def device_of(self, node: Node) -> str | None:
        return "disk0"


def _quorum(children: list[Node], threshold: int) -> tuple[QuorumNode, Events]:
    q = QuorumNode("q", {"vote-threshold": threshold})
    q.threshold = threshold
    for i, c in enumerate(children):
        q.attach_child(f"children.{i}", c)
    q.length = SIZE
    ev = Events()
    q.graph = ev
    return q, ev


def _count_tasks() -> list[int]:
    """Count every task created on the running loop from now on."""
    loop = asyncio.get_running_loop()
    made = [0]

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        made[0] += 1
        return asyncio.Task(coro, loop=loop, **kw)

    loop.set_task_factory(factory)
    return made


async def _open_gates_soon(children: list[ScriptedChild]) -> None:
    for _ in range(3):
        await asyncio.sleep(0)
    for c in children:
        c.gate.set()


def test_replicated_write_shape_needs_no_task_per_child(tmp_path):
    """Two real file children (never suspend) and the usual local + remote shape
    (one that completes at once, one that waits): no task at all is created, and
    the bytes written equal the model."""
    paths = [str(tmp_path / f"c{i}.raw") for i in range(2)]
    for p in paths:
        with open(p, "wb") as f:
            f.truncate(SIZE)
    rnd = random.Random(15)
    model = bytearray(SIZE)

    async def go():
        g = Graph()
        q = await g.add(
            {
                "driver": "quorum",
                "node-name": "q",
                "vote-threshold": 2,
                "children": [
                    {"driver": "raw", "file": {"driver": "file", "filename": p}} for p in paths
                ],
            }
        )
        made = _count_tasks()
        for _ in range(50):
            off = rnd.randrange(SIZE // 4096) * 4096
            data = rnd.randbytes(4096)
            await q.write(off, data)
            model[off : off + 4096] = data
        await q.flush()
        assert made[0] == 0, "a task was created for children that never suspend"

        log: list[str] = []
        local = ScriptedChild("local", log, suspend=False)
        remote = ScriptedChild("remote", log, suspend=True)
        rq, _ = _quorum([local, remote], 1)
        made = _count_tasks()
        opener = asyncio.ensure_future(_open_gates_soon([remote]))
        base = made[0]
        data = rnd.randbytes(4096)
        await rq.write(8192, data)  # inline: wait_for would make a task
        await opener
        assert made[0] == base, "a task was created for the one child that suspends"
        assert log == ["start local", "end local", "start remote", "end remote"]
        assert bytes(local.data[8192 : 8192 + 4096]) == data == bytes(remote.data[8192:12288])
        await g.close_all()

    run(go(), 30)
    for p in paths:
        with open(p, "rb") as f:
            assert f.read() == bytes(model)


def test_children_after_a_suspended_child_run_concurrently_with_it():
    """The first child waits for a gate that only the third child opens: a fan-out
    that ran the children one after another would never finish."""

    async def go():
        log: list[str] = []
        a = ScriptedChild("a", log, suspend=True)
        b = ScriptedChild("b", log, suspend=False)
        c = ScriptedChild("c", log, suspend=True)

        async def c_write(offset: int, data: bytes | memoryview, fua: bool) -> None:
            log.append("start c")
            a.gate.set()
            await c.gate.wait()
            log.append("end c")
            c.data[offset : offset + len(data)] = data

        c._co_write = c_write  # type: ignore[method-assign]
        q, ev = _quorum([a, b, c], 3)
        writer = asyncio.ensure_future(q.write(0, b"x" * 512))
        while "start c" not in log:
            await asyncio.sleep(0)
        assert not writer.done()
        c.gate.set()
        await asyncio.wait_for(writer, 5)
        assert log.index("start a") < log.index("start b") < log.index("start c")
        assert log.index("start c") < log.index("end a")
        assert ev.seen == []
        for ch in (a, b, c):
            assert bytes(ch.data[:512]) == b"x" * 512

    run(go(), 30)


def _model_vote(errnos: list[int]) -> int:
    """The most common errno; a tie goes to the errno that first occurred last."""
    firsts = {e: errnos.index(e) for e in errnos}
    return max(firsts, key=lambda e: (errnos.count(e), firsts[e]))


MIXES = list(itertools.product([False, True], [0, errno.EIO, errno.ENOSPC], repeat=3))


@pytest.mark.parametrize("threshold", [1, 2, 3])
@pytest.mark.parametrize("mix", MIXES, ids=lambda m: "-".join(map(str, m)))
def test_votes_events_and_errors_match_a_model_for_every_mix(mix, threshold):
    """Three children, each completing at once or after suspending, each succeeding
    or failing with EIO or ENOSPC: every child runs to its end, each failure is one
    QUORUM_REPORT_BAD in child order, and the request fails (QUORUM_FAILURE, the
    voted errno) exactly when fewer than vote-threshold children succeeded."""
    plan = [(mix[i], mix[i + 1]) for i in range(0, 6, 2)]

    async def go():
        log: list[str] = []
        kids = [ScriptedChild(f"k{i}", log, s, f) for i, (s, f) in enumerate(plan)]
        q, ev = _quorum(list(kids), threshold)
        opener = asyncio.ensure_future(_open_gates_soon(kids))
        err: BlockError | None = None
        try:
            await asyncio.wait_for(q.write(4096, b"y" * 4096), 5)
        except BlockError as e:
            err = e
        await opener
        assert all(k.done for k in kids)
        failed = [i for i, (_, f) in enumerate(plan) if f]
        want = [
            (
                "QUORUM_REPORT_BAD",
                {
                    "type": "write",
                    "error": os.strerror(plan[i][1]),
                    "node-name": f"k{i}",
                    "sector-num": 8,
                    "sectors-count": 8,
                },
            )
            for i in failed
        ]
        if 3 - len(failed) < threshold:
            want.append(
                (
                    "QUORUM_FAILURE",
                    {"reference": "disk0", "sector-num": 8, "sectors-count": 8},
                )
            )
            assert err is not None
            assert err.errno == _model_vote([plan[i][1] for i in failed])
        else:
            assert err is None
        assert ev.seen == want
        for i, k in enumerate(kids):
            assert bytes(k.data[4096:8192]) == (bytes(4096) if plan[i][1] else b"y" * 4096)

    run(go(), 30)


def test_cancelled_write_cancels_every_running_child_and_leaks_no_coroutine():
    """Cancelling the request while the inline child and a child task both wait
    cancels both; nothing is left running or never awaited."""

    async def go() -> list[warnings.WarningMessage]:
        log: list[str] = []
        kids = [ScriptedChild(f"k{i}", log, suspend=True) for i in range(3)]
        q, ev = _quorum(list(kids), 3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            writer = asyncio.ensure_future(q.write(0, b"z" * 512))
            while len(log) < 3:
                await asyncio.sleep(0)
            writer.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(writer, 5)
            for _ in range(5):
                await asyncio.sleep(0)
            gc.collect()
        assert [k.cancelled for k in kids] == [True, True, True]
        assert not any(k.done for k in kids)
        assert ev.seen == []
        assert q.in_flight() == 0 and all(k.in_flight() == 0 for k in kids)
        return caught

    caught = run(go(), 30)
    assert not [w for w in caught if "never awaited" in str(w.message)]


def test_a_child_bug_surfaces_after_every_child_finished():
    """A child raising something other than a BlockError is not voted on: it reaches
    the caller, but only once the other children have finished."""

    async def go():
        log: list[str] = []
        kids = [ScriptedChild("a", log, False), ScriptedChild("b", log, True)]

        async def broken(offset: int, data: bytes | memoryview, fua: bool) -> None:
            raise ValueError("bug")

        kids[0]._co_write = broken  # type: ignore[method-assign]
        q, ev = _quorum(list(kids), 1)
        opener = asyncio.ensure_future(_open_gates_soon([kids[1]]))
        with pytest.raises(ValueError, match="bug"):
            await asyncio.wait_for(q.write(0, b"q" * 512), 5)
        await opener
        assert kids[1].done and bytes(kids[1].data[:512]) == b"q" * 512
        assert ev.seen == []

    run(go(), 30)
