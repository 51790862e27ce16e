"""The seven internal failures of SPEC §6, each reproduced in a two-daemon replication pair.

P: quorum "colo-disk0" (fifo, vote-threshold=1) over the local disk (children.0) plus,
added at runtime, replication(mode=primary) → nbd → S's export "parent0".
S: REFERENCE-QEMU.md's layout: parent0 (secondary disk), replication(mode=secondary,
top-id=colo-disk0) over active → hidden → parent0, quorum "colo-disk0" on top.

Every disk sits on a blkdebug node without rules; each test arms rules at the moment
the failure is to happen (``x-blkdebug-set-rules``), and checks what SPEC §6 requires:
what each consumer (HMP qemu-io on colo-disk0) sees, what
``query-xen-replication-status`` says on both sides, and the images.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from tests.harness.images import MiB
from tests.harness.pair import Pair
from tests.harness.qmp import QMPSession
from tests.harness.tools import allocated_ranges, assert_file_pattern, check_clean, run_async

SIZE = 4 * MiB
C = 65536  # copy unit / cluster
BASE = 0xAA
OK = {"error": False}
IOERR = {"error": True, "desc": "I/O error occurred"}
EIO = [{"event": "write_aio", "errno": 5}]
EIO_READ = [{"event": "read_aio", "errno": 5}]


def s_drives(d) -> list[str]:
    """REFERENCE-QEMU.md's secondary with a blkdebug node under every disk."""
    return [
        f"if=none,id=parent0,driver=raw,file.driver=blkdebug,file.node-name=secbd,"
        f"file.image.driver=file,file.image.filename={d}/sec.raw",
        "if=none,id=childs0,driver=replication,mode=secondary,top-id=colo-disk0,"
        "file.driver=qcow2,file.node-name=active0,"
        f"file.file.driver=blkdebug,file.file.node-name=actbd,"
        f"file.file.image.driver=file,file.file.image.filename={d}/active.qcow2,"
        "file.backing.driver=qcow2,file.backing.node-name=hidden0,"
        "file.backing.file.driver=blkdebug,file.backing.file.node-name=hidbd,"
        f"file.backing.file.image.driver=file,file.backing.file.image.filename={d}/hidden.qcow2,"
        "file.backing.backing=parent0",
        "if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0=childs0",
    ]


def p_drives(d) -> list[str]:
    return [
        "if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,"
        "children.0.driver=raw,children.0.node-name=plocal,"
        "children.0.file.driver=blkdebug,children.0.file.node-name=pbd,"
        f"children.0.file.image.driver=file,children.0.file.image.filename={d}/prim.raw",
    ]


def run_pair(tmp_path, body, timeout: float = 60) -> Pair:
    pair = Pair(
        wd=tmp_path,
        size=SIZE,
        init=bytes([BASE]) * SIZE,
        exports=False,
        p_drives=p_drives(tmp_path),
        s_drives=s_drives(tmp_path),
    )

    async def go():
        p, s = await pair.start()
        try:
            assert await s.status() == OK and await p.status() == OK
            await body(pair, p, s)
        finally:
            # a session whose daemon was killed holds qemu.qmp's EOFError until closed
            await p.close()
            await s.close()

    try:
        run_async(go(), timeout)
    finally:
        pair.stop_all()
    return pair


async def set_rules(q: QMPSession, node: str, rules: list[dict]) -> None:
    assert await q.run("x-blkdebug-set-rules", {"node-name": node, "inject-error": rules}) == {}


async def drain_events(q: QMPSession) -> list[tuple[str, dict]]:
    """The events the client has received so far (and forget them)."""
    await asyncio.sleep(0.05)  # let the reader task dispatch what has arrived
    return [(ev["event"], ev.get("data", {})) for ev in q.c.events.clear()]


def named(events: list[tuple[str, dict]], name: str) -> list[dict]:
    return [data for ev, data in events if ev == name]


# -- 1 ----------------------------------------------------------------------------------------


