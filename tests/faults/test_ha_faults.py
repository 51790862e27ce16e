"""HA manager under faults (issue 7, acceptance): processes killed, links blackholed, split brain.

* P killed with SIGKILL at a random moment under load (HA_KILL_RUNS runs, default 20, seeded):
  S with --auto-failover and a succeeding fence command ends equal to the model "state at
  the last checkpoint + every S write" (S keeps writing during the failover).
* S killed: P's consumer sees no error, P's disk holds every write, status says degraded.
* The control link blackholed by a proxy (tests/harness/proxies.py) with a failing fence
  command: S reports peer-lost and does not fail over; without a fence command the
  status says that automatic failover is off.
* Both sides write while partitioned, then meet again (P's --reconnect, then a restarted
  P): split brain detected and reported, nothing overwritten on either disk.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest

from blockrep.testing import MiB, free_port
from tests.harness.ha import HA
from tests.harness.models import covers, random_writes, region_writes
from tests.harness.proxies import BlackholeProxy
from tests.harness.tools import sha, sha_file

pytestmark = pytest.mark.timeout(180)

KILL_RUNS = int(os.environ.get("HA_KILL_RUNS", "20"))
SIZE = 4 * MiB
FAST_S = ["--heartbeat-interval", "0.1"]
# a heartbeat timeout that a loaded 2-core machine does not trip by accident
FAST_P = ["--heartbeat-interval", "0.1", "--heartbeat-timeout", "1.5", "--checkpoint-interval", "0"]


async def _checkpoint(p) -> dict:
    return await p.qmp_async("replication-checkpoint")


# -- 1. P killed under load -----------------------------------------------------------------------


async def _kill_run(seed: int) -> dict:
    rnd = random.Random(seed)
    ha = HA()
    try:
        ha.make_disks(SIZE, seed)
        s = ha.secondary(
            extra=[
                "--auto-failover",
                "--fence-command",
                "true",
                "--failover-timeout",
                "0.3",
                *FAST_S,
            ]
        )
        p = ha.primary(f"unix:{ha.path('s.ctl')}", extra=FAST_P)
        await s.wait_ready()
        await p.wait_ready()
        pc = await ha.client(p)
        sc = await ha.client(s)

        # epochs with checkpoints on demand; both consumers quiet around each checkpoint
        checkpoint_state = b""
        for _ in range(rnd.randint(1, 3)):
            await asyncio.gather(
                random_writes(pc, rnd, SIZE, rnd.randint(4, 24)),
                random_writes(sc, rnd, SIZE, rnd.randint(0, 12)),
            )
            await _checkpoint(p)
            checkpoint_state = bytes(await pc.read(0, SIZE))

        # P writes (concurrently, many in flight), S writes one after the other (model exact)
        model = bytearray(checkpoint_state)
        stop_p, stop_s = asyncio.Event(), asyncio.Event()
        p_err: list[BaseException] = []
        s_writes = [0]

        async def p_writer() -> None:
            try:
                while not stop_p.is_set():
                    await asyncio.wait_for(random_writes(pc, rnd, SIZE, 8), 5)
            except BaseException as e:  # noqa: BLE001 - P dies under us: expected
                p_err.append(e)

        async def s_writer() -> None:
            wr = random.Random(seed * 7919)
            while not stop_s.is_set():
                n = wr.choice((512, 1000, 4096, 65536))
                off = wr.randrange(0, SIZE - n)
                data = wr.randbytes(n)
                await asyncio.wait_for(sc.write(off, data), 10)  # must never fail, failover or not
                model[off : off + n] = data
                s_writes[0] += 1
                await asyncio.sleep(0)

        pt = asyncio.create_task(p_writer())
        st = asyncio.create_task(s_writer())
        await asyncio.sleep(rnd.uniform(0.02, 0.5))
        t_kill = time.monotonic()
        os.kill(p.pid, signal.SIGKILL)
        p.proc.wait(10)
        stop_p.set()
        st_done = await s.wait_status(
            lambda x: x["peer"] == "failed-over" and x["stage"] == "done", 15, "failover"
        )
        t_failover = time.monotonic() - t_kill
        await asyncio.sleep(0.1)  # a few S writes after the failover too
        stop_s.set()
        await asyncio.wait_for(st, 15)
        await asyncio.wait_for(pt, 15)
        assert st_done["auto-failover"]["enabled"] is True
        assert "fenced" in st_done["auto-failover"]["reason"], st_done["auto-failover"]
        assert any("peer-lost" in e for e in st_done["errors"]), st_done["errors"]

        got = bytes(await sc.read(0, SIZE))
        assert sha(got) == sha(model), _first_diff(got, model, checkpoint_state)
        s.quit()
        assert sha_file(s.disk) == sha(model)
        return {"failover-s": t_failover, "s-writes": s_writes[0]}
    finally:
        await ha.aclose()


def _first_diff(a: bytes, b: bytes | bytearray, ckpt: bytes) -> str:
    i = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), -1)
    return f"first difference at {i}: got {a[i : i + 8].hex()} model {bytes(b[i : i + 8]).hex()} checkpoint {ckpt[i : i + 8].hex()}"


async def test_primary_sigkill_under_load_secondary_equals_model():
    results = []
    for seed in range(1, KILL_RUNS + 1):
        try:
            results.append(await _kill_run(seed))
        except Exception as e:
            raise AssertionError(f"run with seed {seed}: {e}") from e
    assert len(results) == KILL_RUNS
    assert sum(r["s-writes"] for r in results) > KILL_RUNS  # S wrote during the runs


# -- 2. S killed: P's consumer unaffected -----------------------------------------------------------


async def test_secondary_killed_primary_consumer_unaffected(ha):
    rnd = random.Random(2)
    base = ha.make_disks(SIZE, 2)
    s = ha.secondary(extra=FAST_S)
    p = ha.primary(f"unix:{ha.path('s.ctl')}", extra=FAST_P)
    await s.wait_ready()
    await p.wait_ready()
    pc = await ha.client(p)
    model = bytearray(base)
    # disjoint 4 KiB slots per batch, so concurrent writes keep the model exact
    slots = list(range(SIZE // 4096))

    async def batch() -> None:
        chosen = rnd.sample(slots, 8)
        datas = [rnd.randbytes(4096) for _ in chosen]
        await asyncio.wait_for(
            asyncio.gather(*(pc.write(c * 4096, d) for c, d in zip(chosen, datas, strict=True))), 10
        )
        for c, d in zip(chosen, datas, strict=True):
            model[c * 4096 : (c + 1) * 4096] = d

    for _ in range(10):
        await batch()
    await _checkpoint(p)
    t_end = time.monotonic() + 0.3
    while time.monotonic() < t_end:
        await batch()
    s.kill()  # in the middle of the write stream
    t_end = time.monotonic() + 1.0
    n = 0
    while time.monotonic() < t_end:
        await batch()  # every write must succeed
        n += 1
    assert n > 0
    st = await p.wait_status(lambda x: x["peer"] == "degraded", 10, "degraded")
    assert any("secondary" in e and ("lost" in e or "closed" in e) for e in st["errors"]), st[
        "errors"
    ]
    assert st["alone-since"] and st["alone-since"].startswith("degraded:")
    assert st["written-alone"], st
    for _ in range(5):
        await batch()
    assert sha(bytes(await pc.read(0, SIZE))) == sha(model)
    p.quit()
    assert sha_file(p.disk) == sha(model)


# -- 3. control link blackholed ---------------------------------------------------------------------


@pytest.mark.parametrize("fence", ["false", None])
async def test_blackholed_link_no_failover_without_fence(ha, fence):
    ha.make_disks(SIZE, 3)
    port = free_port()
    proxy = BlackholeProxy(port)
    try:
        fence_args = ["--fence-command", fence] if fence else []
        s = ha.secondary(
            listen=f"127.0.0.1:{port}",
            extra=["--auto-failover", *fence_args, "--failover-timeout", "1.0", *FAST_S],
        )
        p = ha.primary(proxy.addr, extra=FAST_P)
        await s.wait_ready()
        await p.wait_ready()
        pc = await ha.client(p)
        sc = await ha.client(s)
        rnd = random.Random(3)
        await random_writes(pc, rnd, SIZE, 16)
        await _checkpoint(p)
        st = await s.astatus()
        assert st["peer"] == "connected" and st["stage"] == "running"
        if fence:
            assert st["auto-failover"]["enabled"] is True
        else:
            assert st["auto-failover"]["enabled"] is False
            assert "automatic failover is off" in st["auto-failover"]["reason"]

        proxy.blackhole()
        st = await s.wait_status(lambda x: x["peer"] == "peer-lost", 10, "peer-lost")
        if fence:
            st = await s.wait_status(
                lambda x: "fence" in x["auto-failover"]["reason"], 10, "fence failure"
            )
            assert "fail" in st["auto-failover"]["reason"]
            assert any("fence" in e for e in st["errors"]), st["errors"]
        await asyncio.sleep(1.0)  # well past the failover timeout
        st = await s.astatus()
        assert st["stage"] == "running" and st["peer"] == "peer-lost", st
        assert st["alone-since"] is None
        if fence:
            assert "fence command failed" in st["auto-failover"]["reason"]
        else:
            assert st["auto-failover"]["enabled"] is False
            assert "automatic failover is off" in st["auto-failover"]["reason"]
        # S's consumer still works (speculatively); P goes on degraded
        await random_writes(sc, rnd, SIZE, 4)
        ps = await p.wait_status(lambda x: x["peer"] == "degraded", 10, "P degraded")
        assert ps["errors"]
    finally:
        proxy.close()


# -- 4. split brain ---------------------------------------------------------------------------------


async def test_partition_both_write_split_brain_detected_nothing_overwritten(ha):
    rnd = random.Random(4)
    base = ha.make_disks(SIZE, 4)
    port = free_port()
    proxy = BlackholeProxy(port)
    try:
        s = ha.secondary(
            listen=f"127.0.0.1:{port}",
            extra=[
                "--auto-failover",
                "--fence-command",
                "true",
                "--failover-timeout",
                "1.0",
                *FAST_S,
            ],
        )
        p = ha.primary(proxy.addr, extra=[*FAST_P, "--reconnect"])
        await s.wait_ready()
        await p.wait_ready()
        pc = await ha.client(p)
        sc = await ha.client(s)
        p_model = bytearray(base)
        await random_writes(pc, rnd, SIZE, 16, p_model)
        await _checkpoint(p)
        common = (await p.astatus())["epoch-uuid"]
        s_model = bytearray(p_model)
        # writes in the epoch before the partition: P's will be rolled back on S, S's kept
        await random_writes(pc, rnd, SIZE, 8, p_model, sizes=(4096,))
        # S: only in the first MiB, P after the partition: only in the last two
        await region_writes(sc, rnd, 0, MiB, 6, s_model)

        proxy.blackhole()
        await s.wait_status(
            lambda x: x["peer"] == "failed-over" and x["stage"] == "done", 15, "S failover"
        )
        await p.wait_status(lambda x: x["peer"] == "degraded", 15, "P degraded")
        await region_writes(sc, rnd, MiB, MiB, 6, s_model)
        await region_writes(pc, rnd, 2 * MiB, 2 * MiB, 10, p_model)
        assert sha(bytes(await pc.read(0, SIZE))) == sha(p_model)
        assert sha(bytes(await sc.read(0, SIZE))) == sha(s_model)
        p_sha, s_sha = sha_file(p.disk), sha_file(s.disk)
        assert p_sha == sha(p_model) and s_sha == sha(s_model)

        proxy.heal()  # P's --reconnect meets S again
        st = await p.wait_status(lambda x: x["peer"] == "split-brain", 15, "split brain")
        _check_split_brain(st, common)
        await asyncio.sleep(0.5)
        assert sha_file(p.disk) == p_sha and sha_file(s.disk) == s_sha
        assert (await s.astatus())["stage"] == "done"

        # a restarted P (same disk, same state file) against S: refused the same way
        p.kill()
        p2 = ha.primary(
            proxy.addr, name="p2", disk=p.disk, extra=[*FAST_P, "--state-file", p.state]
        )
        await p2.wait_ready()
        st = await p2.astatus()
        assert st["peer"] == "split-brain", st
        _check_split_brain(st, common)
        p2.quit()
        s.quit()
        assert sha_file(p.disk) == p_sha and sha_file(s.disk) == s_sha
    finally:
        proxy.close()


def _check_split_brain(st: dict, common: str) -> None:
    sb = st["split-brain"]
    assert sb["common-epoch"] == common, (sb, common)
    # S wrote in MiB 0 (before its failover, kept by the commit) and MiB 1; P in MiB 2-3
    assert covers(sb["secondary"]["written"], MiB, MiB), sb
    assert covers(sb["secondary"]["written"], 0, MiB), sb
    assert covers(sb["primary"]["written"], 2 * MiB, 2 * MiB), sb
    assert any("split brain" in e for e in st["errors"]), st["errors"]
