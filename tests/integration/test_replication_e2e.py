"""COLO block replication end to end: two ``blockrep daemon`` processes.

The pair is set up with REFERENCE-QEMU.md's command lines and QMP sequence (see
``tests/harness/pair.py``); the consumers of both sides write through NBD exports of
``colo-disk0``. After every step every observable image — P's disk, S's secondary disk
file, S's view through its export and from the files (active → hidden → secondary),
P's view through its export — equals the bytearray model of SPEC §1–§5, and
``qemu-img check`` is clean on the hidden and active disks.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from tests.harness.pair import MiB, running_pair

pytestmark = pytest.mark.timeout(150)

KiB = 1024


def rnd_bytes(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


async def replication_nodes(side) -> list[dict]:
    return [n for n in await side.run("query-replication")]


async def test_two_daemons_checkpoints_and_secondary_failover():
    rng = random.Random(5)
    async with running_pair("blockrep", "blockrep") as pair:
        P, S = pair.P, pair.S
        await pair.check("started")
        (s_node,) = await replication_nodes(S)
        assert (
            s_node["mode"] == "secondary"
            and s_node["stage"] == "running"
            and s_node["error"] is None
        )
        assert s_node["hidden-allocated-bytes"] == 0 and s_node["active-allocated-bytes"] == 0
        epoch0 = s_node["epoch"]
        (p_node,) = await replication_nodes(P)
        assert p_node["mode"] == "primary" and p_node["stage"] == "running"

        # epoch 1: P writes (aligned, sub-sector, 1 byte, cluster-crossing), S writes
        await pair.p_write(0, rnd_bytes(rng, 64 * KiB))
        await pair.check("P aligned 64k")
        await pair.p_write(1000, rnd_bytes(rng, 7))
        await pair.p_write(65535, rnd_bytes(rng, 3))  # crosses a cluster boundary
        await pair.p_write(3 * MiB + 511, b"\x01")
        await pair.p_write(5 * MiB - 100, rnd_bytes(rng, 300))
        await pair.check("P sub-sector writes")
        s_node = (await replication_nodes(S))[0]
        assert s_node["clusters-copied"] >= 4 and s_node["hidden-allocated-bytes"] >= 4 * 64 * KiB

        await pair.s_write(32 * KiB, rnd_bytes(rng, 64 * KiB))  # overlaps P's cluster 0 and 1
        await pair.s_write(5 * MiB - 4096, rnd_bytes(rng, 513))
        await pair.s_write(9 * MiB + 3, rnd_bytes(rng, 5))
        await pair.check("S writes")
        # P rewrites what S and P wrote: the hidden disk keeps the first pre-image only
        await pair.p_write(0, rnd_bytes(rng, 128 * KiB))
        await pair.p_write(5 * MiB - 50, rnd_bytes(rng, 10))
        await pair.check("P rewrites")
        await pair.status_ok()

        # checkpoint: S == P, buffers empty (O(metadata))
        await pair.checkpoint()
        await pair.check("checkpoint 1")
        s_node = (await replication_nodes(S))[0]
        assert s_node["epoch"] == epoch0 + 1
        assert s_node["hidden-allocated-bytes"] == 0 and s_node["active-allocated-bytes"] == 0
        assert s_node["clusters-copied"] == 0

        # epoch 2
        await pair.s_write(0, rnd_bytes(rng, 4096))
        await pair.p_write(100, rnd_bytes(rng, 200))
        await pair.p_write(2 * MiB, rnd_bytes(rng, 1 * MiB))
        await pair.s_write(2 * MiB + 12345, rnd_bytes(rng, 70000))
        await pair.check("epoch 2")
        await pair.checkpoint()
        await pair.check("checkpoint 2")

        # epoch 3: writes that failover must roll back (P) and keep (S)
        await pair.p_write(7 * MiB, rnd_bytes(rng, 256 * KiB))
        await pair.p_write(7 * MiB + 77, rnd_bytes(rng, 1))
        await pair.s_write(7 * MiB + 4096, rnd_bytes(rng, 8192))
        await pair.s_write(11 * MiB, rnd_bytes(rng, 3 * 64 * KiB + 17))
        await pair.check("epoch 3")

        # lots buffered, so that the failover commit has work to do while S writes
        await pair.p_write(8 * MiB, rnd_bytes(rng, 3 * MiB))
        await pair.s_write(8 * MiB + 1 * MiB + 5, rnd_bytes(rng, 3 * MiB))
        await pair.check("epoch 3, buffered")

        # S failover: P dies; secondary disk = last checkpoint + S's writes
        during = [(13 * MiB, b"\x5a" * 65536)] + [
            (rng.randrange(7 * MiB, 12 * MiB), bytes([i + 1]) * rng.randrange(1, 100000))
            for i in range(8)
        ]
        await pair.s_failover(write_during=during)
        await pair.check("after S failover")
        (s_node,) = await replication_nodes(S)
        assert s_node["stage"] == "done" and s_node["error"] is None and s_node["jobs"] == []
        st = await S.run("query-xen-replication-status")
        assert st == {"error": False}
        # S's consumer carries on on the secondary disk
        await pair.s_write(7 * MiB, rnd_bytes(rng, 1000))
        await pair.s_write(15 * MiB + 1, rnd_bytes(rng, 2))
        await pair.check("S writes after failover")
        # a finished replication ignores start, checkpoint and stop
        await S.run("xen-colo-do-checkpoint")
        await S.run("xen-set-replication", {"enable": False, "primary": False, "failover": True})
        await pair.check("after ignored control ops")


async def test_two_daemons_primary_failover():
    rng = random.Random(6)
    async with running_pair("blockrep", "blockrep") as pair:
        P = pair.P
        await pair.p_write(4096, rnd_bytes(rng, 8192))
        await pair.s_write(0, rnd_bytes(rng, 65536))
        await pair.p_write(6 * MiB + 1, rnd_bytes(rng, 9))
        await pair.check("epoch 1")
        await pair.checkpoint()
        await pair.check("checkpoint")
        await pair.p_write(1 * MiB, rnd_bytes(rng, 100 * KiB))
        await pair.s_write(1 * MiB + 50, rnd_bytes(rng, 100))
        await pair.check("epoch 2")

        # S dies; P's next write succeeds for the consumer, the HA manager sees the error
        await pair.p_failover(probe_write=(2 * MiB + 3, rnd_bytes(rng, 1234)))
        await pair.check("after P failover")
        assert await replication_nodes(P) == []  # the node is gone from the registry
        blocks = await P.run("query-named-block-nodes")
        assert not any(b.get("node-name") == "replication0" for b in blocks)
        # P carries on alone: its disk is the model, the dead S's disk is frozen
        await pair.p_write(0, rnd_bytes(rng, 70000))
        await pair.p_write(15 * MiB + 511, rnd_bytes(rng, 2))
        await pair.check("P alone")


def disjoint_writes(rng: random.Random, n: int, size: int, max_len: int) -> list[tuple[int, int]]:
    """n random (offset, length) byte ranges that do not overlap each other (they may share
    clusters); offsets and lengths unaligned, some of them sub-sector."""
    taken: list[tuple[int, int]] = []
    out: list[tuple[int, int]] = []
    hot = [rng.randrange(0, size // (64 * KiB)) * 64 * KiB for _ in range(8)]  # shared clusters
    while len(out) < n:
        if rng.random() < 0.5:
            off = rng.choice(hot) + rng.randrange(0, 64 * KiB)
        else:
            off = rng.randrange(0, size)
        length = rng.choice(
            [1, rng.randrange(1, 512), rng.randrange(512, 8192), rng.randrange(1, max_len)]
        )
        length = min(length, size - off)
        if length <= 0 or any(off < b + m and b < off + length for b, m in taken):
            continue
        taken.append((off, length))
        out.append((off, length))
    return out


async def test_two_daemons_concurrent_writes_across_checkpoints():
    """Hundreds of overlapping in-flight P and S writes per epoch (P's drained before
    each checkpoint, as COLO does): the model still holds. Within one batch, writes of
    one side touch disjoint bytes (in-flight overlapping writes of one consumer have no
    defined order) but share clusters with each other and with the other side's writes."""
    rng = random.Random(7)
    async with running_pair("blockrep", "blockrep") as pair:
        size = pair.size
        for epoch in range(4):
            pw = disjoint_writes(rng, 150, size, 200 * KiB)
            sw = disjoint_writes(rng, 150, size, 200 * KiB)
            # S writes in this epoch prefer P's clusters, to race copy-before-write
            # against the active disk's copy-on-write
            sw[:50] = [
                (o + rng.randrange(0, 4096), min(1 + rng.randrange(0, 3000), size - o - 4096))
                for o, _ in pw[:50]
                if o + 8192 < size
            ]
            # keep S's list disjoint after the change
            sw_clean: list[tuple[int, int]] = []
            for o, n in sw:
                if n > 0 and not any(o < b + m and b < o + n for b, m in sw_clean):
                    sw_clean.append((o, n))
            p_data = [(o, rng.randbytes(n)) for o, n in pw]
            s_data = [(o, rng.randbytes(n)) for o, n in sw_clean]
            ops = [pair.p_write(o, d) for o, d in p_data] + [pair.s_write(o, d) for o, d in s_data]
            rng.shuffle(ops)
            await asyncio.wait_for(asyncio.gather(*ops), 60)
            await pair.check(f"epoch {epoch} after concurrent writes")
            await pair.status_ok()
            await pair.checkpoint()
            await pair.check(f"checkpoint {epoch}")
        # a last epoch of concurrent writes, then S fails over in the middle of S's I/O
        p_data = [(o, rng.randbytes(n)) for o, n in disjoint_writes(rng, 100, size, 64 * KiB)]
        s_data = [(o, rng.randbytes(n)) for o, n in disjoint_writes(rng, 100, size, 64 * KiB)]
        ops = [pair.p_write(o, d) for o, d in p_data] + [pair.s_write(o, d) for o, d in s_data]
        rng.shuffle(ops)
        await asyncio.wait_for(asyncio.gather(*ops), 60)
        await pair.check("last epoch")
        await pair.s_failover()
        await pair.check("after failover")
        s_data = [(o, rng.randbytes(n)) for o, n in disjoint_writes(rng, 100, size, 64 * KiB)]
        await asyncio.wait_for(asyncio.gather(*[pair.s_write(o, d) for o, d in s_data]), 60)
        await pair.check("S alone")


async def test_sub_sector_primary_writes_reach_secondary_exactly():
    """SPEC §4 byte granularity: every byte of a sub-512-byte P write reaches S, and the
    bytes around it keep their contents (QEMU 7.2 pads them with zeros)."""
    rng = random.Random(8)
    async with running_pair("blockrep", "blockrep") as pair:
        for _ in range(40):
            off = rng.randrange(0, pair.size - 600)
            await pair.p_write(off, rng.randbytes(rng.randrange(1, 600)))
        # the same through HMP qemu-io on P's top node
        await pair.p_write(12345, b"\x42" * 3, via="hmp")
        await pair.p_write(8 * MiB + 511, b"\x43" * 2, via="hmp")
        await pair.check("sub-sector writes")
        await pair.status_ok()
        await pair.checkpoint()
        await pair.check("checkpoint")
        # S's consumer sees them exactly after the checkpoint
        assert await pair.s_client.read(12345, 3) == b"\x42" * 3
        assert await pair.s_client.read(8 * MiB + 510, 4) == bytes(
            [pair.model.p[8 * MiB + 510]]
        ) + b"\x43\x43" + bytes([pair.model.p[8 * MiB + 513]])
