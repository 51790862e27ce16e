"""Copy-before-write preserves holes, zeroes and data without a block-status query.

A SEEK_DATA/SEEK_HOLE per copy cost ~1 ms on tmpfs (issue 15); the copy reads the
source as it is instead. The target must read back exactly the pre-images, and
clusters that read as zeroes still reach the target as write_zeroes.
"""

from __future__ import annotations

import random

from blockrep.block import Graph
from blockrep.block.file import FileNode
from blockrep.block.node import Extent
from tests.harness.images import make_qcow2
from tests.harness.tools import run, tool

SIZE = 4 << 20
CS = 64 << 10


def _sparse_source(path: str, rnd: random.Random) -> bytes:
    """Per 64 KiB cluster: a hole, explicit zeroes, random data, or data in a hole."""
    content = bytearray(SIZE)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for c in range(SIZE // CS):
            kind = c % 4
            if kind == 1:
                f.seek(c * CS)
                f.write(bytes(CS))  # allocated, reads as zeroes
            elif kind == 2:
                data = rnd.randbytes(CS)
                f.seek(c * CS)
                f.write(data)
                content[c * CS : (c + 1) * CS] = data
            elif kind == 3:
                off = c * CS + rnd.randrange(CS - 512)
                data = rnd.randbytes(512)
                f.seek(off)
                f.write(data)
                content[off : off + 512] = data
    return bytes(content)


def test_preimages_of_holes_zeroes_and_data_without_block_status(tmp_path, monkeypatch):
    src_path, tgt_path = str(tmp_path / "src.raw"), str(tmp_path / "tgt.qcow2")
    rnd = random.Random(42)
    initial = _sparse_source(src_path, rnd)
    status_calls: list[tuple[str, int, int]] = []
    real_status = FileNode._co_block_status

    async def counted(self: FileNode, offset: int, nbytes: int) -> list[Extent]:
        status_calls.append((self.filename, offset, nbytes))
        return await real_status(self, offset, nbytes)

    monkeypatch.setattr(FileNode, "_co_block_status", counted)

    async def go():
        await make_qcow2(tgt_path, SIZE, cluster_size=CS)
        g = Graph()
        await g.add(
            {"driver": "raw", "node-name": "src", "file": {"driver": "file", "filename": src_path}}
        )
        tgt = await g.add(
            {
                "driver": "qcow2",
                "node-name": "tgt",
                "file": {"driver": "file", "filename": tgt_path},
            }
        )
        cbw = await g.add(
            {"driver": "copy-before-write", "node-name": "cbw", "file": "src", "target": "tgt"}
        )
        model = bytearray(initial)
        touched: set[int] = set()
        # every kind of cluster, touched by writes, zeroes and discards, some spanning
        # several clusters (one copy run), some unaligned
        ops = [
            ("w", 0, 4096),
            ("w", CS + 100, 3000),
            ("z", 2 * CS, CS),
            ("d", 3 * CS, 4096),
            ("w", 5 * CS - 10, 3 * CS),
            ("z", 9 * CS + 7, 2 * CS),
            ("w", 16 * CS, 8 * CS),
        ]
        ops += [("w", rnd.randrange(SIZE - 8192), rnd.randrange(1, 8192)) for _ in range(30)]
        for kind, off, n in ops:
            if kind == "w":
                data = rnd.randbytes(n)
                await cbw.write(off, data)
                model[off : off + n] = data
            elif kind == "z":
                await cbw.write_zeroes(off, n)
                model[off : off + n] = bytes(n)
            else:
                await cbw.discard(off, n)  # advisory: the model keeps what the disk reads
            touched.update(range(off // CS, (off + n - 1) // CS + 1))
        assert status_calls == [], "a copy queried the source's allocation"
        for c in range(SIZE // CS):
            a, b = c * CS, (c + 1) * CS
            ext = [e for e in await tgt.block_status(a, CS) if e.present]
            if c not in touched:
                assert not ext, f"cluster {c} copied although never written"
                continue
            assert await tgt.read(a, CS) == initial[a:b], f"cluster {c}: wrong pre-image"
            # a run of pre-images that read as zeroes (a hole, or written zeroes) is
            # written as zeroes (a zero cluster), as QEMU's block-copy does
            assert ext, c
            if c in (0, 1):  # each copied alone, by the first two operations
                assert all(e.zero for e in ext), f"cluster {c}: zeroes stored as data"
            elif initial[a:b] != bytes(CS):
                assert not any(e.zero for e in ext), f"cluster {c}: data stored as zeroes"
        got = await g.find("src").read(0, SIZE)
        # discards may or may not punch: compare the rest byte for byte
        for kind, off, n in ops:
            if kind == "d":
                got = got[:off] + bytes(model[off : off + n]) + got[off + n :]
        assert got == bytes(model)
        assert cbw.clusters_copied == len(touched)
        await g.close_all()

    run(go(), 60)
    r = tool("qemu-img", "check", tgt_path, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
