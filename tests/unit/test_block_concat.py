"""The ``concat`` driver (a resource's volumes end to end, one replicated device):
random reads, writes, zeroes and discards across the boundaries against a model, and
each child file holds exactly its slice."""

from __future__ import annotations

import random

import pytest

from blockrep.block.graph import Graph
from blockrep.errors import BlockError

SIZES = (3 * 65536 + 512, 1 << 20, 7 * 4096)  # odd lengths: boundaries inside regions


@pytest.mark.parametrize("seed", range(6))
async def test_concat_matches_a_model(tmp_path, seed) -> None:
    rnd = random.Random(seed)
    paths = []
    model = bytearray()
    for i, n in enumerate(SIZES):
        data = rnd.randbytes(n)
        p = tmp_path / f"v{i}.raw"
        p.write_bytes(data)
        paths.append(str(p))
        model += data
    g = Graph()
    top = await g.add(
        {
            "driver": "concat",
            "node-name": "group",
            "children": [
                {"driver": "raw", "file": {"driver": "file", "filename": p}} for p in paths
            ],
        }
    )
    assert top.length == len(model) == sum(SIZES)
    for _ in range(200):
        off = rnd.randrange(len(model))
        n = rnd.randint(1, min(300_000, len(model) - off))
        op = rnd.random()
        if op < 0.4:
            data = rnd.randbytes(n)
            await top.write(off, data)
            model[off : off + n] = data
        elif op < 0.5:
            await top.write_zeroes(off, n)
            model[off : off + n] = bytes(n)
        else:
            assert await top.read(off, n) == bytes(model[off : off + n])
        if rnd.random() < 0.05:
            ext = await top.block_status(off, n)
            assert ext[0].start == off and sum(e.length for e in ext) == n
    with pytest.raises(BlockError):
        await top.write(len(model) - 10, b"x" * 20)  # past the end: refused whole
    await top.flush()
    await g.close_all()
    pos = 0
    for p, n in zip(paths, SIZES, strict=True):
        with open(p, "rb") as f:
            assert f.read() == bytes(model[pos : pos + n])
        pos += n
