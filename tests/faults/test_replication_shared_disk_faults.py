"""Shared-disk replication under faults (SPEC §3, §6; issue 6): P killed with SIGKILL
at random points of its write path, and the seven internal failures re-checked for
the shared graph (blkdebug nodes under the shared disk, the hidden and the active
disk, switched at runtime with x-blkdebug-set-rules).
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from tests.harness.models import KiB, ReplicationModel, diff_summary, random_extents
from tests.harness.pair import MiB, Pair
from tests.harness.proxies import CrashProxy
from tests.harness.tools import check_clean, read_file, run_async, sha

# -- 4. crash ordering -------------------------------------------------------------------------

CRASH_RUNS = 50
CRASH_PARALLEL = 2
CRASH_SIZE = 4 * MiB
MODES = ("ack", "hold", "partial", "timer", "slow")


async def _apply(pair: Pair, model: ReplicationModel, rng: random.Random, np: int, ns: int) -> None:
    """One batch: ``np`` P writes and ``ns`` S writes, all in flight together."""
    assert pair.p_client is not None and pair.s_client is not None
    pext = random_extents(rng, pair.size, np, max_len=96 * KiB)
    sext = random_extents(rng, pair.size, ns, max_len=96 * KiB)
    pdata = [rng.randbytes(n) for _, n in pext]
    sdata = [rng.randbytes(n) for _, n in sext]
    await asyncio.gather(
        *(pair.p_client.write(o, b) for (o, _), b in zip(pext, pdata, strict=True)),
        *(pair.s_client.write(o, b) for (o, _), b in zip(sext, sdata, strict=True)),
    )
    for (o, _), b in zip(pext, pdata, strict=True):
        model.p_write(o, b)
    for (o, _), b in zip(sext, sdata, strict=True):
        model.s_write(o, b)


async def _crash_run(base: Path, seed: int) -> dict:
    rng = random.Random(1000 + seed)
    mode = MODES[seed % len(MODES)]
    d = base / f"run{seed:02d}"
    d.mkdir()
    size = CRASH_SIZE
    initial = bytes(512 * KiB) + rng.randbytes(
        size - 512 * KiB
    )  # zeros too: write-zeroes pre-images
    model = ReplicationModel(initial)
    link = str(d / "link.sock")
    pair = Pair(
        mode="shared",
        wd=d,
        size=size,
        init=initial,
        rep_server={"type": "unix", "data": {"path": link}},
    )
    proxy = CrashProxy(link, pair.s_nbd, pair.kill_p)
    info: dict = {"seed": seed, "mode": mode}
    acked: list[tuple[int, int]] = []
    requests: dict[bytes, tuple[int, int]] = {}
    try:
        await proxy.start()
        await pair.start()
        assert pair.p_client is not None and pair.s_client is not None and pair.S is not None
        # epoch 0, then a checkpoint
        await _apply(pair, model, rng, 8, 3)
        await pair.checkpoint()
        model.checkpoint()
        # epoch 1: S writes, then P's write stream, during which P dies
        await _apply(pair, model, rng, 0, 3)
        k = rng.randrange(0, 12)

        def on_request(idx, hdr, msg):
            requests[msg[8:16]] = (hdr[1], hdr[2])
            if mode == "partial" and idx == k:
                return ("partial", rng.randrange(1, len(msg)))
            return None

        def on_reply(idx, msg):
            if idx != k:
                return None
            acked.append(requests.get(msg[8:16], (-1, 0)))
            if mode == "hold":
                return "hold"
            if mode == "ack":
                return ("ack", rng.choice((0.0, 0.0, 0.0002, 0.0005, 0.001, 0.002)))
            return None

        proxy.on_request = on_request
        proxy.on_reply = on_reply
        if mode == "slow":
            proxy.slow_reply = 0.002
        proxy.armed = True

        stream: list[tuple[int, bytes]] = []

        async def p_stream():
            assert pair.p_client is not None
            for _ in range(3):
                ext = random_extents(rng, size, 6, max_len=96 * KiB)
                batch = [(o, rng.randbytes(n)) for o, n in ext]
                stream.extend(batch)
                res = await asyncio.gather(
                    *(pair.p_client.write(o, b) for o, b in batch), return_exceptions=True
                )
                if any(isinstance(r, BaseException) for r in res):
                    return

        async def timer():
            if mode in ("timer", "slow"):
                await asyncio.sleep(rng.uniform(0, 0.04 if mode == "timer" else 0.08))
                proxy.do_kill()

        sext = random_extents(rng, size, 4, max_len=96 * KiB)
        sdata = [rng.randbytes(n) for _, n in sext]
        await asyncio.gather(
            p_stream(),
            timer(),
            *(pair.s_client.write(o, b) for (o, _), b in zip(sext, sdata, strict=True)),
        )
        for (o, _), b in zip(sext, sdata, strict=True):
            model.s_write(o, b)
        info["killed-in-stream"] = proxy.killed
        proxy.do_kill()  # the stream ended before the chosen point: P dies now
        await pair.p_client.close()
        pair.p_client = None
        info["replies"] = proxy.replies
        # where did P stand? (P's writes that reached the shared disk before it died)
        left = read_file(pair.shared)
        info["p-writes-landed"] = sum(left[o : o + len(b)] == b for o, b in stream)
        info["p-writes"] = len(stream)
        if acked and acked[0][0] >= 0:
            ao, an = acked[0]
            over = [(o, b) for o, b in stream if o < ao + an and ao < o + len(b)]
            info["acked-not-written"] = bool(over) and not any(
                left[o : o + len(b)] == b for o, b in over
            )
        # S's view did not move when P died
        sv = await pair.s_client.read(0, size)
        assert sha(sv) == sha(model.s_view), (
            f"S view after P's death: {diff_summary(sv, bytes(model.s_view))}"
        )
        await proxy.close()
        r = await pair.failover()
        assert r["stage"] == "done" and r["error"] is None, r
        await pair.S.quit()
        got = read_file(pair.shared)
        assert sha(got) == sha(model.s_view), (
            f"shared disk after failover: {diff_summary(got, bytes(model.s_view))}"
        )
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, check_clean, d / "active_disk.img")
        await loop.run_in_executor(None, check_clean, d / "hidden_disk.img")
    except BaseException as e:
        info["failure"] = f"{type(e).__name__}: {e}\n{pair.logs()}"
    finally:
        await proxy.close()
        pair.stop_all()
    return info


def test_crash_ordering_p_killed_in_write_path(tmp_path):
    """50 seeded runs: P SIGKILLed (a) right after S acknowledged a pre-image, before or
    while P writes the shared disk (``ack``, spin delays 0-2 ms); (b) after S stored a
    pre-image whose acknowledgement P never receives (``hold``); (c) half-way through
    sending a pre-image (``partial``); (d) at a random time (``timer``), (e) also with
    a slow export (``slow``). After each, S's failover gives last checkpoint + S's writes."""

    async def go():
        sem = asyncio.Semaphore(CRASH_PARALLEL)

        async def one(seed):
            async with sem:
                return await _crash_run(tmp_path, seed)

        return await asyncio.gather(*(one(s) for s in range(CRASH_RUNS)))

    results = run_async(go(), timeout=240)
    failures = [r for r in results if "failure" in r]
    assert not failures, f"{len(failures)} of {len(results)} runs failed:\n" + "\n\n".join(
        f"seed {r['seed']} mode {r['mode']}: {r['failure']}" for r in failures[:3]
    )
    # the runs did hit the interesting points of the write path
    by_mode = {m: [r for r in results if r["mode"] == m] for m in MODES}
    assert sum(r["killed-in-stream"] for r in results) >= CRASH_RUNS * 0.6, results
    window = [r for r in by_mode["ack"] + by_mode["hold"] if r.get("acked-not-written")]
    assert window, [r for r in by_mode["ack"] + by_mode["hold"]]
    assert any(0 < r["p-writes-landed"] < r["p-writes"] for r in results), results
    in_stream = {m: sum(r["killed-in-stream"] for r in rs) for m, rs in by_mode.items()}
    print(
        f"crash runs: {len(results)}, killed in the write stream per mode: {in_stream}, "
        f"pre-image acknowledged but shared disk not written: {len(window)}"
    )


# -- 5. the seven failures of SPEC §6 on the shared graph -------------------------------------------


def p_drive_dbg(shared: Path) -> str:
    return (
        f"if=virtio,id=primary_disk0,driver=raw,file.driver=blkdebug,file.node-name=dbg-p,"
        f"file.image.driver=file,file.image.filename={shared}"
    )


def s_drives_dbg(d: Path, shared: Path, where: str) -> list[str]:
    """The seed's S command line with a blkdebug node at ``where``: hidden, shared or active."""
    if where == "hidden":
        hfile = (
            f"file.driver=blkdebug,file.node-name=dbg-h,file.image.driver=file,"
            f"file.image.filename={d}/hidden_disk.img"
        )
    else:
        hfile = f"file.filename={d}/hidden_disk.img"
    if where == "shared":
        back = (
            f"backing.driver=raw,backing.file.driver=blkdebug,backing.file.node-name=dbg-s,"
            f"backing.file.image.driver=file,backing.file.image.filename={shared}"
        )
    else:
        back = f"backing.driver=raw,backing.file.filename={shared}"
    if where == "active":
        afile = (
            f"file.file.driver=blkdebug,file.file.node-name=dbg-a,file.file.image.driver=file,"
            f"file.file.image.filename={d}/active_disk.img"
        )
    else:
        afile = f"file.file.filename={d}/active_disk.img"
    return [
        f"if=none,driver=qcow2,{hfile},id=hidden_disk0,{back}",
        f"if=virtio,id=active-disk0,driver=replication,mode=secondary,file.driver=qcow2,top-id=active-disk0,"
        f"{afile},file.backing=hidden_disk0,shared-disk=on",
    ]


