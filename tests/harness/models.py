"""The byte-array models the replication and HA tests compare images against.

``ReplicationModel`` is SPEC §1–§5, for both modes (on a shared disk ``sec`` is the
shared file itself while the link is up):

* ``p``       — the Primary's disk;
* ``ckpt``    — the secondary disk's state at the last checkpoint;
* ``s_view``  — what S's consumer reads: ``ckpt`` with S's writes since overlaid;
* ``sec``     — the secondary disk file: follows ``p`` while the link is up, and after
  S failover becomes ``ckpt`` + S's writes (and takes S's later writes).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

KiB = 1 << 10


class ReplicationModel:
    def __init__(self, init: bytes) -> None:
        self.size = len(init)
        self.p = bytearray(init)
        self.ckpt = bytearray(init)
        self.s_view = bytearray(init)
        self.sec = bytearray(init)
        self.link = True  # P's writes reach the secondary disk
        self.s_failed_over = False
        self.p_alive = True
        self.s_alive = True

    def p_write(self, off: int, data: bytes) -> None:
        self.p[off : off + len(data)] = data
        if self.link:
            self.sec[off : off + len(data)] = data

    def s_write(self, off: int, data: bytes) -> None:
        self.s_view[off : off + len(data)] = data
        if self.s_failed_over:
            self.sec[off : off + len(data)] = data

    def checkpoint(self) -> None:
        assert self.link and self.sec == self.p, "a checkpoint needs S identical to P"
        self.ckpt = bytearray(self.p)
        self.s_view = bytearray(self.p)

    def s_failover(self) -> None:
        """P died; S commits active+hidden: secondary disk = checkpoint + S writes."""
        self.link = False
        self.p_alive = False
        self.s_failed_over = True
        self.sec = self.s_view  # one object from now on: S writes land in the disk

    def p_failover(self) -> None:
        """S died; P carries on alone."""
        self.link = False
        self.s_alive = False


def diff_summary(got: bytes | bytearray, want: bytes | bytearray, limit: int = 5) -> str:
    """Where two images differ (first few runs of differing 512-byte sectors)."""
    if len(got) != len(want):
        return f"length {len(got)} != {len(want)}"
    runs: list[list[int]] = []
    for off in range(0, len(got), 512):
        if got[off : off + 512] != want[off : off + 512]:
            if runs and runs[-1][1] == off:
                runs[-1][1] = off + 512
            else:
                runs.append([off, off + 512])
                if len(runs) > limit:
                    break
    return "differs at sectors " + ", ".join(f"[{a:#x}, {b:#x})" for a, b in runs[:limit])


def random_extents(
    rng: random.Random, size: int, count: int, max_len: int = 160 * KiB
) -> list[tuple[int, int]]:
    """``count`` non-overlapping (offset, length) pairs, any byte alignment, so a batch
    of them may be in flight together with a defined result."""
    out: list[tuple[int, int]] = []
    tries = 0
    while len(out) < count and tries < count * 50:
        tries += 1
        kind = rng.random()
        if kind < 0.3:
            n = rng.randint(1, 600)
        elif kind < 0.7:
            n = rng.randint(512, 16 * KiB)
        else:
            n = rng.randint(16 * KiB, max_len)
        if rng.random() < 0.3:  # sector/cluster aligned ones too
            n = max(512, n & ~511)
            off = rng.randrange(0, size - n + 1) & ~511
        else:
            off = rng.randrange(0, size - n + 1)
        if any(off < o + m and o < off + n for o, m in out):
            continue
        out.append((off, n))
    return out


async def random_writes(
    node: Any,
    rnd: random.Random,
    size: int,
    count: int,
    model: bytearray | None = None,
    sizes: Sequence[int] = (512, 1000, 4096, 16384, 65536),
    concurrent: bool = True,
) -> int:
    """``count`` random writes; with ``model``, written sequentially (the model stays exact)."""
    ops = []
    for _ in range(count):
        n = rnd.choice(sizes)
        off = rnd.randrange(0, size - n)
        ops.append((off, rnd.randbytes(n)))
    if model is not None or not concurrent:
        for off, data in ops:
            await node.write(off, data)
            if model is not None:
                model[off : off + len(data)] = data
    else:
        await asyncio.gather(*(node.write(off, data) for off, data in ops))
    return sum(len(d) for _, d in ops)


async def region_writes(
    node: Any, rnd: random.Random, start: int, length: int, count: int, model: bytearray
) -> None:
    """``count`` sequential small writes inside [start, start + length), kept in ``model``:
    a test that must know which regions each side wrote (split brain, resync) uses this."""
    for _ in range(count):
        n = rnd.choice((512, 4096, 16384))
        off = rnd.randrange(start, start + length - n)
        data = rnd.randbytes(n)
        await node.write(off, data)
        model[off : off + n] = data


def covers(ranges: list[list[int]], start: int, length: int) -> bool:
    """Does one of the [offset, length] ranges (a status's region list) hold the span?"""
    return any(o <= start and start + length <= o + n for o, n in ranges)


def checkpoint_cut(
    base: bytes | bytearray,
    batches: Sequence[Sequence[tuple[int, bytes]]],
    got: bytes | bytearray,
    at_least: int = 0,
) -> tuple[int, list[int]] | None:
    """Which checkpoint cut of a write stream ``got`` shows, or None if it shows none.

    ``batches`` are the writes in the order they were issued: the writes of one batch
    were in flight together (and do not overlap), a batch started only after the one
    before it was acknowledged. A checkpoint quiesces the consumer (new requests wait,
    those in flight finish), so the disk at a cut is ``base`` + every batch before some
    ``b`` + a subset of batch ``b`` (each of its writes wholly in or out) and nothing
    later. ``at_least``: batches known to be covered by a checkpoint that completed.
    Returns ``(b, indices of batch b's writes that are in)``.
    """
    cur = bytearray(base)
    for batch in batches[:at_least]:
        for off, data in batch:
            cur[off : off + len(data)] = data
    for b in range(at_least, len(batches) + 1):
        batch = batches[b] if b < len(batches) else []
        saved = [(off, bytes(cur[off : off + len(data)])) for off, data in batch]
        took = []
        for i, (off, data) in enumerate(batch):
            if got[off : off + len(data)] == data:
                cur[off : off + len(data)] = data
                took.append(i)
        if cur == got:
            return b, took
        for off, old in saved:
            cur[off : off + len(old)] = old
        for off, data in batch:
            cur[off : off + len(data)] = data
    return None
