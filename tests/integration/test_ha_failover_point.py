"""failover-point latest (issue 13, Deliver 1-2): no write the primary acknowledged is lost.

On the old main a failover always rolled back to the last checkpoint: every write the
consumer had seen acknowledged since then was gone from the survivor. And a secondary
paused past its failover timeout resumed, fenced the healthy primary and failed over,
losing what the primary had acknowledged meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys

import pytest

from blockrep.errors import BlockError
from blockrep.testing import MiB
from tests.harness.ha import HA, failover_cli
from tests.harness.models import random_writes
from tests.harness.tools import sha, sha_file

SIZE = 4 * MiB
FAST_S = ["--heartbeat-interval", "0.1"]
FAST_P = ["--heartbeat-interval", "0.1", "--heartbeat-timeout", "1.5", "--checkpoint-interval", "0"]
LATEST = ["--failover-point", "latest"]


async def _pair(ha: HA, shared: bool, s_extra=(), p_extra=()):
    mode = ["--shared"] if shared else []
    disk = ha.disk("p.raw") if shared else None
    s = ha.secondary(disk=disk, extra=[*FAST_S, *mode, *LATEST, *s_extra])
    p = ha.primary(f"unix:{ha.path('s.ctl')}", extra=[*FAST_P, *mode, *p_extra])
    await s.wait_ready()
    await p.wait_ready()
    await p.wait_status(lambda x: x["peer"] == "connected", 30, "paired")
    return p, s


async def _close_clients(ha: HA) -> None:
    for g in ha.graphs:
        await g.close_all()
    ha.graphs.clear()


@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared"])
async def test_latest_failover_keeps_every_acknowledged_write(ha, shared):
    base = ha.make_disks(SIZE, 41)
    p, s = await _pair(ha, shared)
    st = await p.astatus()
    assert st["failover-point"] == "latest" and st["acknowledgements"]["state"] == "flowing"
    assert (await s.astatus())["failover-point"] == "latest"
    # S's consumer export is read-only until failover: nothing speculative to lose
    sc = await ha.client(s)
    with pytest.raises(BlockError):
        await sc.write(0, b"\x5a" * 4096)
    pc = await ha.client(p)
    model = bytearray(base)
    await random_writes(pc, random.Random(41), SIZE, 20, model=model)
    await p.qmp_async("replication-checkpoint")
    # acknowledged after the last checkpoint: a checkpoint failover would lose these
    await random_writes(pc, random.Random(42), SIZE, 40, model=model)
    p.kill()
    await s.wait_status(lambda x: x["peer"] != "connected", 20, "S lost P")
    failover_cli(s)
    await s.wait_status(lambda x: x["peer"] == "failed-over", 20, "failed over")
    await sc.write(SIZE - 4096, b"\xa5" * 4096)  # writable now
    model[SIZE - 4096 :] = b"\xa5" * 4096
    await _close_clients(ha)
    s.quit()
    assert await s.wait_exit(30) == 0, s.log_text()
    assert sha_file(s.disk) == sha(bytes(model))


async def test_paused_secondary_loses_no_acknowledged_write(ha):
    """S stopped (SIGSTOP) past every timeout: P holds acknowledgements, outdates S (its
    command reaches S's QMP, answered as S resumes), then goes on alone; S, Outdated,
    refuses its own automatic failover. Every acknowledged write is on P's disk and
    the only node that could serve."""
    base = ha.make_disks(SIZE, 43)
    s_qmp = ha.path("s.qmp")
    outdate = f"{sys.executable} -m blockrep.cli outdate --qmp unix:{s_qmp}"
    p, s = await _pair(
        ha,
        False,
        s_extra=["--auto-failover", "--fence-command", "true", "--failover-timeout", "1"],
        p_extra=["--heartbeat-timeout", "1", "--outdate-peer-command", outdate],
    )
    pc = await ha.client(p)
    model = bytearray(base)
    await random_writes(pc, random.Random(43), SIZE, 16, model=model)
    await p.qmp_async("replication-checkpoint")

    acked: list[int] = []
    stop = asyncio.Event()

    async def writer() -> None:  # every write the consumer saw completed goes in the model
        rnd = random.Random(44)
        while not stop.is_set():
            off = rnd.randrange(0, SIZE // 4096) * 4096
            data = rnd.randbytes(4096)
            await asyncio.wait_for(pc.write(off, data), 60)
            model[off : off + 4096] = data
            acked.append(off)
            await asyncio.sleep(0.01)

    t = asyncio.create_task(writer())
    await asyncio.sleep(0.5)
    os.kill(s.pid, signal.SIGSTOP)
    try:
        st = await p.wait_status(
            lambda x: x["acknowledgements"]["state"] == "frozen", 20, "P froze acknowledgements"
        )
        n_frozen = len(acked)
        await asyncio.sleep(3)  # S stays stopped well past both timeouts
        assert len(acked) <= n_frozen + 1, (await p.astatus())["acknowledgements"]
    finally:
        os.kill(s.pid, signal.SIGCONT)
    st = await p.wait_status(
        lambda x: x["acknowledgements"]["state"] == "flowing", 90, "P goes on alone"
    )
    assert st["acknowledgements"]["peer-outdated"], st
    await asyncio.sleep(2)  # the writer goes on alone; S had every chance to fail over
    stop.set()
    await t
    ss = await s.astatus()
    assert ss["peer"] != "failed-over" and ss["disk-state"] == "Outdated", ss
    assert len(acked) > n_frozen  # writes flowed again once S was outdated
    await _close_clients(ha)
    for n in (p, s):
        n.quit()
        assert await n.wait_exit(30) == 0, n.log_text()
    assert sha_file(p.disk) == sha(bytes(model))


async def test_on_outdate_failure_continue_gives_up_the_promise_and_says_so(ha):
    """No way to outdate the lost secondary (no command, S dead): with ``continue`` the
    primary goes on alone after one attempt, and status says the promise is gone."""
    base = ha.make_disks(SIZE, 45)
    p, s = await _pair(ha, False, p_extra=["--heartbeat-timeout", "1", "--on-outdate-failure",
                                           "continue"])  # fmt: skip
    pc = await ha.client(p)
    model = bytearray(base)
    await random_writes(pc, random.Random(45), SIZE, 8, model=model)
    s.kill()
    st = await p.wait_status(
        lambda x: x["acknowledgements"]["promise-given-up"], 30, "P gave the promise up"
    )
    assert st["acknowledgements"]["state"] == "flowing" and st["peer"] == "degraded", st
    assert any("--on-outdate-failure continue" in e for e in st["errors"]), st["errors"]
    await asyncio.wait_for(random_writes(pc, random.Random(46), SIZE, 8, model=model), 30)
    await _close_clients(ha)
    p.quit()
    assert await p.wait_exit(30) == 0, p.log_text()
    assert sha_file(p.disk) == sha(bytes(model))
