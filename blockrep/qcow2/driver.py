"""The ``qcow2`` format driver: opening an image and its guest I/O.

The mapping and its write-back live in qcow2/cluster.py, creating an image in
qcow2/create.py, emptying it in qcow2/make_empty.py. One asyncio lock guards the
metadata: writes hold it for their whole duration (allocation, copy-on-write and
table update are one step), reads hold it only while they look up the mapping.
"""

from __future__ import annotations

import asyncio
import errno
import os
import zlib
from typing import Any

from ..block.graph import Graph, probe_format, register, resolve_relative
from ..block.node import Extent, Node
from ..errors import BlockError, OptionError
from .check import CheckResult, check_image
from .cluster import DEFAULT_L2_CACHE, DEFAULT_REFCOUNT_CACHE, ClusterMap, Segment
from .format import (
    COMPRESSED,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    L2E_OFFSET_MASK,
    NORMAL,
    OFLAG_COPIED,
    OFLAG_ZERO,
    UNALLOCATED,
    ZERO_ALLOC,
    ZERO_PLAIN,
    FormatError,
    Header,
    compressed_geometry,
    entry_kind,
    parse_header,
)
from .make_empty import Qcow2PreparedEmpty, make_empty


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
    tables: ClusterMap

    def __init__(self, node_name: str, options: dict[str, Any]) -> None:
        super().__init__(node_name, options)
        self.lock = asyncio.Lock()
        self.filename = ""
        self._prealloc: bool | None = None
        self._l2_cache_bytes = int(
            options.get("l2-cache-size", options.get("cache-size", DEFAULT_L2_CACHE))
        )
        self._refcount_cache_bytes = int(options.get("refcount-cache-size", DEFAULT_REFCOUNT_CACHE))

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
            await node._load()
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

    async def _load(self) -> None:
        f = self._file
        size = f.length
        head = await f.read(0, min(size, 2 << 20)) if size else b""
        try:
            h = parse_header(head, size)
        except FormatError as e:
            raise BlockError(errno.EINVAL, str(e)) from None
        self.h = h
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
        await self._load_tables()
        self.request_alignment = 1
        if not self.read_only:
            await self._open_rw_fixups()

    async def _load_tables(self) -> None:
        self.tables = await ClusterMap.load(
            self._file, self.h, self._l2_cache_bytes, self._refcount_cache_bytes
        )

    async def _open_rw_fixups(self) -> None:
        h = self.h
        changed = False
        if h.autoclear_features:
            # Bits we do not maintain must be cleared by a writer (qcow2 spec).
            h.autoclear_features = 0
            changed = True
        if h.incompatible_features & INCOMPAT_DIRTY:
            # QEMU repairs a dirty image on a writable open, then clears the bit.
            await self.check(repair=True)
            h.incompatible_features &= ~INCOMPAT_DIRTY
            changed = True
        if changed:
            await self._file.write(0, h.pack_fixed())
            await self._file.flush()

    async def check(self, repair: bool = False) -> CheckResult:
        """Check (and repair) the image on disk, as QEMU's bdrv_co_check."""
        async with self.lock:
            res = await check_image(self._file, self.h, repair)
            if repair:
                # the repair wrote to the file directly: what is in memory is stale
                await self._load_tables()
        return res

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
            segs = await self.tables.map(offset, nbytes)
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

    async def _co_write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        async with self.lock:
            await self._write_locked(offset, memoryview(data))
        if fua:
            await self.flush()

    async def _write_locked(self, offset: int, data: memoryview) -> None:
        cs, cb = self.h.cluster_size, self.h.cluster_bits
        pos, end = offset, offset + len(data)
        while pos < end:
            cluster = pos >> cb
            entry = await self.tables.get_entry(cluster)
            if entry_kind(entry, self.h.version) == NORMAL and entry & OFLAG_COPIED:
                # in-place: extend over following clusters mapped contiguously
                host = entry & L2E_OFFSET_MASK
                stop = min(end, (cluster + 1) * cs)
                while stop < end:
                    nxt = await self.tables.get_entry(stop >> cb)
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
                e = await self.tables.get_entry(c)
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
            host = await self.tables.rc.alloc(n)
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
                await self.tables.rc.undo_alloc(host, n)
                raise
            for i, old in enumerate(entries):
                await self.tables.set_entry(cluster + i, (host + i * cs) | OFLAG_COPIED)
                self.tables.release(old)
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
            e = await self.tables.get_entry(c)
            kind = entry_kind(e, self.h.version)
            if v3:
                if kind == ZERO_PLAIN or (kind == ZERO_ALLOC and not may_unmap):
                    continue
                if kind == NORMAL and not may_unmap and e & OFLAG_COPIED:
                    await self.tables.set_entry(
                        c, (e & L2E_OFFSET_MASK) | OFLAG_COPIED | OFLAG_ZERO
                    )
                    continue
                await self.tables.set_entry(c, OFLAG_ZERO)
                self.tables.release(e)
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
            e = await self.tables.get_entry(pos // cs)
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
                e = await self.tables.get_entry(c)
                kind = entry_kind(e, self.h.version)
                allocated = kind in (NORMAL, ZERO_ALLOC, COMPRESSED)
                if not (allocated or self.backing is not None):
                    continue
                new = OFLAG_ZERO if self.h.version >= 3 else 0
                if e == new:
                    continue
                await self.tables.set_entry(c, new)
                self.tables.release(e)

    # -- flush ------------------------------------------------------------------

    async def _co_flush(self) -> None:
        if self.read_only:
            return
        async with self.lock:
            await self.tables.flush()
        await self._file.flush()

    # -- block status -------------------------------------------------------------

    async def allocated_in_layer(self) -> int:
        """Bytes this image holds in its own layer (replication's buffer sizes)."""
        async with self.lock:
            return await self.tables.allocated_bytes(self.length)

    async def _co_block_status(self, offset: int, nbytes: int) -> list[Extent]:
        async with self.lock:
            segs = await self.tables.map(offset, nbytes)
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
        v = self._prealloc
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
                        if await self.tables.rc.get(c):
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
            if self.tables.pristine:
                # nothing was mapped since the last make_empty: the file already is
                # what another make_empty would write (checkpoints of an idle buffer)
                return
            self.tables = await make_empty(self._file, self.tables, self.empty_style)

    def _prepare_make_empty(self) -> Qcow2PreparedEmpty:
        return Qcow2PreparedEmpty(self)

    async def reload_metadata(self) -> None:
        """Read header and tables again, dropping what memory holds (the caller
        holds the lock): after an emptying that failed half-way on disk."""
        f = self._file
        head = await f.read(0, min(f.length, 2 << 20))
        try:
            h = parse_header(head, f.length)
        except FormatError as e:
            raise BlockError(errno.EIO, f"qcow2: cannot re-read the header: {e}") from None
        self.h = h
        await self._load_tables()

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
