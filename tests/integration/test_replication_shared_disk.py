"""Shared-disk replication mode (SPEC §3, issue 6): the seed's usage section, open-time
validation, a model-based end-to-end run and the shared disk's identity.

Two ``blockrep daemon`` processes (P and S) open one raw file: P read-write as its
consumer's disk ``primary_disk0``, S read-only as the backing file of its hidden disk.
"""

from __future__ import annotations

import asyncio
import random
import shutil

from blockrep.testing import free_port, primary_replication_node, shared_secondary_drives
from tests.harness.images import qcow2
from tests.harness.models import KiB, ReplicationModel, diff_summary, random_extents
from tests.harness.pair import MiB, NBDClient, Pair
from tests.harness.processes import DaemonProc, start_daemon
from tests.harness.qmp import QMPSession
from tests.harness.tools import check_clean, read_file, run_async, sha

# -- 1. the seed's "Shared disk usage" section, line for line ------------------------------------


def _seed_rep_args(port: int) -> dict:
    # verbatim from the seed, with host and port filled in ('port' is a string there)
    return {
        "driver": "replication",
        "node-name": "rep",
        "mode": "primary",
        "shared-disk-id": "primary_disk0",
        "shared-disk": True,
        "file": {
            "driver": "nbd",
            "export": "hidden_disk0",
            "server": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}},
        },
    }


async def _seed_setup(tmp_path, size: int) -> tuple[DaemonProc, DaemonProc, QMPSession, QMPSession]:
    with open(tmp_path / "1.raw", "wb") as f:
        f.write(b"\xaa" * size)
    qcow2(tmp_path / "hidden_disk.img", size)
    qcow2(tmp_path / "active_disk.img", size)
    # Secondary:
    #  -drive if=none,driver=qcow2,file.filename=/mnt/ramfs/hidden_disk.img,id=hidden_disk0,\
    #         backing.driver=raw,backing.file.filename=1.raw \
    #  -drive if=virtio,id=active-disk0,driver=replication,mode=secondary,\
    #         file.driver=qcow2,top-id=active-disk0,\
    #         file.file.filename=/mnt/ramfs/active_disk.img,\
    #         file.backing=hidden_disk0,shared-disk=on
    S = start_daemon(
        tmp_path,
        "S",
        [
            f"if=none,driver=qcow2,file.filename={tmp_path}/hidden_disk.img,id=hidden_disk0,"
            f"backing.driver=raw,backing.file.filename={tmp_path}/1.raw",
            "if=virtio,id=active-disk0,driver=replication,mode=secondary,"
            f"file.driver=qcow2,top-id=active-disk0,file.file.filename={tmp_path}/active_disk.img,"
            "file.backing=hidden_disk0,shared-disk=on",
        ],
    )
    # Primary:
    #  -drive if=virtio,id=primary_disk0,file.filename=1.raw,driver=raw
    P = start_daemon(
        tmp_path, "P", [f"if=virtio,id=primary_disk0,file.filename={tmp_path}/1.raw,driver=raw"]
    )
    S.wait_ready()
    P.wait_ready()
    s = await QMPSession.connect("S", S)
    p = await QMPSession.connect("P", P)
    return P, S, p, s


async def _seed_start(p: QMPSession, s: QMPSession, port: int) -> None:
    # Secondary 1. nbd-server-start, 2. nbd-server-add
    await s.run(
        "nbd-server-start",
        {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}},
    )
    await s.run("nbd-server-add", {"device": "hidden_disk0", "writable": True})
    # Primary: blockdev-add of the replication node
    await p.run("blockdev-add", _seed_rep_args(port))
    # COLO's part (REFERENCE-QEMU.md): secondary first, then primary
    await s.run("xen-set-replication", {"enable": True, "primary": False})
    await p.run("xen-set-replication", {"enable": True, "primary": True})
    assert (await s.rep())["stage"] == "running"
    assert (await p.rep())["stage"] == "running"
    assert await s.status() == {"error": False}
    assert await p.status() == {"error": False}


