"""The write fast path (issue 15) held to the general path, which stays the reference.

Requests are issued as the NBD server issues them — ``try_write`` first, ``write`` when it
refuses — on one graph, and through the general path only on an identical second graph;
the bytes of every file must end equal between the two and equal to a model. Each
refusal reason must refuse, and the general path must then do the right thing; drain,
dirty bitmaps, write-error listeners, the replication primary's lost forwards, the
switch and the consumer export's guard must hold on the fast path as on the general one.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockrep import fastpath
from blockrep.block import Graph, quorum
from blockrep.block.node import DirtyBitmap, Node
from blockrep.errors import BlockError
from blockrep.export import Export
from blockrep.ha.activity_log import ActivityLog
from blockrep.ha.consumer import ConsumerExport, VolumeExport
from blockrep.jobs import launch
from blockrep.jobs.base import JobManager
from blockrep.replication import fused as replication_fused
from blockrep.replication.filter import ReplicationStage
from tests.harness.fast_path import (
    GatedExport,
    GeneralExport,
    Issuer,
    Primary,
    Secondary,
    fast_path_on,
    file_bytes,
    nbd_opts,
    raw_file,
    remove_dir,
    short_dir,
    wait_until,
    zero_file,
)
from tests.harness.images import make_qcow2
from tests.harness.tools import run

SIZE = 1 << 20
TIMEOUT = 60


@pytest.fixture(autouse=True)
def _fast_path_on():
    """Every test starts with the switch on (also under ``BLOCKREP_FAST_PATH=0``)."""
    with fast_path_on():
        yield


@pytest.fixture(autouse=True, params=["fused", "layered"])
def fused(request):
    """Every test twice: with P's quorum writing through its whole graph in one call
    (replication/fused.py), and with the layered fast path alone."""
    on = request.param == "fused"
    if not on:
        quorum.set_fused_write(None)
    try:
        yield on
    finally:
        replication_fused.install()


# -- 1. differential: fast path vs general path vs model --------------------------------

# (kind, aligned, offset unit, length unit, fua, data seed)
KINDS = ["write", "write", "write", "write", "zero", "discard", "read"]
op_st = st.tuples(
    st.sampled_from(KINDS),
    st.booleans(),
    st.integers(0, SIZE - 1),
    st.integers(1, 96 << 10),
    st.sampled_from([False, False, False, True]),
    st.integers(0, 2**31),
)
batches_st = st.lists(st.lists(op_st, min_size=1, max_size=8), min_size=1, max_size=6)


def _plan(batches: list[list[tuple[Any, ...]]]) -> list[list[tuple[str, int, int, bool, bytes]]]:
    """Concrete ops: in one batch (all in flight together) byte ranges are disjoint, so
    the result is defined; they may share 4 KiB blocks, and overlap across batches."""
    out = []
    for batch in batches:
        kept: list[tuple[str, int, int, bool, bytes]] = []
        for kind, aligned, off, n, fua, seed in batch:
            if aligned:
                off &= ~4095
                n = max(4096, n & ~4095)
            n = min(n, SIZE - off)
            if any(off < o + m and o < off + n for _, o, m, _, _ in kept):
                continue
            data = random.Random(seed).randbytes(n) if kind == "write" else b""
            kept.append((kind, off, n, fua, data))
        out.append(kept)
    return out


async def _apply(io: Issuer, model: bytearray, plan: list[list[tuple]]) -> None:
    for batch in plan:

        async def one(kind: str, off: int, n: int, fua: bool, data: bytes) -> None:
            node = io.node
            if kind == "write":
                await io.write(off, data, fua)
            elif kind == "zero":
                await node.write_zeroes(off, n, may_unmap=fua, fua=fua)
            elif kind == "discard":
                await node.discard(off, n)
            else:
                got = await io.read(off, n)
                assert got == bytes(model[off : off + n]), f"read {off}+{n} differs from model"

        await asyncio.gather(*(one(*op) for op in batch))
        for kind, off, n, _, data in batch:
            if kind == "write":
                model[off : off + n] = data
            elif kind in ("zero", "discard"):
                model[off : off + n] = bytes(n)
    await io.node.flush()


async def _raw_graph(path: str) -> tuple[Graph, Node]:
    g = Graph()
    return g, await g.add(raw_file(path, "top"))


def _first_fast_write_count(plan: list[list[tuple]]) -> int:
    """Batches opening with a non-FUA write: nothing else is in flight then, so the fast
    path has no reason to refuse it."""
    return sum(1 for b in plan if b and b[0][0] == "write" and not b[0][3])


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batches=batches_st)
def test_raw_over_file_fast_and_general_paths_write_the_same_bytes(batches):
    plan = _plan(batches)
    d = short_dir()

    async def go() -> None:
        paths = [os.path.join(d, f"{x}.raw") for x in ("fast", "general")]
        for p in paths:
            zero_file(p, SIZE)
        models = []
        issuers = []
        for p, fast in zip(paths, (True, False), strict=True):
            g, top = await _raw_graph(p)
            io = Issuer(top, fast)
            model = bytearray(SIZE)
            await _apply(io, model, plan)
            io.check_done_once()
            await g.close_all()
            models.append(model)
            issuers.append(io)
        assert models[0] == models[1]
        for p in paths:
            assert file_bytes(p) == bytes(models[0]), p
        assert issuers[0].taken >= _first_fast_write_count(plan), fastpath.snapshot()
        assert issuers[1].taken == 0

    try:
        run(go(), TIMEOUT)
    finally:
        remove_dir(d)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batches=batches_st)
def test_replicated_quorum_fast_and_general_paths_write_the_same_bytes(fused, batches):
    """P's quorum (fifo, threshold 1) of raw + replication(primary, running) -> nbd to an
    in-process NBD server: P's file and S's file of both graphs equal the model. The
    general graph's server never offers the fast path either."""
    use_fused = fused
    plan = _plan(batches)
    d = short_dir()

    async def go() -> None:
        models, issuers, files = [], [], []
        for name, fast in (("f", True), ("g", False)):
            p_path, s_path = os.path.join(d, f"{name}p.raw"), os.path.join(d, f"{name}s.raw")
            zero_file(p_path, SIZE)
            zero_file(s_path, SIZE)
            sec = Secondary(os.path.join(d, f"{name}.sock"))
            await sec.start(raw_file(s_path), Export if fast else GeneralExport)
            prim = Primary()
            q = await prim.open(p_path, sec.sock)
            io = Issuer(q, fast)
            model = bytearray(SIZE)
            try:
                await _apply(io, model, plan)
                await q.drain()
                io.check_done_once()
                assert prim.rep.state.error == 0, prim.rep.state.error_message
                assert prim.rep.state.unacked_bytes == 0
                assert prim.events == [], prim.events
            finally:
                await prim.close()
                await sec.close()
            models.append(model)
            issuers.append(io)
            files += [p_path, s_path]
        assert models[0] == models[1]
        for p in files:
            assert file_bytes(p) == bytes(models[0]), p
        assert issuers[0].taken >= _first_fast_write_count(plan), fastpath.snapshot()
        assert issuers[1].taken == 0
        # the taken writes went through the path this run asked for
        taken = fastpath.COUNTERS.taken.get("fused write", 0)
        assert (taken >= _first_fast_write_count(plan)) if use_fused else taken == 0, taken

    try:
        run(go(), TIMEOUT)
    finally:
        remove_dir(d)


