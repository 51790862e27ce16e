"""The background resync: copying regions from this node's disk to the peer's while the
consumer keeps writing (CONTINUITY.md §4 "Resync", §8 status's ``resync``).

:class:`Resync` copies a set of regions (``REGION_SIZE``) from a source node to a target
node, ``batch`` regions at a time with ``depth`` copies in flight. Checksums first
(DRBD ``csums-alg``): for each batch the target's digests come in one round trip and
only regions whose digests differ are sent; the bytes saved are counted. New writes on
the source are found in a :class:`~blockrep.block.node.DirtyBitmap` (marked after each
write completes): a region's bits are cleared *before* it is read, so a write that
completes after the read marks it again and it is copied again later. ``run`` returns
once at most ``final_threshold`` regions are left dirty; the caller pauses its consumer
and calls ``final_pass``. After each batch the target is flushed and ``on_done`` gets
the batch's regions that are durably there (and not dirty again) so the caller can
clear them from its persisted remainder and resume from it after an interruption.

``copy_chunks`` with ``SyncKind``/``SyncProgress`` is the one-shot copy of a pairing's
plan (status's ``sync``), a thin wrapper over the same engine.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import hashlib
import heapq
import math
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, replace
from typing import Any

from ..block.node import DirtyBitmap, Node
from ..errors import BlockError
from .bitmap import REGION_SIZE
from .ratelimit import RateMeter, TokenBucket, effective_rate, eta

CHUNK = REGION_SIZE  # the one-shot copy's name for a region
PeerDigests = Callable[[list[int]], Awaitable[list[str]]]


def region_digest(data: bytes) -> str:
    """The digest both sides compute of a region's bytes (a short last region as is)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def region_span(length: int, region: int) -> tuple[int, int]:
    """Offset and byte count of ``region`` on a disk of ``length`` bytes (count 0: past the end)."""
    off = region * REGION_SIZE
    return off, max(0, min(REGION_SIZE, length - off))


async def digests_of(node: Node, regions: list[int], depth: int = 4) -> list[str]:
    """The digests of ``regions`` of ``node``: what the target answers the ``digests``
    verb. Reads overlap; hashing runs in worker threads (hashlib lets go of the GIL),
    so the node's event loop keeps serving while a batch is hashed."""
    sem = asyncio.Semaphore(depth)

    async def one(r: int) -> str:
        off, n = region_span(node.length, r)
        async with sem:
            data = await node.read(off, n) if n else b""
        return await asyncio.to_thread(region_digest, data)

    return list(await asyncio.gather(*(one(r) for r in regions)))


@dataclass
class ResyncOptions:
    rate: int = 0  # bytes/s ceiling, 0: unlimited (--resync-rate)
    min_rate: int = 0  # bytes/s kept even while the consumer is busy (--resync-min-rate)
    checksums: bool = True  # digests first (DRBD csums-alg)
    batch: int = 16  # regions per digest round trip, per target flush
    depth: int = 4  # region copies in flight
    final_threshold: int = 8  # run() returns once at most this many regions are dirty


@dataclass
class ResyncProgress:
    """Status's ``resync`` object (CONTINUITY §8); the engine keeps it current."""

    direction: str = "local-to-peer"  # or "peer-to-local"
    done_bytes: int = 0  # copied or found equal
    total_bytes: int = 0  # grows as new writes dirty regions
    saved_by_checksums: int = 0  # bytes not sent because the digests matched
    rate: int = 0  # bytes/s, moving
    eta: float | None = None  # seconds
    percent: float = 0.0  # 0..100, never decreasing even as the total grows
    paused: bool = False

    def update_percent(self) -> None:
        """100 only when the engine says so: done == total between batches is not the end."""
        if self.total_bytes > 0:
            p = min(99.9, math.floor(self.done_bytes * 1000 / self.total_bytes) / 10)
            self.percent = max(self.percent, p)

    def as_dict(self) -> dict[str, Any]:
        return {
            "direction": self.direction,
            "done-bytes": self.done_bytes,
            "total-bytes": self.total_bytes,
            "percent": self.percent,
            "rate": self.rate,
            "eta": self.eta,
            "saved-by-checksums": self.saved_by_checksums,
            "paused": self.paused,
        }


