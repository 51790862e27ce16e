"""The primary's activity log (CONTINUITY.md §3, I1): record codec byte for byte, the
ring's crash recovery, group commit, eviction rules, and a model-based check that the
durable set always holds every region with a write the secondary has not acknowledged."""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockrep.ha.activity_log import (
    MAX_LIMIT,
    PAGE,
    RING_SIZE,
    SLOTS,
    ActivityLog,
    ActivityLogError,
    RingFile,
    convert,
    decode_record,
    encode_record,
    load,
    scan_ring,
    slot_offset,
)

R = 4096  # region size in most tests: small numbers, same code


class MemRing:
    """A RecordWriter over a bytearray: counts durable writes, can hold or fail them."""

    def __init__(self) -> None:
        self.data = bytearray(RING_SIZE)
        self.syncs = 0
        self.gate: threading.Event | None = None
        self.fail: OSError | None = None

    def write_record(self, offset: int, data: bytes) -> None:
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.fail is not None:
            raise self.fail
        self.data[offset : offset + len(data)] = data
        self.syncs += 1

    def close(self) -> None:
        pass

    def crash_view(self) -> frozenset[int]:
        return scan_ring(bytes(self.data)).newest.regions


def make(limit: int = 8, on_full: Callable[[], None] | None = None) -> tuple[ActivityLog, MemRing]:
    ring = MemRing()
    return ActivityLog(ring, region_size=R, limit=limit, offload=False, on_full=on_full), ring


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def write(al: ActivityLog, region: int, span: int = 1) -> None:
    await al.begin_write(region * R, span * R)
    al.end_write(region * R, span * R)


# -- the record codec: byte for byte ------------------------------------------------------------


def test_record_bytes() -> None:
    rec = encode_record(1, 1 << 20, [5, 1, 5])
    assert rec[:32] == bytes.fromhex(
        "4252414c"  # magic "BRAL"
        "0001"  # version 1
        "14"  # region shift 20: 1 MiB
        "00"  # reserved
        "0000000000000001"  # sequence 1
        "00000002"  # two regions, ascending, deduplicated
        "00000001"
        "00000005"
        "50b860f9"  # crc32 of everything before it
    )
    assert len(rec) == PAGE and rec[32:] == bytes(PAGE - 32)


def test_empty_record_bytes() -> None:
    rec = encode_record(258, 65536, [])
    assert rec[:24] == bytes.fromhex("4252414c00011000000000000000010200000000294930a1")
    assert rec[24:] == bytes(PAGE - 24)


def test_record_round_trip_and_capacity() -> None:
    regs = frozenset(range(0, 3 * MAX_LIMIT, 3))
    r = decode_record(encode_record(7, 1 << 22, regs))
    assert r is not None and (r.seq, r.region_size, r.regions) == (7, 1 << 22, regs)
    assert MAX_LIMIT == 1018
    with pytest.raises(ActivityLogError):
        encode_record(1, R, range(MAX_LIMIT + 1))
    with pytest.raises(ActivityLogError):
        encode_record(1, R, [2**32])


def test_every_flipped_byte_is_refused() -> None:
    rec = encode_record(3, R, [0, 7, 9])
    for i in range(32):
        bad = bytearray(rec)
        bad[i] ^= 0x40
        assert decode_record(bytes(bad)) is None, i


def test_unsorted_regions_are_refused_even_with_a_good_crc() -> None:
    body = struct.pack(">4sHBBQI", b"BRAL", 1, 12, 0, 1, 2) + struct.pack(">2I", 9, 3)
    assert decode_record(body + struct.pack(">I", zlib.crc32(body))) is None
    body = struct.pack(">4sHBBQI", b"BRAL", 1, 12, 0, 1, 2) + struct.pack(">2I", 3, 9)
    assert decode_record(body + struct.pack(">I", zlib.crc32(body))) is not None


def test_slots_wrap() -> None:
    assert [slot_offset(s) for s in (1, 2, SLOTS, SLOTS + 1)] == [0, PAGE, (SLOTS - 1) * PAGE, 0]