# -- 2. each refusal refuses, and the general path then does the right thing ----------


async def _file_graph(path: str) -> tuple[Graph, Node]:
    g = Graph()
    return g, await g.add({"driver": "file", "node-name": "f", "filename": path})


class AlignedFilter(Node):
    """A filter with a request alignment (so unaligned writes read-modify-write)."""

    driver_name = "test-aligned-filter"

    def __init__(self, child: Node, alignment: int) -> None:
        super().__init__("hold", {})
        self.attach_child("file", child)
        self.length = child.length
        self.request_alignment = alignment

    async def _co_read(self, offset: int, nbytes: int) -> bytes:
        return await self._pass().read(offset, nbytes)

    async def _co_write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        await self._pass().write(offset, data, fua)

    def _fast_write(self, offset: int, data: bytes | memoryview, fua: bool, done: Any) -> bool:
        return self._pass().try_write(offset, data, fua, done)


class HoldNextWrite(AlignedFilter):
    """An aligned filter whose next general-path write (only) waits for ``gate``."""

    driver_name = "test-hold-next-write"

    def __init__(self, child: Node, alignment: int) -> None:
        super().__init__(child, alignment)
        self.hold = False
        self.held = asyncio.Event()
        self.gate = asyncio.Event()

    async def _co_write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        if self.hold:
            self.hold = False
            self.held.set()
            await self.gate.wait()
        await super()._co_write(offset, data, fua)


def test_overlapping_serialising_request_refuses_and_general_write_is_not_torn(tmp_path):
    """An unaligned write's read-modify-write (serialising) is between its read and its
    write; an aligned write of the same block must refuse the fast path, and the general
    path must not let the read-modify-write put back the bytes it read before: the block
    ends as one of the two orders (QEMU: every write waits for an overlapping
    serialising request)."""
    path = str(tmp_path / "d.raw")
    zero_file(path, SIZE)
    A = 4096

    async def go() -> bytes:
        g, f = await _file_graph(path)
        hold = HoldNextWrite(f, A)
        hold.hold = True
        w1 = asyncio.ensure_future(hold.write(100, b"x" * 100))
        await asyncio.wait_for(hold.held.wait(), 5)  # W1 read the old block, writes now
        y = b"y" * A
        calls: list[Any] = []
        assert hold.try_write(0, y, False, calls.append) is False
        assert calls == []
        assert fastpath.COUNTERS.fallbacks.get(
            "test-hold-next-write: overlapping serialising request"
        ), fastpath.snapshot()
        w2 = asyncio.ensure_future(hold.write(0, y))  # the general path, as the server
        for _ in range(20):
            await asyncio.sleep(0)
        hold.gate.set()
        await asyncio.wait_for(asyncio.gather(w1, w2), 10)
        # nothing serialising in flight any more: the fast path takes the same write
        assert hold.try_write(A, y, False, calls.append) is True and calls == [None]
        got = await f.read(0, A)
        await g.close_all()
        return got

    got = run(go(), TIMEOUT)
    w1_then_w2 = b"y" * 4096
    w2_then_w1 = b"y" * 100 + b"x" * 100 + b"y" * (4096 - 200)
    assert got in (w1_then_w2, w2_then_w1), (
        f"torn: W2's bytes lost ({got[:8]!r}...{got[200:208]!r}): the general write did not "
        "wait for the overlapping read-modify-write"
    )
    assert file_bytes(path)[:4096] == got


