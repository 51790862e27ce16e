"""QEMU's tests/unit/test-replication.c, ported as black-box tests against ``blockrep daemon``.

The C test builds BlockBackends with ``blk_new_open`` from drive option strings and calls
``replication_*_all`` directly. Here the same option strings are ``-drive`` arguments of a
daemon, the BlockBackend names are the drive ids, the reads and writes are HMP ``qemu-io``
commands and the ``replication_*_all`` calls are their QMP commands:

    replication_start_all(mode)      -> xen-set-replication enable=true primary=(mode==primary)
    replication_stop_all(failover)   -> xen-set-replication enable=false failover=...
    replication_do_checkpoint_all()  -> xen-colo-do-checkpoint
    replication_get_error_all()      -> query-xen-replication-status

QEMU compares with ``memcmp(...) <= 0``, which accepts any buffer that sorts below the
pattern; every comparison here is exact (qemu-io ``-P``). In particular after a failover
the upper half reads the checkpointed 0x11 and not 0x22: the 0x22 written to the local
(secondary) disk after the last checkpoint stands for the primary's writes, which SPEC §5
rolls back through the hidden disk's copies.

Beyond the 13 ports: the error texts of SPEC §4's control table and the open-time errors,
the secondary start checks of SPEC §5 in QEMU's order, and the designed (not 7.2) clean
stop of the secondary without failover.
"""

from __future__ import annotations

import asyncio

from tests.harness.images import MiB, qcow2
from tests.harness.processes import DaemonProc, daemon
from tests.harness.qmp import QMPSession
from tests.harness.tools import allocated_ranges, assert_file_pattern, check_clean, run_async

IMG_SIZE = 64 * MiB
HALF = IMG_SIZE // 2

P_ID = "primary-id"
S_ID = "secondary-id"
S_LOCAL_DISK_ID = "secondary-local-disk-id"


# -- primary --------------------------------------------------------------------------------


def primary_args(tmp_path) -> tuple[list[str], str]:
    disk = tmp_path / "p_local_disk.qcow2"
    qcow2(disk, IMG_SIZE)
    drive = (
        f"if=none,id={P_ID},"
        "driver=replication,mode=primary,node-name=xxx,"
        f"file.driver=qcow2,file.file.filename={disk},"
        "file.file.locking=off"
    )
    return ["-drive", drive], str(disk)


def run_primary(tmp_path, body, timeout: float = 60) -> str:
    """Start the primary (start_primary), run ``body(p)``, quit (teardown_primary)."""
    args, disk = primary_args(tmp_path)
    with daemon(tmp_path, *args, name="P") as d:

        async def go():
            p = await QMPSession.connect("P", d)
            try:
                await body(p)
            finally:
                await p.quit()

        run_async(go(), timeout)
    check_clean(disk)
    return disk


def test_primary_read(tmp_path):
    async def body(p: QMPSession):
        # read from 0 to IMG_SIZE: fails (replication not started; primary never reads)
        await p.read_fails(P_ID, 0, IMG_SIZE)

    run_primary(tmp_path, body)


def test_primary_write(tmp_path):
    async def body(p: QMPSession):
        # write from 0 to IMG_SIZE: fails, stage none
        await p.write_fails(P_ID, 0x00, 0, IMG_SIZE)
        assert (await p.rep())["stage"] == "none"

    disk = run_primary(tmp_path, body)
    # nothing reached the image
    assert allocated_ranges(disk) == []


def test_primary_start(tmp_path):
    async def body(p: QMPSession):
        assert await p.run("xen-set-replication", {"enable": True, "primary": True}) == {}
        # read from 0 to IMG_SIZE: a primary replication node never serves reads
        await p.read_fails(P_ID, 0, IMG_SIZE)
        # write 0x22 from 0 to IMG_SIZE: succeeds and reaches the file child
        await p.write_ok(P_ID, 0x22, 0, IMG_SIZE)
        assert await p.status() == {"error": False}
        r = await p.rep()
        assert (r["node-name"], r["mode"], r["stage"], r["error"]) == (
            "xxx",
            "primary",
            "running",
            None,
        )

    disk = run_primary(tmp_path, body)
    assert_file_pattern(disk, "qcow2", 0x22, 0, IMG_SIZE)