def test_1_primary_disk_io_error(tmp_path):
    """As QEMU's quorum (fifo, vote-threshold=1): a write that the replication child
    completes succeeds, children.0 is reported bad (QUORUM_REPORT_BAD); a read fails,
    because fifo falls back to the replication child, which never serves reads."""

    async def body(pair: Pair, p: QMPSession, s: QMPSession):
        await drain_events(p)
        await set_rules(p, "pbd", EIO + EIO_READ)
        await p.write_ok("colo-disk0", 0x55, 0, C)
        evs = await drain_events(p)
        bad = named(evs, "QUORUM_REPORT_BAD")
        assert [(e["type"], e["node-name"], e["sector-num"], e["sectors-count"]) for e in bad] == [
            ("write", "plocal", 0, C // 512)
        ]
        assert "error" in bad[0]
        # no quorum failure: one success meets the threshold
        assert named(evs, "QUORUM_FAILURE") == []
        assert await p.status() == OK  # the replication side did its job
        # the read: fifo falls back from children.0 to the replication child, which fails
        out = await p.read_fails("colo-disk0", 0, C)
        evs = await drain_events(p)
        bad = named(evs, "QUORUM_REPORT_BAD")
        assert [(e["type"], e["node-name"]) for e in bad] == [
            ("read", "plocal"),
            ("read", "replication0"),
        ]
        assert named(evs, "QUORUM_FAILURE") == []  # QEMU's fifo reads never vote
        assert out.startswith("read failed: ")
        # a read error on P is no replication error
        assert await p.status() == OK
        # the write reached S (the secondary disk has it, hidden has the pre-image)...
        assert pair.sec_bytes(0, C) == b"\x55" * C
        # ...and not the local disk, which failed it
        assert pair.prim_bytes(0, C) == bytes([BASE]) * C
        await s.run("xen-colo-do-checkpoint")
        await s.read_ok("colo-disk0", 0x55, 0, C)
        assert await s.status() == OK
        # the disk heals: both work again
        await set_rules(p, "pbd", [])
        await p.write_ok("colo-disk0", 0x56, C, C)
        await p.read_ok("colo-disk0", 0x56, C, C)
        assert pair.prim_bytes(C, C) == b"\x56" * C == pair.sec_bytes(C, C)
        await p.quit()
        await s.quit()

    run_pair(tmp_path, body)


# -- 2 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["kill", "export-removed"])
def test_2_forwarding_failed(tmp_path, how):
    async def body(pair: Pair, p: QMPSession, s: QMPSession):
        await p.write_ok("colo-disk0", 0x55, 0, C)
        assert pair.sec_bytes(0, C) == b"\x55" * C
        if how == "kill":
            pair.S.process.proc.send_signal(signal.SIGKILL)
            await asyncio.get_running_loop().run_in_executor(None, pair.S.process.proc.wait, 10)
        else:
            await s.run("nbd-server-remove", {"name": "parent0", "mode": "hard"})
        # the consumer is unaffected: writes succeed and land on the local disk
        await p.write_ok("colo-disk0", 0x66, C, C)
        await p.read_ok("colo-disk0", 0x66, C, C)
        assert pair.prim_bytes(C, C) == b"\x66" * C
        assert pair.sec_bytes(C, C) == bytes([BASE]) * C
        # flush too (the replication child's flush failure is not the consumer's)
        assert await p.io("colo-disk0", "flush") == ""
        # reported to the HA manager
        assert await p.status() == IOERR
        r = await p.rep()
        assert (r["stage"], r["mode"]) == ("running", "primary") and r["error"]
        # and it stays reported, while the consumer keeps working
        await p.write_ok("colo-disk0", 0x67, 2 * C, C)
        assert await p.status() == IOERR
        if how == "export-removed":
            # S itself saw nothing wrong with its own disks
            assert await s.status() == OK
            await s.quit()
        # primary failover: stop, take the child out of the quorum, delete it
        assert (
            await p.run("xen-set-replication", {"enable": False, "primary": True, "failover": True})
            == {}
        )
        assert await p.status() == OK
        await p.run("x-blockdev-change", {"parent": "colo-disk0", "child": "children.1"})
        await p.run("blockdev-del", {"node-name": "replication0"})
        await p.write_ok("colo-disk0", 0x68, 3 * C, C)
        await p.read_ok("colo-disk0", 0x68, 3 * C, C)
        await p.quit()

    run_pair(tmp_path, body)


# -- 3 ----------------------------------------------------------------------------------------


def test_3_copy_before_write_failed(tmp_path):
    async def body(pair: Pair, p: QMPSession, s: QMPSession):
        await set_rules(s, "hidbd", EIO)
        # P's consumer: the write succeeds (local disk), the forward failed
        await p.write_ok("colo-disk0", 0x55, 0, C)
        assert pair.prim_bytes(0, C) == b"\x55" * C
        assert await p.status() == IOERR
        # the incoming write failed before reaching the secondary disk
        assert pair.sec_bytes(0, C) == bytes([BASE]) * C
        # S's get_error reports it
        assert await s.status() == IOERR
        r = await s.rep()
        assert r["stage"] == "running" and r["error"]
        # S's consumer still reads the checkpoint state
        await s.read_ok("colo-disk0", BASE, 0, SIZE)
        await p.quit()
        await s.quit()

    run_pair(tmp_path, body)


# -- 4 ----------------------------------------------------------------------------------------


def test_4_secondary_disk_io_error(tmp_path):
    async def body(pair: Pair, p: QMPSession, s: QMPSession):
        await set_rules(s, "secbd", EIO)
        await p.write_ok("colo-disk0", 0x55, 0, C)
        # P: forwarding failed (case 2); S: reported to the HA manager
        assert await p.status() == IOERR
        assert await s.status() == IOERR
        assert pair.sec_bytes(0, C) == bytes([BASE]) * C
        # S's consumer reads the checkpoint state (the pre-image in hidden is the same)
        await s.read_ok("colo-disk0", BASE, 0, SIZE)
        # a read error on the secondary disk reaches S's consumer (secondary mode
        # passes errors through) and is no replication error of its own
        await set_rules(s, "secbd", EIO_READ)
        await s.read_fails("colo-disk0", 2 * MiB, C)
        await p.quit()
        await s.quit()

    run_pair(tmp_path, body)


# -- 5 ----------------------------------------------------------------------------------------


def test_5_active_disk_io_error(tmp_path):
    async def body(pair: Pair, p: QMPSession, s: QMPSession):
        await s.write_ok("colo-disk0", 0x65, MiB + C, C)
        await set_rules(s, "actbd", EIO)
        out = await s.write_fails("colo-disk0", 0x66, MiB, C)
        assert out.startswith("write failed: ")
        # not a replication error, on either side
        assert await s.status() == OK
        await p.write_ok("colo-disk0", 0x55, 0, C)
        assert await p.status() == OK
        assert pair.sec_bytes(0, C) == b"\x55" * C
        # reads of data in the active disk fail too, for the consumer only
        await set_rules(s, "actbd", EIO_READ)
        await s.read_fails("colo-disk0", MiB + C, C)
        assert await s.status() == OK
        # the disk heals: S writes again, and the checkpoint works
        await set_rules(s, "actbd", [])
        await s.write_ok("colo-disk0", 0x66, MiB, C)
        await s.read_ok("colo-disk0", 0x66, MiB, C)
        assert await s.run("xen-colo-do-checkpoint") == {}
        await s.read_ok("colo-disk0", 0x55, 0, C)
        await s.read_ok("colo-disk0", BASE, MiB, C)
        assert await s.status() == OK
        await p.quit()
        await s.quit()

    pair = run_pair(tmp_path, body)
    check_clean(pair.active)
    check_clean(pair.hidden)


# -- 6 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("disk", ["active", "hidden"])
def test_6_make_empty_failed(tmp_path, disk):
    async def body(pair: Pair, p: QMPSession, s: QMPSession):
        await p.write_ok("colo-disk0", 0x55, 0, C)
        await s.write_ok("colo-disk0", 0x66, MiB, C)
        assert await s.run("xen-colo-do-checkpoint") == {}
        await p.write_ok("colo-disk0", 0x57, 2 * MiB, C)
        await s.write_ok("colo-disk0", 0x67, 3 * MiB, C)
        await set_rules(s, "actbd" if disk == "active" else "hidbd", EIO)
        desc = await s.error("xen-colo-do-checkpoint")
        assert "empty" in desc and disk in desc, desc
        # reported to the HA manager
        assert await s.status() == IOERR
        r = await s.rep()
        assert r["error"]
        # P is not affected (once the disk works again, its forwards succeed)
        await set_rules(s, "actbd" if disk == "active" else "hidbd", [])
        await p.write_ok("colo-disk0", 0x58, 2 * MiB + C, C)
        assert await p.status() == OK
        await p.quit()
        await s.quit()

    pair = run_pair(tmp_path, body)
    # the failed make_empty left consistent images
    check_clean(pair.active)
    check_clean(pair.hidden)


# -- 7 ----------------------------------------------------------------------------------------


def test_7_failover_commit_failed(tmp_path):
    A, H, N = MiB, 0, 2 * MiB  # in active, in hidden, in neither

    async def body(pair: Pair, p: QMPSession, s: QMPSession):
        await p.write_ok("colo-disk0", 0x55, H, C)  # S: pre-image 0xaa copied to hidden
        await s.write_ok("colo-disk0", 0x66, A, C)  # S: active
        r = await s.rep()
        assert (r["hidden-allocated-bytes"], r["active-allocated-bytes"]) == (C, C)
        # P dies; the secondary disk starts failing writes; failover
        pair.P.process.proc.send_signal(signal.SIGKILL)
        await asyncio.get_running_loop().run_in_executor(None, pair.P.process.proc.wait, 10)
        await s.run("nbd-server-stop")
        await set_rules(s, "secbd", EIO)
        assert (
            await s.run(
                "xen-set-replication", {"enable": False, "primary": False, "failover": True}
            )
            == {}
        )
        r = await s.wait_stage(("failover-failed", "done"))
        assert r["stage"] == "failover-failed" and r["error"]
        assert await s.status() == IOERR
        # the control table in failover-failed
        assert await s.error("xen-set-replication", {"enable": True, "primary": False}) == (
            "Block replication is running or done"
        )
        assert await s.error("xen-colo-do-checkpoint") == "Backup job was cancelled unexpectedly"
        assert await s.error("xen-set-replication", {"enable": False, "primary": False}) == (
            "Block replication is not running"
        )
        assert (await s.rep())["stage"] == "failover-failed"
        # S's consumer still sees last checkpoint + its own writes
        await s.read_ok("colo-disk0", BASE, H, C)
        await s.read_ok("colo-disk0", 0x66, A, C)
        await s.read_ok("colo-disk0", BASE, N, C)
        # the disk recovers; writes now route per SPEC §4
        await set_rules(s, "secbd", [])
        await s.write_ok("colo-disk0", 0x77, H, C)  # allocated in hidden -> active
        await s.write_ok("colo-disk0", 0x78, A, C)  # allocated in active -> active
        await s.write_ok("colo-disk0", 0x79, N, C)  # nowhere -> the secondary disk
        # straddling: its first half is in active, its second half nowhere
        await s.write_ok("colo-disk0", 0x7A, A + C - 4096, 8192)
        await s.read_ok("colo-disk0", 0x77, H, C)
        await s.read_ok("colo-disk0", 0x78, A, C - 4096)
        await s.read_ok("colo-disk0", 0x7A, A + C - 4096, 8192)
        await s.read_ok("colo-disk0", 0x79, N, C)
        assert (await s.rep())["stage"] == "failover-failed"
        await s.quit()

    pair = run_pair(tmp_path, body)
    # the secondary disk: P's forwarded write stays, the commit wrote nothing, and
    # the writes outside the buffers landed here
    sec = open(pair.sec, "rb").read()
    want = bytearray([BASE]) * SIZE
    want[H : H + C] = b"\x55" * C
    want[N : N + C] = b"\x79" * C
    want[A + C : A + C + 4096] = b"\x7a" * 4096
    assert sec == bytes(want)
    # active holds exactly the buffered ranges, with S's new data
    check_clean(pair.active)
    check_clean(pair.hidden)
    assert allocated_ranges(pair.active) == [(H, C), (A, C)]
    assert_file_pattern(pair.active, "qcow2", 0x77, H, C)
    assert_file_pattern(pair.active, "qcow2", 0x78, A, C - 4096)
    assert_file_pattern(pair.active, "qcow2", 0x7A, A + C - 4096, 4096)
    # hidden still holds the pre-image
    assert allocated_ranges(pair.hidden) == [(H, C)]
    assert_file_pattern(pair.hidden, "qcow2", BASE, H, C)
    assert os.path.getsize(pair.prim) == SIZE