def test_armed_copy_before_write_cluster_refuses_and_copy_comes_first(tmp_path):
    """A write to a cluster still to be copied refuses; the general path copies the
    pre-image into the target first. Once copied, the fast path takes writes to it, and
    the target keeps the first pre-image."""
    src_path, tgt_path = str(tmp_path / "s.raw"), str(tmp_path / "t.qcow2")
    size = 4 << 20
    initial = random.Random(7).randbytes(size)
    zero_file(src_path, size, initial)

    async def go() -> None:
        await make_qcow2(tgt_path, size)
        g = Graph()
        jobs = JobManager(lambda n, d: None)
        await g.add(raw_file(src_path, "src"))
        tgt = await g.add(
            {
                "driver": "qcow2",
                "node-name": "tgt",
                "file": {"driver": "file", "filename": tgt_path},
            }
        )
        job = await launch.start_backup(
            g, jobs, {"job-id": "b", "device": "src", "target": "tgt", "sync": "none"}
        )
        await job.checkpoint()
        cbw = job.cbw
        assert cbw is not None
        cs = cbw.cluster_size
        io = Issuer(cbw, fast=True)
        new1 = b"\x11" * 4096
        await io.write(cs + 512, new1)
        assert (io.taken, io.refused) == (0, 1)
        assert fastpath.COUNTERS.fallbacks.get("copy-before-write: cluster to copy") == 1
        assert await tgt.read(cs, cs) == initial[cs : 2 * cs], "target lacks the pre-image"
        new2 = b"\x22" * 4096
        await io.write(cs + 8192, new2)  # copied already: straight to the source
        assert (io.taken, io.refused) == (1, 1)
        assert await tgt.read(cs, cs) == initial[cs : 2 * cs]
        # a write spanning a copied and an armed cluster refuses
        await io.write(2 * cs - 4096, b"\x33" * 8192)
        assert (io.taken, io.refused) == (1, 2)
        assert await tgt.read(2 * cs, cs) == initial[2 * cs : 3 * cs]
        io.check_done_once()
        model = bytearray(initial)
        model[cs + 512 : cs + 512 + 4096] = new1
        model[cs + 8192 : cs + 8192 + 4096] = new2
        model[2 * cs - 4096 : 2 * cs + 4096] = b"\x33" * 8192
        assert await cbw.read(0, size) == bytes(model)
        assert cbw.clusters_copied == 2
        job.cancel(force=True)
        await job.done.wait()
        await g.close_all()
        assert file_bytes(src_path) == bytes(model)

    run(go(), TIMEOUT)


async def _primary_pair(d: str, name: str, *, start: bool, threshold: int = 1, **kw: Any):
    p_path, s_path = os.path.join(d, f"{name}p.raw"), os.path.join(d, f"{name}s.raw")
    zero_file(p_path, SIZE)
    zero_file(s_path, SIZE)
    sec = Secondary(os.path.join(d, f"{name}.sock"))
    await sec.start(kw.get("s_node") or raw_file(s_path), kw.get("export_class", Export))
    prim = Primary()
    q = await prim.open(p_path, sec.sock, start=start, threshold=threshold)
    return prim, sec, q, p_path, s_path


def test_replication_not_running_refuses_and_general_path_fails_the_forward():
    """Stage none: the replication node refuses; its general write fails with EIO and
    calls on_lost_forward; the quorum (threshold 1) reports the child and succeeds —
    the same events, result and bytes as the general path."""
    d = short_dir()

    async def go() -> None:
        seen = []
        for name, fast in (("f", True), ("g", False)):
            prim, sec, q, p_path, s_path = await _primary_pair(d, name, start=False)
            try:
                rep = prim.rep
                assert rep.state.stage == ReplicationStage.NONE
                calls: list[Any] = []
                assert rep.try_write(0, b"r" * 4096, False, calls.append) is False
                assert calls == [] and rep.in_flight() == 0
                with pytest.raises(BlockError) as ei:
                    await rep.write(0, b"r" * 4096)
                assert ei.value.errno == errno.EIO
                prim.events.clear()
                prim.lost_forwards = 0
                io = Issuer(q, fast)
                await io.write(8192, b"w" * 4096)
                io.check_done_once()
                await q.drain()
                seen.append((prim.events, prim.lost_forwards, io.taken))
            finally:
                await prim.close()
                await sec.close()
            model = bytearray(SIZE)
            model[8192 : 8192 + 4096] = b"w" * 4096
            assert file_bytes(p_path) == bytes(model)
            assert file_bytes(s_path) == bytes(SIZE)
        (fev, flost, ftaken), (gev, glost, _) = seen
        assert ftaken == 1  # quorum took it; its replication child ran the general path
        assert fev == gev and flost == glost == 1, seen
        assert [e[0] for e in fev] == ["QUORUM_REPORT_BAD"]
        assert fev[0][1]["node-name"] == "rep" and fev[0][1]["error"] == os.strerror(errno.EIO)

    try:
        run(go(), TIMEOUT)
    finally:
        remove_dir(d)