def test_seed_usage_primary_failure(tmp_path):
    """The seed's section as written; the primary host goes down and S takes over."""
    size = 16 * MiB
    port = free_port()

    async def go():
        P, S, p, s = await _seed_setup(tmp_path, size)
        try:
            await _seed_start(p, s, port)
            # the consumers run: P overwrites, S writes speculatively
            await p.write_ok("primary_disk0", 0x55, 0, 64 * KiB)
            await s.read_ok("active-disk0", 0xAA, 0, 64 * KiB)  # S still sees the checkpoint
            await s.write_ok("active-disk0", 0x66, 1 * MiB, 64 * KiB)
            await s.read_ok("active-disk0", 0x66, 1 * MiB, 64 * KiB)
            await s.run("xen-colo-do-checkpoint")
            await p.run("xen-colo-do-checkpoint")
            await s.read_ok("active-disk0", 0x55, 0, 64 * KiB)  # P's write, now checkpointed
            await s.read_ok("active-disk0", 0xAA, 1 * MiB, 64 * KiB)  # S's speculation dropped
            # a new epoch: P writes again (odd offset and length), S writes
            await p.write_ok("primary_disk0", 0x77, 100, 70000)
            await s.read_ok("active-disk0", 0x55, 0, 64 * KiB)
            await s.write_ok("active-disk0", 0x88, 2 * MiB, 64 * KiB)
            assert await p.status() == {"error": False}
            assert await s.status() == {"error": False}

            # After Failover: Primary
            await p.run("xen-set-replication", {"enable": False, "primary": True})
            await p.run("x-blockdev-del", {"node-name": "rep"})
            assert "rep" not in [n["node-name"] for n in await p.run("query-named-block-nodes")]
            assert await p.run("query-replication") == []
            assert await p.run("query-jobs") == []
            # ... and the primary host goes down
            await p.quit()
            # After Failover: Secondary
            await s.run("nbd-server-stop")
            await s.run(
                "xen-set-replication", {"enable": False, "primary": False, "failover": True}
            )
            r = await s.wait_stage(("done", "failover-failed"))
            assert r["stage"] == "done", r
            assert r["error"] is None, r
            assert await s.status() == {"error": False}
            await s.read_ok("active-disk0", 0x55, 0, 64 * KiB)
            await s.read_ok("active-disk0", 0xAA, 1 * MiB, 64 * KiB)
            await s.read_ok("active-disk0", 0x88, 2 * MiB, 64 * KiB)
            # S's consumer keeps running on the shared disk
            await s.write_ok("active-disk0", 0x99, 3 * MiB, 4 * KiB)
            await s.quit()
        finally:
            for dp in (P, S):
                dp.stop()
        return P, S

    P, S = run_async(go())
    want = bytearray(b"\xaa" * size)
    want[0 : 64 * KiB] = b"\x55" * (64 * KiB)
    want[2 * MiB : 2 * MiB + 64 * KiB] = b"\x88" * (64 * KiB)
    want[3 * MiB : 3 * MiB + 4 * KiB] = b"\x99" * (4 * KiB)
    got = read_file(tmp_path / "1.raw")
    assert got == want, diff_summary(got, bytes(want))
    check_clean(tmp_path / "active_disk.img")
    check_clean(tmp_path / "hidden_disk.img")


def test_seed_usage_secondary_failure(tmp_path):
    """The seed's section; this time S goes away and P goes on alone: P's replication
    records the lost link, is stopped and deleted (x-blockdev-del rep), P's disk is P's."""
    size = 4 * MiB
    port = free_port()

    async def go():
        P, S, p, s = await _seed_setup(tmp_path, size)
        try:
            await _seed_start(p, s, port)
            await p.write_ok("primary_disk0", 0x11, 0, 64 * KiB)
            S.stop(9)  # the secondary host is gone
            await p.write_ok("primary_disk0", 0x22, 1 * MiB, 64 * KiB)  # consumer unaffected
            assert await p.status() == {"error": True, "desc": "I/O error occurred"}
            await p.run("xen-set-replication", {"enable": False, "primary": True})
            await p.run("x-blockdev-del", {"node-name": "rep"})
            assert "rep" not in await p.node_names()
            assert await p.status() == {"error": False}
            await p.write_ok("primary_disk0", 0x33, 2 * MiB, 64 * KiB)
            await p.read_ok("primary_disk0", 0x11, 0, 64 * KiB)
            await p.read_ok("primary_disk0", 0x22, 1 * MiB, 64 * KiB)
            await p.quit()
            await s.close()
        finally:
            for dp in (P, S):
                dp.stop()

    run_async(go())
    got = read_file(tmp_path / "1.raw")
    want = bytearray(b"\xaa" * size)
    for pat, off in ((0x11, 0), (0x22, 1 * MiB), (0x33, 2 * MiB)):
        want[off : off + 64 * KiB] = bytes([pat]) * (64 * KiB)
    assert got == want, diff_summary(got, bytes(want))


