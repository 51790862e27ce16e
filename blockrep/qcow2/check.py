"""Consistency check (and repair) of a qcow2 image, as ``qemu-img check`` does it.

Every cluster's references are counted from the structures (header, L1, L2,
refcount table and blocks, snapshot tables) and compared with its stored
refcount: stored < referenced is corruption, stored > referenced a leak.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field

from .cluster import ClusterMap
from .format import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    Header,
    compressed_geometry,
)
from .refcount import ImageFile, rc_get


@dataclass
class CheckResult:
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)

    def corruption(self, message: str) -> None:
        self.corruptions += 1
        self.messages.append(message)

    def take_double_check(self, after: CheckResult) -> None:
        """After a repair, QEMU reports what the repair fixed, then the counts and
        statistics of the check that follows it."""
        self.corruptions_fixed = self.corruptions - after.corruptions
        self.leaks_fixed = self.leaks - after.leaks
        self.corruptions, self.leaks = after.corruptions, after.leaks
        self.image_end_offset = after.image_end_offset
        self.total_clusters = after.total_clusters
        self.allocated_clusters = after.allocated_clusters
        self.fragmented_clusters = after.fragmented_clusters
        self.compressed_clusters = after.compressed_clusters
        self.check_errors = after.check_errors


async def _read_table(f: ImageFile, offset: int, entries: int) -> list[int]:
    data = await f.read(offset, entries * 8)
    return list(struct.unpack(f">{entries}Q", data))


async def check_image(f: ImageFile, h: Header, repair: bool = False) -> CheckResult:
    """Count references, compare with refcounts; with ``repair`` fix both kinds.

    A repair writes to ``f`` directly: whoever holds the image's tables in memory
    (an open driver) reads them again afterwards.
    """
    cs, cb = h.cluster_size, h.cluster_bits
    file_size = f.length
    nb_clusters = -(-file_size // cs)
    res = CheckResult()
    res.total_clusters = -(-h.size // cs)
    refs: Counter[int] = Counter()
    copied_checks: list[tuple[str, int, int, int]] = []  # (kind, index, entry, cluster)

    def ref(offset: int, nbytes: int, what: str) -> bool:
        if offset % cs and what != "compressed":
            res.corruption(
                f"ERROR {what} offset={offset:x}: Cluster is not properly aligned; "
                "L2 entry corrupted."
                if what == "data"
                else f"ERROR {what} offset {offset:#x} is not cluster aligned"
            )
            return False
        first = offset >> cb
        last = (offset + max(nbytes, 1) - 1) >> cb
        for c in range(first, last + 1):
            refs[c] += 1
        return True

    ref(0, cs, "header")

    async def walk_l1(l1_offset: int, l1_size: int, active: bool) -> None:
        if l1_size == 0:
            return
        ref(l1_offset, l1_size * 8, "L1 table")
        l1 = await _read_table(f, l1_offset, l1_size)
        for i, e in enumerate(l1):
            l2_off = e & L1E_OFFSET_MASK
            if not l2_off:
                continue
            if l2_off % cs:
                res.corruption(
                    f"ERROR l2_offset={l2_off:x}: Table is not cluster aligned; L1 entry corrupted"
                )
                continue
            if l2_off + cs > file_size:
                res.corruption(f"ERROR l2_offset={l2_off:x}: L2 table is outside the image")
                continue
            ref(l2_off, cs, "L2 table")
            if active:
                copied_checks.append(("L1", i, e, l2_off >> cb))
            l2 = await _read_table(f, l2_off, h.l2_entries)
            next_contiguous = 0  # QEMU counts fragmentation within one L2 table
            for j, le in enumerate(l2):
                if le & OFLAG_COMPRESSED:
                    off, nb = compressed_geometry(le & ~OFLAG_COPIED, cb)
                    if le & OFLAG_COPIED:
                        res.corruption(
                            f"ERROR: coffset=0x{off:x}: copied flag must never be set for compressed clusters"
                        )
                    ref(off, nb, "compressed")
                    if active:
                        res.allocated_clusters += 1
                        res.compressed_clusters += 1
                        res.fragmented_clusters += 1  # compressed clusters are, by nature
                    continue
                host = le & L2E_OFFSET_MASK
                if h.version >= 3 and le & OFLAG_ZERO and not host:
                    continue
                if not host:
                    continue
                if host % cs:
                    res.corruption(
                        f"ERROR offset={host:x}: Cluster is not properly aligned; L2 entry corrupted."
                    )
                    continue
                if host + cs > file_size + (cs - 1) and host >= file_size:
                    res.corruption(
                        f"ERROR offset={host:x}: Data cluster is beyond the end of the image"
                    )
                    continue
                ref(host, cs, "data")
                if active:
                    res.allocated_clusters += 1
                    if next_contiguous and host != next_contiguous:
                        res.fragmented_clusters += 1
                    next_contiguous = host + cs
                    copied_checks.append(("L2", i * h.l2_entries + j, le, host >> cb))

    await walk_l1(h.l1_table_offset, h.l1_size, True)
    # snapshots: their L1 tables and the table itself
    if h.nb_snapshots:
        pos = h.snapshots_offset
        start = pos
        for _ in range(h.nb_snapshots):
            head = await f.read(pos, 40)
            l1_off, l1_size, id_len, name_len = struct.unpack_from(">QIHH", head, 0)
            extra = struct.unpack_from(">I", head, 36)[0]
            await walk_l1(l1_off, l1_size, False)
            pos += 40 + extra + id_len + name_len
            pos += (-pos) % 8
        ref(start, pos - start, "snapshot table")
    # refcount structures
    ref(h.refcount_table_offset, h.refcount_table_clusters * cs, "refcount table")
    reftable = await _read_table(f, h.refcount_table_offset, h.refcount_table_clusters * cs // 8)
    block_entries = (cs * 8) >> h.refcount_order
    blocks: dict[int, bytes] = {}
    for i, e in enumerate(reftable):
        off = e & ~0x1FF
        if not off:
            continue
        if off % cs:
            res.corruption(
                f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
            )
            continue
        if off >= file_size:
            res.corruption(f"ERROR refcount block {i} is outside image")
            continue
        ref(off, cs, "refcount block")
        blocks[i] = await f.read(off, cs)

    def stored(c: int) -> int:
        blk = blocks.get(c // block_entries)
        return 0 if blk is None else rc_get(blk, c % block_entries, h.refcount_order)

    highest = max(refs) if refs else 0
    upper = max(nb_clusters, highest + 1)
    fixes: list[tuple[int, int]] = []
    for c in range(upper):
        r = refs.get(c, 0)
        s = stored(c)
        if s == r:
            continue
        if s < r:
            res.corruption(f"ERROR cluster {c} refcount={s} reference={r}")
        else:
            res.leaks += 1
            res.messages.append(f"Leaked cluster {c} refcount={s} reference={r}")
        fixes.append((c, r - s))
    # Like QEMU, refcounts of clusters past the end of the file are not reported
    # (a writer killed after counting a cluster but before writing it leaves
    # those), so leak totals match qemu-img's. A repair still drops them: they
    # would turn into leaks as soon as the file grows over them.
    beyond: list[tuple[int, int]] = []
    for bi, blk in blocks.items():
        base = bi * block_entries
        if base + block_entries <= upper:
            continue
        for k in range(max(0, upper - base), block_entries):
            s = rc_get(blk, k, h.refcount_order)
            if s:
                beyond.append((base + k, -s))
    for kind, idx, e, c in copied_checks:
        expect = stored(c) == 1 and refs.get(c, 0) == 1
        if bool(e & OFLAG_COPIED) != expect:
            res.corruption(
                f"ERROR OFLAG_COPIED L2 cluster: l1_index={idx} l1_entry={e:x} refcount={stored(c)}"
                if kind == "L1"
                else f"ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={stored(c)}"
            )
            fixes.append((-1, 0))
    # QEMU's image end: the last cluster that is referenced or has a refcount
    in_use = [c for c in range(upper) if refs.get(c, 0) or stored(c)]
    res.image_end_offset = ((max(in_use) + 1) * cs) if in_use else cs
    if repair and (fixes or beyond):
        await _repair(f, h, fixes + beyond, res)
        res.leaks_fixed -= len(beyond)
    return res


async def _repair(f: ImageFile, h: Header, fixes: list[tuple[int, int]], res: CheckResult) -> None:
    """Apply refcount deltas through the allocator, then set COPIED flags right."""
    t = await ClusterMap.load(f, h)
    rc = t.rc
    for c, delta in fixes:
        if c < 0:
            continue
        await rc.add(c, delta)
        if delta < 0:
            res.leaks_fixed += 1
        else:
            res.corruptions_fixed += 1
    await rc.write_increments()
    await f.flush()
    cb = h.cluster_bits
    for i, e in enumerate(t.l1):
        off = e & L1E_OFFSET_MASK
        if not off:
            continue
        want = off | (OFLAG_COPIED if await rc.get(off >> cb) == 1 else 0)
        if want != e:
            t.l1[i] = want
            t.l1_dirty.add(i)
        l2 = await t.l2(i, alloc=False)
        assert l2 is not None
        for j in range(h.l2_entries):
            le = int.from_bytes(l2[j * 8 : j * 8 + 8], "big")
            host = le & L2E_OFFSET_MASK
            if le & OFLAG_COMPRESSED or not host:
                continue
            want = (le & ~OFLAG_COPIED) | (OFLAG_COPIED if await rc.get(host >> cb) == 1 else 0)
            if want != le:
                l2[j * 8 : j * 8 + 8] = want.to_bytes(8, "big")
                t.l2cache.dirty.add(off)
    await t.flush()
    await f.flush()