def _failing_child(path: str, err: int = errno.EIO) -> dict[str, Any]:
    return {
        "driver": "raw",
        "node-name": "bad",
        "file": {
            "driver": "blkdebug",
            "image": {"driver": "file", "filename": path},
            "inject-error": [{"event": "write_aio", "errno": err}],
        },
    }


@pytest.mark.parametrize("threshold", [1, 2])
@pytest.mark.parametrize("where", ["local", "link"])
def test_quorum_child_failure_votes_as_the_general_path(threshold, where):
    """A failing child — a local one (blkdebug, no fast path: its general write joins the
    vote) or the link (the server's error reply reaches the fast path's callback): the
    same QUORUM_REPORT_BAD / QUORUM_FAILURE events and the same error as the general path;
    threshold 1 succeeds, threshold 2 fails. Quorum over raw + nbd (no replication filter,
    which would hide the link's error)."""
    d = short_dir()

    async def go() -> list[Any]:
        outcomes = []
        for name, fast in (("f", True), ("g", False)):
            good, other = os.path.join(d, f"{name}a.raw"), os.path.join(d, f"{name}b.raw")
            zero_file(good, SIZE)
            zero_file(other, SIZE)
            sec = Secondary(os.path.join(d, f"{name}.sock"))
            s_node = _failing_child(other) if where == "link" else raw_file(other)
            await sec.start(s_node, Export if fast else GeneralExport)
            g = Graph()
            events: list[Any] = []
            g.emit = lambda n, data, ev=events: ev.append((n, data))
            if where == "link":
                second: dict[str, Any] = {
                    "driver": "nbd",
                    "node-name": "bad",
                    "server": {"type": "unix", "path": sec.sock},
                    "export": "disk",
                }
            else:
                local_bad = os.path.join(d, f"{name}c.raw")
                zero_file(local_bad, SIZE)
                second = _failing_child(local_bad)
            q = await g.add(
                {
                    "driver": "quorum",
                    "node-name": "q",
                    "read-pattern": "fifo",
                    "vote-threshold": threshold,
                    "children": [raw_file(good, "good"), second],
                }
            )
            g.devices["disk0"] = q
            heard: list[BlockError] = []
            q.write_error_listeners.append(heard.append)
            io = Issuer(q, fast)
            err: BlockError | None = None
            try:
                await io.write(4096, b"v" * 4096)
            except BlockError as e:
                err = e
            io.check_done_once()
            await q.drain()
            del g.devices["disk0"]
            await g.close_all()
            await sec.close()
            model = bytearray(SIZE)
            model[4096:8192] = b"v" * 4096
            assert file_bytes(good) == bytes(model)
            outcomes.append(
                (
                    events,
                    None if err is None else (err.errno, err.message),
                    [(h.errno, h.message) for h in heard],
                    io.taken,
                )
            )
        return outcomes

    try:
        (fev, ferr, fheard, ftaken), (gev, gerr, gheard, _) = run(go(), TIMEOUT)
    finally:
        remove_dir(d)
    assert ftaken == 1, fastpath.snapshot()
    assert fev == gev
    assert ferr == gerr and fheard == gheard
    names = [e[0] for e in fev]
    assert names == (
        ["QUORUM_REPORT_BAD"] if threshold == 1 else ["QUORUM_REPORT_BAD", "QUORUM_FAILURE"]
    )
    assert fev[0][1]["node-name"] == "bad" and fev[0][1]["error"] == os.strerror(errno.EIO)
    if threshold == 1:
        assert ferr is None and fheard == []
    else:
        assert ferr is not None and ferr[0] == errno.EIO and fheard == [ferr]


class HoldFastDone(AlignedFilter):
    """An aligned filter whose fast writes reach the file at once and report done only
    when ``release`` is called."""

    driver_name = "test-hold-fast-done"

    def __init__(self, child: Node, alignment: int) -> None:
        super().__init__(child, alignment)
        self.parked: list[tuple[Any, Any]] = []

    def _fast_write(self, offset: int, data: bytes | memoryview, fua: bool, done: Any) -> bool:
        return self._pass().try_write(
            offset, data, fua, lambda err: self.parked.append((done, err))
        )

    def release(self) -> None:
        parked, self.parked = self.parked, []
        for done, err in parked:
            done(err)


