"""Background resync (CONTINUITY §4, I3, I5): the survivor's consumer writes while the
returning node is brought level — checksums first, rate-limited, pausable, resumed
after an interruption — and the pairing ends with both disks identical."""

from __future__ import annotations

import asyncio
import random

from blockrep.ha.bitmap import REGION_SIZE
from tests.integration.test_ha_roles_runtime import both_down_and_equal, cli, ok, protected

MiB = 1 << 20
SIZE = 64 * MiB


async def test_initial_sync_in_background_with_a_writing_consumer(ha) -> None:
    """A new resource whose disks differ: promote --force copies a's disk to b while a's
    consumer writes; b is Inconsistent meanwhile and refuses promotion (I3); pause and
    resume hold the copy; no consumer request fails (I5)."""
    ha.make_disks(SIZE, seed=1, names=("a.raw",))
    ha.make_disks(SIZE, seed=2, names=("b.raw",))
    res = ha.resource()
    a = ha.up(res, "a", extra=["--resync-rate", "8M"])
    b = ha.up(res, "b")
    await asyncio.gather(a.wait_ready(), b.wait_ready())
    ok("promote", res, "--node", "a", "--force")
    s = await a.wait_status(lambda s: "resync" in s, 10, "resync running")
    assert s["replication"] == "SyncSource" and s["peer-disk-state"] == "Inconsistent", s
    r = s["resync"]
    assert r["direction"] == "local-to-peer" and 0 <= r["percent"] <= 100, r
    assert r["total-bytes"] >= SIZE, r
    await b.wait_status(lambda s: s["disk-state"] == "Inconsistent", 10, "b Inconsistent")
    assert b.status()["replication"] == "SyncTarget"
    refused = cli("promote", res, "--node", "b")
    assert refused.returncode == 1 and "I3" in refused.stderr, refused.stderr

    errors: list[BaseException] = []
    model: dict[int, bytes] = {}
    stop = asyncio.Event()

    async def writer() -> None:
        c = await ha.client(a)
        rnd = random.Random(7)
        while not stop.is_set():
            off = rnd.randrange(0, SIZE // 4096) * 4096
            data = rnd.randbytes(4096)
            try:
                await c.write(off, data)
            except BaseException as e:  # noqa: BLE001 - asserted below
                errors.append(e)
                return
            model[off] = data
            await asyncio.sleep(0.002)

    w = asyncio.create_task(writer())
    out = ok("resync", "pause", res, "--node", "a")
    assert "paused" in out
    s = await a.wait_status(lambda s: s["replication"] == "PausedSync", 5, "PausedSync")
    held = s["resync"]["done-bytes"]
    await asyncio.sleep(1.0)
    assert a.status()["resync"]["done-bytes"] == held  # nothing copied while paused
    ok("resync", "resume", res, "--node", "a")
    percents = []
    while True:
        s = a.status()
        if "resync" not in s:
            break
        percents.append(s["resync"]["percent"])
        await asyncio.sleep(0.2)
    stop.set()
    await w
    assert errors == []
    assert percents == sorted(percents) and all(0 <= p <= 100 for p in percents), percents
    s = await protected(a, 60)
    hs = s["last-handshake"]
    # a fresh peer (no history) gets all of the promoted disk: rule full (CONTINUITY §5)
    assert hs["rule"] == "full" and hs["bytes"] >= SIZE - 4 * MiB, hs
    assert b.status()["disk-state"] != "Inconsistent"
    await both_down_and_equal(ha, a, b)
    with open(a.disk, "rb") as f:
        disk = f.read()
    for off, data in model.items():
        assert disk[off : off + 4096] == data


async def test_checksums_save_equal_regions_and_an_interrupted_resync_resumes(ha) -> None:
    """Equal disks: promote --force sends digests, not data. Then the old primary dies,
    the survivor writes many regions, and the returning node is killed mid-resync;
    started again, it is resumed — the disks end identical."""
    ha.make_disks(SIZE, names=("a.raw", "b.raw"))
    res = ha.resource()
    a, b = ha.up(res, "a"), ha.up(res, "b", extra=["--resync-rate", "2M"])
    await asyncio.gather(a.wait_ready(), b.wait_ready())
    ok("promote", res, "--node", "a", "--force")
    s = await protected(a, 60)
    hs = s["last-handshake"]
    assert hs["bytes"] == 0 and hs["saved-by-checksums"] >= SIZE - 2 * MiB, hs

    # a dies; b takes over and writes 12 regions alone
    a.kill()
    await b.wait_status(lambda s: s["peer"] != "connected", 10, "b lost a")
    ok("promote", res, "--node", "b")
    c = await ha.client(b)
    for i in range(12):
        await c.write(i * MiB + 4096, bytes([i + 1]) * 8192)
    await c.flush()

    # a returns; b resyncs it at 2 MiB/s; a is killed mid-copy
    a2 = ha.up(res, "a")
    await b.wait_status(lambda s: s.get("resync", {}).get("done-bytes", 0) >= 2 * MiB, 30, "copy")
    assert a2.status()["disk-state"] == "Inconsistent"
    a2.kill()
    await b.wait_status(lambda s: "resync" not in s, 30, "resync ended by the loss")
    assert b.status()["written-alone"], "the remainder stays marked for the next pairing"
    a3 = ha.up(res, "a")
    s = await protected(b, 60)
    hs = s["last-handshake"]
    assert hs["rule"] == "resume", hs  # a is Inconsistent: the interrupted resync resumes
    # resumed: the remainder (and a's marks), never the 12 regions twice plus more
    assert hs["bytes"] <= 12 * REGION_SIZE, hs
    await both_down_and_equal(ha, b, a3)
