"""A qcow2 layer's own allocation from its tables (``allocated_in_layer``), which
replication's status polls every turn, equals what block status says is allocated at
depth 0 — after data, zero and discard writes, over a backing file, in both versions."""

from __future__ import annotations

import os
import random

import pytest

from blockrep.block import Graph
from tests.harness.images import make_qcow2

SIZE = 8 << 20


@pytest.mark.parametrize("version,cluster", [(3, 65536), (2, 65536), (3, 4096)])
async def test_layer_allocation_from_tables_equals_block_status(tmp_path, version, cluster):
    base = str(tmp_path / "base.raw")
    with open(base, "wb") as f:
        f.write(os.urandom(SIZE))
    top = str(tmp_path / "top.qcow2")
    await make_qcow2(top, SIZE, cluster_size=cluster, backing=base, backing_fmt="raw",
                     version=version)  # fmt: skip
    g = Graph()
    node = await g.add({"driver": "qcow2", "file": {"driver": "file", "filename": top}})
    rnd = random.Random(version * cluster)
    try:
        for step in range(60):
            off = rnd.randrange(0, SIZE - 200_000)
            n = rnd.choice((512, 4096, 65536, 200_000))
            what = rnd.random()
            if what < 0.6:
                await node.write(off, rnd.randbytes(n))
            elif what < 0.8:
                await node.write_zeroes(off, n, may_unmap=rnd.random() < 0.5)
            else:
                await node.discard(off, n)
            if step % 10 == 9:
                extents = await node.block_status(0, SIZE)
                want = sum(e.length for e in extents if e.present and e.depth == 0)
                assert await node.allocated_in_layer() == want
        assert await node.allocated_in_layer() > 0
    finally:
        await g.close_all()