async def _set_rules(q, node: str, rules: list[dict]) -> None:
    await q.run("x-blkdebug-set-rules", {"node-name": node, "inject-error": rules})


def _fail(event: str) -> list[dict]:
    return [{"event": event, "errno": 5}]


async def _started(tmp_path, size, *, p_dbg=False, s_dbg: str | None = None, seed: int = 7):
    rng = random.Random(seed)
    initial = rng.randbytes(size)
    shared = tmp_path / "1.raw"
    pair = Pair(
        mode="shared",
        wd=tmp_path,
        size=size,
        init=initial,
        p_drives=[p_drive_dbg(shared)] if p_dbg else None,
        s_drives=s_drives_dbg(tmp_path, shared, s_dbg) if s_dbg else None,
    )
    await pair.start()
    return pair, ReplicationModel(initial), rng


async def _assert_s_view(pair: Pair, model: ReplicationModel, what: str) -> None:
    assert pair.s_client is not None
    sv = await pair.s_client.read(0, pair.size)
    assert sha(sv) == sha(model.s_view), f"{what}: {diff_summary(sv, bytes(model.s_view))}"


def _is_eio(out: str) -> bool:
    return "Input/output error" in out or "(EIO)" in out


async def _io_write(q, node, pat, off, n, ok=True) -> str:
    out = await q.io(node, f"write -P {pat:#x} {off} {n}")
    if ok:
        assert out.startswith(f"wrote {n}/{n} bytes"), (q.name, out)
    else:
        assert out.startswith("write failed: ") and _is_eio(out), (q.name, out)
    return out


