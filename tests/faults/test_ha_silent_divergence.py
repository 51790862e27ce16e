"""Issue 11, Why 1: "silent divergence" after a failover and a restart in swapped roles.

P writes under a random load and is killed (SIGKILL, seeded moment) past its last
checkpoint; S fails over (`blockrep failover`: its rollback discards P's unfinished
epoch) and its consumer writes; then the old P restarts as `blockrep secondary` of the
survivor restarted as `blockrep primary`. They pair by the rule failover-discard: the
survivor copies its bitmap (I2 marks + alone writes) ∪ the old P's activity log ∪ its
bitmap. Both disks end byte for byte equal to each other and to the model (the last
checkpoint + S's own writes), and what was copied is a few regions, never the disk.

On the code before the fix the pair came up "connected" and the old P's disk still
held its rolled-back writes: the byte comparison fails.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal

import pytest

from blockrep.testing import MiB
from tests.harness.ha import HA, failover_cli
from tests.harness.models import random_writes
from tests.harness.tools import sha, sha_file

pytestmark = pytest.mark.timeout(240)

RUNS = int(os.environ.get("HA_DIVERGENCE_RUNS", "3"))
SIZE = 32 * MiB
WINDOW = 4 * MiB  # P's load stays in a window: its activity log is a few regions
FAST_S = ["--heartbeat-interval", "0.1"]
FAST_P = ["--heartbeat-interval", "0.1", "--heartbeat-timeout", "1.5", "--checkpoint-interval", "0"]


class _Window:
    """A consumer client whose offsets start at ``base`` (random_writes stays inside)."""

    def __init__(self, client, base: int) -> None:
        self.client, self.base = client, base

    def write(self, off: int, data: bytes):
        return self.client.write(self.base + off, data)


def _first_diff(a: bytes, b: bytes | bytearray) -> str:
    i = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), -1)
    return f"first difference at {i} (region {i // MiB})"


async def _run(seed: int) -> None:
    rnd = random.Random(seed)
    ha = HA()
    try:
        ha.make_disks(SIZE, seed)
        s = ha.secondary(extra=FAST_S)
        p = ha.primary(f"unix:{ha.path('s.ctl')}", extra=FAST_P)
        await s.wait_ready()
        await p.wait_ready()
        pc = await ha.client(p)
        win = _Window(pc, rnd.randrange(0, SIZE - WINDOW, MiB))

        # a few epochs, each ended by a checkpoint (S's consumer is quiet until failover)
        for _ in range(rnd.randint(1, 3)):
            await random_writes(win, rnd, WINDOW, rnd.randint(4, 24))
            await p.qmp_async("replication-checkpoint")
        ckpt = bytes(await pc.read(0, SIZE))

        # P under load, many writes in flight, killed at a random moment past the checkpoint
        p_err: list[BaseException] = []
        stop = asyncio.Event()

        async def p_writer() -> None:
            try:
                while not stop.is_set():
                    await asyncio.wait_for(random_writes(win, rnd, WINDOW, 8), 5)
            except BaseException as e:  # noqa: BLE001 - P dies under us: expected
                p_err.append(e)

        pt = asyncio.create_task(p_writer())
        await asyncio.sleep(rnd.uniform(0.05, 0.4))
        os.kill(p.pid, signal.SIGKILL)
        p.proc.wait(10)
        stop.set()
        await asyncio.wait_for(pt, 15)
        assert sha_file(p.disk) != sha(ckpt), "P wrote nothing past the checkpoint: no test"

        # S fails over (rolls P's unfinished epoch back) and its consumer writes
        await asyncio.to_thread(failover_cli, s)
        await s.wait_status(lambda x: x["peer"] == "failed-over", 15, "failover")
        sc = await ha.client(s)
        model = bytearray(ckpt)
        s_regions: set[int] = set()
        for _ in range(rnd.randint(1, 6)):
            n = rnd.choice((512, 4096, 65536))
            off = rnd.randrange(0, SIZE - n)
            data = rnd.randbytes(n)
            await sc.write(off, data)
            model[off : off + n] = data
            s_regions.update(range(off // MiB, (off + n - 1) // MiB + 1))
        assert sha(bytes(await sc.read(0, SIZE))) == sha(model)
        s.quit()

        # swapped roles: the old P (same disk, state file, activity log) as the secondary
        # of the survivor as primary (its names keep each disk's state file)
        p2 = ha.secondary(name="p", disk=ha.disk("p.raw"), extra=FAST_S)
        s2 = ha.primary(f"unix:{ha.path('p.ctl')}", name="s", disk=ha.disk("s.raw"), extra=FAST_P)
        await p2.wait_ready()
        await s2.wait_ready()
        st = await s2.astatus()
        assert st["peer"] == "connected", st

        # the survivor's consumer goes on; a checkpoint; both disks equal the model
        s2c = await ha.client(s2)
        assert sha(bytes(await s2c.read(0, SIZE))) == sha(model)
        await random_writes(s2c, rnd, SIZE, 4, model=model)
        await s2.qmp_async("replication-checkpoint")
        s2.quit()
        p2.quit()
        old_p, survivor = open(p2.disk, "rb").read(), open(s2.disk, "rb").read()
        assert sha(survivor) == sha(model), _first_diff(survivor, model)
        assert sha(old_p) == sha(model), _first_diff(old_p, model)

        # the rule is named, and what it copied is the marked regions, not the disk
        hs = st["last-handshake"]
        assert hs["rule"] == "failover-discard", hs
        assert hs["direction"] == "local-to-peer", hs
        marked = {win.base // MiB + i for i in range(WINDOW // MiB)} | s_regions
        assert 0 < hs["bytes"] <= len(marked) * MiB < SIZE // 2, (hs, sorted(marked))
        assert "failover-discard" in s2.log_text(), s2.log_text()
    finally:
        await ha.aclose()


@pytest.mark.parametrize("seed", range(1, RUNS + 1))
async def test_old_primary_returns_as_secondary_of_the_survivor(seed):
    await _run(seed)
