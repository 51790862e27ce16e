"""Refcount tables and blocks, the cluster allocator, and a bounded table cache.

Crash safety rests on one ordering rule, applied at every flush: first the data
and every refcount increment reach the disk, then the L2/L1 tables that point at
the new clusters, and only then the decrements of clusters those tables stopped
pointing at. A writer killed anywhere therefore leaves at worst leaked clusters
(refcount higher than the references), never a reference to a free cluster.
Clusters whose decrement is pending stay allocated in memory, so nothing reuses
them before the tables that dropped them are on disk.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from typing import Protocol

from ..errors import BlockError
from .format import MAX_REFTABLE_BYTES, REFT_OFFSET_MASK, Header


class ImageFile(Protocol):
    """The file an image lives in, as the codec needs it (a block node has it all).

    Declared here so that the codec does not depend on the block layer above it.
    """

    length: int

    async def read(self, offset: int, nbytes: int) -> bytes: ...

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None: ...

    async def discard(self, offset: int, nbytes: int) -> None: ...

    async def flush(self) -> None: ...


def rc_get(block: bytearray | bytes, i: int, order: int) -> int:
    if order >= 3:
        w = 1 << (order - 3)
        return int.from_bytes(block[i * w : (i + 1) * w], "big")
    bits = 1 << order
    per = 8 // bits
    return (block[i // per] >> (bits * (i % per))) & ((1 << bits) - 1)


def rc_set(block: bytearray, i: int, order: int, value: int) -> None:
    if order >= 3:
        w = 1 << (order - 3)
        block[i * w : (i + 1) * w] = value.to_bytes(w, "big")
        return
    bits = 1 << order
    per = 8 // bits
    shift = bits * (i % per)
    mask = ((1 << bits) - 1) << shift
    block[i // per] = (block[i // per] & ~mask) | ((value << shift) & mask)


class TableCache:
    """LRU of cluster-sized tables (L2 tables or refcount blocks) keyed by offset."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(2, capacity)
        self.tables: OrderedDict[int, bytearray] = OrderedDict()
        self.dirty: set[int] = set()

    def get(self, offset: int) -> bytearray | None:
        t = self.tables.get(offset)
        if t is not None:
            self.tables.move_to_end(offset)
        return t

    def put(self, offset: int, table: bytearray, dirty: bool = False) -> None:
        self.tables[offset] = table
        self.tables.move_to_end(offset)
        if dirty:
            self.dirty.add(offset)

    def victim(self) -> int | None:
        """The least recently used table, if the cache is over capacity."""
        if len(self.tables) < self.capacity:
            return None
        for off in self.tables:
            return off
        return None

    def drop(self, offset: int) -> None:
        self.tables.pop(offset, None)
        self.dirty.discard(offset)

    def clear(self) -> None:
        self.tables.clear()
        self.dirty.clear()