def test_primary_stop(tmp_path):
    async def body(p: QMPSession):
        await p.run("xen-set-replication", {"enable": True, "primary": True})
        assert (
            await p.run("xen-set-replication", {"enable": False, "primary": True, "failover": True})
            == {}
        )
        r = await p.rep()
        assert (r["stage"], r["error"]) == ("done", None)
        assert await p.status() == {"error": False}
        # SPEC §5 primary stop: further writes fail with EIO, reads still fail
        await p.write_fails(P_ID, 0x44, 0, 65536)
        await p.read_fails(P_ID, 0, 65536)
        # stop and start of a finished replication are ignored (SPEC §4)
        assert await p.run("xen-set-replication", {"enable": False, "primary": True}) == {}
        assert await p.run("xen-set-replication", {"enable": True, "primary": True}) == {}
        assert await p.run("xen-colo-do-checkpoint") == {}
        assert (await p.rep())["stage"] == "done"

    disk = run_primary(tmp_path, body)
    assert allocated_ranges(disk) == []


def test_primary_do_checkpoint(tmp_path):
    async def body(p: QMPSession):
        await p.run("xen-set-replication", {"enable": True, "primary": True})
        assert await p.run("xen-colo-do-checkpoint") == {}
        assert await p.status() == {"error": False}
        assert (await p.rep())["stage"] == "running"

    run_primary(tmp_path, body)


def test_primary_get_error_all(tmp_path):
    async def body(p: QMPSession):
        await p.run("xen-set-replication", {"enable": True, "primary": True})
        assert await p.status() == {"error": False}

    run_primary(tmp_path, body)


# -- secondary ------------------------------------------------------------------------------


class SecondaryImages:
    def __init__(self, tmp_path, size: int = IMG_SIZE, active_size: int | None = None) -> None:
        self.local = tmp_path / "s_local_disk.qcow2"
        self.active = tmp_path / "s_active_disk.qcow2"
        self.hidden = tmp_path / "s_hidden_disk.qcow2"
        qcow2(self.local, size)
        qcow2(self.active, active_size or size)
        qcow2(self.hidden, size)

    def args(self, top_id: str = S_ID) -> list[str]:
        local = (
            f"if=none,id={S_LOCAL_DISK_ID},file.filename={self.local},driver=qcow2,file.locking=off"
        )
        rep = (
            f"if=none,id={S_ID},"
            f"driver=replication,mode=secondary,top-id={top_id},"
            f"file.driver=qcow2,file.file.filename={self.active},"
            "file.file.locking=off,"
            "file.backing.driver=qcow2,"
            f"file.backing.file.filename={self.hidden},"
            "file.backing.file.locking=off,"
            f"file.backing.backing={S_LOCAL_DISK_ID}"
        )
        return ["-drive", local, "-drive", rep]

    def check_clean(self) -> None:
        for img in (self.local, self.active, self.hidden):
            check_clean(img)


async def start_secondary(s: QMPSession, size: int = IMG_SIZE) -> None:
    """start_secondary(): format the local disk with 0x11 through its own drive."""
    await s.write_ok(S_LOCAL_DISK_ID, 0x11, 0, size)


def run_secondary(tmp_path, body, timeout: float = 90) -> SecondaryImages:
    imgs = SecondaryImages(tmp_path)
    with daemon(tmp_path, *imgs.args(), name="S") as d:

        async def go():
            s = await QMPSession.connect("S", d)
            try:
                await start_secondary(s)
                await body(s)
            finally:
                await s.quit()

        run_async(go(), timeout)
    imgs.check_clean()
    return imgs


async def start_s(s: QMPSession) -> None:
    assert await s.run("xen-set-replication", {"enable": True, "primary": False}) == {}
    r = await s.rep()
    assert (r["mode"], r["stage"], r["error"]) == ("secondary", "running", None)
    assert await s.status() == {"error": False}