def test_convert_covers_the_same_bytes() -> None:
    assert convert({1}, 1 << 20, 1 << 18) == {4, 5, 6, 7}
    assert convert({4, 5, 9}, 1 << 18, 1 << 20) == {1, 2}


# -- the ring: crash recovery ---------------------------------------------------------------


def ring_with(*records: tuple[int, list[int]]) -> bytearray:
    data = bytearray(RING_SIZE)
    for seq, regs in records:
        data[slot_offset(seq) : slot_offset(seq) + PAGE] = encode_record(seq, R, regs)
    return data


def test_empty_ring_has_no_active_regions() -> None:
    rec = scan_ring(bytes(RING_SIZE))
    assert (rec.newest.seq, rec.newest.regions, rec.torn) == (0, frozenset(), False)
    # a crash while the file was being made leaves it short: the rest reads as zeros
    assert scan_ring(b"").newest.seq == 0


def test_newest_record_wins_across_a_wrapped_ring() -> None:
    data = ring_with(*[(s, [s]) for s in range(1, SLOTS + 4)])
    rec = scan_ring(bytes(data))
    assert (rec.newest.seq, rec.newest.regions, rec.torn) == (SLOTS + 3, {SLOTS + 3}, False)


@pytest.mark.parametrize("written", [16, 100, 2000, 3600])
def test_a_torn_last_record_is_ignored_and_the_one_before_used(written: int) -> None:
    data = ring_with(*[(s, [s, 100]) for s in range(1, SLOTS + 2)])  # seq 9 overwrote slot 0
    seq = SLOTS + 2  # goes over seq 2's slot, torn after `written` bytes
    off = slot_offset(seq)
    data[off : off + written] = encode_record(seq, R, range(900))[:written]  # 3628 bytes
    rec = scan_ring(bytes(data))
    assert (rec.newest.seq, rec.newest.regions, rec.torn) == (SLOTS + 1, {SLOTS + 1, 100}, True)


@pytest.mark.parametrize(("written", "seq"), [(1, SLOTS + 1), (3628, SLOTS + 2)])
def test_a_write_torn_outside_the_record_leaves_a_valid_one(written: int, seq: int) -> None:
    # torn before its first changed byte: the old record stands; after its last
    # checksummed byte: the new one is whole (the padding is not part of it)
    data = ring_with(*[(s, [s, 100]) for s in range(1, SLOTS + 2)])
    off = slot_offset(SLOTS + 2)
    data[off : off + written] = encode_record(SLOTS + 2, R, range(900))[:written]
    rec = scan_ring(bytes(data))
    assert (rec.newest.seq, rec.torn) == (seq, False)


def test_two_bad_slots_are_corruption_named_by_slot() -> None:
    data = ring_with((1, [1]), (2, [2]), (3, [3]))
    data[5] ^= 1
    data[PAGE + 5] ^= 1
    with pytest.raises(ActivityLogError, match=r"x: slots \[0, 1\] are corrupt"):
        scan_ring(bytes(data), "x")
    with pytest.raises(ActivityLogError, match="not a ring"):
        scan_ring(bytes(RING_SIZE + 1), "x")


def test_a_record_in_the_wrong_slot_is_bad() -> None:
    data = bytearray(RING_SIZE)
    data[0:PAGE] = encode_record(2, R, [1])  # seq 2 belongs in slot 1
    assert scan_ring(bytes(data)).torn


class CountingRingFile(RingFile):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.syncs = 0

    def write_record(self, offset: int, data: bytes) -> None:
        super().write_record(offset, data)
        self.syncs += 1