class Refcounts:
    """In-memory view of the refcount structure plus the cluster allocator."""

    def __init__(
        self,
        file: ImageFile,
        header: Header,
        reftable: list[int],
        cache_tables: int,
    ) -> None:
        self.file = file
        self.h = header
        self.cs = header.cluster_size
        self.cb = header.cluster_bits
        self.order = header.refcount_order
        self.max_refcount = (1 << (1 << self.order)) - 1
        # clusters described by one refcount block
        self.block_entries = (self.cs * 8) >> self.order
        self.block_shift = self.block_entries.bit_length() - 1
        self.reftable = reftable
        # the reftable size on disk; the in-memory list may grow past it until a flush
        self.reftable_capacity = header.refcount_table_clusters * self.cs // 8
        self.reftable_dirty = False
        self.cache = TableCache(cache_tables)
        self.free_hint = 0
        self.pending_free: list[int] = []
        # clusters chosen for an allocation whose refcounts are not yet set
        self._reserved: list[tuple[int, int]] = []

    async def write_header_fields(self) -> None:
        """Point the header at the refcount table (offset and clusters, bytes 48..59)."""
        await self.file.write(
            48, struct.pack(">QI", self.h.refcount_table_offset, self.h.refcount_table_clusters)
        )

    # -- refcount block access --------------------------------------------------

    async def _block(self, bi: int, create: bool) -> bytearray | None:
        off = self.reftable[bi] if bi < len(self.reftable) else 0
        if off == 0:
            if not create:
                return None
            off = await self._new_block(bi)
        blk = self.cache.get(off)
        if blk is None:
            if off + self.cs > self.file.length:
                raise BlockError(5, f"Refcount block offset {off:#x} beyond end of file")
            blk = bytearray(await self.file.read(off, self.cs))
            await self._make_room()
            self.cache.put(off, blk)
        return blk

    async def _make_room(self) -> None:
        v = self.cache.victim()
        if v is not None:
            if v in self.cache.dirty:
                await self.file.write(v, bytes(self.cache.tables[v]))
            self.cache.drop(v)

    async def get(self, cluster: int) -> int:
        blk = await self._block(cluster >> self.block_shift, create=False)
        if blk is None:
            return 0
        return rc_get(blk, cluster & (self.block_entries - 1), self.order)

    async def add(self, cluster: int, delta: int) -> int:
        bi = cluster >> self.block_shift
        blk = await self._block(bi, create=True)
        assert blk is not None
        i = cluster & (self.block_entries - 1)
        value = rc_get(blk, i, self.order) + delta
        if value < 0 or value > self.max_refcount:
            raise BlockError(
                22, f"Refcount of cluster {cluster} out of range ({value}); image may be corrupt"
            )
        rc_set(blk, i, self.order, value)
        self.cache.dirty.add(self.reftable[bi])
        if value == 0 and cluster < self.free_hint:
            self.free_hint = cluster
        return value

    async def _new_block(self, bi: int) -> int:
        """Place a new refcount block for block index ``bi`` in a free cluster.

        If the chosen cluster lies in the range the new block describes, the block
        counts itself; otherwise its own refcount lives in another block, which
        may have to be created in turn (the recursion ends at a self-describing one).
        """
        while len(self.reftable) <= bi:
            self.reftable.append(0)
        cluster = await self._find_free(1)
        off = cluster << self.cb
        self.reftable[bi] = off
        self.reftable_dirty = True
        await self._make_room()
        self.cache.put(off, bytearray(self.cs), dirty=True)
        self._reserved.append((cluster, cluster + 1))
        try:
            await self.add(cluster, 1)
        finally:
            self._reserved.remove((cluster, cluster + 1))
        return off

    # -- allocation -------------------------------------------------------------

    async def _find_free(self, n: int) -> int:
        """First run of ``n`` free clusters at or after the hint."""
        pos = self.free_hint
        run = 0
        while run < n:
            c = pos + run
            r = next((r for r in self._reserved if r[0] <= c < r[1]), None)
            if r is not None:
                pos, run = r[1], 0
                continue
            bi = c >> self.block_shift
            if bi >= len(self.reftable) or self.reftable[bi] == 0:
                # a whole block of free clusters
                step = self.block_entries - (c & (self.block_entries - 1))
                for r in self._reserved:
                    if c < r[0] < c + step:
                        step = r[0] - c
                run += step
                continue
            blk = await self._block(bi, create=False)
            assert blk is not None
            if rc_get(blk, c & (self.block_entries - 1), self.order) == 0:
                run += 1
            else:
                pos = c + 1
                run = 0
        return pos

    async def alloc(self, n: int) -> int:
        """Allocate ``n`` contiguous clusters; returns the host offset of the first."""
        first = await self._find_free(n)
        self._reserved.append((first, first + n))
        try:
            for c in range(first, first + n):
                await self.add(c, 1)
        finally:
            self._reserved.remove((first, first + n))
        if n == 1 or first == self.free_hint:
            self.free_hint = first + n
        return first << self.cb

    def defer_free(self, offset: int, nclusters: int = 1) -> None:
        """Drop a reference once the tables that held it are on disk (see module doc)."""
        base = offset >> self.cb
        self.pending_free.extend(range(base, base + nclusters))

    # -- persistence ----------------------------------------------------------

    async def write_increments(self) -> None:
        """Phase 1 of a flush: dirty refcount blocks, then the refcount table."""
        for off in sorted(self.cache.dirty):
            await self.file.write(off, bytes(self.cache.tables[off]))
        self.cache.dirty.clear()
        if self.reftable_dirty:
            await self._write_reftable()

    async def _write_reftable(self) -> None:
        if len(self.reftable) <= self.reftable_capacity:
            data = struct.pack(f">{len(self.reftable)}Q", *self.reftable)
            await self.file.write(self.h.refcount_table_offset, data)
            self.reftable_dirty = False
            return
        # Relocate the table: new clusters may need new refcount blocks, which may
        # lengthen the table again, so size it until it fits.
        while True:
            entries = len(self.reftable) + len(self.reftable) // 2 + 1
            clusters = -(-entries * 8 // self.cs)
            if clusters * self.cs > MAX_REFTABLE_BYTES:
                raise BlockError(27, "Reference count table too large")
            old_off, old_clusters = self.h.refcount_table_offset, self.h.refcount_table_clusters
            new_off = await self.alloc(clusters)
            if len(self.reftable) <= clusters * self.cs // 8:
                break
            await self.undo_alloc(new_off, clusters)
        table = self.reftable + [0] * (clusters * self.cs // 8 - len(self.reftable))
        for off in sorted(self.cache.dirty):
            await self.file.write(off, bytes(self.cache.tables[off]))
        self.cache.dirty.clear()
        await self.file.write(new_off, struct.pack(f">{len(table)}Q", *table))
        await self.file.flush()
        self.h.refcount_table_offset = new_off
        self.h.refcount_table_clusters = clusters
        self.reftable_capacity = len(table)
        await self.write_header_fields()
        self.reftable_dirty = False
        self.defer_free(old_off, old_clusters)

    async def undo_alloc(self, off: int, n: int) -> None:
        base = off >> self.cb
        for c in range(base, base + n):
            await self.add(c, -1)

    async def apply_frees(self) -> list[int]:
        """Phase 3 of a flush: the decrements; returns clusters that became free."""
        freed = []
        pending, self.pending_free = self.pending_free, []
        for c in pending:
            if await self.add(c, -1) == 0:
                freed.append(c)
        return freed

    @staticmethod
    def parse_reftable(data: bytes, file_size: int, cs: int) -> list[int]:
        n = len(data) // 8
        table = list(struct.unpack(f">{n}Q", data[: n * 8]))
        # drop trailing unused entries so the in-memory list stays short
        while table and table[-1] == 0:
            table.pop()
        for i, e in enumerate(table):
            off = e & REFT_OFFSET_MASK
            if e != off or off % cs:
                raise BlockError(22, f"Refcount block {i} offset {e:#x} is not aligned")
            if off and off + cs > file_size:
                raise BlockError(
                    22, f"Refcount block {i} at {off:#x} lies beyond the end of the file"
                )
        return table