async def failover(s: QMPSession) -> None:
    """replication_stop_all(true), then wait until the active commit has finished."""
    assert (
        await s.run("xen-set-replication", {"enable": False, "primary": False, "failover": True})
        == {}
    )
    r = await s.wait_stage(("done", "failover-failed"))
    assert (r["stage"], r["error"], r["jobs"]) == ("done", None, [])
    assert await s.status() == {"error": False}


async def p_writes_local_upper_half(s: QMPSession) -> None:
    """write 0x22 to s_local_disk (IMG_SIZE / 2, IMG_SIZE), then the top still reads 0x11."""
    await s.write_ok(S_LOCAL_DISK_ID, 0x22, HALF, HALF)
    # replication backed s_local_disk up into s_hidden_disk: the top reads the checkpoint
    await s.read_ok(S_ID, 0x11, 0, IMG_SIZE)
    r = await s.rep()
    assert r["hidden-allocated-bytes"] == HALF
    assert r["active-allocated-bytes"] == 0


def test_secondary_read(tmp_path):
    async def body(s: QMPSession):
        # read from 0 to IMG_SIZE before start: fails
        await s.read_fails(S_ID, 0, IMG_SIZE)

    run_secondary(tmp_path, body)


def test_secondary_write(tmp_path):
    async def body(s: QMPSession):
        # write from 0 to IMG_SIZE before start: fails
        await s.write_fails(S_ID, 0x00, 0, IMG_SIZE)

    imgs = run_secondary(tmp_path, body)
    assert allocated_ranges(imgs.active) == []
    assert allocated_ranges(imgs.hidden) == []
    assert_file_pattern(imgs.local, "qcow2", 0x11, 0, IMG_SIZE)


def test_secondary_start(tmp_path):
    async def body(s: QMPSession):
        await start_s(s)
        # read from s_local_disk (0, IMG_SIZE)
        await s.read_ok(S_ID, 0x11, 0, IMG_SIZE)
        await p_writes_local_upper_half(s)
        # write 0x33 to s_active_disk (0, IMG_SIZE / 2)
        await s.write_ok(S_ID, 0x33, 0, HALF)
        # read from s_active_disk (0, IMG_SIZE / 2); the upper half is still the checkpoint
        await s.read_ok(S_ID, 0x33, 0, HALF)
        await s.read_ok(S_ID, 0x11, HALF, HALF)
        assert (await s.rep())["active-allocated-bytes"] == HALF
        # the local disk itself has P's writes
        await s.read_ok(S_LOCAL_DISK_ID, 0x11, 0, HALF)
        await s.read_ok(S_LOCAL_DISK_ID, 0x22, HALF, HALF)
        # unblock top_bs
        await failover(s)

    imgs = run_secondary(tmp_path, body)
    assert_file_pattern(imgs.local, "qcow2", 0x33, 0, HALF)
    assert_file_pattern(imgs.local, "qcow2", 0x11, HALF, HALF)


def test_secondary_stop(tmp_path):
    async def body(s: QMPSession):
        await start_s(s)
        await p_writes_local_upper_half(s)
        # write 0x33 to s_active_disk (0, IMG_SIZE / 2)
        await s.write_ok(S_ID, 0x33, 0, HALF)
        # do active commit, wait until it has finished
        await failover(s)
        # read (0, IMG_SIZE / 2): S's own writes
        await s.read_ok(S_ID, 0x33, 0, HALF)
        # read (IMG_SIZE / 2, IMG_SIZE): the checkpointed 0x11 (QEMU's memcmp <= 0 would
        # also accept 0x22; P's writes since the checkpoint are rolled back)
        await s.read_ok(S_ID, 0x11, HALF, HALF)
        # the secondary disk itself now holds it, through its own drive too
        await s.read_ok(S_LOCAL_DISK_ID, 0x33, 0, HALF)
        await s.read_ok(S_LOCAL_DISK_ID, 0x11, HALF, HALF)
        # S keeps running on the secondary disk
        await s.write_ok(S_ID, 0x44, 0, 65536)
        await s.read_ok(S_LOCAL_DISK_ID, 0x44, 0, 65536)

    imgs = run_secondary(tmp_path, body)
    assert_file_pattern(imgs.local, "qcow2", 0x44, 0, 65536)
    assert_file_pattern(imgs.local, "qcow2", 0x33, 65536, HALF - 65536)
    assert_file_pattern(imgs.local, "qcow2", 0x11, HALF, HALF)