async def test_crash_recovery_from_a_torn_ring_file(tmp_path: Path) -> None:
    path = str(tmp_path / "al")
    al = ActivityLog.open(path, region_size=R, limit=8)
    for n in (3, 1, 4):
        await write(al, n)
    await al.aclose()
    assert os.path.getsize(path) == RING_SIZE
    assert load(path).newest.regions == {1, 3, 4} and load(path).newest.seq == 3
    # the next commit was torn by a crash: half its page reached the disk
    with open(path, "r+b") as f:
        f.seek(slot_offset(4))
        f.write(encode_record(4, R, [1, 3, 4, 7])[:30])
    rec = load(path)
    assert (rec.newest.seq, rec.newest.regions, rec.torn) == (3, {1, 3, 4}, True)
    al = ActivityLog.open(path, region_size=R, limit=8)
    assert al.regions() == {1, 3, 4}  # what crash-recovery resync must copy
    await write(al, 7)  # rewrites the torn slot with seq 4
    await al.aclose()
    assert load(path).newest.seq == 4 and load(path).newest.regions == {1, 3, 4, 7}
    assert not load(path).torn


async def test_open_converts_another_region_size(tmp_path: Path) -> None:
    path = str(tmp_path / "al")
    al = ActivityLog.open(path, region_size=1 << 20, limit=8)
    await al.begin_write(5 << 20, 1)
    al.end_write(5 << 20, 1)
    await al.aclose()
    al = ActivityLog.open(path, region_size=1 << 21, limit=8)
    assert al.regions() == {2}
    await al.aclose()


def test_missing_file_is_an_empty_log(tmp_path: Path) -> None:
    assert load(str(tmp_path / "none")).newest.regions == frozenset()


# -- group commit ---------------------------------------------------------------------------------


async def test_concurrent_cold_writes_share_one_fsync(tmp_path: Path) -> None:
    ring = CountingRingFile(str(tmp_path / "al"))
    al = ActivityLog(ring, region_size=R, limit=64)  # offloaded to a thread, as in production
    await asyncio.gather(*(al.begin_write(n * R, 512) for n in range(50)))
    assert (al.commits, ring.syncs) == (1, 1)
    assert al.regions() == set(range(50)) == load(str(tmp_path / "al")).newest.regions
    for n in range(50):
        al.end_write(n * R, 512)
    await al.aclose()


async def test_writes_arriving_during_a_commit_share_the_next_one() -> None:
    ring = MemRing()
    ring.gate = threading.Event()
    al = ActivityLog(ring, region_size=R, limit=64)
    first = asyncio.create_task(write(al, 0))
    await asyncio.sleep(0.05)  # the commit for region 0 is in its worker thread now
    later = [asyncio.create_task(write(al, n)) for n in range(1, 11)]
    await asyncio.sleep(0.05)
    assert not first.done() and not any(t.done() for t in later)
    ring.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *later), 10)
    assert al.commits == ring.syncs == 2
    assert al.regions() == set(range(11))


async def test_hot_writes_need_no_commit() -> None:
    al, ring = make()
    await write(al, 2, span=2)  # two regions, one record
    assert (al.commits, ring.syncs) == (1, 1)
    for i in range(100):
        await al.begin_write(2 * R + i * 64, 64)
        al.end_write(2 * R + i * 64, 64)
    await write(al, 3)
    assert (al.commits, ring.syncs) == (1, 1)
    assert al.stats() == {"regions": 2, "limit": 8, "commits": 1, "worst-case-resync-bytes": 2 * R}


async def test_the_mark_is_durable_before_begin_write_returns() -> None:
    al, ring = make()
    await al.begin_write(9 * R, 1)
    assert 9 in ring.crash_view()
    al.end_write(9 * R, 1)


async def test_a_cancelled_writer_does_not_cancel_the_shared_commit() -> None:
    ring = MemRing()
    ring.gate = threading.Event()
    al = ActivityLog(ring, region_size=R, limit=8)
    a = asyncio.create_task(al.begin_write(0, 1))
    b = asyncio.create_task(al.begin_write(R, 1))
    await asyncio.sleep(0.05)
    a.cancel()
    await asyncio.sleep(0.05)
    ring.gate.set()
    await asyncio.wait_for(b, 10)
    assert a.cancelled() and al.commits == 1
    al.end_write(R, 1)


