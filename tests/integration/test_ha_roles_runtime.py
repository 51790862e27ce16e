"""`blockrep up` and roles at run time (issue 11, CONTINUITY §4): promote, switchover,
demote, re-protect without restarting the survivor, I3, and the refusals — every
scenario ends with both disks compared byte for byte."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from blockrep.ha.bitmap import REGION_SIZE
from tests.harness.ha import REPO, buffers_in_memory

MiB = 1 << 20
SIZE = 64 * MiB


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blockrep.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def ok(*args: str) -> str:
    r = cli(*args)
    assert r.returncode == 0, f"blockrep {' '.join(args)}: {r.stderr}"
    return r.stdout


async def protected(node, timeout: float = 30.0) -> dict:
    return await node.wait_status(
        lambda s: s["replication"] == "Protected" and s["role"] == "primary",
        timeout,
        "Protected",
    )


async def write(ha, node, offset: int, data: bytes) -> None:
    c = await ha.client(node)
    await c.write(offset, data)
    await c.flush()


async def both_down_and_equal(ha, a, b) -> None:
    """`blockrep down` on both (the primary first: a clean handover), then the disks."""
    for n in (a, b):
        if n.proc.poll() is None:
            cli("down", "--qmp", f"unix:{n.qmp}")
            assert await n.wait_exit(30) == 0, n.log_text()
    with open(a.disk, "rb") as fa, open(b.disk, "rb") as fb:
        da, db = fa.read(), fb.read()
    assert len(da) == len(db) == SIZE
    if da != db:
        first = next(i for i in range(SIZE) if da[i] != db[i])
        raise AssertionError(f"the disks differ at offset {first}")


async def test_up_promote_switchover_and_reprotect_without_restart(ha) -> None:
    ha.make_disks(SIZE, names=("a.raw", "b.raw"))
    # a's buffers are fresh files at each checkpoint wherever they are; b's the default
    res = ha.resource(node_keys={"a": ['keep-buffer-pages = "off"']})
    a, b = ha.up(res, "a"), ha.up(res, "b")
    await asyncio.gather(a.wait_ready(), b.wait_ready())
    for n in (a, b):
        s = n.status()
        assert s["role"] == "none" and s["resource"] == "r0" and s["node"] == n.name

    # both disks hold the same bytes with no history: promote checks and pairs
    assert "primary" in ok("promote", res, "--node", "a")
    s = await protected(a)
    assert s["peer-role"] == "secondary"
    await b.wait_status(lambda s: s["role"] == "secondary", 10, "b secondary")
    assert b.status()["keep-buffer-pages"] is buffers_in_memory(ha)  # auto
    # a second promote is a no-op that says so; promoting the secondary is refused
    assert "already primary" in ok("promote", "--qmp", f"unix:{a.qmp}")
    r = cli("promote", res, "--node", "b")
    assert r.returncode == 1 and "the peer is primary" in r.stderr, r.stderr
    assert b.status()["role"] == "secondary"

    await write(ha, a, 3 * MiB, b"\x11" * MiB)
    await a.qmp_async("replication-checkpoint")

    # switchover under a writer: no consumer error on either side, no data copied
    writer_errors: list[BaseException] = []
    stop = asyncio.Event()

    async def writer() -> None:
        c = await ha.client(a)
        i = 0
        while not stop.is_set():
            try:
                await c.write((i % 16) * MiB, bytes([i % 251]) * 65536)
            except BaseException as e:  # noqa: BLE001 - collected and asserted below
                writer_errors.append(e)
                return
            i += 1
            await asyncio.sleep(0.005)

    w = asyncio.create_task(writer())
    await asyncio.sleep(0.3)
    assert "switched over" in ok("switchover", res, "--node", "a")
    stop.set()
    await w
    assert writer_errors == []
    s = await protected(b)
    assert s["last-handshake"]["bytes"] == 0, s["last-handshake"]
    await a.wait_status(lambda s: s["role"] == "secondary", 10, "a secondary")
    assert a.status()["keep-buffer-pages"] is False  # the resource file's, after a role change

    # the primary dies; the secondary is promoted and writes alone
    await write(ha, b, 20 * MiB, b"\x22" * (2 * MiB))
    b.kill()
    await a.wait_status(lambda s: s["peer"] in ("connecting", "peer-lost"), 10, "peer gone")
    assert "primary" in ok("promote", res, "--node", "a")
    await write(ha, a, 40 * MiB, b"\x33" * (3 * MiB))
    s = a.status()
    assert s["role"] == "primary" and s["replication"] != "Protected"
    assert s["written-alone"], s

    # the old primary comes back: the survivor (not restarted) re-protects itself
    pid = a.pid
    b2 = ha.up(res, "b")
    s = await protected(a, 40)
    assert a.pid == pid
    hs = s["last-handshake"]
    assert hs["rule"] == "failover-discard", hs
    assert 0 < hs["bytes"] < SIZE, hs  # the marked regions, never the whole disk
    assert hs["bytes"] <= (1024 + 8) * REGION_SIZE  # the AL's limit bounds b's part
    await b2.wait_status(lambda s: s["role"] == "secondary", 10, "b secondary")
    await write(ha, a, 50 * MiB, b"\x44" * MiB)
    await a.qmp_async("replication-checkpoint")
    await both_down_and_equal(ha, a, b2)
    with open(a.disk, "rb") as f:
        f.seek(40 * MiB)
        assert f.read(3 * MiB) == b"\x33" * (3 * MiB)


async def test_demote_then_promote_the_peer_copies_only_new_writes(ha) -> None:
    ha.make_disks(SIZE, names=("a.raw", "b.raw"))
    res = ha.resource()
    a, b = ha.up(res, "a"), ha.up(res, "b")
    await asyncio.gather(a.wait_ready(), b.wait_ready())
    ok("promote", res, "--node", "a")
    await protected(a)
    await write(ha, a, 0, b"\x55" * (4 * MiB))
    assert "secondary" in ok("demote", res, "--node", "a")
    await a.wait_status(lambda s: s["role"] in ("none", "secondary"), 10, "a demoted")
    await b.wait_status(lambda s: s["role"] == "none", 10, "b free")
    # neither is primary: nothing replicates
    assert a.status()["replication"] != "Protected"
    ok("promote", res, "--node", "b")
    await write(ha, b, 10 * MiB, b"\x66" * MiB)
    s = await protected(b)
    # what b wrote before pairing, nothing for a's clean demote (its AL was emptied)
    assert s["last-handshake"]["bytes"] <= 2 * REGION_SIZE, s["last-handshake"]
    await both_down_and_equal(ha, a, b)


async def test_promote_refusals_change_nothing(ha) -> None:
    data = ha.make_disks(SIZE, names=("a.raw", "b.raw"))
    res = ha.resource()
    a = ha.up(res, "a")
    await a.wait_ready()
    # I3: an Outdated disk (a split brain given up by resolve) is never promoted
    from blockrep.ha.node_state import NodeState
    from blockrep.ha.states import DiskState

    ok("down", res, "--node", "a")
    assert await a.wait_exit(30) == 0
    st = NodeState.load(a.state)
    with st.update():
        st.disk_state = DiskState.OUTDATED
    a2 = ha.up(res, "a")
    await a2.wait_ready()
    r = cli("promote", res, "--node", "a")
    assert r.returncode == 1 and "I3" in r.stderr and "Outdated" in r.stderr, r.stderr
    assert a2.status()["role"] == "none"
    # bad addressing: usage errors that name what is missing
    r = cli("promote")
    assert r.returncode == 2 and "name the node" in r.stderr
    r = cli("promote", res, "--node", "nosuch")
    assert r.returncode == 2 and "no node 'nosuch'" in r.stderr
    r = cli("switchover", res, "--node", "a")
    assert r.returncode == 1 and "not primary" in r.stderr
    ok("down", "--qmp", f"unix:{a2.qmp}")
    assert await a2.wait_exit(30) == 0
    with open(a2.disk, "rb") as f:
        assert f.read() == data  # nothing was written by any refused verb