async def _failover_and_check(pair: Pair, model: ReplicationModel) -> None:
    assert pair.S is not None
    if pair.p_client is not None:
        await pair.p_client.close()
        pair.p_client = None
    pair.kill_p()
    r = await pair.failover()
    assert r["stage"] == "done" and r["error"] is None, r
    await pair.S.quit()
    got = read_file(pair.shared)
    assert sha(got) == sha(model.s_view), diff_summary(got, bytes(model.s_view))
    check_clean(Path(pair.wd) / "active_disk.img")
    check_clean(Path(pair.wd) / "hidden_disk.img")


def test_fault1_shared_disk_error_on_p_reaches_p_consumer(tmp_path):
    size = 4 * MiB

    async def go():
        pair, model, rng = await _started(tmp_path, size, p_dbg=True)
        p = pair.P
        try:
            # a failing write of the shared disk: the consumer sees EIO ...
            await _set_rules(p, "dbg-p", _fail("write_aio"))
            await _io_write(p, "primary_disk0", 0x41, 64 * KiB, 4096, ok=False)
            # ... and so does a failing read, both the consumer's own and the one that
            # fetches the pre-image for S (the write cannot go on without it)
            await _set_rules(p, "dbg-p", _fail("read_aio"))
            out = await p.io("primary_disk0", "read 0 4096")
            assert out.startswith("read failed: ") and _is_eio(out), out
            await _io_write(p, "primary_disk0", 0x42, 1 * MiB, 4096, ok=False)
            # the replication link was not at fault; S's view is untouched
            assert await p.status() == {"error": False}
            assert await pair.S.status() == {"error": False}
            await _assert_s_view(pair, model, "after P's disk errors")
            # the disk heals: P goes on, replication with it
            await _set_rules(p, "dbg-p", [])
            await _io_write(p, "primary_disk0", 0x43, 1 * MiB, 4096)
            model.p_write(1 * MiB, b"\x43" * 4096)
            got = await pair.p_client.read(0, size)
            assert got == bytes(model.p)
            await _assert_s_view(pair, model, "after P's disk healed")
            await _failover_and_check(pair, model)
        finally:
            pair.stop_all()

    run_async(go())