def test_serialising_request_waits_for_fast_writes_in_flight_and_none_starts_meanwhile(
    tmp_path,
):
    """Fast writes are counted, not tracked one by one: a read-modify-write (serialising)
    waits until none is in flight, drain waits for them, and while the read-modify-write
    waits no fast write starts, even one elsewhere (it takes the general path)."""
    path = str(tmp_path / "d.raw")
    zero_file(path, SIZE)
    A = 4096

    async def go() -> bytes:
        g, f = await _file_graph(path)
        n = HoldFastDone(f, A)
        calls: list[Any] = []
        assert n.try_write(0, b"a" * A, False, calls.append) is True
        assert n.in_flight() == 1 and calls == []
        rmw = asyncio.ensure_future(n.write(100, b"x" * 100))
        drain = asyncio.ensure_future(n.drain())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not rmw.done() and not drain.done()
        assert n.try_write(2 * A, b"c" * A, False, calls.append) is False
        assert fastpath.COUNTERS.fallbacks.get(
            "test-hold-fast-done: a serialising request waits"
        ), fastpath.snapshot()
        n.release()
        await asyncio.wait_for(asyncio.gather(rmw, drain), 10)
        assert calls == [None] and n.in_flight() == 0
        # nothing waits any more: the fast path takes the write it refused
        assert n.try_write(2 * A, b"c" * A, False, calls.append) is True
        n.release()
        assert calls == [None, None]
        got = await f.read(0, 3 * A)
        await g.close_all()
        return got

    got = run(go(), TIMEOUT)
    model = bytearray(b"a" * A + bytes(2 * A))
    model[100:200] = b"x" * 100
    model[2 * A :] = b"c" * A
    assert got == bytes(model)
    assert file_bytes(path)[: 3 * A] == got


# -- 3. what the general path guarantees, on the fast path -----------------------------


def test_drain_waits_for_a_fast_write_in_flight_on_the_link():
    d = short_dir()

    async def go() -> None:
        prim, sec, q, p_path, s_path = await _primary_pair(
            d, "a", start=True, export_class=GatedExport
        )
        try:
            exp = sec.export
            assert isinstance(exp, GatedExport)
            exp.hold.clear()
            calls: list[Any] = []
            assert q.try_write(0, b"d" * 4096, False, calls.append) is True
            await wait_until(lambda: exp.arrived == 1)
            drain = asyncio.ensure_future(q.drain())
            for _ in range(50):
                await asyncio.sleep(0)
            assert not drain.done() and calls == []
            assert q.in_flight() == 1 and prim.rep.in_flight() == 1
            assert prim.rep.state.unacked_bytes == 4096
            exp.hold.set()
            await asyncio.wait_for(drain, 10)
            assert calls == [None]
            assert q.in_flight() == 0 and prim.rep.state.unacked_bytes == 0
        finally:
            await prim.close()
            await sec.close()
        assert file_bytes(p_path)[:4096] == file_bytes(s_path)[:4096] == b"d" * 4096

    try:
        run(go(), TIMEOUT)
    finally:
        remove_dir(d)


def test_fast_writes_mark_dirty_bitmaps_at_every_layer():
    d = short_dir()

    async def go() -> None:
        prim, sec, q, p_path, _ = await _primary_pair(d, "a", start=True)
        try:
            bms = {}
            for name in ("q", "local", "rep", "link"):
                node = prim.graph.get_node(name)
                bm = DirtyBitmap(65536, node.length)
                node.dirty_bitmaps.append(bm)
                bms[name] = bm
            io = Issuer(q, fast=True)
            await io.write(3 * 65536 + 100, b"m" * 70000)
            assert io.taken == 1
            for name, bm in bms.items():
                assert bm.dirty == {3, 4}, (name, bm.dirty)
        finally:
            await prim.close()
            await sec.close()

    try:
        run(go(), TIMEOUT)
    finally:
        remove_dir(d)


def test_failed_forward_is_recorded_and_the_write_succeeds():
    """The link answers EIO to a fast-path write: the nbd node's error listeners hear it,
    the replication primary records it and calls on_lost_forward before the write
    completes, and the consumer's write succeeds — as on the general path."""
    d = short_dir()

    async def go() -> list[Any]:
        out = []
        for name, fast in (("f", True), ("g", False)):
            s_path = os.path.join(d, f"{name}bad.raw")
            zero_file(s_path, SIZE)
            prim, sec, q, p_path, _ = await _primary_pair(
                d, name, start=True, s_node=_failing_child(s_path),
                export_class=Export if fast else GeneralExport,
            )  # fmt: skip
            try:
                heard: list[BlockError] = []
                prim.graph.get_node("link").write_error_listeners.append(heard.append)
                q_heard: list[BlockError] = []
                q.write_error_listeners.append(q_heard.append)
                order: list[str] = []
                prim.rep.state.on_lost_forward = lambda o=order: o.append("lost")
                io = Issuer(q, fast)
                await io.write(0, b"e" * 4096)
                order.append("done")
                io.check_done_once()
                st = prim.rep.state
                out.append(
                    (order, st.error, st.error_message, [(h.errno, h.message) for h in heard],
                     q_heard, prim.events, io.taken)
                )  # fmt: skip
            finally:
                await prim.close()
                await sec.close()
            assert file_bytes(p_path)[:4096] == b"e" * 4096
        return out

    try:
        f, g = run(go(), TIMEOUT)
    finally:
        remove_dir(d)
    assert f[-1] == 1, "the fast path did not take the write"
    assert f[:-1] == g[:-1]
    order, error, _, heard, q_heard, events, _ = f
    assert order == ["lost", "done"] and error == errno.EIO
    assert len(heard) == 1 and heard[0][0] == errno.EIO
    assert q_heard == [] and events == []