def test_secondary_continuous_replication(tmp_path):
    async def body(s: QMPSession):
        await start_s(s)
        await p_writes_local_upper_half(s)
        await s.write_ok(S_ID, 0x33, 0, HALF)
        # do failover (active commit)
        assert (
            await s.run(
                "xen-set-replication", {"enable": False, "primary": False, "failover": True}
            )
            == {}
        )
        # it should ignore all requests from now on: start (even with the other mode),
        # checkpoint and stop all succeed without doing anything
        assert await s.run("xen-set-replication", {"enable": True, "primary": True}) == {}
        assert await s.run("xen-colo-do-checkpoint") == {}
        assert (
            await s.run(
                "xen-set-replication", {"enable": False, "primary": False, "failover": True}
            )
            == {}
        )
        r = await s.wait_stage(("done", "failover-failed"))
        assert (r["stage"], r["error"]) == ("done", None)
        # and still, once done
        assert await s.run("xen-set-replication", {"enable": True, "primary": True}) == {}
        assert await s.run("xen-colo-do-checkpoint") == {}
        assert await s.run("xen-set-replication", {"enable": False, "primary": False}) == {}
        assert (await s.rep())["stage"] == "done"
        assert await s.status() == {"error": False}
        await s.read_ok(S_ID, 0x33, 0, HALF)
        await s.read_ok(S_ID, 0x11, HALF, HALF)

    imgs = run_secondary(tmp_path, body)
    assert_file_pattern(imgs.local, "qcow2", 0x33, 0, HALF)
    assert_file_pattern(imgs.local, "qcow2", 0x11, HALF, HALF)


def test_secondary_do_checkpoint(tmp_path):
    async def body(s: QMPSession):
        await start_s(s)
        epoch = (await s.rep())["epoch"]
        await p_writes_local_upper_half(s)
        await s.write_ok(S_ID, 0x33, 0, 65536)
        assert await s.run("xen-colo-do-checkpoint") == {}
        r = await s.rep()
        assert (r["stage"], r["error"], r["epoch"]) == ("running", None, epoch + 1)
        assert (r["hidden-allocated-bytes"], r["active-allocated-bytes"], r["clusters-copied"]) == (
            0,
            0,
            0,
        )
        # after checkpoint, read pattern 0x22 from s_local_disk; S's write is gone
        await s.read_ok(S_ID, 0x22, HALF, HALF)
        await s.read_ok(S_ID, 0x11, 0, HALF)
        # unblock top_bs
        await failover(s)
        await s.read_ok(S_ID, 0x11, 0, HALF)
        await s.read_ok(S_ID, 0x22, HALF, HALF)

    imgs = run_secondary(tmp_path, body)
    assert_file_pattern(imgs.local, "qcow2", 0x11, 0, HALF)
    assert_file_pattern(imgs.local, "qcow2", 0x22, HALF, HALF)


def test_secondary_get_error_all(tmp_path):
    async def body(s: QMPSession):
        await start_s(s)
        assert await s.status() == {"error": False}
        # unblock top_bs
        await failover(s)

    run_secondary(tmp_path, body)


# -- beyond the C test: SPEC §4 control table, open-time errors, §5 start checks ----------------

SMALL = 4 * MiB