@pytest.mark.parametrize("how", ["export-removed", "secondary-killed"])
def test_fault2_forward_failed_consumer_unaffected(tmp_path, how):
    size = 4 * MiB

    async def go():
        pair, model, rng = await _started(tmp_path, size)
        p, s = pair.P, pair.S
        try:
            data = rng.randbytes(100_000)
            if how == "export-removed":
                await s.run("nbd-server-remove", {"name": "hidden_disk0", "mode": "hard"})
            else:
                await pair.s_client.close()
                pair.s_client = None
                pair.S.process.stop(9)
            await pair.p_client.write(12345, data)  # the consumer does not notice
            model.p_write(12345, data)
            assert await pair.p_client.read(0, size) == bytes(model.p)
            assert await p.status() == {"error": True, "desc": "I/O error occurred"}
            r = await p.rep()
            assert r["stage"] == "running" and r["error"], r
            # the error stays recorded; more writes still succeed
            await _io_write(p, "primary_disk0", 0x21, 2 * MiB, 512)
            assert await p.status() == {"error": True, "desc": "I/O error occurred"}
            await pair.p_client.close()
            pair.p_client = None
            await p.quit()
            if how == "export-removed":
                assert await s.status() == {"error": False}
                await pair.s_client.close()
                pair.s_client = None
                await s.quit()
        finally:
            pair.stop_all()
        return model

    model = run_async(go())
    got = read_file(tmp_path / "1.raw")
    assert got[12345 : 12345 + 100_000] == model.p[12345 : 12345 + 100_000]


def test_fault3_preimage_copy_failed_at_s(tmp_path):
    size = 4 * MiB

    async def go():
        pair, model, rng = await _started(tmp_path, size, s_dbg="hidden")
        p, s = pair.P, pair.S
        try:
            await _set_rules(s, "dbg-h", _fail("write_aio"))
            # S cannot store the pre-image: the write into hidden fails on S ...
            await _io_write(
                p, "primary_disk0", 0x31, 256 * KiB, 8192
            )  # ... P's consumer is unaffected
            model.p_write(256 * KiB, b"\x31" * 8192)
            assert await p.status() == {"error": True, "desc": "I/O error occurred"}
            assert (await p.rep())["error"], await p.rep()
            assert (await pair.p_client.read(0, size)) == bytes(model.p)
            # ... and S, whose copy of that cluster is lost, reports it too (SPEC §6 case 3)
            assert await s.status() == {"error": True, "desc": "I/O error occurred"}
            assert (await s.rep())["error"], await s.rep()
            await _set_rules(s, "dbg-h", [])
            await pair.p_client.close()
            pair.p_client = None
            await p.quit()
            await pair.s_client.close()
            pair.s_client = None
            await s.quit()
        finally:
            pair.stop_all()

    run_async(go())
    check_clean(tmp_path / "hidden_disk.img")


def test_fault4_shared_disk_error_on_s(tmp_path):
    size = 4 * MiB

    async def go():
        pair, model, rng = await _started(tmp_path, size, s_dbg="shared")
        p, s = pair.P, pair.S
        try:
            await _set_rules(s, "dbg-s", _fail("read_aio"))
            # S's consumer reads a range that only the shared disk holds: the error reaches it
            out = await s.io("active-disk0", "read 1048576 4096")
            assert out.startswith("read failed: ") and _is_eio(out), out
            # ranges in the buffers still read; P's replication is unaffected
            await _io_write(s, "active-disk0", 0x51, 0, 65536)
            model.s_write(0, b"\x51" * 65536)
            out = await s.io("active-disk0", "read -P 0x51 0 65536")
            assert out.startswith("read 65536/65536"), out
            await _io_write(p, "primary_disk0", 0x52, 2 * MiB, 4096)
            model.p_write(2 * MiB, b"\x52" * 4096)
            assert await p.status() == {"error": False}
            await _set_rules(s, "dbg-s", [])
            await _assert_s_view(pair, model, "after the shared disk healed on S")
            await _failover_and_check(pair, model)
        finally:
            pair.stop_all()

    run_async(go())


def test_fault5_active_disk_error_reaches_s_consumer(tmp_path):
    size = 4 * MiB

    async def go():
        pair, model, rng = await _started(tmp_path, size, s_dbg="active")
        s = pair.S
        try:
            await _set_rules(s, "dbg-a", _fail("write_aio"))
            await _io_write(s, "active-disk0", 0x61, 3 * MiB, 4096, ok=False)
            # secondary mode passes errors through: no recorded replication error
            r = await s.rep()
            assert r["stage"] == "running", r
            await _set_rules(s, "dbg-a", [])
            await _io_write(s, "active-disk0", 0x62, 3 * MiB, 4096)
            model.s_write(3 * MiB, b"\x62" * 4096)
            await _assert_s_view(pair, model, "after the active disk healed")
            await _failover_and_check(pair, model)
        finally:
            pair.stop_all()

    run_async(go())