def test_switch_off_makes_export_refuse_and_counts_nothing(tmp_path):
    path = str(tmp_path / "d.raw")
    zero_file(path, SIZE)

    async def go() -> None:
        g = Graph()
        node = await g.add(raw_file(path, "top"))
        exp = Export("disk", node, writable=True)
        calls: list[Any] = []
        fastpath.set_enabled(False)
        assert fastpath.snapshot()["enabled"] is False
        assert exp.try_write(0, b"o" * 4096, False, calls.append) is False
        assert exp.try_read(0, 4096) is None and exp.file_range(0, 4096) is None
        assert calls == [] and exp.active == 0 and exp.idle.is_set()
        snap = fastpath.snapshot()
        assert snap["taken"] == {} and snap["fallbacks"] == {}, snap
        assert file_bytes(path)[:4096] == bytes(4096)
        fastpath.set_enabled(True)
        assert exp.try_write(0, b"o" * 4096, False, calls.append) is True
        assert calls == [None] and exp.active == 0 and exp.idle.is_set()
        assert exp.try_read(0, 4096) == b"o" * 4096
        assert fastpath.snapshot()["taken"] == {"write": 1, "read": 1}
        exp.release()
        await g.close_all()
        assert file_bytes(path)[:4096] == b"o" * 4096

    run(go(), TIMEOUT)


# -- 4. the consumer export's guard on the fast path ----------------------------------


class MemRing:
    def __init__(self) -> None:
        self.records = 0

    def write_record(self, offset: int, data: bytes) -> None:
        self.records += 1

    def close(self) -> None:
        pass


async def _consumer(node: Node, marks: list[tuple[int, int]]) -> tuple[ConsumerExport, ActivityLog]:
    exp = ConsumerExport(node, lambda o, n: marks.append((o, n)))
    al = ActivityLog(MemRing(), region_size=65536, offload=False)
    exp.activity_log = al
    exp.ack_gate = asyncio.Event()
    exp.ack_gate.set()
    return exp, al


async def _general(exp: Export, offset: int, data: bytes) -> None:
    """The server's general path for a write."""
    await exp.enter()
    try:
        await exp.write(offset, data, False)
    finally:
        exp.leave()


def test_consumer_cold_region_refuses_hot_region_is_taken(tmp_path):
    path = str(tmp_path / "d.raw")
    zero_file(path, SIZE)

    async def go() -> None:
        g = Graph()
        node = await g.add(raw_file(path, "top"))
        marks: list[tuple[int, int]] = []
        exp, al = await _consumer(node, marks)
        calls: list[Any] = []
        assert exp.try_write(0, b"c" * 4096, False, calls.append) is False
        assert calls == [] and exp.in_flight == {} and exp.active == 0
        assert fastpath.COUNTERS.fallbacks == {"consumer: activity log must commit": 1}
        assert al.commits == 0
        await _general(exp, 0, b"c" * 4096)  # the general path commits the region
        assert al.commits == 1
        assert exp.try_write(8192, b"h" * 4096, False, calls.append) is True
        assert calls == [None] and al.commits == 1
        assert exp.in_flight == {} and exp.active == 0 and exp.idle.is_set()
        assert fastpath.COUNTERS.taken == {"write": 1}
        assert exp.written_bytes == 8192
        exp.release()
        await g.close_all()
        model = bytearray(SIZE)
        model[0:4096] = b"c" * 4096
        model[8192 : 8192 + 4096] = b"h" * 4096
        assert file_bytes(path) == bytes(model)

    run(go(), TIMEOUT)


