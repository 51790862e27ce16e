"""The ``qcow2`` format driver.

Metadata lives in memory (L1 table, refcount table) or in bounded LRU caches (L2
tables, refcount blocks) and is written back at flush, in the order described in
qcow2/refcount.py. One asyncio lock guards the metadata: writes hold it for their
whole duration (allocation, copy-on-write and table update are one step), reads
hold it only while they look up the mapping.
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from ..errors import BlockError, OptionError
from ..qcow2.format import (
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    FormatError,
    Header,
    compressed_geometry,
    parse_header,
    size_to_l1,
)
from ..qcow2.refcount import Refcounts, TableCache, rc_get, rc_set
from .file import FileNode
from .graph import Graph, probe_format, register, resolve_relative
from .node import Extent, Node

UNALLOCATED, ZERO_PLAIN, ZERO_ALLOC, NORMAL, COMPRESSED = range(5)
DEFAULT_L2_CACHE = 32 << 20
DEFAULT_REFCOUNT_CACHE = 1 << 20


@dataclass
class Segment:
    """A run of guest bytes with one kind of storage (host offsets contiguous)."""

    start: int
    length: int
    kind: int
    host: int  # host byte offset of ``start`` for NORMAL/ZERO_ALLOC, L2 entry for COMPRESSED


def entry_kind(entry: int, version: int) -> int:
    if entry & OFLAG_COMPRESSED:
        return COMPRESSED
    if version >= 3 and entry & OFLAG_ZERO:
        return ZERO_ALLOC if entry & L2E_OFFSET_MASK else ZERO_PLAIN
    if entry & L2E_OFFSET_MASK:
        return NORMAL
    return UNALLOCATED


@register
class Qcow2Node(Node):
    driver_name = "qcow2"
    supports_backing = True
    schema = {
        "file": "ref",
        "backing": "ref",
        "data-file": "ref",
        "lazy-refcounts": "bool",
        "pass-discard-request": "bool",
        "pass-discard-snapshot": "bool",
        "pass-discard-other": "bool",
        "discard-no-unref": "bool",
        "overlap-check": "any",
        "cache-size": "size",
        "l2-cache-size": "size",
        "l2-cache-entry-size": "size",
        "refcount-cache-size": "size",
        "cache-clean-interval": "int",
        "encrypt": "any",
    }

    h: Header
    l1: list[int]
    rc: Refcounts

    def __init__(self, node_name: str, options: dict[str, Any]) -> None:
        super().__init__(node_name, options)
        self.lock = asyncio.Lock()
        self.pristine = False  # true from a fresh-layout make_empty until the next mapping change
        # replication buffers: make_empty swaps in a fresh file (O(1) in the data held)
        self.swap_on_empty = False
        self.l1_dirty: set[int] = set()
        self.l2cache = TableCache(64)
        self.filename = ""

    # -- open -------------------------------------------------------------------

    @classmethod
    async def open(cls, graph: Graph, name: str, opts: dict[str, Any], typed: bool) -> Qcow2Node:
        if opts.get("data-file") is not None:
            raise OptionError("blockrep does not support qcow2 external data files")
        node = cls(name, opts)
        f = await graph.open_child(opts, "file", typed=typed, default_driver="file")
        assert f is not None
        node.attach_child("file", f)
        node.read_only = node.read_only or f.read_only
        node.filename = f.describe_filename()
        try:
            await node._load(opts)
            await node._open_backing(graph, opts, typed)
        except BaseException:
            node.detach_child("file")
            if not f.parents and f.node_name not in graph.monitor_owned:
                await graph.close_node(f)
            b = node.children.get("backing")
            if b is not None:
                node.detach_child("backing")
            raise
        return node

    async def _load(self, opts: dict[str, Any]) -> None:
        f = self._file
        size = f.length
        head = await f.read(0, min(size, 2 << 20)) if size else b""
        try:
            h = parse_header(head, size)
        except FormatError as e:
            raise BlockError(errno.EINVAL, str(e)) from None
        self.h = h
        cs = h.cluster_size
        if not self.read_only:
            if h.incompatible_features & INCOMPAT_CORRUPT:
                raise BlockError(
                    errno.EACCES, "qcow2: Image is corrupt; cannot be opened read/write"
                )
            if h.nb_snapshots:
                raise BlockError(
                    errno.ENOTSUP,
                    "Images with internal snapshots can only be opened read-only by blockrep",
                )
        self.length = h.size
        l1_bytes = await f.read(h.l1_table_offset, h.l1_size * 8) if h.l1_size else b""
        self.l1 = list(struct.unpack(f">{h.l1_size}Q", l1_bytes))
        for i, e in enumerate(self.l1):
            off = e & L1E_OFFSET_MASK
            if off % cs or (off and off + cs > size):
                raise BlockError(
                    errno.EINVAL, f"L2 table offset {off:#x} in L1 entry {i} is invalid"
                )
        rt = await f.read(h.refcount_table_offset, h.refcount_table_clusters * cs)
        reftable = Refcounts.parse_reftable(rt, size, cs)
        l2_cache = int(opts.get("l2-cache-size", opts.get("cache-size", DEFAULT_L2_CACHE)))
        # never more tables than the image can have
        l2_tables = max(2, min(l2_cache // cs, max(h.l1_size, 1)))
        self.l2cache = TableCache(l2_tables)
        rc_cache = int(opts.get("refcount-cache-size", DEFAULT_REFCOUNT_CACHE))
        self.rc = Refcounts(f, h, reftable, max(4, rc_cache // cs), self._write_reftable_fields)
        self.request_alignment = 1
        if not self.read_only:
            await self._open_rw_fixups()

    async def _open_rw_fixups(self) -> None:
        h = self.h
        changed = False
        if h.autoclear_features:
            # Bits we do not maintain must be cleared by a writer (qcow2 spec).
            h.autoclear_features = 0
            changed = True
        if h.incompatible_features & INCOMPAT_DIRTY:
            # QEMU repairs a dirty image on a writable open, then clears the bit.
            from ..qcow2.check import check_image

            await check_image(self, repair=True)
            h.incompatible_features &= ~INCOMPAT_DIRTY
            changed = True
        if changed:
            await self._file.write(0, h.pack_fixed())
            await self._file.flush()

    async def _open_backing(self, graph: Graph, opts: dict[str, Any], typed: bool) -> None:
        if "backing" in opts:
            if opts["backing"] is None:
                return
            b = await graph.open_child(
                {**opts, "read-only": True}, "backing", typed=typed, required=False
            )
            if b is not None:
                self.attach_child("backing", b)
            return
        name = self.h.backing_file
        if not name:
            return
        path = resolve_relative(self.filename, name)
        chain: list[str] = graph.__dict__.setdefault("_qcow2_chain", [])
        real = os.path.realpath(self.filename)
        if real in chain:
            raise BlockError(errno.ELOOP, f"Backing file chain loop detected at '{self.filename}'")
        if len(chain) > 64:
            raise BlockError(errno.ELOOP, "Backing chain too deep")
        fmt = self.h.backing_format or probe_format(path)
        chain.append(real)
        try:
            b = await graph.add(
                {"driver": fmt, "read-only": True, "file": {"driver": "file", "filename": path}},
                typed=True,
            )
        except BlockError as e:
            raise BlockError(e.errno, f"Could not open backing file: {e.message}") from None
        finally:
            chain.pop()
        self.attach_child("backing", b)

    @property
    def _file(self) -> Node:
        f = self.file
        assert f is not None
        return f

    def describe_filename(self) -> str:
        return self.filename

    async def _write_reftable_fields(self) -> None:
        await self._file.write(
            48, struct.pack(">QI", self.h.refcount_table_offset, self.h.refcount_table_clusters)
        )

    # -- mapping ----------------------------------------------------------------

    async def _l2(self, l1_index: int, alloc: bool) -> bytearray | None:
        """The L2 table of an L1 slot (allocating a zeroed one if asked)."""
        e = self.l1[l1_index]
        off = e & L1E_OFFSET_MASK
        if off == 0:
            if not alloc:
                return None
            off = await self.rc.alloc(1)
            table = bytearray(self.h.cluster_size)
            await self._l2_make_room()
            self.l2cache.put(off, table, dirty=True)
            self.l1[l1_index] = off | OFLAG_COPIED
            self.l1_dirty.add(l1_index)
            return table
        table = self.l2cache.get(off)
        if table is None:
            table = bytearray(await self._file.read(off, self.h.cluster_size))
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
            await self._flush_metadata()
        self.l2cache.drop(v)

    async def _get_entry(self, cluster: int) -> int:
        l2e = self.h.l2_entries
        table = await self._l2(cluster // l2e, alloc=False)
        if table is None:
            return 0
        i = cluster % l2e
        entry = int.from_bytes(table[i * 8 : i * 8 + 8], "big")
        if entry & L2E_OFFSET_MASK and not entry & OFLAG_COMPRESSED:
            self._check_host(cluster, entry)
        return entry

    def _check_host(self, cluster: int, entry: int) -> None:
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
        if entry_kind(entry, self.h.version) == NORMAL and host >= self._file.length:
            raise BlockError(
                errno.EIO,
                f"qcow2: Data cluster offset {host:#x} (guest offset {cluster * cs:#x}) "
                f"lies beyond the end of the file ({self._file.length} bytes); image is corrupt",
            )

    async def _set_entry(self, cluster: int, entry: int) -> None:
        self.pristine = False
        l2e = self.h.l2_entries
        l1i = cluster // l2e
        table = await self._l2(l1i, alloc=True)
        assert table is not None
        i = cluster % l2e
        table[i * 8 : i * 8 + 8] = entry.to_bytes(8, "big")
        self.l2cache.dirty.add(self.l1[l1i] & L1E_OFFSET_MASK)

    async def _map(self, offset: int, nbytes: int) -> list[Segment]:
        """Resolve guest bytes to runs of storage, merging contiguous clusters."""
        cs, cb, ver = self.h.cluster_size, self.h.cluster_bits, self.h.version
        l2e = self.h.l2_entries
        out: list[Segment] = []
        pos, end = offset, offset + nbytes
        while pos < end:
            cluster = pos >> cb
            table = await self._l2(cluster // l2e, alloc=False)
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
                    self._check_host(cluster, entry)
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

    async def _read_compressed(self, entry: int) -> bytes:
        cs = self.h.cluster_size
        off, nb = compressed_geometry(entry & ~OFLAG_COPIED, self.h.cluster_bits)
        raw = await self._file.read(off, nb)
        try:
            d = zlib.decompressobj(-12)
            out = d.decompress(raw, cs)
        except zlib.error:
            raise BlockError(errno.EIO, "Could not decompress a compressed cluster") from None
        if len(out) != cs:
            raise BlockError(errno.EIO, "Compressed cluster is truncated")
        return out

    async def _read_backing(self, offset: int, nbytes: int) -> bytes:
        b = self.backing
        if b is None or offset >= b.length:
            return bytes(nbytes)
        n = min(nbytes, b.length - offset)
        data = await b.read(offset, n)
        return data if n == nbytes else data + bytes(nbytes - n)

    async def _read_segment(self, seg: Segment) -> bytes:
        if seg.kind == NORMAL:
            return await self._file.read(seg.host, seg.length)
        if seg.kind == UNALLOCATED:
            return await self._read_backing(seg.start, seg.length)
        if seg.kind == COMPRESSED:
            cs = self.h.cluster_size
            data = await self._read_compressed(seg.host)
            in_off = seg.start & (cs - 1)
            return data[in_off : in_off + seg.length]
        return bytes(seg.length)

    # -- read -------------------------------------------------------------------

    async def _co_read(self, offset: int, nbytes: int) -> bytes:
        async with self.lock:
            segs = await self._map(offset, nbytes)
        if len(segs) == 1:
            return await self._read_segment(segs[0])
        parts = [await self._read_segment(s) for s in segs]
        return b"".join(parts)

    # -- write ------------------------------------------------------------------

    async def _old_cluster(self, cluster: int, entry: int) -> bytes:
        """What a cluster reads as now (for copy-on-write of a partial write)."""
        cs = self.h.cluster_size
        kind = entry_kind(entry, self.h.version)
        if kind == NORMAL:
            return await self._file.read(entry & L2E_OFFSET_MASK, cs)
        if kind == COMPRESSED:
            return await self._read_compressed(entry)
        if kind == UNALLOCATED:
            start = cluster * cs
            n = min(cs, self.length - start)
            data = await self._read_backing(start, n)
            return data + bytes(cs - n)
        return bytes(cs)

    def _release(self, entry: int) -> None:
        """Schedule the host storage an L2 entry held for freeing."""
        kind = entry_kind(entry, self.h.version)
        if kind in (NORMAL, ZERO_ALLOC):
            self.rc.defer_free(entry & L2E_OFFSET_MASK)
        elif kind == COMPRESSED:
            off, nb = compressed_geometry(entry & ~OFLAG_COPIED, self.h.cluster_bits)
            cb = self.h.cluster_bits
            first = off >> cb
            last = (off + nb - 1) >> cb
            for c in range(first, last + 1):
                self.rc.defer_free(c << cb)

    async def _co_write(self, offset: int, data: bytes, fua: bool) -> None:
        async with self.lock:
            await self._write_locked(offset, memoryview(data))
        if fua:
            await self.flush()

    async def _write_locked(self, offset: int, data: memoryview) -> None:
        cs, cb = self.h.cluster_size, self.h.cluster_bits
        pos, end = offset, offset + len(data)
        while pos < end:
            cluster = pos >> cb
            entry = await self._get_entry(cluster)
            if entry_kind(entry, self.h.version) == NORMAL and entry & OFLAG_COPIED:
                # in-place: extend over following clusters mapped contiguously
                host = entry & L2E_OFFSET_MASK
                stop = min(end, (cluster + 1) * cs)
                while stop < end:
                    nxt = await self._get_entry(stop >> cb)
                    if (
                        entry_kind(nxt, self.h.version) != NORMAL
                        or not nxt & OFLAG_COPIED
                        or (nxt & L2E_OFFSET_MASK) != host + (stop - (cluster << cb))
                    ):
                        break
                    stop = min(end, stop + cs)
                await self._file.write(host + (pos & (cs - 1)), data[pos - offset : stop - offset])
                pos = stop
                continue
            # allocate a run of clusters that all need new storage
            entries = [entry]
            c = cluster + 1
            while c << cb < end and len(entries) < 4096:
                e = await self._get_entry(c)
                if entry_kind(e, self.h.version) == NORMAL and e & OFLAG_COPIED:
                    break
                entries.append(e)
                c += 1
            n = len(entries)
            run_start = cluster << cb
            run_end = run_start + n * cs
            w_end = min(end, run_end)
            need_head = pos > run_start
            need_tail = end < run_end
            host = await self.rc.alloc(n)
            try:
                if not (need_head or need_tail):
                    # whole clusters: the guest data goes out as it is, no copy
                    await self._file.write(host, data[pos - offset : w_end - offset])
                else:
                    buf = bytearray(n * cs)
                    if need_head:
                        buf[:cs] = await self._old_cluster(cluster, entries[0])
                    if need_tail and (n > 1 or not need_head):
                        buf[(n - 1) * cs :] = await self._old_cluster(cluster + n - 1, entries[-1])
                    buf[pos - run_start : w_end - run_start] = data[pos - offset : w_end - offset]
                    await self._file.write(host, memoryview(buf))
            except BlockError:
                # nothing references the new clusters yet: give them back (QEMU's
                # qcow2_alloc_cluster_abort), or the image leaks them
                await self.rc._undo_alloc(host, n)
                raise
            for i, old in enumerate(entries):
                await self._set_entry(cluster + i, (host + i * cs) | OFLAG_COPIED)
                self._release(old)
            pos = w_end

    async def _co_write_zeroes(self, offset: int, nbytes: int, may_unmap: bool, fua: bool) -> None:
        async with self.lock:
            await self._zero_locked(offset, nbytes, may_unmap)
        if fua:
            await self.flush()

    def _full_clusters(self, offset: int, nbytes: int) -> tuple[int, int]:
        """[first, last) clusters wholly inside the range (the image end counts as a boundary)."""
        cs = self.h.cluster_size
        end = offset + nbytes
        first = -(-offset // cs)
        last = end // cs
        if end == self.length and end % cs:
            last += 1
        return first, max(first, last)

    async def _zero_locked(self, offset: int, nbytes: int, may_unmap: bool) -> None:
        cs = self.h.cluster_size
        end = offset + nbytes
        first, last = self._full_clusters(offset, nbytes)
        if first >= last:
            await self._zero_partial(offset, end)
            return
        await self._zero_partial(offset, min(end, first * cs))
        v3 = self.h.version >= 3
        for c in range(first, last):
            e = await self._get_entry(c)
            kind = entry_kind(e, self.h.version)
            if v3:
                if kind == ZERO_PLAIN or (kind == ZERO_ALLOC and not may_unmap):
                    continue
                if kind == NORMAL and not may_unmap and e & OFLAG_COPIED:
                    await self._set_entry(c, (e & L2E_OFFSET_MASK) | OFLAG_COPIED | OFLAG_ZERO)
                    continue
                await self._set_entry(c, OFLAG_ZERO)
                self._release(e)
            else:
                if kind == UNALLOCATED and self.backing is None:
                    continue
                await self._write_locked(c * cs, memoryview(bytes(min(cs, self.length - c * cs))))
        await self._zero_partial(max(offset, last * cs), end)

    async def _zero_partial(self, start: int, end: int) -> None:
        """Zero bytes inside single clusters, skipping clusters that read as zero."""
        cs = self.h.cluster_size
        pos = start
        while pos < end:
            stop = min(end, (pos // cs + 1) * cs)
            e = await self._get_entry(pos // cs)
            kind = entry_kind(e, self.h.version)
            reads_zero = kind in (ZERO_PLAIN, ZERO_ALLOC) or (
                kind == UNALLOCATED and self.backing is None
            )
            if not reads_zero:
                await self._write_locked(pos, memoryview(bytes(stop - pos)))
            pos = stop

    async def _co_discard(self, offset: int, nbytes: int) -> None:
        async with self.lock:
            first, last = self._full_clusters(offset, nbytes)
            for c in range(first, last):
                e = await self._get_entry(c)
                kind = entry_kind(e, self.h.version)
                allocated = kind in (NORMAL, ZERO_ALLOC, COMPRESSED)
                if not (allocated or self.backing is not None):
                    continue
                new = OFLAG_ZERO if self.h.version >= 3 else 0
                if e == new:
                    continue
                await self._set_entry(c, new)
                self._release(e)

    # -- flush ------------------------------------------------------------------

    async def _co_flush(self) -> None:
        if self.read_only:
            return
        async with self.lock:
            await self._flush_metadata()
        await self._file.flush()

    async def _flush_metadata(self) -> None:
        """Write back metadata in crash-safe order (see qcow2/refcount.py)."""
        f = self._file
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

    # -- block status -------------------------------------------------------------

    async def _co_block_status(self, offset: int, nbytes: int) -> list[Extent]:
        async with self.lock:
            segs = await self._map(offset, nbytes)
            recurse = any(s.kind == NORMAL for s in segs) and await self._metadata_preallocated()
        f = self._file
        out: list[Extent] = []
        for s in segs:
            if s.kind == NORMAL and recurse:
                # as QEMU (BDRV_BLOCK_RECURSE): holes in the host file read as zeroes
                n = max(0, min(s.length, f.length - s.host))
                for e in await f.block_status(s.host, n) if n else []:
                    out.append(
                        Extent(
                            s.start + e.start - s.host, e.length, True, e.zero, True, 0, e.start, f
                        )
                    )
                if n < s.length:
                    out.append(
                        Extent(s.start + n, s.length - n, True, True, True, 0, s.host + n, f)
                    )
            elif s.kind == NORMAL:
                out.append(Extent(s.start, s.length, True, False, True, 0, s.host, f))
            elif s.kind == ZERO_ALLOC:
                out.append(Extent(s.start, s.length, True, True, False, 0, s.host, f))
            elif s.kind == ZERO_PLAIN:
                out.append(Extent(s.start, s.length, True, True, False, 0, None, None))
            elif s.kind == COMPRESSED:
                e = Extent(s.start, s.length, True, False, True, 0, None, None)
                e.compressed = True  # type: ignore[attr-defined]
                out.append(e)
            else:
                out.extend(await self._backing_status(s.start, s.length))
        return out

    async def _backing_status(self, start: int, length: int) -> list[Extent]:
        b = self.backing
        if b is None:
            return [Extent(start, length, False, True, False, 0, None, None)]
        out = []
        if start < b.length:
            n = min(length, b.length - start)
            for e in await b.block_status(start, n):
                out.append(
                    Extent(
                        e.start, e.length, e.present, e.zero, e.data, e.depth + 1, e.offset, e.file
                    )
                )
            start += n
            length -= n
        if length:
            # beyond the end of the backing file: QEMU answers at this layer (depth 0)
            out.append(Extent(start, length, False, True, False, 0, None, None))
        return out

    async def _metadata_preallocated(self) -> bool:
        """QEMU's qcow2_detect_metadata_preallocation, decided once per open: the image
        counts as preallocated when clearly more clusters are refcounted than the host
        file really holds; block status then looks through to the file's holes."""
        v = self.__dict__.get("_prealloc")
        if v is None:
            f = self._file
            allocated = getattr(f, "allocated_size", None)
            v = False
            if allocated is not None:
                cs = self.h.cluster_size
                real = allocated() // cs
                threshold = max(real * 10 // 9, real + 2)
                count = 0
                try:
                    for c in range(-(-f.length // cs)):
                        if await self.rc.get(c):
                            count += 1
                            if count >= threshold:
                                v = True
                                break
                except BlockError:
                    v = False  # as QEMU: an unreadable refcount means "not preallocated"
            self._prealloc = v
        return v

    # -- make_empty -----------------------------------------------------------------

    async def _co_make_empty(self) -> None:
        async with self.lock:
            if self.pristine:
                # nothing was mapped since the last make_empty: the file already is
                # what another make_empty would write (checkpoints of an idle buffer)
                return
            await self._make_empty_locked()

    async def _make_empty_locked(self) -> None:
        h = self.h
        cs = h.cluster_size
        l1_clusters = -(-h.l1_size * 8 // cs)
        if h.version < 3 or 3 + l1_clusters > self.rc.block_entries:
            # Fallback, as QEMU: discard every cluster (O(data)); only slots that
            # have an L2 table can hold anything.
            nclusters = -(-self.length // cs)
            l2e = h.l2_entries
            for i in range(len(self.l1)):
                if not self.l1[i] & L1E_OFFSET_MASK:
                    continue
                for c in range(i * l2e, min((i + 1) * l2e, nclusters)):
                    e = await self._get_entry(c)
                    if e:
                        await self._set_entry(c, 0)
                        self._release(e)
            await self._flush_metadata()
            return
        if (
            self.swap_on_empty
            and isinstance(self._file, FileNode)
            and not self._file.direct
            and not h.nb_snapshots
        ):
            await self._make_empty_by_swap(l1_clusters)
            return
        # The fresh layout (reftable in cluster 1, refcount block 0 in cluster 2,
        # L1 from cluster 3) is reachable in place when L1 and block 0 already sit
        # there and cluster 1 is no refcount block; the reftable itself may have
        # moved. Otherwise unmap everything the ordinary way (not byte-identical).
        f = self._file
        rt_on_disk = await f.read(h.refcount_table_offset, h.refcount_table_clusters * cs)
        rt_entries = struct.unpack(f">{len(rt_on_disk) // 8}Q", rt_on_disk)
        in_place = (
            rt_entries[0] == 2 * cs
            and cs not in rt_entries
            and (h.l1_size == 0 or h.l1_table_offset == 3 * cs)
            and not h.nb_snapshots
            and (h.refcount_table_offset != cs or h.refcount_table_clusters == 1)
        )
        if not in_place:
            await self._drop_all_l2_tables()
            return
        # Rewrite the image as a fresh one: O(metadata). Every step leaves an image
        # with at most leaked clusters, never a reference to a cluster whose
        # refcount is 0, so a crash in between is harmless (no dirty-bit window):
        #  1. zero the L1 table: every L2 table and data cluster is now a leak;
        #  2. reftable in cluster 1: drop entries 1.. (their blocks become leaks);
        #     reftable elsewhere: count cluster 1 in block 0, write the one-entry
        #     table into cluster 1, then point the header at it;
        #  3. rewrite refcount block 0 to count only header, tables and L1;
        #  4. truncate the file after the L1 table.
        # Unwritten in-memory metadata is dropped: nothing on disk refers to it.
        order = h.refcount_order
        if h.l1_size:
            await f.write_zeroes(h.l1_table_offset, l1_clusters * cs)
        await f.flush()
        if h.refcount_table_offset == cs:
            await f.write(cs + 8, bytes(cs - 8))
            await f.flush()
        else:
            block0 = bytearray(await f.read(2 * cs, cs))
            if rc_get(block0, 1, order) == 0:
                rc_set(block0, 1, order, 1)
                await f.write(2 * cs, bytes(block0))
                await f.flush()
            await f.write(cs, (2 * cs).to_bytes(8, "big") + bytes(cs - 8))
            await f.flush()
            h.refcount_table_offset = cs
            h.refcount_table_clusters = 1
            await self._write_reftable_fields()
            await f.flush()
        nclusters = 3 + l1_clusters
        block = bytearray(cs)
        for c in range(nclusters):
            rc_set(block, c, order, 1)
        await f.write(2 * cs, bytes(block))
        await f.flush()
        await f.truncate(nclusters * cs)  # type: ignore[attr-defined]
        await f.flush()
        self.l1 = [0] * h.l1_size
        self.l1_dirty.clear()
        self.l2cache.clear()
        self.rc = Refcounts(f, h, [2 * cs], self.rc.cache.capacity, self._write_reftable_fields)
        self.rc.reftable_capacity = cs // 8
        self.rc.free_hint = nclusters
        self.pristine = True

    async def _make_empty_by_swap(self, l1_clusters: int) -> None:
        """make_empty as a new file with QEMU's result, renamed over the old one.

        The bytes are exactly what QEMU's make_empty leaves: the header with only
        the L1/refcount-table fields rewritten (and the dirty bit clear), the
        one-entry refcount table, refcount block 0 counting header, tables and L1,
        a zero L1, the file ending after it. The old data is freed in the
        background, so the cost does not grow with what the image held.
        """
        h = self.h
        cs = h.cluster_size
        f = self._file
        assert isinstance(f, FileNode)
        header = bytearray(await f.read(0, cs))
        h.incompatible_features &= ~INCOMPAT_DIRTY
        h.l1_table_offset = 3 * cs
        h.refcount_table_offset = cs
        h.refcount_table_clusters = 1
        fixed = h.pack_fixed()
        header[: len(fixed)] = fixed
        nclusters = 3 + l1_clusters
        content = bytearray(nclusters * cs)
        content[:cs] = header
        content[cs : cs + 8] = (2 * cs).to_bytes(8, "big")
        block = memoryview(content)[2 * cs : 3 * cs]
        refblock = bytearray(cs)
        for c in range(nclusters):
            rc_set(refblock, c, h.refcount_order, 1)
        block[:] = refblock
        await f.swap_in(bytes(content))
        self.l1 = [0] * h.l1_size
        self.l1_dirty.clear()
        self.l2cache.clear()
        self.rc = Refcounts(f, h, [2 * cs], self.rc.cache.capacity, self._write_reftable_fields)
        self.rc.reftable_capacity = cs // 8
        self.rc.free_hint = nclusters
        self.pristine = True

    async def _drop_all_l2_tables(self) -> None:
        """make_empty for a non-fresh layout: unmap everything through the usual
        crash-safe flush order (L1 entries reach the disk before the frees)."""
        cs = self.h.cluster_size
        for i, e in enumerate(self.l1):
            off = e & L1E_OFFSET_MASK
            if not off:
                continue
            table = await self._l2(i, alloc=False)
            assert table is not None
            for j in range(0, cs, 8):
                le = int.from_bytes(table[j : j + 8], "big")
                if le:
                    self._release(le)
            self.l1[i] = 0
            self.l1_dirty.add(i)
            self.l2cache.drop(off)
            self.rc.defer_free(off)
        await self._flush_metadata()

    async def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        """Rewrite the header's backing file name and format (after a commit)."""
        h = self.h
        old = (h.backing_file, h.backing_format)
        h.backing_file, h.backing_format = name, (fmt if name else None)
        try:
            header = h.pack(h.cluster_size)
        except FormatError as e:
            h.backing_file, h.backing_format = old
            raise BlockError(errno.EINVAL, str(e)) from None
        async with self.lock:
            await self._file.write(0, header + bytes(h.cluster_size - len(header)))
            await self._file.flush()

    # -- reopen / close ---------------------------------------------------------

    async def reopen(self, read_only: bool) -> None:
        if read_only == self.read_only:
            return
        if read_only:
            await self.flush()
        await self._file.reopen(read_only)
        self.read_only = read_only
        if not read_only:
            try:
                await self._open_rw_fixups()
            except BlockError:
                await self._file.reopen(True)
                self.read_only = True
                raise

    async def close(self) -> None:
        if not self.closed and not self.read_only:
            try:
                await self.flush()
            except BlockError:
                pass
        await super().close()

    def info(self) -> dict[str, Any]:
        h = self.h
        spec: dict[str, Any] = {"compat": "1.1" if h.version >= 3 else "0.10"}
        if h.version >= 3:
            spec.update(
                {
                    "compression-type": "zlib",
                    "lazy-refcounts": bool(h.compatible_features & 1),
                    "refcount-bits": h.refcount_bits,
                    "corrupt": bool(h.incompatible_features & INCOMPAT_CORRUPT),
                    "extended-l2": False,
                }
            )
        else:
            spec.update({"compression-type": "zlib", "refcount-bits": 16})
        return {"cluster-size": h.cluster_size, "format-specific": {"type": "qcow2", "data": spec}}


async def create(
    file: Node,
    size: int,
    *,
    cluster_size: int = 65536,
    backing_file: str | None = None,
    backing_format: str | None = None,
    version: int = 3,
    refcount_bits: int = 16,
    lazy_refcounts: bool = False,
) -> None:
    """Write a fresh qcow2 image into an empty file node, laid out as QEMU does.

    Cluster 0 holds the header, 1 the refcount table, 2 the first refcount block,
    and the L1 table follows at the first free cluster; the file ends right after
    the L1 entries (not the whole L1 cluster), exactly as qemu-img leaves it.
    """
    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 << 20:
        raise BlockError(
            errno.EINVAL,
            "Cluster size must be a power of two between 512 and 2048k",
        )
    if refcount_bits & (refcount_bits - 1) or not 1 <= refcount_bits <= 64:
        raise BlockError(
            errno.EINVAL, "Refcount width must be a power of two and may not exceed 64 bits"
        )
    if version < 3 and refcount_bits != 16:
        raise BlockError(
            errno.EINVAL,
            "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
        )
    cb = cluster_size.bit_length() - 1
    h = Header(
        version=version,
        cluster_bits=cb,
        size=0,
        refcount_table_offset=cluster_size,
        refcount_table_clusters=1,
        refcount_order=refcount_bits.bit_length() - 1,
        compatible_features=1 if lazy_refcounts else 0,
        backing_file=backing_file,
        backing_format=backing_format if backing_file else None,
    )
    if version == 2:
        h.header_length = 72
    header = h.pack(cluster_size)
    await file.write(0, header + bytes(cluster_size - len(header)))
    table = bytearray(2 * cluster_size)
    table[0:8] = (2 * cluster_size).to_bytes(8, "big")
    await file.write(cluster_size, bytes(table))
    rc = Refcounts(file, h, [2 * cluster_size], 16, lambda: _write_fields(file, h))
    await rc.alloc(3)
    h.l1_size = size_to_l1(size, cb)
    h.size = size
    if h.l1_size:
        l1_bytes = h.l1_size * 8
        h.l1_table_offset = await rc.alloc(-(-l1_bytes // cluster_size))
        await file.write(h.l1_table_offset, bytes(l1_bytes))
    await rc.write_increments()
    await file.write(0, h.pack(cluster_size))
    await file.flush()


async def _write_fields(file: Node, h: Header) -> None:
    await file.write(48, struct.pack(">QI", h.refcount_table_offset, h.refcount_table_clusters))
