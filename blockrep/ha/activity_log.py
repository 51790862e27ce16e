"""The primary's activity log (CONTINUITY.md §3, I1): mark before write, group commit.

An LRU of "hot" regions, durable before any write into them is issued: after a crash
of the primary only these can differ from the secondary, so recovery copies them.

* A write into a hot region goes at once: no I/O.
* A write into a cold region waits for the next commit; all activations pending then
  go into ONE fsync'd record (group commit): N concurrent cold writes, one fdatasync.
* A region leaves (to make room) only when no write to it is in flight and a checkpoint
  the secondary acknowledged covers its last write, or — alone — once it is in the peer
  bitmap. A write finding the log full waits for a checkpoint ack (``on_full`` asks).

On disk: a ring of SLOTS one-page records, each the WHOLE active set (no replay). Record
``seq`` goes to slot ``(seq - 1) % SLOTS``; commits are serial, so a crash tears at most
one slot. Records carry their region size: a changed ``region_size`` is converted.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# the on-disk format, re-exported: users of the log import it from here
from .activity_log_disk import (  # noqa: F401
    DEFAULT_LIMIT,
    DEFAULT_REGION_SIZE,
    MAX_LIMIT,
    MAX_REGION,
    PAGE,
    RING_SIZE,
    SLOTS,
    ActivityLogError,
    Record,
    RecordWriter,
    Recovered,
    RingFile,
    convert,
    decode_record,
    encode_record,
    load,
    scan_ring,
    slot_offset,
)

BitmapMark = Callable[[Sequence[int]], Awaitable[None] | None]


@dataclass
class _Region:
    inflight: int = 0
    last_write: int = 0  # completion stamp of its last write; 0: none in this life
    durable: bool = False  # in a committed record since it was last activated


class ActivityLog:
    """One per primary disk, on one event loop; the writer's I/O runs in a thread (offload)."""

    def __init__(
        self,
        writer: RecordWriter,
        *,
        region_size: int = DEFAULT_REGION_SIZE,
        limit: int = DEFAULT_LIMIT,
        seq: int = 0,
        recovered: Iterable[int] = (),
        offload: bool = True,
        on_full: Callable[[], None] | None = None,
    ) -> None:
        if region_size < PAGE or region_size & (region_size - 1) or not 1 <= limit <= MAX_LIMIT:
            msg = f"region size {region_size} (a power of two >= {PAGE}), limit {limit}"
            raise ActivityLogError(f"bad activity log {msg} (1..{MAX_LIMIT})", errno.EINVAL)
        self.region_size = region_size
        self.limit = limit
        self.on_full = on_full
        self._writer = writer
        self._offload = offload
        self._seq = seq
        self._on_disk = frozenset(recovered)
        self._active: OrderedDict[int, _Region] = OrderedDict(
            (n, _Region(durable=True)) for n in sorted(self._on_disk)
        )
        self._stamp = 0
        self._covered = -1
        self._in_bitmap: set[int] = set()
        self._alone_mark: BitmapMark | None = None
        self._committing: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._failed: BaseException | None = None
        self.commits = 0
        self.waits = 0  # writes that found the log full and waited for room

    @classmethod
    def open(cls, path: str, **kw: Any) -> ActivityLog:
        """Open (or make) the AL file; the set a crash left stays active (converted)."""
        newest = load(path).newest
        size = kw.get("region_size", DEFAULT_REGION_SIZE)
        regions = newest.regions
        if newest.seq and newest.region_size != size:
            regions = convert(regions, newest.region_size, size)
            if len(regions) > MAX_LIMIT:
                msg = f"holds {len(newest.regions)} regions of {newest.region_size} bytes"
                raise ActivityLogError(f"activity log {path} {msg}: too many at {size}")
        return cls(RingFile(path), seq=newest.seq, recovered=regions, **kw)

    def regions_of(self, offset: int, nbytes: int) -> range:
        r = range(offset // self.region_size, -(-(offset + nbytes) // self.region_size))
        if offset < 0 or nbytes < 0 or r.stop > MAX_REGION + 1:
            raise ActivityLogError(f"bad write range {offset}+{nbytes}", errno.EINVAL)
        return r

    async def begin_write(self, offset: int, nbytes: int) -> None:
        """Return once every region the write touches is durably active (then the
        caller issues the write and calls ``end_write`` with the same range)."""
        if len(regs := self.regions_of(offset, nbytes)) > self.limit:
            msg = f"spans {len(regs)} regions, more than the activity log's limit {self.limit}"
            raise ActivityLogError(f"a write of {nbytes} bytes {msg}", errno.EINVAL)
        # take every region at once, with no await in between: a write holding some
        # regions while waiting for room for the others could deadlock with another
        waited = False
        while True:
            self._check()
            cold = [n for n in regs if n not in self._active]
            if not cold or self._make_room(len(self._active) + len(cold) - self.limit, regs):
                break
            self.waits += not waited
            waited = True
            # alone, no checkpoint will come: the peer bitmap takes over the marks
            if self._alone_mark is not None and await self.flush_to_bitmap(self._alone_mark):
                continue
            if self.on_full is not None:
                self.on_full()
            await self._changed.wait()
        for n in regs:
            r = self._active.setdefault(n, _Region())
            r.inflight += 1
            self._active.move_to_end(n)
        try:
            while not all(self._active[n].durable for n in regs):
                await self._commit()
        except BaseException:
            self._release(regs, wrote=False)
            raise

    def try_begin_write(self, offset: int, nbytes: int) -> bool:
        """``begin_write`` if every region is hot and durable already (no wait), else False."""
        act, regs = self._active, self.regions_of(offset, nbytes)
        if self._failed is not None or len(regs) > self.limit:
            return False
        if not all(n in act and act[n].durable for n in regs):
            return False
        for n in regs:
            act[n].inflight += 1
            act.move_to_end(n)
        return True

    def cancel_write(self, offset: int, nbytes: int) -> None:
        """A ``try_begin_write`` whose write was never issued after all."""
        self._release(self.regions_of(offset, nbytes), wrote=False)

    def end_write(self, offset: int, nbytes: int) -> None:
        """The write finished (or failed: it may have changed the disk all the same)."""
        self._release(self.regions_of(offset, nbytes), wrote=True)

    def _release(self, regs: range, *, wrote: bool) -> None:
        if wrote:
            self._stamp += 1
        for n in regs:
            r = self._active.get(n)
            if r is None or r.inflight == 0:
                raise ActivityLogError(f"end_write of region {n} without begin_write", errno.EINVAL)
            r.inflight -= 1
            if wrote:
                r.last_write = self._stamp
            elif r.inflight == 0 and not r.durable and r.last_write == 0:
                del self._active[n]  # activated for a write that never went
        self._notify()

    def checkpoint_mark(self) -> int:
        """Taken when a checkpoint is cut: it covers every write finished by then."""
        return self._stamp

    def checkpoint_acked(self, mark: int | None = None) -> None:
        """The secondary acknowledged the checkpoint of ``mark`` (default: now — right
        only while the consumer is still paused for that checkpoint)."""
        self._covered = max(self._covered, self._stamp if mark is None else mark)
        self._notify()

    def set_alone(self, mark: BitmapMark | None) -> None:
        """Alone (peer lost): when the log is full, regions leave after ``mark`` set
        them in the persisted peer bitmap instead of waiting for a checkpoint that
        will not come. None when paired again."""
        self._alone_mark = mark
        self._notify()

    async def flush_to_bitmap(self, mark: BitmapMark) -> list[int]:
        """Set every active region a checkpoint does not cover in the peer bitmap via
        ``mark(regions)`` (durable when it returns); afterwards they may leave."""
        c, bm = self._covered, self._in_bitmap
        active = self._active.items()
        regs = sorted(n for n, r in active if n not in bm and (r.last_write > c or r.inflight))
        if regs:
            res = mark(regs)
            if inspect.isawaitable(res):
                await res
            self._in_bitmap.update(regs)
            self._notify()
        return regs

    def peer_bitmap_cleared(self) -> None:
        """The peer bitmap was emptied (a resync finished): its marks cover nothing now."""
        self._in_bitmap.clear()

    def _evictable(self, n: int, r: _Region) -> bool:
        covered = r.last_write <= self._covered or n in self._in_bitmap
        return r.inflight == 0 and r.durable and covered

    def _make_room(self, need: int, keep: range) -> bool:
        """Evict ``need`` regions, least recently used first, or none at all."""
        if need <= 0:
            return True
        victims = [n for n, r in self._active.items() if n not in keep and self._evictable(n, r)]
        if len(victims) < need:
            return False
        for n in victims[:need]:
            del self._active[n]
            self._in_bitmap.discard(n)
        return True

    async def _commit(self) -> None:
        if self._committing is None:
            self._committing = asyncio.get_running_loop().create_task(self._write_next())
        # a cancelled writer must not cancel the commit the others wait for
        await asyncio.shield(self._committing)

    async def _write_next(self) -> None:
        try:
            self._check()
            snapshot = frozenset(self._active)
            batch = [r for r in self._active.values() if not r.durable]
            seq = self._seq + 1
            data = encode_record(seq, self.region_size, snapshot)
            off = slot_offset(seq)
            try:
                if self._offload:
                    await asyncio.to_thread(self._writer.write_record, off, data)
                else:
                    self._writer.write_record(off, data)
            except OSError as e:
                # sticky: after a failed fsync a retry may "succeed" over lost pages
                self._failed = e
                raise ActivityLogError(f"activity log commit failed: {e}") from e
            self._seq = seq
            self._on_disk = snapshot
            self.commits += 1
            for r in batch:
                r.durable = True
        finally:
            self._committing = None
            self._notify()

    def _check(self) -> None:
        if self._failed is not None:
            raise ActivityLogError(f"activity log failed earlier: {self._failed}")

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def regions(self) -> frozenset[int]:
        """The durable active set: what a crash now would make resync copy."""
        return self._on_disk

    def stats(self) -> dict[str, int]:
        """status --json's ``al`` object (worst case: every durable region differs)."""
        n, size = len(self._on_disk), self.region_size
        return {"regions": n, "limit": self.limit, "commits": self.commits,
                "worst-case-resync-bytes": n * size}  # fmt: skip

    async def clear(self) -> None:
        """A clean handover (nothing in flight, all covered): an empty record on disk."""
        busy = [n for n, r in self._active.items() if r.inflight or r.last_write > self._covered]
        if busy:
            raise ActivityLogError(f"cannot empty the activity log: {len(busy)} region(s) busy")
        self._active.clear()
        self._in_bitmap.clear()
        await self._commit()

    async def aclose(self) -> None:
        if self._committing is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._committing)
        self._writer.close()