def test_seed_flat_socket_address_form(tmp_path):
    """SPEC §3: the flat SocketAddress form ``{type, host, port}`` works too (port an int)."""
    size = 4 * MiB
    port = free_port()

    async def go():
        P, S, p, s = await _seed_setup(tmp_path, size)
        try:
            await s.run(
                "nbd-server-start",
                {"addr": {"type": "inet", "host": "127.0.0.1", "port": str(port)}},
            )
            await s.run("nbd-server-add", {"device": "hidden_disk0", "writable": True})
            await p.run(
                "blockdev-add",
                primary_replication_node(True, {"type": "inet", "host": "127.0.0.1", "port": port}),
            )
            await s.run("xen-set-replication", {"enable": True, "primary": False})
            await p.run("xen-set-replication", {"enable": True, "primary": True})
            await p.write_ok("primary_disk0", 0x31, 4096, 512)
            await s.read_ok("active-disk0", 0xAA, 0, 64 * KiB)
            assert (await s.rep())["hidden-allocated-bytes"] == 64 * KiB
            assert await p.status() == {"error": False}
            await p.quit()
            await s.quit()
        finally:
            for dp in (P, S):
                dp.stop()

    run_async(go())


# -- 2. open-time validation -------------------------------------------------------------------


def test_open_errors_leave_nothing_behind(tmp_path):
    size = 4 * MiB

    async def go():
        pair = Pair(mode="shared", wd=tmp_path, size=size)
        await pair.start_daemons()
        p, s = pair.P, pair.S
        assert p is not None and s is not None
        try:
            await s.run(
                "nbd-server-start", {"addr": {"type": "unix", "data": {"path": pair.s_nbd}}}
            )
            await s.run("nbd-server-add", {"device": "hidden_disk0", "writable": True})
            qcow2(tmp_path / "extra.img", size)
            s_before, p_before = await s.node_names(), await p.node_names()
            server = {"type": "unix", "data": {"path": pair.s_nbd}}

            # shared-disk-id in secondary mode
            desc = await s.error(
                "blockdev-add",
                {
                    "driver": "replication",
                    "node-name": "rep2",
                    "mode": "secondary",
                    "top-id": "rep2",
                    "shared-disk": True,
                    "shared-disk-id": "hidden_disk0",
                    "file": {
                        "driver": "qcow2",
                        "node-name": "extra-q",
                        "file": {
                            "driver": "file",
                            "node-name": "extra-f",
                            "filename": str(tmp_path / "extra.img"),
                        },
                    },
                },
            )
            assert desc == "The secondary side does not support option shared-disk-id"
            assert await s.node_names() == s_before

            # shared-disk=true on P without shared-disk-id
            a = primary_replication_node(True, server)
            del a["shared-disk-id"]
            a["file"]["node-name"] = "rep-nbd"
            assert await p.error("blockdev-add", a) == "Missing the option shared-disk-id"
            assert await p.node_names() == p_before

            # shared-disk-id without shared-disk
            a = primary_replication_node(True, server)
            del a["shared-disk"]
            a["file"]["node-name"] = "rep-nbd"
            assert (
                await p.error("blockdev-add", a) == "The option shared-disk-id needs shared-disk=on"
            )
            assert await p.node_names() == p_before

            # an id that names nothing (the NBD link opens first: it must be closed again)
            a = primary_replication_node(True, server)
            a["shared-disk-id"] = "no_such_disk"
            a["file"]["node-name"] = "rep-nbd"
            desc = await p.error("blockdev-add", a)
            assert desc == "Cannot find device='no_such_disk' nor node-name='no_such_disk'"
            assert await p.node_names() == p_before
            assert await p.run("query-replication") == []

            # nothing in the way of the right command afterwards (same node names)
            a = primary_replication_node(True, server)
            a["file"]["node-name"] = "rep-nbd"
            await p.run("blockdev-add", a)
            assert "rep" in await p.node_names() and "rep-nbd" in await p.node_names()
            await s.run("xen-set-replication", {"enable": True, "primary": False})
            await p.run("xen-set-replication", {"enable": True, "primary": True})
            assert await p.status() == {"error": False}
            await pair.close()
        finally:
            pair.stop_all()

    run_async(go())


