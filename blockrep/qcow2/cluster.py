"""The L1/L2 mapping of guest clusters to host storage (QEMU's qcow2-cluster.c).

The L1 table lives in memory, L2 tables in a bounded LRU cache; both are written
back by ``flush`` in the order described in refcount.py. Nothing here locks: the
driver holds its metadata lock around every call.
"""

from __future__ import annotations

import errno
import struct
from array import array
from dataclasses import dataclass

from ..errors import BlockError
from .format import (
    COMPRESSED,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    NORMAL,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    ZERO_ALLOC,
    Header,
    compressed_geometry,
    entry_kind,
)
from .refcount import ImageFile, Refcounts, TableCache

DEFAULT_L2_CACHE = 32 << 20
DEFAULT_REFCOUNT_CACHE = 1 << 20


@dataclass
class Segment:
    """A run of guest bytes with one kind of storage (host offsets contiguous)."""

    start: int
    length: int
    kind: int
    host: int  # host byte offset of ``start`` for NORMAL/ZERO_ALLOC, L2 entry for COMPRESSED


class ClusterMap:
    """L1 table, L2 table cache and refcounts of one open image."""

    def __init__(self, file: ImageFile, h: Header, l1: list[int], l2_tables: int, rc: Refcounts):
        self.file = file
        self.h = h
        self.l1 = l1
        self.l1_dirty: set[int] = set()
        self.l2cache = TableCache(l2_tables)
        self.rc = rc
        # true from a fresh-layout make_empty until the next mapping change
        self.pristine = False

    @classmethod
    async def load(
        cls,
        file: ImageFile,
        h: Header,
        l2_cache_bytes: int = DEFAULT_L2_CACHE,
        refcount_cache_bytes: int = DEFAULT_REFCOUNT_CACHE,
    ) -> ClusterMap:
        """Read and check the L1 and refcount tables a parsed header points at."""
        cs = h.cluster_size
        size = file.length
        l1_bytes = await file.read(h.l1_table_offset, h.l1_size * 8) if h.l1_size else b""
        l1 = list(struct.unpack(f">{h.l1_size}Q", l1_bytes))
        for i, e in enumerate(l1):
            off = e & L1E_OFFSET_MASK
            if off % cs or (off and off + cs > size):
                raise BlockError(
                    errno.EINVAL, f"L2 table offset {off:#x} in L1 entry {i} is invalid"
                )
        rt = await file.read(h.refcount_table_offset, h.refcount_table_clusters * cs)
        reftable = Refcounts.parse_reftable(rt, size, cs)
        # never more tables than the image can have
        l2_tables = max(2, min(l2_cache_bytes // cs, max(h.l1_size, 1)))
        rc = Refcounts(file, h, reftable, max(4, refcount_cache_bytes // cs))
        return cls(file, h, l1, l2_tables, rc)

    async def l2(self, l1_index: int, alloc: bool) -> bytearray | None:
        """The L2 table of an L1 slot (allocating a zeroed one if asked)."""
        e = self.l1[l1_index]
        off = e & L1E_OFFSET_MASK
        if off == 0:
            if not alloc:
                return None
            off = await self.rc.alloc(1)
            fresh = bytearray(self.h.cluster_size)
            await self._l2_make_room()
            self.l2cache.put(off, fresh, dirty=True)
            self.l1[l1_index] = off | OFLAG_COPIED
            self.l1_dirty.add(l1_index)
            return fresh
        table = self.l2cache.get(off)
        if table is None:
            table = bytearray(await self.file.read(off, self.h.cluster_size))
            await self._l2_make_room()
            self.l2cache.put(off, table)
        return table

    async def _l2_make_room(self) -> None:
        v = self.l2cache.victim()
        if v is None:
            return
        if v in self.l2cache.dirty:
            # An L2 table may reach the disk only after the refcounts of what it
            # points at (and the data) did.
            await self.flush()
        self.l2cache.drop(v)

    async def get_entry(self, cluster: int) -> int:
        l2e = self.h.l2_entries
        table = await self.l2(cluster // l2e, alloc=False)
        if table is None:
            return 0
        i = cluster % l2e
        entry = int.from_bytes(table[i * 8 : i * 8 + 8], "big")
        if entry & L2E_OFFSET_MASK and not entry & OFLAG_COMPRESSED:
            self.check_host(cluster, entry)
        return entry

    def check_host(self, cluster: int, entry: int) -> None:
        """Refuse an L2 entry whose host cluster is unaligned or past EOF (a
        hostile or corrupt image): using it would read or overwrite the wrong
        bytes, and freeing it would drop another cluster's refcount."""
        host = entry & L2E_OFFSET_MASK
        cs = self.h.cluster_size
        if host % cs:
            raise BlockError(
                errno.EIO,
                f"qcow2: Cluster allocation offset {host:#x} unaligned (guest offset "
                f"{cluster * cs:#x}); image is corrupt",
            )
        if entry_kind(entry, self.h.version) == NORMAL and host >= self.file.length:
            raise BlockError(
                errno.EIO,
                f"qcow2: Data cluster offset {host:#x} (guest offset {cluster * cs:#x}) "
                f"lies beyond the end of the file ({self.file.length} bytes); image is corrupt",
            )

    async def set_entry(self, cluster: int, entry: int) -> None:
        self.pristine = False
        l2e = self.h.l2_entries
        l1i = cluster // l2e
        table = await self.l2(l1i, alloc=True)
        assert table is not None
        i = cluster % l2e
        table[i * 8 : i * 8 + 8] = entry.to_bytes(8, "big")
        self.l2cache.dirty.add(self.l1[l1i] & L1E_OFFSET_MASK)

    async def allocated_bytes(self, length: int) -> int:
        """Bytes this layer maps itself (data or zero clusters; never its backing),
        counted from the L2 tables alone: what a status poll can afford every turn."""
        cs, l2e = self.h.cluster_size, self.h.l2_entries
        clusters = 0
        for i, e in enumerate(self.l1):
            if not e & L1E_OFFSET_MASK:
                continue
            table = await self.l2(i, alloc=False)
            if table is not None:
                clusters += l2e - array("Q", table).count(0)  # 0: unallocated here
        return min(clusters * cs, length)

    async def map(self, offset: int, nbytes: int) -> list[Segment]:
        """Resolve guest bytes to runs of storage, merging contiguous clusters."""
        cs, cb, ver = self.h.cluster_size, self.h.cluster_bits, self.h.version
        l2e = self.h.l2_entries
        out: list[Segment] = []
        pos, end = offset, offset + nbytes
        while pos < end:
            cluster = pos >> cb
            table = await self.l2(cluster // l2e, alloc=False)
            # walk the rest of this L2 table without further lookups
            last_in_table = min(end, ((cluster // l2e) + 1) * l2e * cs)
            while pos < last_in_table:
                cluster = pos >> cb
                in_off = pos & (cs - 1)
                n = min(cs - in_off, last_in_table - pos)
                if table is None:
                    entry = 0
                else:
                    i = cluster % l2e
                    entry = int.from_bytes(table[i * 8 : i * 8 + 8], "big")
                kind = entry_kind(entry, ver)
                if kind == NORMAL or kind == ZERO_ALLOC:
                    self.check_host(cluster, entry)
                    host = (entry & L2E_OFFSET_MASK) + in_off
                elif kind == COMPRESSED:
                    host = entry
                else:
                    host = 0
                prev = out[-1] if out else None
                if (
                    prev is not None
                    and prev.kind == kind
                    and kind != COMPRESSED
                    and (kind not in (NORMAL, ZERO_ALLOC) or prev.host + prev.length == host)
                ):
                    prev.length += n
                else:
                    out.append(Segment(pos, n, kind, host))
                pos += n
        return out

    def release(self, entry: int) -> None:
        """Schedule the host storage an L2 entry held for freeing."""
        kind = entry_kind(entry, self.h.version)
        if kind in (NORMAL, ZERO_ALLOC):
            self.rc.defer_free(entry & L2E_OFFSET_MASK)
        elif kind == COMPRESSED:
            cb = self.h.cluster_bits
            off, nb = compressed_geometry(entry & ~OFLAG_COPIED, cb)
            for c in range(off >> cb, ((off + nb - 1) >> cb) + 1):
                self.rc.defer_free(c << cb)

    async def flush(self) -> None:
        """Write back metadata in crash-safe order (see refcount.py)."""
        f = self.file
        if not (
            self.rc.cache.dirty
            or self.rc.reftable_dirty
            or self.l2cache.dirty
            or self.l1_dirty
            or self.rc.pending_free
        ):
            return
        await self.rc.write_increments()
        await f.flush()
        if self.l2cache.dirty or self.l1_dirty:
            for off in sorted(self.l2cache.dirty):
                await f.write(off, bytes(self.l2cache.tables[off]))
            self.l2cache.dirty.clear()
            for i in sorted(self.l1_dirty):
                await f.write(self.h.l1_table_offset + 8 * i, self.l1[i].to_bytes(8, "big"))
            self.l1_dirty.clear()
            await f.flush()
        if self.rc.pending_free:
            freed = await self.rc.apply_frees()
            await self.rc.write_increments()
            await f.flush()
            cb = self.h.cluster_bits
            for c in freed:
                if (c << cb) < f.length:
                    await f.discard(c << cb, 1 << cb)
