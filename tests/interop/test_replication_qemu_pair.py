"""COLO block replication with real QEMU 7.2 on one side (or both, for the differential).

Mixed pairs: (a) a blockrep Secondary fed by a QEMU Primary, (b) a QEMU Secondary fed
by a blockrep Primary; (c) a seeded random workload run in lockstep on a QEMU pair and
on a blockrep pair gives identical images at every step. Command lines and QMP sequence
are REFERENCE-QEMU.md §2's, with the replication link on a unix socket (§4.7).

QEMU's HMP ``qemu-io`` output is invisible (§4.1), so data is verified from the files
(after ``qemu-io NODE flush``, §4.2) against the bytearray model of SPEC §1–§5, and P's
writes are 512-byte aligned whenever QEMU is the Primary (§6: QEMU 7.2 pads sub-sector
primary writes with zeros on S).
"""

from __future__ import annotations

import random
import shutil

import pytest

from tests.harness.pair import MiB, running_pair

pytestmark = [pytest.mark.interop, pytest.mark.timeout(150)]

KiB = 1024


@pytest.fixture(autouse=True)
def _need_qemu():
    for t in ("qemu-system-x86_64", "qemu-img"):
        if shutil.which(t) is None:
            pytest.fail(f"{t} is not installed; `make test` installs it")


def pat(rng: random.Random, n: int) -> bytes:
    return bytes([rng.randrange(1, 256)]) * n


# -- (a) QEMU Primary, blockrep Secondary ----------------------------------------------------


async def test_qemu_primary_feeds_blockrep_secondary_then_secondary_failover():
    rng = random.Random(21)
    async with running_pair("qemu", "blockrep") as pair:
        await pair.check("started")
        await pair.p_write(0, pat(rng, 64 * KiB))
        await pair.p_write(512, pat(rng, 512))
        await pair.p_write(3 * MiB + 4096, pat(rng, 3 * 512))
        await pair.check("QEMU P writes")
        await pair.s_write(32 * KiB + 7, rng.randbytes(64 * KiB))  # S's consumer, over NBD
        await pair.s_write(3 * MiB + 4000, rng.randbytes(300))
        await pair.check("blockrep S writes")
        await pair.p_write(0, pat(rng, 128 * KiB))  # the hidden disk keeps the first pre-image
        await pair.check("QEMU P rewrites")
        await pair.status_ok()
        await pair.checkpoint()
        await pair.check("checkpoint 1")
        (s_node,) = await pair.S.run("query-replication")
        assert s_node["hidden-allocated-bytes"] == 0 and s_node["active-allocated-bytes"] == 0
        await pair.p_write(5 * MiB, pat(rng, 1 * MiB))
        await pair.s_write(5 * MiB + 100, rng.randbytes(5000))
        await pair.s_write(9 * MiB, rng.randbytes(1))
        await pair.check("epoch 2")
        await pair.checkpoint()
        await pair.check("checkpoint 2")
        await pair.p_write(7 * MiB, pat(rng, 192 * KiB))
        await pair.s_write(7 * MiB + 65536 - 3, rng.randbytes(10))
        await pair.check("epoch 3")
        await pair.s_failover(write_during=(12 * MiB + 1, b"\x3c" * 70000))
        await pair.check("after S failover")
        await pair.s_write(7 * MiB, rng.randbytes(4096))
        await pair.check("S alone")


async def test_qemu_primary_failover_with_blockrep_secondary():
    rng = random.Random(22)
    async with running_pair("qemu", "blockrep") as pair:
        await pair.p_write(1 * MiB, pat(rng, 4096))
        await pair.s_write(1 * MiB + 1, rng.randbytes(4096))
        await pair.check("epoch 1")
        await pair.checkpoint()
        await pair.p_write(2 * MiB, pat(rng, 65536))
        await pair.check("epoch 2")
        await pair.p_failover(probe_write=(4 * MiB, pat(rng, 8192)))
        await pair.check("after P failover")
        await pair.p_write(0, pat(rng, 512))
        await pair.check("QEMU P alone")


# -- (b) blockrep Primary, QEMU Secondary ----------------------------------------------------


async def test_blockrep_primary_feeds_qemu_secondary_then_secondary_failover():
    rng = random.Random(23)
    async with running_pair("blockrep", "qemu") as pair:
        await pair.check("started")
        await pair.p_write(0, rng.randbytes(64 * KiB))  # P's consumer, over NBD
        await pair.p_write(1000, rng.randbytes(7))  # sub-sector: blockrep forwards bytes
        await pair.p_write(65535, rng.randbytes(3))
        await pair.p_write(3 * MiB + 511, b"\x01")
        await pair.check("blockrep P writes")
        await pair.s_write(32 * KiB, pat(rng, 64 * KiB))  # QEMU S's consumer, HMP
        await pair.s_write(3 * MiB + 7, pat(rng, 1000))
        await pair.check("QEMU S writes")
        await pair.p_write(0, rng.randbytes(128 * KiB))
        await pair.check("P rewrites")
        await pair.status_ok()
        await pair.checkpoint()
        await pair.check("checkpoint 1")
        await pair.p_write(5 * MiB + 3, rng.randbytes(1 * MiB))
        await pair.s_write(5 * MiB + 100, pat(rng, 5000))
        await pair.check("epoch 2")
        await pair.checkpoint()
        await pair.check("checkpoint 2")
        await pair.p_write(7 * MiB, rng.randbytes(192 * KiB))
        await pair.s_write(7 * MiB + 65536 - 3, pat(rng, 10))
        await pair.check("epoch 3")
        await pair.s_failover(write_during=(12 * MiB + 1, b"\x3c" * 70000))
        await pair.check("after S failover")
        await pair.s_write(7 * MiB, pat(rng, 4096))
        await pair.check("QEMU S alone")


