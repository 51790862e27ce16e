"""Writer for the qcow2 crash tests: a seeded random workload on one overlay.

Run as ``python qcow2_crash_writer.py CONFIG_JSON``; the parent kills it with
SIGKILL at a moment of its choosing. Protocol on stdout, one line each, flushed:

    READY          image opened
    B i            about to start op i
    D i            op i returned
    F i            op i was a flush and it returned (everything before it is durable)
    END            all ops done and the image closed

The op list is a pure function of the config (``gen_ops``), so the parent replays it
to know what the image must hold up to the last ``F``. The parent imports this file
for ``gen_ops``, ``op_data`` and ``BASE_REGIONS``.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from typing import Any

SECTOR = 512
# Regions of the backing file filled by qemu-io with one byte value: (offset, length, byte).
BASE_REGIONS = [(0, 256 << 10, 0x11), (1 << 20, 512 << 10, 0x22), (5 << 20, 64 << 10, 0x33)]
HOT = 8 << 20  # half of the ops land here, over the backing file's patterns


def gen_ops(cfg: dict[str, Any]) -> list[tuple]:
    """The workload: ('w', off, len), ('z', off, len, may_unmap), ('d', off, len), ('f',), ('e',)."""
    rng = random.Random(cfg["seed"])
    size = cfg["size"]
    max_len = cfg.get("max_len", 128 << 10)
    ops: list[tuple] = []
    for _ in range(cfg["nops"]):
        r = rng.random()
        n = rng.choice([1, 1, 2, 7, 8, 9, 64, 128]) * SECTOR
        if rng.random() < 0.3:
            n = rng.randrange(1, max_len // SECTOR + 1) * SECTOR
        span = HOT if rng.random() < 0.5 else size
        off = rng.randrange(0, (span - n) // SECTOR + 1) * SECTOR
        if r < 0.60:
            ops.append(("w", off, n))
        elif r < 0.72:
            ops.append(("z", off, n, rng.random() < 0.5))
        elif r < 0.82:
            cs = cfg["cluster"]
            if rng.random() < 0.7:  # mostly whole clusters, so something is freed
                off -= off % cs
                n = -(-n // cs) * cs
                n = min(n, size - off)
            ops.append(("d", off, n))
        elif r < 0.99 - cfg.get("empty_rate", 0.015):
            ops.append(("f",))
        elif r < 0.99:
            ops.append(("e",))
        else:
            ops.append(("f",))
    return ops


def op_data(seed: int, i: int, n: int) -> bytes:
    return random.Random(seed * 1_000_003 + i).randbytes(n)


async def run(cfg: dict[str, Any]) -> None:
    from blockrep.block import Graph

    g = Graph()
    opts: dict[str, Any] = {"driver": "qcow2", "file": {"driver": "file", "filename": cfg["image"]}}
    opts.update(cfg.get("qcow2_opts", {}))
    node = await g.add(opts)
    out = sys.stdout
    out.write("READY\n")
    out.flush()
    for i, op in enumerate(gen_ops(cfg)):
        out.write(f"B {i}\n")
        out.flush()
        kind = op[0]
        if kind == "w":
            await node.write(op[1], op_data(cfg["seed"], i, op[2]))
        elif kind == "z":
            await node.write_zeroes(op[1], op[2], op[3])
        elif kind == "d":
            await node.discard(op[1], op[2])
        elif kind == "f":
            await node.flush()
        elif kind == "e":
            await node.make_empty()
        out.write(f"D {i}\n" if kind != "f" else f"D {i}\nF {i}\n")
        out.flush()
    await g.close_all()
    out.write("END\n")
    out.flush()


if __name__ == "__main__":
    asyncio.run(run(json.loads(sys.argv[1])))