async def test_a_failed_commit_fails_the_writers_and_stays_failed() -> None:
    al, ring = make()
    ring.fail = OSError(5, "Input/output error")
    with pytest.raises(ActivityLogError, match="commit failed"):
        await al.begin_write(0, 1)
    ring.fail = None  # a retried fsync could lie: the log does not retry
    with pytest.raises(ActivityLogError, match="failed earlier"):
        await al.begin_write(R, 1)
    assert al.regions() == frozenset() and ring.syncs == 0


async def test_bad_calls_are_refused() -> None:
    al, _ = make(limit=2)
    with pytest.raises(ActivityLogError, match="spans 3 regions"):
        await al.begin_write(0, 3 * R)
    with pytest.raises(ActivityLogError, match="without begin_write"):
        al.end_write(0, 1)
    await al.begin_write(0, 0)  # a zero-length write touches nothing
    assert al.commits == 0
    for size, limit in ((3000, 8), (R * 3, 8), (R, 0), (R, MAX_LIMIT + 1)):
        with pytest.raises(ActivityLogError, match="bad activity log"):
            ActivityLog(MemRing(), region_size=size, limit=limit)


# -- eviction ---------------------------------------------------------------------------------------


async def test_a_full_log_of_uncovered_regions_waits_for_a_checkpoint_ack() -> None:
    asked: list[int] = []
    al, ring = make(limit=4, on_full=lambda: asked.append(1))
    for n in range(4):
        await write(al, n)
    t = asyncio.create_task(write(al, 9))
    await settle()
    assert not t.done() and asked and al.waits == 1
    assert 9 not in ring.crash_view()
    al.checkpoint_acked()
    await asyncio.wait_for(t, 5)
    assert al.regions() == {1, 2, 3, 9} == ring.crash_view()  # region 0, least recently used, left


async def test_lru_order_follows_the_last_write() -> None:
    al, _ = make(limit=3)
    for n in (0, 1, 2, 0):
        await write(al, n)
    al.checkpoint_acked()
    await write(al, 5)
    assert al.regions() == {0, 2, 5}


async def test_a_region_with_a_write_in_flight_never_leaves() -> None:
    al, _ = make(limit=2)
    await al.begin_write(0, 1)  # region 0: in flight
    await write(al, 1)
    al.checkpoint_acked()
    await write(al, 2)  # region 1 leaves, not 0
    assert al.regions() == {0, 2}
    t = asyncio.create_task(write(al, 3))
    await settle()
    assert not t.done()  # 0 is in flight, 2 is not covered
    al.end_write(0, 1)
    await settle()
    assert not t.done()  # 0 finished after the checkpoint: not covered either
    al.checkpoint_acked()
    await asyncio.wait_for(t, 5)
    assert al.regions() == {2, 3}


async def test_a_write_finished_after_the_checkpoint_was_cut_is_not_covered() -> None:
    al, _ = make(limit=1)
    await al.begin_write(0, 1)
    mark = al.checkpoint_mark()
    al.end_write(0, 1)  # lands after the checkpoint was cut
    al.checkpoint_acked(mark)
    t = asyncio.create_task(write(al, 1))
    await settle()
    assert not t.done()
    al.checkpoint_acked(al.checkpoint_mark())
    await asyncio.wait_for(t, 5)


async def test_recovered_regions_stay_until_a_checkpoint_after_pairing() -> None:
    ring = MemRing()
    al = ActivityLog(ring, region_size=R, limit=2, seq=5, recovered={7, 8}, offload=False)
    assert al.regions() == {7, 8}
    t = asyncio.create_task(write(al, 1))
    await settle()
    assert not t.done()
    al.checkpoint_acked()
    await asyncio.wait_for(t, 5)
    assert al.regions() == {8, 1} == ring.crash_view()
    assert scan_ring(bytes(ring.data)).newest.seq == 6


