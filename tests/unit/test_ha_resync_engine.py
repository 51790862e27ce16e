"""The background resync engine (blockrep/ha/resync.py, CONTINUITY §4 "Resync"): region
copies between two raw files, checksums first, new writes on the source during the copy,
progress for status (§8), the rate limit with a floor, pause/resume, and ``on_done``
only after the target's flush. Every test ends comparing both files byte for byte."""

from __future__ import annotations

import asyncio
import collections
import random
import time
from typing import Any

import pytest

from blockrep.block import Graph
from blockrep.block.node import DirtyBitmap, Node
from blockrep.errors import BlockError
from blockrep.ha.bitmap import REGION_SIZE as RS
from blockrep.ha.ratelimit import effective_rate, eta
from blockrep.ha.resync import (
    Resync,
    ResyncOptions,
    ResyncProgress,
    SyncKind,
    SyncProgress,
    copy_chunks,
    digests_of,
    region_digest,
)

SIZE = 8 * RS + 300_000  # nine regions, the last one short
NREG = 9


class Pair:
    """Two raw files opened as nodes; ``writes``/``flushes`` record the target's I/O."""

    def __init__(self, tmp_path: Any, src_bytes: bytes, dst_bytes: bytes) -> None:
        self.src_path, self.dst_path = str(tmp_path / "src.raw"), str(tmp_path / "dst.raw")
        for p, b in ((self.src_path, src_bytes), (self.dst_path, dst_bytes)):
            with open(p, "wb") as f:
                f.write(b)
        self.g = Graph()
        self.writes: list[int] = []  # region of each write to dst
        self.unflushed: set[int] = set()  # regions written to dst since its last flush
        self.flushes = 0

    async def open(self) -> tuple[Node, Node]:
        async def raw(name: str, path: str) -> Node:
            return await self.g.add(
                {"driver": "raw", "node-name": name, "file": {"driver": "file", "filename": path}}
            )

        self.src, self.dst = await raw("src", self.src_path), await raw("dst", self.dst_path)
        write, flush = self.dst.write, self.dst.flush

        async def counted_write(offset: int, data: bytes | memoryview, fua: bool = False) -> None:
            await write(offset, data, fua)
            self.writes.append(offset // RS)
            self.unflushed.add(offset // RS)

        async def counted_flush() -> None:
            pending = set(self.unflushed)
            await flush()
            self.unflushed -= pending
            self.flushes += 1

        self.dst.write = counted_write  # type: ignore[method-assign]
        self.dst.flush = counted_flush  # type: ignore[method-assign]
        return self.src, self.dst

    def track(self, granularity: int = RS) -> DirtyBitmap:
        bm = DirtyBitmap(granularity, self.src.length)
        self.src.dirty_bitmaps.append(bm)
        return bm

    async def files(self) -> tuple[bytes, bytes]:
        await self.g.close_all()
        with open(self.src_path, "rb") as a, open(self.dst_path, "rb") as b:
            return a.read(), b.read()


def _region(data: bytes, r: int) -> bytes:
    return data[r * RS : (r + 1) * RS]


@pytest.fixture
def images() -> tuple[bytes, bytes]:
    rnd = random.Random(7)
    return rnd.randbytes(SIZE), rnd.randbytes(SIZE)


async def test_copies_exactly_the_listed_regions(tmp_path, images) -> None:
    a, b = images
    pair = Pair(tmp_path, a, b)
    src, dst = await pair.open()
    listed = [8, 0, 3, 3, 100]  # 100 is past the end: ignored; 8 is the short last one
    progress = ResyncProgress()
    await Resync(src, dst, listed, options=ResyncOptions(), progress=progress).run()
    assert sorted(pair.writes) == [0, 3, 8]
    assert progress.done_bytes == progress.total_bytes == 2 * RS + 300_000
    assert progress.percent == 100.0 and progress.saved_by_checksums == 0
    sa, sb = await pair.files()
    want = bytearray(b)
    for r in (0, 3, 8):
        want[r * RS : (r + 1) * RS] = _region(a, r)
    assert sb == bytes(want) and sa == a


async def test_whole_disk_then_identical(tmp_path, images) -> None:
    a, b = images
    pair = Pair(tmp_path, a, b)
    src, dst = await pair.open()
    engine = Resync(src, dst, range(NREG), options=ResyncOptions(batch=4, depth=3))
    await engine.run()
    await engine.final_pass()
    assert sorted(pair.writes) == list(range(NREG))
    sa, sb = await pair.files()
    assert sa == sb == a


async def test_checksums_first_sends_only_differing_regions(tmp_path, images) -> None:
    a, _ = images
    b = bytearray(a)
    for r in (2, 5, 8):  # 8: a difference in the short last region
        b[r * RS + 17] ^= 0xFF
    pair = Pair(tmp_path, a, bytes(b))
    src, dst = await pair.open()
    asked: list[list[int]] = []

    async def peer(regions: list[int]) -> list[str]:
        asked.append(list(regions))
        return await digests_of(dst, regions)

    progress = ResyncProgress()
    opts = ResyncOptions(batch=4)
    await Resync(src, dst, range(NREG), options=opts, progress=progress, peer_digests=peer).run()
    assert sorted(pair.writes) == [2, 5, 8]
    assert progress.saved_by_checksums == 6 * RS  # six equal full regions
    assert progress.done_bytes == progress.total_bytes == SIZE
    assert [len(x) for x in asked] == [4, 4, 1]  # one round trip per batch
    assert progress.as_dict()["saved-by-checksums"] == 6 * RS
    sa, sb = await pair.files()
    assert sa == sb == a


async def test_without_peer_digests_everything_is_sent(tmp_path, images) -> None:
    a, _ = images
    pair = Pair(tmp_path, a, a)
    src, dst = await pair.open()
    progress = ResyncProgress()
    await Resync(src, dst, range(NREG), options=ResyncOptions(), progress=progress).run()
    assert sorted(pair.writes) == list(range(NREG)) and progress.saved_by_checksums == 0
    sa, sb = await pair.files()
    assert sa == sb == a


async def test_digests_of_matches_region_digest(tmp_path, images) -> None:
    a, b = images
    pair = Pair(tmp_path, a, b)
    src, _ = await pair.open()
    got = await digests_of(src, [0, 8])
    assert got == [region_digest(_region(a, 0)), region_digest(_region(a, 8))]
    assert len(_region(a, 8)) == 300_000
    await pair.files()


@pytest.mark.parametrize("granularity", [64 << 10, RS, 4 * RS])
async def test_a_write_completing_after_the_read_is_copied_again(
    tmp_path, images, granularity
) -> None:
    """The dirty bit is cleared before the region is read: a write that lands after the
    read marks the region again and run() copies it again."""
    a, b = images
    pair = Pair(tmp_path, a, b)
    src, dst = await pair.open()
    dirty = pair.track(granularity)
    read, write = src.read, src.write
    late = b"L" * 5000
    fired: list[int] = []

    async def read_then_write(offset: int, nbytes: int) -> bytes:
        data = await read(offset, nbytes)
        if offset == 4 * RS and not fired:
            fired.append(1)
            await write(4 * RS + 1000, late)  # completes after the read: marks region 4
        return data

    src.read = read_then_write  # type: ignore[method-assign]
    progress = ResyncProgress()
    opts = ResyncOptions(final_threshold=0)
    await Resync(src, dst, range(NREG), options=opts, progress=progress, dirty=dirty).run()
    assert fired and pair.writes.count(4) == 2 and dirty.count() == 0
    again = max(granularity, RS)  # a bitmap chunk wider than a region brings its neighbours
    assert progress.total_bytes == SIZE + again == progress.done_bytes
    sa, sb = await pair.files()
    assert sa == sb and sa[4 * RS + 1000 : 4 * RS + 6000] == late


@pytest.mark.parametrize("seed", range(10))
async def test_concurrent_writer_then_final_pass(tmp_path, images, seed) -> None:
    a, other = images
    rnd = random.Random(seed)
    initial = [r for r in range(NREG) if rnd.random() < 0.6]
    b = bytearray(a)  # the target differs from the source in the listed regions only
    for r in initial:
        b[r * RS : (r + 1) * RS] = _region(other, r)
    pair = Pair(tmp_path, a, bytes(b))
    src, dst = await pair.open()
    dirty = pair.track()
    checksums = seed % 2 == 0
    opts = ResyncOptions(
        batch=rnd.choice([1, 3, 16]),
        depth=rnd.choice([1, 4]),
        final_threshold=rnd.choice([0, 2, 3]),
    )
    reported: collections.Counter[int] = collections.Counter()
    percents: list[float] = []
    progress = ResyncProgress()

    def on_done(regions: list[int]) -> None:
        assert not set(regions) & pair.unflushed  # durable on the target first
        reported.update(regions)
        percents.append(progress.percent)

    async def peer(regions: list[int]) -> list[str]:
        return await digests_of(dst, regions)

    stop = asyncio.Event()
    writes = 0
    hot = rnd.sample(range(NREG), rnd.choice([1, 2, NREG]))  # where the consumer writes
    touched: set[int] = set()

    async def writer(count: int) -> None:
        nonlocal writes
        while not stop.is_set() and writes < count:
            r = rnd.choice(hot)
            off = r * RS + rnd.randrange(min(RS, SIZE - r * RS) - 1)
            n = rnd.randint(1, min(200_000, SIZE - off))
            await src.write(off, rnd.randbytes(n))
            touched.update(range(off // RS, (off + n - 1) // RS + 1))
            writes += 1
            await asyncio.sleep(rnd.choice([0, 0, 0.001]))

    engine = Resync(
        src,
        dst,
        initial,
        options=opts,
        progress=progress,
        peer_digests=peer if checksums else None,
        dirty=dirty,
        on_done=on_done,
    )
    w = asyncio.ensure_future(writer(rnd.randint(50, 400)))
    try:
        await asyncio.sleep(0)
        await asyncio.wait_for(engine.run(), timeout=60)  # at worst once the writer is done
        writes_during_run = writes
        await asyncio.sleep(0.05)  # the writer may go on a little: final_pass takes it all
    finally:
        stop.set()  # the consumer is quiesced
        await w
    assert writes_during_run > 0
    total_before = progress.total_bytes
    await engine.final_pass()
    assert progress.total_bytes >= total_before
    assert progress.done_bytes == progress.total_bytes and progress.percent == 100.0
    assert dirty.count() == 0 and engine.pending == 0
    assert percents == sorted(percents) and all(0 <= p <= 100 for p in percents)
    assert sum(reported.values()) <= pair.flushes * opts.batch * 2 + NREG
    assert set(initial) <= set(reported)
    assert not set(pair.writes) - set(initial) - touched  # nothing else copied
    sa, sb = await pair.files()
    assert sa == sb


@pytest.mark.parametrize("seed", range(4))
async def test_run_cancelled_mid_batch_then_final_pass(tmp_path, images, seed) -> None:
    """The pairing gives up chasing a busy writer and cancels run() mid-batch: the
    regions whose dirty bits that batch cleared must still be copied by final_pass."""
    a, other = images
    pair = Pair(tmp_path, a, other)  # every region differs
    src, dst = await pair.open()
    dirty = pair.track()
    rnd = random.Random(seed)
    stop = asyncio.Event()

    async def writer() -> None:
        while not stop.is_set():
            r = rnd.randrange(NREG)
            off = r * RS + rnd.randrange(max(1, min(RS, SIZE - r * RS) - 4096))
            await src.write(off, rnd.randbytes(4096))
            await asyncio.sleep(0)

    engine = Resync(
        src, dst, range(NREG), options=ResyncOptions(batch=4, depth=2, rate=8 << 20), dirty=dirty
    )
    w = asyncio.ensure_future(writer())
    run = asyncio.ensure_future(engine.run())
    await asyncio.sleep(0.1 + seed * 0.05)
    stop.set()  # the consumer is quiesced first, then the chase is given up
    await w
    await asyncio.sleep(0.6)  # a batch (4 MiB at 8 MiB/s) began after the last write
    assert not run.done()  # rate-limited: a batch is in flight
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    await engine.final_pass()
    sa, sb = await pair.files()
    assert sa == sb


async def test_run_stops_chasing_a_writer_faster_than_the_copy(tmp_path, images) -> None:
    """A consumer that rewrites every region as fast as they are copied: run() must not
    chase it for ever (each lap would send the same regions again); it returns with the
    writer still going, and final_pass (the consumer held) makes the disks equal."""
    a, other = images
    pair = Pair(tmp_path, a, other)
    src, dst = await pair.open()
    dirty = pair.track()
    stop = asyncio.Event()
    rnd = random.Random(3)

    async def writer() -> None:
        while not stop.is_set():
            for r in range(NREG):
                off = r * RS + rnd.randrange(max(1, min(RS, SIZE - r * RS) - 512))
                await src.write(off, rnd.randbytes(512))
            await asyncio.sleep(0)

    engine = Resync(
        src, dst, range(NREG), options=ResyncOptions(batch=2, final_threshold=0), dirty=dirty
    )
    w = asyncio.ensure_future(writer())
    try:
        await asyncio.wait_for(engine.run(), timeout=30)
        assert not w.done()  # it returned while the writer still wrote
        assert engine.progress.percent < 100.0  # not done: the final pass is
    finally:
        stop.set()
        await w
    await engine.final_pass()
    assert engine.progress.percent == 100.0
    sa, sb = await pair.files()
    assert sa == sb


async def test_progress_total_grows_percent_monotone(tmp_path, images) -> None:
    a, b = images
    pair = Pair(tmp_path, a, b)
    src, dst = await pair.open()
    dirty = pair.track()
    progress = ResyncProgress(direction="peer-to-local")
    seen: list[tuple[float, int, int]] = []
    write = src.write

    def on_done(regions: list[int]) -> None:
        seen.append((progress.percent, progress.done_bytes, progress.total_bytes))

    engine = Resync(
        src,
        dst,
        [0, 1],
        options=ResyncOptions(batch=1, final_threshold=0),
        progress=progress,
        dirty=dirty,
        on_done=on_done,
    )
    assert progress.total_bytes == 2 * RS and progress.percent == 0.0
    await write(6 * RS, b"x" * 10)  # a new write before the copy: region 6 joins
    await write(8 * RS + 5, b"y" * 10)  # and the short last region
    await engine.run()
    assert progress.total_bytes == 3 * RS + 300_000 == progress.done_bytes
    assert [s[2] for s in seen] == sorted(s[2] for s in seen) and seen[0][2] == 2 * RS
    assert [s[0] for s in seen] == sorted(s[0] for s in seen)
    assert seen[0][0] == 50.0  # 50 % first, never back below it
    # 100 only once the engine is done: done == total between batches is not the end
    assert all(pct < 100.0 for pct, _, _ in seen), seen
    d = progress.as_dict()
    assert set(d) == {
        "direction",
        "done-bytes",
        "total-bytes",
        "percent",
        "rate",
        "eta",
        "saved-by-checksums",
        "paused",
    }
    assert d["direction"] == "peer-to-local" and d["percent"] == 100.0 and d["paused"] is False
    sa, sb = await pair.files()
    for r in (0, 1, 6, 8):
        assert _region(sa, r) == _region(sb, r)


async def test_rate_limit_is_a_lower_bound_on_time(tmp_path, images) -> None:
    a, b = images
    pair = Pair(tmp_path, a, b)
    src, dst = await pair.open()
    opts = ResyncOptions(rate=4 * RS, checksums=False)
    t0 = time.monotonic()
    await Resync(src, dst, range(8), options=opts).run()  # 8 MiB at 4 MiB/s
    assert time.monotonic() - t0 >= 1.5
    sa, sb = await pair.files()
    assert sa[: 8 * RS] == sb[: 8 * RS]


async def test_a_busy_consumer_slows_the_copy_down_to_the_floor(tmp_path, images) -> None:
    a, b = images
    pair = Pair(tmp_path, a, b)
    src, dst = await pair.open()
    opts = ResyncOptions(rate=8 * RS, min_rate=2 * RS, checksums=False, batch=1)
    engine = Resync(src, dst, range(3), options=opts, consumer_busy=lambda: 7 * RS)
    assert engine.current_rate() == 2 * RS
    t0 = time.monotonic()
    await engine.run()  # 3 MiB at 2 MiB/s: the first region free, then 0.5 s each
    assert time.monotonic() - t0 >= 0.9
    sa, sb = await pair.files()
    assert sa[: 3 * RS] == sb[: 3 * RS]


async def test_nothing_to_copy_is_done(tmp_path, images) -> None:
    a, b = images
    pair = Pair(tmp_path, a, b)
    src, dst = await pair.open()
    progress = ResyncProgress()
    await Resync(src, dst, [], progress=progress, dirty=pair.track()).run()
    assert progress.percent == 100.0 and progress.total_bytes == 0 and pair.flushes == 0
    await pair.files()


async def test_pause_stops_progress_until_resume(tmp_path, images) -> None:
    a, b = images
    pair = Pair(tmp_path, a, b)
    src, dst = await pair.open()
    progress = ResyncProgress()
    engine = Resync(
        src, dst, range(NREG), options=ResyncOptions(rate=4 * RS, batch=2), progress=progress
    )
    task = asyncio.ensure_future(engine.run())
    while progress.done_bytes == 0:
        await asyncio.sleep(0.01)
    engine.pause()
    assert progress.paused and progress.as_dict()["paused"] is True
    await asyncio.sleep(0.7)  # regions already past the pause check finish
    held = progress.done_bytes
    await asyncio.sleep(0.8)
    assert progress.done_bytes == held < SIZE and not task.done()
    assert progress.rate == 0 and progress.eta is None
    engine.set_rate(0)  # and unlimited from now on
    engine.resume()
    await asyncio.wait_for(task, 30)
    assert progress.done_bytes == SIZE and not progress.paused
    sa, sb = await pair.files()
    assert sa == sb


async def test_on_done_after_flush_once_per_region(tmp_path, images) -> None:
    a, b = images
    pair = Pair(tmp_path, a, b)
    src, dst = await pair.open()
    calls: list[list[int]] = []

    def on_done(regions: list[int]) -> None:
        assert pair.flushes > 0 and not set(regions) & pair.unflushed
        calls.append(regions)

    engine = Resync(src, dst, range(NREG), options=ResyncOptions(batch=4, depth=2), on_done=on_done)
    await engine.run()
    await engine.final_pass()  # nothing left: no call
    assert len(calls) == 3 and pair.flushes == 3
    assert sorted(r for c in calls for r in c) == list(range(NREG))
    sa, sb = await pair.files()
    assert sa == sb


async def test_errors_propagate_and_leave_the_batch_unreported(tmp_path, images) -> None:
    a, b = images
    pair = Pair(tmp_path, a, b)
    src, dst = await pair.open()
    write = dst.write
    calls: list[list[int]] = []

    async def failing(offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        if offset == 5 * RS:
            raise BlockError(5, "peer gone")
        await write(offset, data, fua)

    dst.write = failing  # type: ignore[method-assign]
    engine = Resync(src, dst, range(NREG), options=ResyncOptions(batch=4), on_done=calls.append)
    with pytest.raises(BlockError, match="peer gone"):
        await engine.run()
    assert calls == [[0, 1, 2, 3]]  # the failed batch's regions stay to do
    await pair.files()


async def test_copy_chunks_wrapper(tmp_path, images) -> None:
    a, b = images
    pair = Pair(tmp_path, a, b)
    src, dst = await pair.open()
    progress = SyncProgress(SyncKind.INITIAL, total=NREG * RS)
    await copy_chunks(src, dst, list(range(NREG)), progress)
    assert progress.current == progress.total and pair.unflushed == set()
    sa, sb = await pair.files()
    assert sa == sb


def test_effective_rate_floor_and_ceiling() -> None:
    assert effective_rate(0, 0) == 0 and effective_rate(0, 5 << 20, 1 << 30) == 0  # unlimited
    assert effective_rate(10 << 20, 0, 0) == 10 << 20
    assert effective_rate(10 << 20, 0, 4 << 20) == 6 << 20  # the consumer's share comes off
    assert effective_rate(10 << 20, 3 << 20, 9 << 20) == 3 << 20  # down to the floor
    assert effective_rate(10 << 20, 0, 1 << 30) == (10 << 20) // 16  # never to zero
    assert effective_rate(10 << 20, 20 << 20, 0) == 10 << 20  # the ceiling wins
    assert eta(0, 0) == 0.0 and eta(10, 0) is None and eta(10 << 20, 4 << 20) == 2.5
