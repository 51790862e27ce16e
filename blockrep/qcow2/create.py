"""Creating a qcow2 image, laid out byte for byte as ``qemu-img create`` does."""

from __future__ import annotations

import errno
from typing import TypedDict, Unpack

from ..block.graph import Graph
from ..block.node import Node
from ..errors import BlockError
from .format import V2_HEADER_LEN, Header, size_to_l1
from .refcount import Refcounts


class CreateOptions(TypedDict, total=False):
    """The options of ``create`` (QEMU's BlockdevCreateOptionsQcow2); defaults there."""

    cluster_size: int
    backing_file: str | None
    backing_format: str | None
    version: int
    refcount_bits: int
    lazy_refcounts: bool


async def create_file(path: str, size: int, **options: Unpack[CreateOptions]) -> None:
    """Create the file ``path`` (truncating one that exists) holding a fresh image.

    The one qcow2 creator for ``img create``, the HA manager's overlays, tests and
    benchmarks; ``size`` is used as given (``img create`` rounds it up to sectors).
    """
    with open(path, "wb"):
        pass
    graph = Graph()
    try:
        await create(await graph.add({"driver": "file", "filename": path}), size, **options)
    finally:
        await graph.close_all()


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
        h.header_length = V2_HEADER_LEN
    header = h.pack(cluster_size)
    await file.write(0, header + bytes(cluster_size - len(header)))
    table = bytearray(2 * cluster_size)
    table[0:8] = (2 * cluster_size).to_bytes(8, "big")
    await file.write(cluster_size, bytes(table))
    rc = Refcounts(file, h, [2 * cluster_size], 16)
    await rc.alloc(3)
    h.l1_size = size_to_l1(size, cb)
    h.size = size
    if h.l1_size:
        l1_bytes = h.l1_size * 8
        h.l1_table_offset = await rc.alloc(-(-l1_bytes // cluster_size))
        await file.write(h.l1_table_offset, bytes(l1_bytes))
    await rc.write_increments()
    await file.write(0, h.pack(cluster_size))