def test_secondary_stop_without_failover_checkpoints_cleanly(tmp_path):
    """The designed behaviour where QEMU 7.2 fails ('Backup job was cancelled unexpectedly')."""
    imgs = SecondaryImages(tmp_path, SMALL)
    with daemon(tmp_path, *imgs.args(), name="S") as d:

        async def go():
            s = await QMPSession.connect("S", d)

            async def read_only_of(filename) -> set[bool]:
                nodes = await s.run("query-named-block-nodes")
                return {
                    n["ro"] for n in nodes if n["drv"] == "qcow2" and n["file"] == str(filename)
                }

            await start_secondary(s, SMALL)
            # the hidden disk is opened read-only as a backing file...
            assert await read_only_of(imgs.hidden) == {True}
            await start_s(s)
            # ...reopened read-write by the start...
            assert await read_only_of(imgs.hidden) == {False}
            await s.write_ok(S_LOCAL_DISK_ID, 0x22, SMALL // 2, SMALL // 2)
            await s.write_ok(S_ID, 0x33, 0, SMALL // 2)
            r = await s.rep()
            assert (r["hidden-allocated-bytes"], r["active-allocated-bytes"]) == (
                SMALL // 2,
                SMALL // 2,
            )
            assert await s.run("xen-set-replication", {"enable": False, "primary": False}) == {}
            r = await s.rep()
            assert (r["stage"], r["error"], r["jobs"]) == ("done", None, [])
            assert (r["hidden-allocated-bytes"], r["active-allocated-bytes"]) == (0, 0)
            assert await s.status() == {"error": False}
            assert await s.run("query-jobs") == []
            # ...and back to read-only by the stop
            for _ in range(100):
                if await read_only_of(imgs.hidden) == {True}:
                    break
                await asyncio.sleep(0.02)
            assert await read_only_of(imgs.hidden) == {True}
            # the buffers were emptied by the final checkpoint: the top reads the secondary disk
            await s.read_ok(S_ID, 0x11, 0, SMALL // 2)
            await s.read_ok(S_ID, 0x22, SMALL // 2, SMALL // 2)
            # the management blocker on top-id is gone with the backup job
            assert await s.hmp(f"drive_del {S_ID}") == ""
            await s.quit()

        run_async(go())
    imgs.check_clean()
    assert allocated_ranges(imgs.active) == []
    assert allocated_ranges(imgs.hidden) == []
    assert_file_pattern(imgs.local, "qcow2", 0x11, 0, SMALL // 2)
    assert_file_pattern(imgs.local, "qcow2", 0x22, SMALL // 2, SMALL // 2)


def test_control_table_errors(tmp_path):
    """SPEC §4's control table, stages none and running, with QEMU's exact texts."""
    imgs = SecondaryImages(tmp_path, SMALL)
    pdisk = tmp_path / "p.qcow2"
    qcow2(pdisk, SMALL)
    with (
        daemon(tmp_path, *imgs.args(), name="S") as ds,
        daemon(
            tmp_path,
            "-drive",
            f"if=none,id={P_ID},driver=replication,mode=primary,node-name=xxx,file.driver=qcow2,file.file.filename={pdisk}",
            name="P",
        ) as dp,
    ):

        async def go():
            s = await QMPSession.connect("S", ds)
            p = await QMPSession.connect("P", dp)
            # stage none
            not_running = {"error": True, "desc": "Block replication is not running"}
            assert await s.status() == not_running
            assert await p.status() == not_running
            assert (
                await s.error("xen-colo-do-checkpoint") == "Backup job was cancelled unexpectedly"
            )
            assert await p.run("xen-colo-do-checkpoint") == {}  # no-op on the primary
            for q in (s, p):
                desc = await q.error("xen-set-replication", {"enable": False, "primary": q is p})
                assert desc == "Block replication is not running"
                desc = await q.error(
                    "xen-set-replication", {"enable": False, "primary": q is p, "failover": False}
                )
                assert desc == "Block replication is not running"
                # a failover stop drops its errors, as QEMU's (errp=NULL): nothing happened
                assert (
                    await q.run(
                        "xen-set-replication",
                        {"enable": False, "primary": q is p, "failover": True},
                    )
                    == {}
                )
                assert (await q.rep())["stage"] == "none"
            assert (
                await s.error("xen-set-replication", {"enable": True, "primary": True})
                == "The parameter mode's value is invalid, needs 1, but got 0"
            )
            assert (
                await p.error("xen-set-replication", {"enable": True, "primary": False})
                == "The parameter mode's value is invalid, needs 0, but got 1"
            )
            assert (
                await s.error(
                    "xen-set-replication", {"enable": True, "primary": False, "failover": True}
                )
                == "Parameter 'failover' is only for stopping replication"
            )
            assert (await s.rep())["stage"] == (await p.rep())["stage"] == "none"
            # stage running
            await start_s(s)
            assert await p.run("xen-set-replication", {"enable": True, "primary": True}) == {}
            for q in (s, p):
                for primary in (True, False):
                    desc = await q.error(
                        "xen-set-replication", {"enable": True, "primary": primary}
                    )
                    assert desc == "Block replication is running or done"
                assert await q.status() == {"error": False}
                assert await q.run("xen-colo-do-checkpoint") == {}
            # block management operations on top-id are blocked while the backup job runs
            blocked = (
                f"Error: Node '{S_ID}' is busy: Block device is in use by internal backup job\r\n"
            )
            assert await s.hmp(f"drive_del {S_ID}") == blocked
            job_ids = (await s.rep())["jobs"]
            assert len(job_ids) == 1
            # blockrep shows the internal job in query-jobs (README: differences from 7.2)
            assert [j["id"] for j in await s.run("query-jobs")] == job_ids
            await s.quit()
            await p.quit()

        run_async(go())


def test_open_time_errors(tmp_path):
    disk = tmp_path / "x.qcow2"
    qcow2(disk, SMALL)
    file = {"driver": "qcow2", "file": {"driver": "file", "filename": str(disk)}}
    cases = [
        ({}, "Missing the option mode"),
        ({"mode": "tertiary"}, "The option mode's value should be primary or secondary"),
        ({"mode": "primary", "top-id": "t"}, "The primary side does not support option top-id"),
        ({"mode": "secondary"}, "Missing the option top-id"),
        # blockrep's own option: only a secondary has buffers whose pages it keeps
        (
            {"mode": "primary", "keep-buffer-pages": "off"},
            "The primary side does not support option keep-buffer-pages",
        ),
    ]
    with daemon(tmp_path, name="D") as d:

        async def go():
            q = await QMPSession.connect("D", d)
            for extra, want in cases:
                desc = await q.error(
                    "blockdev-add",
                    {"driver": "replication", "node-name": "r0", "file": file, **extra},
                )
                assert desc == want, extra
                # the -drive syntax of the C test (drive_add -n)
                keyval = "".join(f",{k}={v}" for k, v in extra.items())
                out = await q.hmp(
                    f"drive_add -n buddy driver=replication,node-name=r1{keyval},"
                    f"file.driver=qcow2,file.file.filename={disk}"
                )
                assert out == f"Error: {want}\r\n", extra
            # nothing was left behind: the image is free and no node registered
            assert await q.run("query-replication") == []
            await q.quit()

        run_async(go())
    # and on the daemon command line: a clear message, non-zero exit
    for extra, want in cases:
        keyval = "".join(f",{k}={v}" for k, v in extra.items())
        d = DaemonProc(
            [
                "-drive",
                f"if=none,id=r{keyval},driver=replication,file.driver=qcow2,file.file.filename={disk}",
            ],
            None,
            str(tmp_path / "cmdline.log"),
        )
        try:
            rc = d.proc.wait(20)
        finally:
            d.stop()
        assert rc != 0
        assert want in d.output(), (extra, d.output())


def _start_check_case(tmp_path, name: str, drives: list[str], want: str) -> None:
    """Start replication on a secondary graph that must fail with ``want``; nothing changes."""
    sub = tmp_path / name
    sub.mkdir()
    with daemon(sub, *drives, name="S") as d:

        async def go():
            s = await QMPSession.connect("S", d)
            desc = await s.error("xen-set-replication", {"enable": True, "primary": False})
            assert desc == want, name
            r = await s.rep()
            assert (r["stage"], r["jobs"]) == ("none", []), name
            assert await s.status() == {"error": True, "desc": "Block replication is not running"}
            assert await s.run("query-jobs") == []
            await s.quit()

        run_async(go())


def test_secondary_start_checks_in_qemu_order(tmp_path):
    """Each graph fails the check it is built for, though later checks would fail too."""
    d = tmp_path
    for n in ("local", "hidden", "active", "active_small", "other"):
        qcow2(d / f"{n}.qcow2", SMALL // 2 if n == "active_small" else SMALL)
    local = f"if=none,id=local,driver=qcow2,file.filename={d}/local.qcow2"
    local_node = f"driver=qcow2,node-name=localnode,file.driver=file,file.filename={d}/local.qcow2"

    def rep(active: str, tail: str, top: str = S_ID) -> str:
        return (
            f"if=none,id={S_ID},driver=replication,mode=secondary,top-id={top},"
            f"file.driver=qcow2,file.file.filename={d}/{active}.qcow2{tail}"
        )

    hidden = f",file.backing.driver=qcow2,file.backing.file.filename={d}/hidden.qcow2"
    # 1. active without backing (and a small active, and a bad top-id)
    _start_check_case(
        tmp_path,
        "no-active-backing",
        ["-drive", local, "-drive", rep("active_small", "", top="nosuch")],
        "Active disk doesn't have backing file",
    )
    # 2. hidden without backing (and a small active, a bad top-id)
    _start_check_case(
        tmp_path,
        "no-hidden-backing",
        ["-drive", local, "-drive", rep("active_small", hidden, top="nosuch")],
        "Hidden disk doesn't have backing file",
    )
    # 3. the secondary disk defined with -blockdev and not exported: no block backend
    _start_check_case(
        tmp_path,
        "no-backend",
        [
            "-blockdev",
            local_node,
            "-drive",
            rep("active_small", hidden + ",file.backing.backing=localnode", top="nosuch"),
        ],
        "The secondary disk doesn't have block backend",
    )
    # 4. lengths differ (active at half the size; and a bad top-id)
    _start_check_case(
        tmp_path,
        "lengths",
        [
            "-drive",
            local,
            "-drive",
            rep("active_small", hidden + ",file.backing.backing=local", top="nosuch"),
        ],
        "Active disk, hidden disk, secondary disk's length are not the same",
    )
    # 5. (make_empty: every blockrep format that can have a backing file is qcow2, which
    #    supports it, so that check cannot be reached with a real graph)
    # 6. top-id names no node
    _start_check_case(
        tmp_path,
        "no-top",
        [
            "-drive",
            local,
            "-drive",
            rep("active", hidden + ",file.backing.backing=local", top="nosuch"),
        ],
        "No top_bs or it is invalid",
    )
    # 7. top-id names a node that exists but does not contain the replication node
    _start_check_case(
        tmp_path,
        "top-elsewhere",
        [
            "-drive",
            local,
            "-drive",
            f"if=none,id=other,driver=qcow2,file.filename={d}/other.qcow2",
            "-drive",
            rep("active", hidden + ",file.backing.backing=local", top="other"),
        ],
        "No top_bs or it is invalid",
    )
    # 8. top-id names a node that contains it but is not a root (the docs' top-id=childs1 mistake)
    _start_check_case(
        tmp_path,
        "top-not-root",
        [
            "-drive",
            local,
            "-drive",
            f"if=none,id=childs1,driver=replication,mode=secondary,top-id=childs1,"
            f"file.driver=qcow2,file.file.filename={d}/active.qcow2{hidden},file.backing.backing=local",
            "-drive",
            "if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0=childs1",
        ],
        "No top_bs or it is invalid",
    )
    # and the images are untouched by all of that (reopened read-only again, not written)
    for n in ("local", "hidden", "active", "active_small", "other"):
        assert allocated_ranges(d / f"{n}.qcow2") == []
        check_clean(d / f"{n}.qcow2")