async def test_blockrep_primary_failover_with_qemu_secondary():
    rng = random.Random(24)
    async with running_pair("blockrep", "qemu") as pair:
        await pair.p_write(1 * MiB + 5, rng.randbytes(4096))
        await pair.s_write(1 * MiB, pat(rng, 4096))
        await pair.check("epoch 1")
        await pair.checkpoint()
        await pair.p_write(2 * MiB, rng.randbytes(65536))
        await pair.check("epoch 2")
        await pair.p_failover(probe_write=(4 * MiB + 1, rng.randbytes(8191)))
        await pair.check("after P failover")
        await pair.p_write(0, rng.randbytes(513))
        await pair.check("blockrep P alone")


# -- (c) differential: the same seeded workload on a QEMU pair and on a blockrep pair --------


def workload(seed: int, size: int, failover: str, steps: int = 22) -> list[tuple]:
    """P writes (512-aligned, QEMU §6), S writes (any alignment), checkpoints, and one
    failover (``failover`` = "s" or "p") at a random step; afterwards the survivor writes."""
    rng = random.Random(seed)
    fo_step = rng.randrange(steps // 3, steps - 3)
    ops: list[tuple] = []
    for i in range(steps):
        if i == fo_step:
            off = rng.randrange(0, size // 512) * 512
            if failover == "s":
                ops.append(
                    (
                        "s_failover",
                        rng.randrange(0, size - 70000),
                        65536 + rng.randrange(0, 4000),
                        rng.randrange(1, 256),
                    )
                )
            else:
                ops.append(("p_failover", off, min(4096, size - off), rng.randrange(1, 256)))
            continue
        if i < fo_step:
            kind = rng.choices(["pw", "sw", "ckpt"], [5, 4, 2])[0]
        else:
            kind = "sw" if failover == "s" else "pw"
        b = rng.randrange(1, 256)
        if kind == "pw":
            off = rng.randrange(0, size // 512) * 512
            n = rng.choice([512, 4096, 65536, 512 * rng.randrange(1, 400)])
            ops.append(("pw", off, min(n, size - off), b))
        elif kind == "sw":
            off = rng.randrange(0, size - 1)
            n = rng.choice([1, 511, 4096, 65536 + 3, rng.randrange(1, 200000)])
            ops.append(("sw", off, min(n, size - off), b))
        else:
            ops.append(("ckpt",))
    return ops


async def apply(pair, op: tuple) -> None:
    kind = op[0]
    if kind == "pw":
        await pair.p_write(op[1], bytes([op[3]]) * op[2], via="hmp")
    elif kind == "sw":
        await pair.s_write(op[1], bytes([op[3]]) * op[2], via="hmp")
    elif kind == "ckpt":
        await pair.checkpoint()
    elif kind == "s_failover":
        await pair.s_failover(write_during=(op[1], bytes([op[3]]) * op[2]))
    elif kind == "p_failover":
        await pair.p_failover(probe_write=(op[1], bytes([op[3]]) * op[2]))
    else:
        raise AssertionError(op)


@pytest.mark.parametrize("seed,failover", [(31, "s"), (32, "p")])
async def test_differential_qemu_pair_vs_blockrep_pair(seed, failover):
    size = 16 * MiB
    ops = workload(seed, size, failover)
    async with (
        running_pair("qemu", "qemu", size=size, seed=seed, exports=False) as ref,
        running_pair("blockrep", "blockrep", size=size, seed=seed, exports=False) as br,
    ):
        await ref.check("start")
        await br.check("start")
        for i, op in enumerate(ops):
            await apply(ref, op)
            await apply(br, op)
            label = f"step {i} {op[:3]}"
            ref_sha = await ref.check(f"QEMU {label}")  # both against the model ...
            br_sha = await br.check(f"blockrep {label}")
            common = ref_sha.keys() & br_sha.keys()
            assert {"prim", "sec"} <= common
            # ... and against each other
            assert {k: ref_sha[k] for k in common} == {k: br_sha[k] for k in common}, label


async def test_qemu_primary_sub_sector_write_diverges_as_documented():
    """Negative control for the harness, and REFERENCE-QEMU.md §6: a QEMU 7.2 Primary pads a
    sub-sector write with zeros on its way to S and reports no error. (blockrep's own
    Primary gets this right: tests/integration/test_replication_e2e.py.)"""
    async with running_pair("qemu", "blockrep") as pair:
        await pair.P.qemu_io("colo-disk0", "write -P 0x42 1000 3")
        await pair.P.qemu_io("colo-disk0", "flush")
        prim, sec = (await pair.images())["prim"], (await pair.images())["sec"]
        assert prim[1000:1003] == sec[1000:1003] == b"\x42" * 3
        assert prim[512:1000] == pair.init[512:1000]
        assert sec[512:1000] == bytes(488) and sec[1003:1024] == bytes(21)  # zero padding on S
        assert sec[:512] == pair.init[:512] and sec[1024:] == pair.init[1024:]
        assert await pair.P.run("query-xen-replication-status") == {"error": False}