def test_consumer_ack_gate_closing_during_write_holds_done():
    d = short_dir()

    async def go() -> None:
        s_path = os.path.join(d, "s.raw")
        zero_file(s_path, SIZE)
        sec = Secondary(os.path.join(d, "s.sock"))
        await sec.start(raw_file(s_path), GatedExport)
        exp_s = sec.export
        assert isinstance(exp_s, GatedExport)
        g = Graph()
        link = await g.add(
            {"driver": "nbd", "server": {"type": "unix", "path": sec.sock}, "export": "disk"}
        )
        marks: list[tuple[int, int]] = []
        exp, al = await _consumer(link, marks)
        try:
            await _general(exp, 0, b"0" * 4096)  # region 0 hot
            exp_s.hold.clear()
            calls: list[Any] = []
            assert exp.try_write(4096, b"a" * 4096, False, calls.append) is True
            assert exp.active == 1 and len(exp.in_flight) == 1
            await wait_until(lambda: exp_s.arrived == 2)
            assert exp.ack_gate is not None
            exp.ack_gate.clear()  # the peer may be lost: acknowledgements held
            exp_s.hold.set()
            await wait_until(lambda: link.in_flight() == 0)
            for _ in range(20):
                await asyncio.sleep(0)
            assert calls == [], "acknowledged while the gate was closed"
            assert exp.active == 0 and exp.idle.is_set(), "held write counted active"
            assert len(exp.in_flight) == 1
            # a new write meanwhile refuses (the gate is closed)
            assert exp.try_write(8192, b"b" * 4096, False, calls.append) is False
            exp.ack_gate.set()
            await wait_until(lambda: bool(calls))
            assert calls == [None]
            assert exp.in_flight == {} and exp.active == 0 and exp.idle.is_set()
        finally:
            exp.release()
            await g.close_all()
            await sec.close()
        model = bytearray(SIZE)
        model[0:4096] = b"0" * 4096
        model[4096:8192] = b"a" * 4096
        assert file_bytes(s_path) == bytes(model)

    try:
        run(go(), TIMEOUT)
    finally:
        remove_dir(d)


def test_consumer_before_write_refusal_reaches_done(tmp_path):
    """before_write raising: done(that error), nothing written, nothing in flight — the
    general path raises the same error."""
    path = str(tmp_path / "d.raw")
    zero_file(path, SIZE)

    def refuse(offset: int, nbytes: int) -> None:
        raise BlockError(errno.EPERM, "read-only until failover")

    async def go() -> None:
        g = Graph()
        node = await g.add(raw_file(path, "top"))
        exp = ConsumerExport(node, refuse)
        calls: list[Any] = []
        assert exp.try_write(0, b"z" * 4096, False, calls.append) is True
        assert len(calls) == 1 and isinstance(calls[0], BlockError)
        assert (calls[0].errno, calls[0].message) == (errno.EPERM, "read-only until failover")
        assert exp.in_flight == {} and exp.active == 0 and exp.idle.is_set()
        with pytest.raises(BlockError) as ei:
            await _general(exp, 0, b"z" * 4096)
        assert (ei.value.errno, ei.value.message) == (calls[0].errno, calls[0].message)
        assert exp.active == 0 and exp.written_bytes == 0
        exp.release()
        await g.close_all()
        assert file_bytes(path) == bytes(SIZE)

    run(go(), TIMEOUT)


def test_volume_export_fast_reads_and_file_range_are_of_its_own_volume(tmp_path):
    """A volume of a resource is the slice [base, base + length) of the device: a read
    the server serves synchronously (try_read) or by sendfile (file_range) must return
    that volume's bytes, as its general read does — not the first volume's."""
    path = str(tmp_path / "d.raw")
    vol = SIZE // 2
    zero_file(path, SIZE)

    async def go() -> None:
        g = Graph()
        node = await g.add(raw_file(path, "top"))
        v0 = VolumeExport(node, lambda o, n: None, name="disk", base=0, length=vol)
        v1 = VolumeExport(node, lambda o, n: None, name="disk1", base=vol, length=vol)
        calls: list[Any] = []
        assert v0.try_write(0, b"0" * 4096, False, calls.append) is True
        assert v1.try_write(0, b"1" * 4096, False, calls.append) is True
        assert calls == [None, None]
        want = {v0: b"0" * 4096, v1: b"1" * 4096}
        wrong = []
        for v, data in want.items():
            assert await v.read(0, 4096) == data  # the general path: the reference
            if v.try_read(0, 4096) not in (None, data):
                wrong.append(f"{v.name}: try_read returns another volume's bytes")
            where = v.file_range(0, 4096)
            if where is not None and os.pread(where[0], 4096, where[1]) != data:
                wrong.append(f"{v.name}: file_range {where[1]} is another volume's")
        assert not wrong, wrong
        for v in want:
            v.release()
        await g.close_all()
        model = bytearray(SIZE)
        model[0:4096] = b"0" * 4096
        model[vol : vol + 4096] = b"1" * 4096
        assert file_bytes(path) == bytes(model)

    run(go(), TIMEOUT)


def test_overlapping_writes_reach_the_link_in_the_order_they_reach_the_local_disk():
    """The review's divergence: W1's link request is refused (link paused) after its
    local pwrite; W2 overlaps it and is taken at once. W1's general write must keep its
    place on the link, or P's disk ends with W2 and S's with W1. The writes' first steps
    happen inline, and a request() in line for the write side makes try_request refuse."""
    d = short_dir()

    async def go() -> None:
        prim, sec, q, p_path, s_path = await _primary_pair(d, "o", start=True)
        try:
            link = prim.graph.get_node("link")
            conn = link.conn
            assert conn is not None and conn.replies is not None
            results: list[Any] = []
            # the link's write side looks paused: W1's forward cannot be sent at once
            conn.replies.writing_paused = True
            assert q.try_write(0, b"1" * 4096, False, results.append)
            conn.replies.writing_paused = False
            # W2, same block, in the same turn of the loop
            assert q.try_write(0, b"2" * 4096, False, results.append)
            while len(results) < 2:
                await asyncio.sleep(0.01)
            assert results == [None, None]
            await q.drain()
            await q.flush()
        finally:
            await prim.close()
            await sec.close()
        assert file_bytes(p_path)[:4096] == b"2" * 4096
        assert file_bytes(s_path)[:4096] == b"2" * 4096, "S holds W1: the link reordered"

    run(go(), TIMEOUT)


