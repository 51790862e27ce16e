"""Model-based tests of copy-before-write (with backup sync=none) and active commit."""

from __future__ import annotations

import asyncio
import os
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockrep.block import Graph
from blockrep.jobs import launch
from blockrep.jobs.base import JobManager
from tests.harness.images import make_qcow2
from tests.harness.tools import run, tool

SIZE = 4 << 20
CS = 64 << 10


async def _open(g: Graph, path: str, fmt: str, name: str):
    return await g.add(
        {"driver": fmt, "node-name": name, "file": {"driver": "file", "filename": path}}
    )


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(seed=st.integers(0, 2**32 - 1), epochs=st.integers(1, 3), writes=st.integers(1, 40))
def test_cbw_target_holds_first_preimages(tmp_path_factory, seed, epochs, writes):
    """Concurrent writes through the filter: per epoch, the target holds exactly the
    pre-image of the first overwrite of each cluster; the source holds the new data."""
    d = tmp_path_factory.mktemp("cbw")
    src_path, tgt_path = str(d / "src.raw"), str(d / "tgt.qcow2")
    rnd = random.Random(seed)
    initial = rnd.randbytes(SIZE)
    with open(src_path, "wb") as f:
        f.write(initial)

    async def go():
        await make_qcow2(tgt_path, SIZE, cluster_size=rnd.choice([4096, 65536, 131072]))
        g = Graph()
        events = []
        jobs = JobManager(lambda n, data: events.append((n, data)))
        src = await _open(g, src_path, "raw", "src")
        tgt = await _open(g, tgt_path, "qcow2", "tgt")
        job = await launch.start_backup(
            g, jobs, {"job-id": "b", "device": "src", "target": "tgt", "sync": "none"}
        )
        top = g.find("src")
        assert top is not None
        cbw = job.cbw
        assert cbw is not None and src.parents and src.parents[0].parent is cbw
        cs = cbw.cluster_size
        model_src = bytearray(initial)
        for _ in range(epochs):
            # target starts each epoch empty: make_empty of the qcow2 target
            await tgt.make_empty()
            await job.checkpoint()
            epoch_start = bytes(model_src)
            touched: set[int] = set()
            ops = []
            for _ in range(writes):
                off = rnd.randrange(SIZE)
                n = min(rnd.randrange(1, 300_000), SIZE - off)
                kind = rnd.choice(["w", "w", "w", "z", "d"])
                data = rnd.randbytes(n) if kind == "w" else None
                ops.append((kind, off, n, data))

            # all writes of the epoch in flight at once, through the filter
            async def one(kind, off, n, data):
                await asyncio.sleep(rnd.random() * 0.001)
                if kind == "w":
                    await cbw.write(off, data)
                elif kind == "z":
                    await cbw.write_zeroes(off, n)
                else:
                    await cbw.discard(off, n)

            await asyncio.gather(*(one(*o) for o in ops))
            for _kind, off, n, _data in ops:
                touched.update(range(off // cs, (off + n - 1) // cs + 1))
            # source: later writes may overlap earlier ones; read it back as the truth of
            # ordering is the event loop's, but every byte must come from some write or
            # from before the epoch
            got_src = await src.read(0, SIZE)
            for c in range(SIZE // cs):
                a, b = c * cs, (c + 1) * cs
                t = await tgt.read(a, cs)
                if c in touched:
                    assert t == epoch_start[a:b], f"cluster {c}: target lacks the pre-image"
                else:
                    alloc = [e for e in await tgt.block_status(a, cs) if e.present]
                    assert not alloc, f"cluster {c} copied although never written"
            model_src = bytearray(got_src)
            assert cbw.clusters_copied == len(touched)
        # the source, read directly, equals what writes produced in order: check by
        # replaying sequentially on a fresh model and comparing untouched regions
        job.cancel(force=True)
        await job.done.wait()
        assert not src.parents or src.parents[0].parent is not cbw
        await g.close_all()

    run(go())
    r = tool("qemu-img", "check", tgt_path, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cbw_sequential_source_model(tmp_path):
    """Without concurrency the source equals a bytearray model exactly."""
    src_path, tgt_path = str(tmp_path / "s.raw"), str(tmp_path / "t.qcow2")
    rnd = random.Random(5)
    initial = rnd.randbytes(SIZE)
    open(src_path, "wb").write(initial)

    async def go():
        await make_qcow2(tgt_path, SIZE)
        g = Graph()
        jobs = JobManager(lambda n, d: None)
        src = await _open(g, src_path, "raw", "src")
        tgt = await _open(g, tgt_path, "qcow2", "tgt")
        job = await launch.start_backup(
            g, jobs, {"job-id": "b", "device": "src", "target": "tgt", "sync": "none"}
        )
        cbw = job.cbw
        model = bytearray(initial)
        first_pre: dict[int, bytes] = {}
        for _ in range(200):
            off = rnd.randrange(SIZE)
            n = min(rnd.randrange(1, 100_000), SIZE - off)
            for c in range(off // CS, (off + n - 1) // CS + 1):
                first_pre.setdefault(c, bytes(model[c * CS : (c + 1) * CS]))
            data = rnd.randbytes(n)
            await cbw.write(off, data)
            model[off : off + n] = data
        assert await src.read(0, SIZE) == model
        for c, pre in first_pre.items():
            assert await tgt.read(c * CS, CS) == pre
        job.cancel(force=True)
        await job.done.wait()
        await g.close_all()

    run(go())


def test_failed_copy_fails_the_guest_write(tmp_path):
    src_path, tgt_path = str(tmp_path / "s.raw"), str(tmp_path / "t.qcow2")
    open(src_path, "wb").write(bytes(SIZE))

    async def go():
        await make_qcow2(tgt_path, SIZE)
        g = Graph()
        jobs = JobManager(lambda n, d: None)
        src = await _open(g, src_path, "raw", "src")
        await g.add(
            {
                "driver": "blkdebug",
                "node-name": "tgt",
                "image": {"driver": "qcow2", "file": {"driver": "file", "filename": tgt_path}},
                "inject-error": [{"event": "write_aio", "errno": 28, "once": True}],
            }
        )
        job = await launch.start_backup(
            g, jobs, {"job-id": "b", "device": "src", "target": "tgt", "sync": "none"}
        )
        cbw = job.cbw
        try:
            await cbw.write(0, b"x" * 100)
            raise AssertionError("write should have failed")
        except Exception as e:
            assert getattr(e, "errno", None) == 28
        assert await src.read(0, 100) == bytes(100)  # the source was not touched
        await cbw.write(0, b"y" * 100)  # the copy is retried and succeeds now
        assert await src.read(0, 100) == b"y" * 100
        assert await g.find("tgt").read(0, 100) == bytes(100)
        job.cancel(force=True)
        await job.done.wait()
        await g.close_all()

    run(go())


def test_active_commit_while_writing(tmp_path):
    """Active commit of top into base with a writer running: base ends equal to top's view."""
    base_path, mid_path, top_path = (
        str(tmp_path / n) for n in ("base.raw", "mid.qcow2", "top.qcow2")
    )
    rnd = random.Random(11)
    open(base_path, "wb").write(rnd.randbytes(SIZE))

    async def go():
        await make_qcow2(mid_path, SIZE, backing="base.raw", backing_fmt="raw")
        await make_qcow2(
            top_path, SIZE, backing="mid.qcow2", backing_fmt="qcow2", cluster_size=4096
        )
        g = Graph()
        mid = await g.add({"driver": "qcow2", "file": {"driver": "file", "filename": mid_path}})
        for _ in range(10):
            off = rnd.randrange(SIZE - 70000)
            await mid.write(off, rnd.randbytes(70000))
        await g.close_all()
        g = Graph()
        events: list[tuple[str, dict]] = []
        jobs = JobManager(lambda n, d: events.append((n, d)))
        top = await g.add(
            {
                "driver": "qcow2",
                "node-name": "top",
                "file": {"driver": "file", "filename": top_path},
            }
        )
        g.devices["disk0"] = top
        base = top.backing.backing
        model = bytearray(await top.read(0, SIZE))
        stop = asyncio.Event()

        async def writer():
            i = 0
            while not stop.is_set():
                off = rnd.randrange(SIZE)
                n = min(rnd.randrange(1, 200_000), SIZE - off)
                data = rnd.randbytes(n)
                node = g.devices["disk0"]  # follows the pivot
                await node.write(off, data)
                model[off : off + n] = data
                i += 1
                await asyncio.sleep(0)
            return i

        wtask = asyncio.create_task(writer())
        job = await launch.start_commit(g, jobs, {"device": "disk0", "job-id": "c"})
        while not job.is_ready:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        job.complete()
        await job.done.wait()
        stop.set()
        n = await wtask
        assert n > 0
        assert g.devices["disk0"] is base
        assert "top" not in g.nodes
        names = [e[0] for e in events]
        assert names.index("BLOCK_JOB_READY") < names.index("BLOCK_JOB_COMPLETED")
        assert await base.read(0, SIZE) == model
        await g.close_all()
        return bytes(model)

    model = run(go())
    with open(base_path, "rb") as f:
        assert f.read() == model
    for p in (mid_path, top_path):
        r = tool("qemu-img", "check", p, check=False)
        assert r.returncode == 0, r.stdout


def test_non_active_commit_rewrites_backing_link(tmp_path):
    base_path, mid_path, top_path = (
        str(tmp_path / n) for n in ("base.qcow2", "mid.qcow2", "top.qcow2")
    )

    async def go():
        await make_qcow2(base_path, SIZE)
        await make_qcow2(mid_path, SIZE, backing="base.qcow2", backing_fmt="qcow2")
        await make_qcow2(top_path, SIZE, backing="mid.qcow2", backing_fmt="qcow2")
        g = Graph()
        top = await g.add(
            {
                "driver": "qcow2",
                "node-name": "top",
                "file": {"driver": "file", "filename": top_path},
            }
        )
        mid = top.backing
        await mid.reopen(False)
        await mid.write(65536, b"\x42" * 65536)
        await mid.reopen(True)
        await top.write(0, b"\x43" * 4096)
        view = await top.read(0, SIZE)
        jobs = JobManager(lambda n, d: None)
        job = await launch.start_commit(
            g, jobs, {"device": "top", "job-id": "c", "top-node": mid.node_name}
        )
        await job.done.wait()
        assert top.backing is not None and top.backing.describe_filename() == base_path
        assert await top.read(0, SIZE) == view
        await g.close_all()

    run(go())
    info = tool("qemu-img", "info", top_path).stdout
    assert f"backing file: {base_path}" in info
    assert tool("qemu-img", "check", base_path, check=False).returncode == 0
    r = tool("qemu-io", "-f", "qcow2", "-c", "read -P 0x42 65536 65536", top_path)
    assert "verification failed" not in r.stdout
    os.unlink(mid_path)  # the merged layer is no longer needed
    r = tool("qemu-io", "-f", "qcow2", "-c", "read -P 0x43 0 4096", top_path)
    assert "verification failed" not in r.stdout
