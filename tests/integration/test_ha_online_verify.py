"""Online verify (issue 13, CONTINUITY §7): ``blockrep verify`` compares the two disks
of a Protected pair by digests, while the consumer writes; ``blockrep resync
--out-of-sync`` repairs what it found. Each test ends with both disks compared byte
for byte with the consumer's model."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess

from blockrep.ha.bitmap import REGION_SIZE
from blockrep.testing import MiB, blockrep_argv
from tests.harness.ha import HA, REPO
from tests.harness.tools import sha, sha_file

SIZE = 16 * MiB
P_ARGS = ["--heartbeat-interval", "0.1", "--heartbeat-timeout", "1.5", "--checkpoint-interval"]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        blockrep_argv(*args), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


async def acli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, *args, timeout=timeout)


async def _pair(ha: HA, interval: str = "0", shared: bool = False):
    mode = ["--shared"] if shared else []
    s = ha.secondary(disk=ha.disk("p.raw") if shared else None, extra=mode)
    p = ha.primary(f"unix:{ha.path('s.ctl')}", extra=[*P_ARGS, interval, *mode])
    await s.wait_ready()
    await p.wait_ready()
    await p.wait_status(lambda x: x["replication"] == "Protected", 30, "Protected")
    return p, s


async def _stop_and_compare(ha: HA, model: bytearray, p, s) -> None:
    """A checkpoint, an orderly stop of both, then both disks against the model."""
    r = await acli("checkpoint", "--qmp", f"unix:{p.qmp}")
    assert r.returncode == 0, r.stderr
    for g in ha.graphs:
        await g.close_all()
    ha.graphs.clear()
    for n in (p, s):
        n.quit()
        assert await n.wait_exit(30) == 0, n.log_text()
    for n in (p, s):
        assert sha_file(n.disk) == sha(bytes(model)), n.name


async def test_a_region_corrupted_behind_blockreps_back_is_found_and_repaired(ha) -> None:
    """S's disk file is changed under the running pair: verify exits 1 naming the
    region, marks it (status, event, peer bitmap); resync --out-of-sync copies it back
    with the consumer running; a second verify exits 0; the disks end identical."""
    model = bytearray(ha.make_disks(SIZE))
    p, s = await _pair(ha)
    c = await ha.client(p)
    rnd = random.Random(3)
    for _ in range(20):
        off, data = rnd.randrange(0, SIZE - 8192), rnd.randbytes(8192)
        await c.write(off, data)
        model[off : off + len(data)] = data
    await c.flush()

    bad = 5  # region 5 of S's disk, behind blockrep's back
    fd = os.open(s.disk, os.O_WRONLY)
    try:
        os.pwrite(
            fd, bytes(b ^ 0xFF for b in model[bad * MiB + 100 : bad * MiB + 612]), bad * MiB + 100
        )
        os.fsync(fd)
    finally:
        os.close(fd)

    r = await acli("verify", "--qmp", f"unix:{p.qmp}", "--wait")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr, p.log_text())
    assert f"region {bad} (offset {bad * REGION_SIZE}" in r.stdout, r.stdout
    v = (await p.astatus())["verify"]
    assert v["mismatched-regions"] == [bad] and v["mismatched-bytes"] == REGION_SIZE, v
    assert v["last-result"] == "mismatches" and v["position"] == v["total"] == SIZE, v
    assert v["out-of-sync-bytes"] == REGION_SIZE and not v["running"], v
    assert v["digest-bytes"] < SIZE // 100, v  # digests crossed the wire, not the disk
    # set in the peer bitmap (no checkpoint since: --checkpoint-interval 0)
    assert [bad * REGION_SIZE, REGION_SIZE] in (await p.astatus())["written-alone"]
    ev = await p.qmp_async("query-ha-events", {"cursor": 0})
    found = [e for e in ev["events"] if "verify" in e["changed"]]
    assert any((e["verify"] or {}).get("mismatched-regions") == [bad] for e in found), found

    # the repair holds the consumer only per batch: a writer keeps going meanwhile
    stop = asyncio.Event()
    errors: list[BaseException] = []

    async def writer() -> None:
        w = random.Random(9)
        while not stop.is_set():
            off, data = w.randrange(0, SIZE // 4096) * 4096, w.randbytes(4096)
            try:
                await c.write(off, data)
            except BaseException as e:  # noqa: BLE001 - asserted below
                errors.append(e)
                return
            model[off : off + len(data)] = data

    task = asyncio.create_task(writer())
    r = await acli("resync", "--out-of-sync", "--qmp", f"unix:{p.qmp}")
    stop.set()
    await task
    assert errors == []
    assert r.returncode == 0 and "1 region(s)" in r.stdout, (r.stdout, r.stderr)
    s_now = (await p.astatus())["verify"]
    assert s_now["out-of-sync-bytes"] == 0, s_now

    r = await acli("verify", "--qmp", f"unix:{p.qmp}", "--wait")
    assert r.returncode == 0, (r.stdout, r.stderr)
    v = (await p.astatus())["verify"]
    assert v["last-result"] == "in-sync" and v["mismatched-bytes"] == 0, v
    await _stop_and_compare(ha, model, p, s)


async def test_verify_under_a_write_load_reports_no_false_mismatch(ha) -> None:
    """Writers hammer the first half of the disk while a slow verify (two regions per
    batch) passes over it: regions written during their batch are skipped and counted,
    none is reported as a mismatch; the untouched half is verified."""
    model = bytearray(ha.make_disks(SIZE))
    p, s = await _pair(ha, interval="0.5")
    c = await ha.client(p)
    stop = asyncio.Event()
    errors: list[BaseException] = []
    half_blocks = SIZE // 2 // 4096
    writers = 6

    async def writer(i: int) -> None:
        w = random.Random(100 + i)
        while not stop.is_set():  # blocks ≡ i (mod writers): no two writes overlap
            off = (w.randrange(0, half_blocks // writers) * writers + i) * 4096
            data = w.randbytes(4096)
            try:
                await c.write(off, data)
            except BaseException as e:  # noqa: BLE001 - asserted below
                errors.append(e)
                return
            model[off : off + len(data)] = data

    tasks = [asyncio.create_task(writer(i)) for i in range(writers)]
    try:
        await asyncio.sleep(0.3)
        r = await acli("verify", "--qmp", f"unix:{p.qmp}", "--wait", "--rate", "8M")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert errors == []
    v = (await p.astatus())["verify"]
    assert r.returncode == 0, (r.stdout, r.stderr, v)
    assert v["mismatched-bytes"] == 0 and v["last-result"] == "in-sync", v
    assert 0 < v["skipped-bytes"] <= SIZE // 2, v  # only the written half is skipped
    assert v["position"] == SIZE, v
    await _stop_and_compare(ha, model, p, s)


async def test_verify_is_refused_in_shared_mode(ha) -> None:
    """One shared disk has nothing to compare: verify exits 2 saying so, and so does a
    repair (exit 1, like the other control commands' refusals)."""
    model = bytearray(ha.make_disks(SIZE, names=("p.raw",)))
    p, s = await _pair(ha, shared=True)
    r = await acli("verify", "--qmp", f"unix:{p.qmp}", "--wait")
    assert r.returncode == 2 and "shared" in r.stderr, (r.stdout, r.stderr)
    r = await acli("resync", "--out-of-sync", "--qmp", f"unix:{p.qmp}")
    assert r.returncode == 1 and "shared" in r.stderr, (r.stdout, r.stderr)
    assert (await p.astatus())["verify"]["last-result"] is None
    for n in (p, s):
        n.quit()
        assert await n.wait_exit(30) == 0, n.log_text()
    assert sha_file(ha.disk("p.raw")) == sha(bytes(model))


async def test_verify_stops_with_an_error_when_the_secondary_is_lost(ha) -> None:
    """A pass stops with an error (exit 2) when the secondary is lost mid-way; a verify
    of a primary that is not Protected is refused (exit 2) and keeps the position for
    a resume; a second verify while one runs is refused."""
    model = bytearray(ha.make_disks(SIZE))
    p, s = await _pair(ha)
    r = await acli("verify", "--qmp", f"unix:{p.qmp}", "--rate", "2M")  # 8 s at 2 MiB/s
    assert r.returncode == 0 and "started" in r.stdout, r.stderr
    await p.wait_status(lambda x: x["verify"]["position"] >= 2 * MiB, 20, "verify moving")
    r = await acli("verify", "--qmp", f"unix:{p.qmp}", "--wait")
    assert r.returncode == 2 and "running" in r.stderr, (r.stdout, r.stderr)
    s.kill()
    st = await p.wait_status(lambda x: not x["verify"]["running"], 30, "verify stopped")
    v = st["verify"]
    assert v["last-result"].startswith("error:"), v
    stopped_at = v["position"]
    assert 0 < stopped_at < SIZE, v
    await p.wait_status(lambda x: x["replication"] != "Protected", 30, "P alone")
    r = await acli("verify", "--qmp", f"unix:{p.qmp}", "--wait")
    assert r.returncode == 2 and "not Protected" in r.stderr, (r.stdout, r.stderr)
    assert (await p.astatus())["verify"]["position"] == stopped_at  # kept for a resume
    c = await ha.client(p)
    await c.write(MiB, b"\x5a" * 4096)  # alone: the consumer is served
    await c.flush()
    s_model = bytes(model)
    model[MiB : MiB + 4096] = b"\x5a" * 4096
    for g in ha.graphs:
        await g.close_all()
    ha.graphs.clear()
    p.quit()
    assert await p.wait_exit(30) == 0, p.log_text()
    assert sha_file(p.disk) == sha(bytes(model))
    assert sha_file(s.disk) == sha(s_model)  # S held every write up to its loss