async def test_alone_regions_leave_only_after_the_peer_bitmap_has_them() -> None:
    marked: list[list[int]] = []

    async def mark(regions: Sequence[int]) -> None:
        marked.append(list(regions))
        await asyncio.sleep(0)

    al, ring = make(limit=2)
    await write(al, 0)
    await write(al, 1)
    al.checkpoint_acked()
    await write(al, 1)  # written again after the checkpoint: uncovered
    al.set_alone(mark)
    await al.begin_write(2 * R, 1)  # region 0 (covered) leaves without a bitmap mark
    assert marked == [] and al.regions() == {1, 2}
    t = asyncio.create_task(write(al, 3))
    await settle()
    # 1 is idle and uncovered: into the bitmap, then it may leave; 2 is in flight
    assert t.done() and marked == [[1, 2]] and al.regions() == {2, 3} == ring.crash_view()
    al.end_write(2 * R, 1)
    assert await al.flush_to_bitmap(mark) == [3]
    al.peer_bitmap_cleared()
    al.set_alone(None)
    t = asyncio.create_task(write(al, 4))
    await settle()
    assert not t.done()  # the bitmap's marks are gone, no checkpoint yet
    al.checkpoint_acked()
    await asyncio.wait_for(t, 5)


async def test_a_sync_bitmap_hook_works_too() -> None:
    marked: list[int] = []
    al, _ = make(limit=1)
    await write(al, 0)
    assert await al.flush_to_bitmap(marked.extend) == [0]
    assert marked == [0]
    await write(al, 1)  # 0 is in the bitmap: it may leave
    assert al.regions() == {1}


# -- the invariant against a model ------------------------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("begin"), st.integers(0, 11), st.integers(1, 3)),
        st.tuples(st.just("end"), st.integers(0, 50), st.just(0)),
        st.tuples(st.just("mark"), st.just(0), st.just(0)),
        st.tuples(st.just("ack"), st.integers(0, 50), st.just(0)),
        st.tuples(st.just("flush"), st.just(0), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=OPS, limit=st.integers(3, 6))
def test_the_durable_set_holds_every_unacknowledged_write(
    ops: list[tuple[str, int, int]], limit: int
) -> None:
    async def run() -> None:
        al, ring = make(limit=limit)
        stamp = 0  # the model's count of finished writes
        covered = -1  # finished writes up to this stamp are in an acknowledged checkpoint
        marks: list[int] = []
        bitmap: set[int] = set()
        pending: list[tuple[asyncio.Task[None], range]] = []
        issued: list[range] = []  # begin_write returned: the data write may be on disk
        last_end: dict[int, int] = {}

        def check() -> None:
            nonlocal pending
            for t, regs in pending:
                if t.done():
                    t.result()
                    issued.append(regs)
            pending = [(t, r) for t, r in pending if not t.done()]
            must = {n for regs in issued for n in regs}
            must |= {n for n, s in last_end.items() if s > covered} - bitmap
            # a crash now: the ring on disk must name every region that may differ
            assert must <= ring.crash_view()
            assert must <= al.regions()
            assert len(al.regions()) <= limit

        async def flush_all() -> None:
            nonlocal covered
            for _ in range(100):
                while issued:
                    end(issued.pop())
                covered = stamp
                al.checkpoint_acked()
                await settle()
                check()
                if not pending and not issued:
                    return
            raise AssertionError("writers never got room: a deadlock")

        def end(regs: range) -> None:
            nonlocal stamp
            al.end_write(regs.start * R, len(regs) * R)
            stamp += 1
            for n in regs:
                last_end[n] = stamp

        async def mark(regions: Sequence[int]) -> None:
            bitmap.update(regions)

        for op in ops:
            if op[0] == "begin":
                regs = range(op[1], op[1] + op[2])
                pending.append((asyncio.create_task(write_begin(al, regs)), regs))
            elif op[0] == "end" and issued:
                end(issued.pop(op[1] % len(issued)))
            elif op[0] == "mark":
                marks.append(al.checkpoint_mark())
                assert marks[-1] == stamp
            elif op[0] == "ack" and marks:
                m = marks[op[1] % len(marks)]
                covered = max(covered, m)
                al.checkpoint_acked(m)
            elif op[0] == "flush":
                await al.flush_to_bitmap(mark)
            await settle()
            check()
        await flush_all()

    asyncio.run(run())


async def write_begin(al: ActivityLog, regs: range) -> None:
    await al.begin_write(regs.start * R, len(regs) * R)