@pytest.mark.parametrize("which", ["active", "hidden"])
def test_fault6_emptying_failed_checkpoint_fails(tmp_path, which):
    size = 4 * MiB

    async def go():
        pair, model, rng = await _started(tmp_path, size, s_dbg=which)
        s = pair.S
        node = {"active": "dbg-a", "hidden": "dbg-h"}[which]
        try:
            await _apply(pair, model, rng, 6, 3)
            await _set_rules(s, node, _fail("write_aio"))
            desc = await s.error("xen-colo-do-checkpoint")
            assert desc.startswith(f"Failed to empty the {which} disk"), desc
            await _set_rules(s, node, [])
            # a checkpoint that did not happen: retried, it empties both
            await pair.checkpoint()
            model.checkpoint()
            r = await s.rep()
            assert r["hidden-allocated-bytes"] == 0 and r["active-allocated-bytes"] == 0, r
            await _assert_s_view(pair, model, "after the retried checkpoint")
            await _apply(pair, model, rng, 6, 3)
            await _assert_s_view(pair, model, "a new epoch")
            await _failover_and_check(pair, model)
        finally:
            pair.stop_all()

    run_async(go())


def test_fault7_failover_commit_failed_p_alive_holds_the_lock(tmp_path):
    size = 4 * MiB

    async def go():
        pair, model, rng = await _started(tmp_path, size)
        s = pair.S
        try:
            await _apply(pair, model, rng, 6, 3)
            await pair.s_client.close()
            pair.s_client = None
            # P is alive (not fenced): S's failover cannot take the shared disk
            await s.run("nbd-server-stop")
            await s.run(
                "xen-set-replication", {"enable": False, "primary": False, "failover": True}
            )
            r = await s.wait_stage(("done", "failover-failed"))
            assert r["stage"] == "failover-failed", r
            assert "lock" in r["error"], r
            assert await s.status() == {"error": True, "desc": "I/O error occurred"}
            # no way back out; the shared disk still is P's
            assert (
                await s.error("xen-set-replication", {"enable": True, "primary": False})
                == "Block replication is running or done"
            )
            assert await pair.p_client.read(0, size) == bytes(model.p)
            assert read_file(pair.shared) == bytes(model.p)
            # S's consumer still reads its view: last checkpoint + S's writes
            await s.run(
                "nbd-server-start",
                {"addr": {"type": "unix", "data": {"path": str(tmp_path / "S2.nbd")}}},
            )
            await s.run("nbd-server-add", {"device": "active-disk0", "writable": False})
            from tests.harness.pair import NBDClient

            c = await NBDClient.connect(str(tmp_path / "S2.nbd"), "active-disk0")
            sv = await c.read(0, size)
            await c.close()
            assert sha(sv) == sha(model.s_view), diff_summary(sv, bytes(model.s_view))
            # failover-failed routing must not write P's disk behind its back
            out = await s.io("active-disk0", "write -P 0x7e 3145728 4096")
            assert out.startswith(("write failed: ", "wrote 4096/4096")), out
            assert read_file(pair.shared) == bytes(model.p)
            await pair.close()
        finally:
            pair.stop_all()

    run_async(go())


def test_fault7_failover_commit_write_error(tmp_path):
    size = 4 * MiB

    async def go():
        pair, model, rng = await _started(tmp_path, size, s_dbg="shared")
        s = pair.S
        try:
            await _apply(pair, model, rng, 8, 4)
            await pair.p_client.close()
            pair.p_client = None
            pair.kill_p()
            await _set_rules(s, "dbg-s", _fail("write_aio"))
            r = await pair.failover()
            assert r["stage"] == "failover-failed", r
            assert await s.status() == {"error": True, "desc": "I/O error occurred"}
            # failover-failed routing: S's view is still last checkpoint + S's writes
            out = await s.io("active-disk0", "read 0 4096")
            assert out.startswith("read 4096/4096"), out
            await _set_rules(s, "dbg-s", [])
            view = await pair.s_view_after_failover()
            assert sha(view) == sha(model.s_view), diff_summary(view, bytes(model.s_view))
            await s.quit()
        finally:
            pair.stop_all()

    run_async(go())