def test_command_line_shared_disk_id_on_secondary_refused(tmp_path):
    qcow2(tmp_path / "a.img", 1 * MiB)
    d = start_daemon(
        tmp_path,
        "X",
        [
            "if=virtio,id=active-disk0,driver=replication,mode=secondary,file.driver=qcow2,top-id=active-disk0,"
            f"file.file.filename={tmp_path}/a.img,shared-disk=on,shared-disk-id=active-disk0",
        ],
    )
    try:
        rc = d.proc.wait(20)
    finally:
        d.stop()
    assert rc != 0
    assert "The secondary side does not support option shared-disk-id" in d.output()


# -- 3. model-based end to end ---------------------------------------------------------------------


async def _views(pair: Pair) -> tuple[bytes, bytes]:
    assert pair.p_client is not None and pair.s_client is not None
    pv, sv = await asyncio.gather(
        pair.p_client.read(0, pair.size), pair.s_client.read(0, pair.size)
    )
    return pv, sv


def test_model_end_to_end(tmp_path):
    size = 8 * MiB
    rng = random.Random(0x5EED)
    initial = rng.randbytes(size)
    model = ReplicationModel(initial)

    async def go():
        pair = Pair(mode="shared", wd=tmp_path, size=size, init=initial)
        try:
            await pair.start()
            p, s = pair.P, pair.S
            assert (
                p is not None
                and s is not None
                and pair.p_client is not None
                and pair.s_client is not None
            )
            # a second connection to P's export: P writes in flight on two connections
            pw2 = await NBDClient.connect(pair.p_nbd, "primary_disk0")
            step = 0

            async def check(what: str) -> None:
                pv, sv = await _views(pair)
                assert sha(pv) == sha(model.p), f"{what}: P view {diff_summary(pv, bytes(model.p))}"
                assert sha(sv) == sha(model.s_view), (
                    f"{what}: S view {diff_summary(sv, bytes(model.s_view))}"
                )

            await check("start")
            for epoch in range(4):
                for rnd in range(3):
                    step += 1
                    pext = random_extents(rng, size, 24)
                    sext = random_extents(rng, size, 8)
                    pdata = [rng.randbytes(n) for _, n in pext]
                    sdata = [rng.randbytes(n) for _, n in sext]
                    conns = (pair.p_client, pw2)
                    await asyncio.gather(
                        *(
                            conns[i % 2].write(o, b)
                            for i, ((o, _), b) in enumerate(zip(pext, pdata, strict=True))
                        ),
                        *(pair.s_client.write(o, b) for (o, _), b in zip(sext, sdata, strict=True)),
                    )
                    for (o, _), b in zip(pext, pdata, strict=True):
                        model.p_write(o, b)
                    for (o, _), b in zip(sext, sdata, strict=True):
                        model.s_write(o, b)
                    await check(f"epoch {epoch} round {rnd}")
                    assert await p.status() == {"error": False}
                    assert await s.status() == {"error": False}
                if epoch == 3:
                    break
                # checkpoint: P's writes are drained (all awaited above); S, then P
                await pair.checkpoint()
                model.checkpoint()
                await check(f"checkpoint {epoch}")
                r = await s.rep()
                assert r["hidden-allocated-bytes"] == 0 and r["active-allocated-bytes"] == 0, r
                assert r["epoch"] == epoch + 2, r  # start runs one checkpoint
            # the last epoch ends with P's death: failover on S
            await pw2.close()
            await pair.p_client.close()
            pair.p_client = None
            pair.kill_p()
            await pair.s_client.close()
            pair.s_client = None
            await s.run("nbd-server-stop")
            await s.run(
                "xen-set-replication", {"enable": False, "primary": False, "failover": True}
            )
            # S's consumer keeps writing while the commit runs
            for i, off in enumerate((5, 3 * MiB + 1000, 7 * MiB)):
                pat = 0xC0 + i
                out = await s.io("active-disk0", f"write -P {pat:#x} {off} 3000")
                assert out.startswith("wrote 3000/3000"), out
                model.s_write(off, bytes([pat]) * 3000)
            r = await s.wait_stage(("done", "failover-failed"))
            assert r["stage"] == "done" and r["error"] is None, r
            assert await s.status() == {"error": False}
            sv = await pair.s_view_after_failover()
            assert sha(sv) == sha(model.s_view), (
                f"after failover: {diff_summary(sv, bytes(model.s_view))}"
            )
            await s.quit()
        finally:
            pair.stop_all()
            logs = pair.logs()
        return logs

    run_async(go(), timeout=150)
    got = read_file(tmp_path / "1.raw")
    assert sha(got) == sha(model.s_view), diff_summary(got, bytes(model.s_view))
    check_clean(tmp_path / "active_disk.img")
    check_clean(tmp_path / "hidden_disk.img")


