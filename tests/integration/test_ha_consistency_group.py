"""A resource of two volumes is one consistency group (issue 11): one checkpoint, one
failover — after the primary is killed mid-epoch both volumes hold the same checkpoint,
and re-protect brings both back level (compared byte for byte)."""

from __future__ import annotations

import asyncio

from blockrep import testing
from tests.integration.test_ha_roles_runtime import cli, ok, protected

MiB = 1 << 20
SIZES = (24 * MiB, 8 * MiB + 512 * 1024)  # the second starts inside a 1 MiB region


async def _volume(ha, node, i: int):
    g, c = await testing.nbd_client(node.export, "disk" if i == 0 else f"disk{i}")
    ha.graphs.append(g)
    return c


async def test_two_volumes_fail_over_to_one_checkpoint(ha) -> None:
    disks = {n: [ha.disk(f"{n}{i}.raw") for i in range(2)] for n in ("a", "b")}
    for i, size in enumerate(SIZES):
        ha.make_disks(size, seed=i, names=(f"a{i}.raw", f"b{i}.raw"))
    res = ha.resource(disks=disks)
    a, b = ha.up(res, "a"), ha.up(res, "b")
    await asyncio.gather(a.wait_ready(), b.wait_ready())
    ok("promote", res, "--node", "a", "--force")
    s = await protected(a, 60)
    assert [v["size"] for v in s["volumes"]] == list(SIZES)
    assert s["volumes"][1]["offset"] == SIZES[0]
    assert s["last-handshake"]["bytes"] == 0  # equal disks: only digests crossed

    va = [await _volume(ha, a, i) for i in range(2)]
    for i, v in enumerate(va):
        await v.write(MiB, bytes([0x10 + i]) * (2 * MiB))
        await v.flush()
    await a.qmp_async("replication-checkpoint")  # the checkpoint both volumes share
    for i, v in enumerate(va):
        await v.write(MiB, bytes([0x20 + i]) * (2 * MiB))  # past it, on both volumes
        await v.flush()
    a.kill()
    await b.wait_status(lambda s: s["peer"] != "connected", 10, "b lost a")
    ok("promote", res, "--node", "b")
    vb = [await _volume(ha, b, i) for i in range(2)]
    for i, v in enumerate(vb):
        assert await v.read(MiB, 2 * MiB) == bytes([0x10 + i]) * (2 * MiB), f"volume {i}"
    await vb[1].write(SIZES[1] - 4096, b"\x77" * 4096)  # the survivor writes its last block

    a2 = ha.up(res, "a")
    s = await protected(b, 60)
    assert s["last-handshake"]["rule"] == "failover-discard", s["last-handshake"]
    await b.qmp_async("replication-checkpoint")
    for n in (b, a2):
        r = cli("down", "--qmp", f"unix:{n.qmp}")
        assert r.returncode == 0, r.stderr
        assert await n.wait_exit(30) == 0
    for i in range(2):
        with open(disks["a"][i], "rb") as fa, open(disks["b"][i], "rb") as fb:
            da, db = fa.read(), fb.read()
        assert len(da) == SIZES[i] and da == db, f"volume {i} differs"
        assert da[MiB : 3 * MiB] == bytes([0x10 + i]) * (2 * MiB)
    assert db[-4096:] == b"\x77" * 4096
