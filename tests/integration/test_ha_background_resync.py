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


async def test_the_source_killed_mid_resync_resumes_after_its_restart(ha) -> None:
    """CONTINUITY §9: SIGKILL of the sync source mid-resync. The target stays
    Inconsistent (never promoted); the source restarts, is promoted again and resumes
    from its persisted remainder (rule resume) — the disks end identical."""
    ha.make_disks(SIZE, names=("a.raw", "b.raw"))
    res = ha.resource()
    slow = ["--resync-rate", "2M"]
    a, b = ha.up(res, "a", extra=slow), ha.up(res, "b")
    await asyncio.gather(a.wait_ready(), b.wait_ready())
    ok("promote", res, "--node", "a", "--force")
    await protected(a, 60)
    b.kill()  # b leaves; a writes alone into 10 regions
    await a.wait_status(lambda s: s["peer"] != "connected", 10, "a lost b")
    c = await ha.client(a)
    for i in range(10):
        await c.write((20 + i) * MiB, bytes([0x40 + i]) * 65536)
    await c.flush()
    b2 = ha.up(res, "b")
    await a.wait_status(lambda s: s.get("resync", {}).get("done-bytes", 0) >= MiB, 30, "copying")
    a.kill()  # the source dies mid-copy
    await b2.wait_status(lambda s: s["disk-state"] == "Inconsistent", 10, "b Inconsistent")
    r = cli("promote", res, "--node", "b")
    assert r.returncode == 1 and "I3" in r.stderr, r.stderr  # never promote stale data
    a2 = ha.up(res, "a")
    await a2.wait_ready()
    ok("promote", res, "--node", "a")
    s = await protected(a2, 60)
    hs = s["last-handshake"]
    assert hs["rule"] == "resume" and hs["bytes"] <= 10 * REGION_SIZE, hs
    await both_down_and_equal(ha, a2, b2)
    with open(a2.disk, "rb") as f:
        f.seek(29 * MiB)
        assert f.read(65536) == bytes([0x49]) * 65536


async def test_a_returning_node_with_an_unrelated_disk_is_refused(ha) -> None:
    """A node whose disk has another lineage (no common epoch) is never overwritten:
    the pairing is refused by the rule unrelated, both disks keep their bytes."""
    a_data = ha.make_disks(SIZE, seed=5, names=("a.raw",))
    b_data = ha.make_disks(SIZE, seed=6, names=("b.raw",))
    from blockrep.ha.node_state import NodeState
    from blockrep.ha.states import HistoryEntry

    for name, gen in (("a", "epoch:aaaa"), ("b", "epoch:bbbb")):
        st = NodeState(ha.disk(f"{name}.raw") + ".blockrep-state.json")
        st.ensure_disk_id(SIZE)
        st.append(HistoryEntry.parse(gen))  # each its own lineage
    res = ha.resource()
    a, b = ha.up(res, "a"), ha.up(res, "b")
    await asyncio.gather(a.wait_ready(), b.wait_ready())
    ok("promote", res, "--node", "a")
    s = await a.wait_status(lambda s: s["peer"] == "refused", 20, "refused")
    assert s["replication"] == "Unrelated", s
    assert any("unrelated" in e for e in s["errors"]), s["errors"]
    for n in (a, b):
        ok("down", "--qmp", f"unix:{n.qmp}")
        assert await n.wait_exit(30) == 0
    with open(a.disk, "rb") as fa, open(b.disk, "rb") as fb:
        assert fa.read() == a_data and fb.read() == b_data  # nothing copied either way