# -- 6. identity of the shared disk ------------------------------------------------------------------


def test_shared_disk_identity(tmp_path):
    size = 4 * MiB
    rng = random.Random(6)
    initial = rng.randbytes(size)

    async def go():
        pair = Pair(mode="shared", wd=tmp_path, size=size, init=initial)
        other = tmp_path / "other"
        other.mkdir()
        S2 = None
        try:
            await pair.start_daemons()
            p, s = pair.P, pair.S
            assert p is not None and s is not None
            # S, before replication starts: the operator checks the pair first
            before = (await s.rep()).get("shared-disk-identity")
            await s.run(
                "nbd-server-start", {"addr": {"type": "unix", "data": {"path": pair.s_nbd}}}
            )
            await s.run("nbd-server-add", {"device": "hidden_disk0", "writable": True})
            await p.run(
                "blockdev-add",
                primary_replication_node(True, {"type": "unix", "data": {"path": pair.s_nbd}}),
            )
            before_p = (await p.rep()).get("shared-disk-identity")
            assert before is not None and before_p is not None, (before, before_p)
            assert (before["device"], before["inode"]) == (before_p["device"], before_p["inode"])
            await s.run("xen-set-replication", {"enable": True, "primary": False})
            await p.run("xen-set-replication", {"enable": True, "primary": True})
            rp, rs = await p.rep(), await s.rep()
            ip, is_ = rp["shared-disk-identity"], rs["shared-disk-identity"]
            assert rp["shared-disk"] is True and rs["shared-disk"] is True
            assert ip["device"] == is_["device"] and ip["inode"] == is_["inode"], (ip, is_)
            assert ip["fingerprint"] == is_["fingerprint"] and ip["size"] == is_["size"] == size

            # S2's hidden disk backs onto a copy of the file: same contents, another disk
            shutil.copyfile(tmp_path / "1.raw", other / "1.raw")
            qcow2(other / "hidden_disk.img", size)
            qcow2(other / "active_disk.img", size)
            S2 = start_daemon(
                other,
                "S",
                shared_secondary_drives(
                    str(other / "1.raw"), f"{other}/active_disk.img", f"{other}/hidden_disk.img"
                ),
            )
            S2.wait_ready()
            s2 = await QMPSession.connect("S2", S2)
            await s2.run(
                "nbd-server-start",
                {"addr": {"type": "unix", "data": {"path": str(other / "S.nbd")}}},
            )
            await s2.run("nbd-server-add", {"device": "hidden_disk0", "writable": True})
            await s2.run("xen-set-replication", {"enable": True, "primary": False})
            i2 = (await s2.rep())["shared-disk-identity"]
            assert (i2["device"], i2["inode"]) != (ip["device"], ip["inode"]), (i2, ip)
            await s2.quit()
            await pair.close()
        finally:
            pair.stop_all()
            if S2 is not None:
                S2.stop()

    run_async(go())