async def _all(coros: list[Coroutine[Any, Any, None]]) -> None:
    """Run ``coros`` together; the first error cancels the others and propagates as is."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class Resync:
    """Copies ``regions`` (and what ``dirty`` marks meanwhile) from ``src`` to ``dst``."""

    def __init__(
        self,
        src: Node,
        dst: Node,
        regions: Iterable[int],
        *,
        options: ResyncOptions | None = None,
        progress: ResyncProgress | None = None,
        peer_digests: PeerDigests | None = None,
        dirty: DirtyBitmap | None = None,
        on_done: Callable[[list[int]], None] | None = None,
        consumer_busy: Callable[[], int] | None = None,
        no_digests: Iterable[int] = (),
    ) -> None:
        """``no_digests``: regions known to differ (the source wrote them since the
        common epoch): sent without asking the peer for their digests."""
        self.src = src
        self.dst = dst
        self.options = replace(options) if options is not None else ResyncOptions()
        self.progress = progress if progress is not None else ResyncProgress()
        self._peer_digests = peer_digests
        self._dirty = dirty
        self._on_done = on_done
        self._busy = consumer_busy
        self._no_digests = frozenset(no_digests)
        self._nregions = -(-src.length // REGION_SIZE)
        self._queue: dict[int, None] = {}  # pending regions, in order
        self._bucket = TokenBucket()
        self._meter = RateMeter()
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._lock = asyncio.Lock()  # one pass at a time: no region copied twice at once
        self._enqueue(sorted(set(regions)))

    # -- control --------------------------------------------------------------------------

    def pause(self) -> None:
        """Stop before the next region (a batch under way finishes its regions in flight)."""
        self._resumed.clear()
        self.progress.paused = True
        self._meter.reset()
        self.progress.rate, self.progress.eta = 0, None

    def resume(self) -> None:
        self._resumed.set()
        self.progress.paused = False

    def set_rate(self, rate: int, min_rate: int | None = None) -> None:
        self.options.rate = rate
        if min_rate is not None:
            self.options.min_rate = min_rate

    def current_rate(self) -> int:
        """The bytes/s the copy may use now (0: unlimited)."""
        busy = self._busy() if self._busy is not None else 0
        return effective_rate(self.options.rate, self.options.min_rate, busy)

    @property
    def pending(self) -> int:
        """Regions queued and not copied yet (not counting those only marked dirty)."""
        return len(self._queue)

    # -- the passes -----------------------------------------------------------------------

    async def run(self) -> None:
        """Copy the pending regions, then what new writes dirty, until at most
        ``final_threshold`` regions are dirty — or the dirty set stops shrinking (the
        consumer rewrites as fast as the copy goes: chasing it would only send the same
        regions again); rate-limited and pausable."""
        async with self._lock:
            before: int | None = None  # dirty regions when the last chase batch began
            while True:
                if not self._queue:
                    left = self.dirty_regions()
                    p = self.progress
                    if left == 0 and p.total_bytes == p.done_bytes:
                        p.percent = 100.0  # (also when there was nothing to copy)
                    if left <= self.options.final_threshold:
                        return
                    if before is not None and left >= before:
                        return  # not converging: the caller's final pass takes the rest
                    before = left
                    pulled = self._pull(self.options.batch)
                    if not pulled:
                        return
                    self._enqueue(pulled)
                await self._resumed.wait()
                await self._batch(self._next(self.options.batch), limited=True)

    async def final_pass(self) -> None:
        """With the consumer quiesced: copy everything pending or dirty, at full speed,
        not pausable. Call it once ``run`` has returned (or was cancelled)."""
        async with self._lock:
            while True:
                if not self._queue:
                    self._enqueue(self._pull(self.options.batch))
                    if not self._queue:
                        break
                await self._batch(self._next(self.options.batch), limited=False)
            self.progress.percent = 100.0
            self.progress.eta = 0.0

    # -- regions --------------------------------------------------------------------------

    def _enqueue(self, regions: Iterable[int]) -> None:
        p = self.progress
        for r in regions:
            if 0 <= r < self._nregions and r not in self._queue:
                self._queue[r] = None
                p.total_bytes += region_span(self.src.length, r)[1]
        p.update_percent()

    def _next(self, n: int) -> list[int]:
        out = []
        for r in self._queue:
            out.append(r)
            if len(out) == n:
                break
        for r in out:
            del self._queue[r]
        return out

    def _chunks_of(self, region: int) -> range:
        g = self._dirty.granularity if self._dirty is not None else REGION_SIZE
        off, n = region_span(self.src.length, region)
        return range(off // g, (off + max(n, 1) - 1) // g + 1)

    def _regions_of(self, chunk: int) -> range:
        g = self._dirty.granularity if self._dirty is not None else REGION_SIZE
        end = min((chunk + 1) * g, self.src.length)
        return range(chunk * g // REGION_SIZE, max(chunk * g, end - 1) // REGION_SIZE + 1)

    def dirty_regions(self) -> int:
        """How many regions the dirty bitmap marks now."""
        d = self._dirty
        if d is None or not d.dirty:
            return 0
        per = max(1, REGION_SIZE // d.granularity)  # chunks per region at most
        if d.granularity <= REGION_SIZE and len(d.dirty) // per > self.options.final_threshold:
            return len(d.dirty) // per  # a lower bound is enough to go on
        return len({r for c in d.dirty for r in self._regions_of(c)})

    def _pull(self, n: int) -> list[int]:
        """At least ``n`` dirty regions (or all), whole chunks of the bitmap at a time;
        their bits are cleared by ``_batch`` just before they are read."""
        d = self._dirty
        if d is None or not d.dirty:
            return []
        out: dict[int, None] = {}
        for c in heapq.nsmallest(n, d.dirty):
            out.update(dict.fromkeys(r for r in self._regions_of(c) if r < self._nregions))
            if len(out) >= n:
                break
        return list(out)

    def _clear_dirty(self, regions: list[int]) -> None:
        """Clear the dirty bits wholly inside ``regions``: every write that completed
        before now is in what is read next; later ones mark the region again."""
        d = self._dirty
        if d is None or not d.dirty:
            return
        these = set(regions)
        for r in regions:
            for c in self._chunks_of(r):
                if c in d.dirty and all(x in these for x in self._regions_of(c)):
                    d.dirty.discard(c)
        if not d.dirty:
            d.changed.clear()

    def _is_dirty(self, region: int) -> bool:
        d = self._dirty
        return d is not None and any(c in d.dirty for c in self._chunks_of(region))

    # -- copying --------------------------------------------------------------------------

    async def _batch(self, regions: list[int], limited: bool) -> None:
        if not regions:
            return
        self._clear_dirty(regions)
        remote: dict[int, str] = {}
        ask = [r for r in regions if r not in self._no_digests]
        if self.options.checksums and self._peer_digests is not None and ask:
            got = list(await self._peer_digests(ask))
            if len(got) != len(ask):
                raise BlockError(
                    errno.EPROTO, f"peer sent {len(got)} digests for {len(ask)} regions"
                )
            remote = dict(zip(ask, got, strict=True))
        sem = asyncio.Semaphore(max(1, self.options.depth))
        p = self.progress

        copied: set[int] = set()

        async def one(i: int, r: int) -> None:
            off, n = region_span(self.src.length, r)
            async with sem:
                if limited:
                    await self._resumed.wait()
                    await self._bucket.take(n, self.current_rate)
                    await self._resumed.wait()  # paused while it waited for its tokens
                data = await self.src.read(off, n)
                theirs = remote.get(r)
                if theirs is not None and await asyncio.to_thread(region_digest, data) == theirs:
                    p.saved_by_checksums += n
                else:
                    await self.dst.write(off, data)
            copied.add(r)
            p.done_bytes += n
            self._measure()

        try:
            await _all([one(i, r) for i, r in enumerate(regions)])
        except BaseException:
            # cancelled (the caller moves on to the final pass) or failed: their dirty
            # bits are cleared, so the regions not copied go back to the queue
            for r in regions:
                if r not in copied:
                    self._queue[r] = None
            raise
        await self.dst.flush()
        if self._on_done is not None:
            durable = [r for r in regions if not self._is_dirty(r)]
            if durable:
                self._on_done(durable)

    def _measure(self) -> None:
        p = self.progress
        p.update_percent()
        self._meter.add(p.done_bytes)
        if not p.paused:
            p.rate = self._meter.rate()
            p.eta = eta(p.total_bytes - p.done_bytes + self._pending_dirty_bytes(), p.rate)

    def _pending_dirty_bytes(self) -> int:
        d = self._dirty
        return len(d.dirty) * min(d.granularity, REGION_SIZE) if d is not None else 0


# -- the one-shot copy of a pairing's plan (status's "sync") -------------------------------


class SyncKind(enum.StrEnum):
    """Why a copy runs: status's ``sync.what`` and the progress bar's label."""

    RESYNC = "resync"  # only the regions that may differ
    INITIAL = "initial sync"  # the whole disk (--initial-sync)


@dataclass
class SyncProgress:
    what: SyncKind
    total: int  # bytes to copy (whole regions)
    current: int = 0  # bytes copied so far

    def as_dict(self) -> dict[str, Any]:
        """Status's ``sync`` object (README): ``what``, ``current``, ``total``."""
        return {"what": self.what.value, "current": self.current, "total": self.total}


def all_chunks(length: int) -> list[int]:
    """Every region of a disk of ``length`` bytes (the last one may be short)."""
    return list(range(-(-length // CHUNK)))


async def copy_chunks(
    src: Node, dst: Node, chunks: list[int], progress: SyncProgress
) -> ResyncProgress:
    """Copy ``chunks`` of ``src`` onto ``dst`` (the consumer held: no dirty tracking) and
    flush ``dst``; ``progress`` follows as regions become durable."""

    def done(regions: list[int]) -> None:
        progress.current += len(regions) * CHUNK

    engine = Resync(src, dst, chunks, options=ResyncOptions(checksums=False), on_done=done)
    await engine.run()
    await dst.flush()
    return engine.progress