def test_a_request_waiting_for_the_write_side_makes_try_request_refuse():
    """A coroutine request() in line for the link's write side: try_request() must not
    pass it (the lock's locked() is False between a release and the waiter's wake-up)."""
    d = short_dir()

    async def go() -> None:
        prim, sec, q, p_path, s_path = await _primary_pair(d, "w", start=True)
        try:
            conn = prim.graph.get_node("link").conn
            assert conn is not None
            await conn.wlock.acquire()
            waiter = asyncio.ensure_future(
                conn.request(1, 0, 4096, 0, b"a" * 4096)  # CMD_WRITE
            )
            await asyncio.sleep(0)  # the waiter is in line now
            conn.wlock.release()
            assert not conn.wlock.locked()  # released, the waiter not yet run
            got: list[Any] = []
            assert conn.try_request(1, 0, 4096, 0, b"b" * 4096, got.append) is False
            await waiter
        finally:
            await prim.close()
            await sec.close()
        assert file_bytes(s_path)[:4096] == b"a" * 4096

    run(go(), TIMEOUT)


def test_a_pass_through_chain_counts_marks_and_hears_errors_at_every_node():
    """raw (offset 8192) over nbd: the fast write walks through raw into the link in one
    loop. While the link holds the reply both nodes count it in flight and a drain of
    raw waits; then each node's dirty bitmap is marked at its own offset. An error
    reply reaches the listeners of both nodes, innermost first, and then the caller. A
    refusal at the bottom of a chain (a file with aio=threads under raw) leaves no
    count behind and the general path writes the same bytes."""
    d = short_dir()
    shift = 8192

    async def go() -> None:
        for name, s_node in (("ok", None), ("bad", "failing")):
            s_path = os.path.join(d, f"{name}s.raw")
            zero_file(s_path, SIZE)
            sec = Secondary(os.path.join(d, f"{name}.sock"))
            await sec.start(_failing_child(s_path) if s_node else raw_file(s_path), GatedExport)
            g = Graph()
            try:
                top = await g.add(
                    {"driver": "raw", "node-name": "top", "offset": shift,
                     "file": nbd_opts(sec.sock)}
                )  # fmt: skip
                link = g.get_node("link")
                heard: list[str] = []
                marks = {}
                for n in (top, link):
                    n.write_error_listeners.append(lambda e, n=n, h=heard: h.append(n.node_name))
                    bm = DirtyBitmap(4096, n.length)
                    n.dirty_bitmaps.append(bm)
                    marks[n.node_name] = bm
                exp = sec.export
                assert isinstance(exp, GatedExport)
                exp.hold.clear()
                calls: list[Any] = []
                assert top.try_write(4096, b"c" * 4096, False, calls.append) is True
                await wait_until(lambda x=exp: x.arrived == 1)
                drain = asyncio.ensure_future(top.drain())
                for _ in range(50):
                    await asyncio.sleep(0)
                assert not drain.done() and calls == []
                assert top.in_flight() == 1 and link.in_flight() == 1
                assert marks["top"].dirty == set() and marks["link"].dirty == set()
                exp.hold.set()
                await asyncio.wait_for(drain, 10)
                assert top.in_flight() == 0 and link.in_flight() == 0
                assert marks["top"].dirty == {1} and marks["link"].dirty == {3}
                if s_node:
                    assert len(calls) == 1 and calls[0].errno == errno.EIO
                    assert heard == ["link", "top"]
                else:
                    assert calls == [None] and heard == []
            finally:
                await g.close_all()
                await sec.close()
            want = bytes(4096 + shift) + (b"c" * 4096 if not s_node else bytes(4096))
            assert file_bytes(s_path)[: len(want)] == want

        # a refusal at the bottom: nothing counted, the general path writes it
        f_path = os.path.join(d, "threads.raw")
        zero_file(f_path, SIZE)
        g = Graph()
        try:
            top = await g.add(
                {"driver": "raw", "node-name": "top", "offset": shift,
                 "file": {"driver": "file", "node-name": "f", "filename": f_path,
                          "aio": "threads"}}
            )  # fmt: skip
            io = Issuer(top, fast=True)
            await io.write(0, b"t" * 4096)
            assert io.refused == 1 and io.taken == 0
            assert top.in_flight() == 0 and g.get_node("f").in_flight() == 0
            assert fastpath.COUNTERS.fallbacks.get("file: aio=threads, O_DIRECT or FUA") == 1
        finally:
            await g.close_all()
        assert file_bytes(f_path)[: shift + 4096] == bytes(shift) + b"t" * 4096

    try:
        run(go(), TIMEOUT)
    finally:
        remove_dir(d)
