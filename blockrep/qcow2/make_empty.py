"""make_empty for qcow2: drop every mapping, as QEMU's bdrv_make_empty does.

Replication empties its active and hidden disks at every checkpoint, so the cost
must not grow with what they held: an image in QEMU's fresh layout is rewritten as
a fresh image in O(metadata) (its file cut after the tables, or left at its length
for the next writes to overwrite: ``EmptyStyle``), or replaced by a fresh file where
the file node can replace its contents; anything else is unmapped cluster by cluster.
"""

from __future__ import annotations

import copy
import logging
import struct
from typing import TYPE_CHECKING

from ..block.node import EmptyStyle, Node, PreparedEmpty
from ..errors import BlockError
from .cluster import ClusterMap
from .format import INCOMPAT_DIRTY, L1E_OFFSET_MASK
from .refcount import Refcounts, rc_get, rc_set

if TYPE_CHECKING:
    from .driver import Qcow2Node

log = logging.getLogger("blockrep.qcow2")


def _fresh_layout_fits(t: ClusterMap) -> bool:
    """QEMU's make_completely_empty applies: v3, and the L1 fits refcount block 0."""
    h = t.h
    l1_clusters = -(-h.l1_size * 8 // h.cluster_size)
    return h.version >= 3 and 3 + l1_clusters <= t.rc.block_entries


def _can_swap(file: Node, t: ClusterMap, style: EmptyStyle) -> bool:
    return (
        style is EmptyStyle.FRESH_FILE
        and _fresh_layout_fits(t)
        and file.supports_replace_contents()
        and not t.h.nb_snapshots
    )


async def make_empty(
    file: Node, t: ClusterMap, style: EmptyStyle, staged: bool = False
) -> ClusterMap:
    """Empty the image in ``file``; returns the mapping to use from now on.

    ``style``: the node's ``empty_style``. FRESH_FILE: a file that can replace its
    contents gets a fresh one. KEEP_PAGES: the in-place rewrite leaves the file at
    its length (the old clusters free, their pages kept for the next writes).
    ``staged``: the L1 table on disk is already zero (``Qcow2PreparedEmpty.stage``),
    so nothing may keep the in-memory L1 pointing at L2 tables (the fallback drops
    them), and a swap that fails goes on in place instead of failing.
    """
    h = t.h
    cs = h.cluster_size
    l1_clusters = -(-h.l1_size * 8 // cs)
    if not _fresh_layout_fits(t) and staged:
        await _drop_all_l2_tables(t)
        return t
    if not _fresh_layout_fits(t):
        # Fallback, as QEMU: discard every cluster (O(data)); only slots that
        # have an L2 table can hold anything.
        nclusters = -(-h.size // cs)
        l2e = h.l2_entries
        for i in range(len(t.l1)):
            if not t.l1[i] & L1E_OFFSET_MASK:
                continue
            for c in range(i * l2e, min((i + 1) * l2e, nclusters)):
                e = await t.get_entry(c)
                if e:
                    await t.set_entry(c, 0)
                    t.release(e)
        await t.flush()
        return t
    if _can_swap(file, t, style):
        try:
            return await _make_empty_by_swap(file, t, l1_clusters)
        except BlockError as e:
            if not staged:
                raise
            # the swap changed nothing (replace_contents is all or nothing); the
            # in-place rewrite needs no new descriptor and no new file
            log.warning("%s: swapping in a fresh image failed (%s); emptying in place", file, e)
    # The fresh layout (reftable in cluster 1, refcount block 0 in cluster 2,
    # L1 from cluster 3) is reachable in place when L1 and block 0 already sit
    # there and cluster 1 is no refcount block; the reftable itself may have
    # moved. Otherwise unmap everything the ordinary way (not byte-identical).
    rt_on_disk = await file.read(h.refcount_table_offset, h.refcount_table_clusters * cs)
    rt_entries = struct.unpack(f">{len(rt_on_disk) // 8}Q", rt_on_disk)
    in_place = (
        rt_entries[0] == 2 * cs
        and cs not in rt_entries
        and (h.l1_size == 0 or h.l1_table_offset == 3 * cs)
        and not h.nb_snapshots
        and (h.refcount_table_offset != cs or h.refcount_table_clusters == 1)
    )
    if not in_place:
        await _drop_all_l2_tables(t)
        return t
    # Rewrite the image as a fresh one: O(metadata). Every step leaves an image
    # with at most leaked clusters, never a reference to a cluster whose
    # refcount is 0, so a crash in between is harmless (no dirty-bit window):
    #  1. zero the L1 table: every L2 table and data cluster is now a leak;
    #  2. reftable in cluster 1: drop entries 1.. (their blocks become leaks);
    #     reftable elsewhere: count cluster 1 in block 0, write the one-entry
    #     table into cluster 1, then point the header at it;
    #  3. rewrite refcount block 0 to count only header, tables and L1;
    #  4. truncate the file after the L1 table (KEEP_PAGES: not; what lies
    #     beyond has refcount 0 and no reference, free space as after a discard
    #     that did not punch).
    # Unwritten in-memory metadata is dropped: nothing on disk refers to it.
    order = h.refcount_order
    if h.l1_size:
        await file.write_zeroes(h.l1_table_offset, l1_clusters * cs)
    await file.flush()
    if h.refcount_table_offset == cs:
        await file.write(cs + 8, bytes(cs - 8))
        await file.flush()
    else:
        block0 = bytearray(await file.read(2 * cs, cs))
        if rc_get(block0, 1, order) == 0:
            rc_set(block0, 1, order, 1)
            await file.write(2 * cs, bytes(block0))
            await file.flush()
        await file.write(cs, (2 * cs).to_bytes(8, "big") + bytes(cs - 8))
        await file.flush()
        h.refcount_table_offset = cs
        h.refcount_table_clusters = 1
        await t.rc.write_header_fields()
        await file.flush()
    nclusters = 3 + l1_clusters
    await file.write(2 * cs, _fresh_refblock(t, nclusters))
    await file.flush()
    if style is not EmptyStyle.KEEP_PAGES:
        await file.truncate(nclusters * cs)  # type: ignore[attr-defined]
        await file.flush()
    return _fresh_tables(file, t, nclusters)


async def _make_empty_by_swap(file: Node, t: ClusterMap, l1_clusters: int) -> ClusterMap:
    """make_empty as a new file with QEMU's result, replacing the old one.

    The bytes are exactly what QEMU's make_empty leaves: the header with only
    the L1/refcount-table fields rewritten (and the dirty bit clear), the
    one-entry refcount table, refcount block 0 counting header, tables and L1,
    a zero L1, the file ending after it. The old data is freed in the
    background, so the cost does not grow with what the image held.
    """
    h = t.h
    cs = h.cluster_size
    header = bytearray(await file.read(0, cs))
    # The header object is the open image's: it changes only once the new file is
    # in place, so a failed swap leaves the node exactly as it was.
    fresh = copy.copy(h)
    fresh.incompatible_features &= ~INCOMPAT_DIRTY
    fresh.l1_table_offset = 3 * cs
    fresh.refcount_table_offset = cs
    fresh.refcount_table_clusters = 1
    fixed = fresh.pack_fixed()
    header[: len(fixed)] = fixed
    nclusters = 3 + l1_clusters
    content = bytearray(nclusters * cs)
    content[:cs] = header
    content[cs : cs + 8] = (2 * cs).to_bytes(8, "big")
    content[2 * cs : 3 * cs] = _fresh_refblock(t, nclusters)
    await file.replace_contents(bytes(content))
    h.incompatible_features = fresh.incompatible_features
    h.l1_table_offset = fresh.l1_table_offset
    h.refcount_table_offset = fresh.refcount_table_offset
    h.refcount_table_clusters = fresh.refcount_table_clusters
    return _fresh_tables(file, t, nclusters)


def _fresh_refblock(t: ClusterMap, nclusters: int) -> bytes:
    """Refcount block 0 of a fresh image: header, reftable, block 0 and L1 counted once."""
    block = bytearray(t.h.cluster_size)
    for c in range(nclusters):
        rc_set(block, c, t.h.refcount_order, 1)
    return bytes(block)


def _fresh_tables(file: Node, t: ClusterMap, nclusters: int) -> ClusterMap:
    """The mapping of a fresh image whose first ``nclusters`` clusters are in use."""
    h = t.h
    cs = h.cluster_size
    rc = Refcounts(file, h, [2 * cs], t.rc.cache.capacity)
    rc.reftable_capacity = cs // 8
    rc.free_hint = nclusters
    fresh = ClusterMap(file, h, [0] * h.l1_size, t.l2cache.capacity, rc)
    fresh.pristine = True
    return fresh


async def _drop_all_l2_tables(t: ClusterMap) -> None:
    """make_empty for a non-fresh layout: unmap everything through the usual
    crash-safe flush order (L1 entries reach the disk before the frees)."""
    cs = t.h.cluster_size
    for i, e in enumerate(t.l1):
        off = e & L1E_OFFSET_MASK
        if not off:
            continue
        table = await t.l2(i, alloc=False)
        assert table is not None
        for j in range(0, cs, 8):
            le = int.from_bytes(table[j : j + 8], "big")
            if le:
                t.release(le)
        t.l1[i] = 0
        t.l1_dirty.add(i)
        t.l2cache.drop(off)
        t.rc.defer_free(off)
    await t.flush()


class Qcow2PreparedEmpty(PreparedEmpty):
    """make_empty of a qcow2 node in steps (see ``PreparedEmpty``).

    ``stage`` zeroes the L1 table on disk and nothing else: the image is then
    logically empty on disk, every old cluster a leak, while the node keeps its
    in-memory mapping and so still reads as before. ``undo`` writes the old L1
    back. ``finish`` completes the emptying (a fresh file, or the in-place
    rewrite, or unmapping) and, if that fails, re-reads the mapping from disk: an
    empty image with leaked clusters, which the next make_empty drops. The node's
    metadata lock is held from ``stage`` to ``undo``/``finish``, so no request
    changes the mapping in between. Nothing here flushes the old file: either L1
    is a valid image after a crash, and the buffers' old contents do not matter.
    """

    undoable = True

    def __init__(self, node: Qcow2Node) -> None:
        super().__init__(node)
        self.q = node
        self._old_l1: bytes | None = None
        self._held = False
        self._nothing_to_do = False

    async def commit(self) -> None:
        q = self.q
        async with q.lock:
            t = q.tables
            if t.pristine:
                return
            if _can_swap(q._file, t, q.empty_style):
                # one step: replace_contents either puts the fresh file in place
                # or leaves the old one, and the header changes only after it
                l1_clusters = -(-t.h.l1_size * 8 // t.h.cluster_size)
                q.tables = await _make_empty_by_swap(q._file, t, l1_clusters)
                return
            await self._zero_l1(t)
            await self._finish_locked(t)

    async def stage(self) -> None:
        q = self.q
        await q.lock.acquire()
        try:
            t = q.tables
            if t.pristine:
                self._nothing_to_do = True
            else:
                await self._zero_l1(t)
        except BaseException:
            q.lock.release()
            raise
        self._held = True

    async def undo(self) -> None:
        if not self._held:
            return
        try:
            if self._old_l1 is not None:
                await self.q._file.write(self.q.tables.h.l1_table_offset, self._old_l1)
                self._old_l1 = None
        finally:
            self._release()

    async def finish(self) -> None:
        if not self._held:
            return
        try:
            if not self._nothing_to_do:
                await self._finish_locked(self.q.tables)
        finally:
            self._release()

    def _release(self) -> None:
        self._held = False
        self.q.lock.release()

    async def _zero_l1(self, t: ClusterMap) -> None:
        file = self.q._file
        h = t.h
        nbytes = h.l1_size * 8
        if not nbytes:
            return
        old = await file.read(h.l1_table_offset, nbytes)
        try:
            await file.write(h.l1_table_offset, bytes(nbytes))
        except BlockError:
            # a write that failed half-way must not leave half an L1 on disk
            try:
                await file.write(h.l1_table_offset, old)
            except BlockError as e:
                log.error("%s: could not restore the L1 table: %s", self.q.node_name, e.message)
            raise
        self._old_l1 = old

    async def _finish_locked(self, t: ClusterMap) -> None:
        q = self.q
        try:
            q.tables = await make_empty(q._file, t, q.empty_style, staged=True)
        except BlockError as e:
            # L1 on disk is zero: the image is empty, with leaks; the mapping in
            # memory may not match what reached the disk, so read it again
            log.warning(
                "%s: emptying after the L1 table was cleared failed (%s); "
                "the image keeps leaked clusters until its next make_empty",
                q.node_name,
                e.message,
            )
            await q.reload_metadata()
        self._old_l1 = None
