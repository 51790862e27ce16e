"""make_empty for qcow2: drop every mapping, as QEMU's bdrv_make_empty does.

Replication empties its active and hidden disks at every checkpoint, so the cost
must not grow with what they held: an image in QEMU's fresh layout is rewritten as
a fresh image in O(metadata), or replaced by a fresh file where the file node can
replace its contents; anything else is unmapped cluster by cluster.
"""

from __future__ import annotations

import struct

from ..block.node import Node
from .cluster import ClusterMap
from .format import INCOMPAT_DIRTY, L1E_OFFSET_MASK
from .refcount import Refcounts, rc_get, rc_set


async def make_empty(file: Node, t: ClusterMap, swap: bool) -> ClusterMap:
    """Empty the image in ``file``; returns the mapping to use from now on.

    ``swap``: the node's owner has no interest in the old contents (the node's
    ``swap_on_empty``), so a file that can replace its contents gets a fresh one.
    """
    h = t.h
    cs = h.cluster_size
    l1_clusters = -(-h.l1_size * 8 // cs)
    if h.version < 3 or 3 + l1_clusters > t.rc.block_entries:
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
    if swap and file.supports_replace_contents() and not h.nb_snapshots:
        return await _make_empty_by_swap(file, t, l1_clusters)
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
    #  4. truncate the file after the L1 table.
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
    content[2 * cs : 3 * cs] = _fresh_refblock(t, nclusters)
    await file.replace_contents(bytes(content))
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
