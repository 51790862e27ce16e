"""Issue 11, Why 3: a woken old primary.

P stalls (SIGSTOP) past the failover timeout, the operator fails S over and S writes;
P wakes up (SIGCONT). Before the fix P reported ``connected`` and kept checkpointing,
and each checkpoint S answered erased S's failover record: a survivor restarted later
came back as a plain secondary, and a later split-brain report said it wrote nothing.

Now the failed-over S refuses every verb of the old primary (code ``failed-over``)
without touching its state; P stops claiming it replicates (``peer: stale``), serves
its consumer alone and marks its writes. Both sides' writes show in a later split-brain
report, and nothing is overwritten on either disk.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal

import pytest

from blockrep.ha.node_state import NodeState
from blockrep.ha.states import EntryKind
from blockrep.testing import MiB
from tests.harness.models import covers, random_writes, region_writes
from tests.harness.tools import sha, sha_file

pytestmark = pytest.mark.timeout(180)

SIZE = 4 * MiB
FAST_S = ["--heartbeat-interval", "0.1", "--failover-timeout", "1.0"]
# P keeps checkpointing on its own (the woken P's checkpoints are what erased S's record)
P_ARGS = [
    "--heartbeat-interval",
    "0.2",
    "--heartbeat-timeout",
    "1.5",
    "--checkpoint-interval",
    "0.2",
]


def _failover_recorded(path: str) -> bool:
    alone = NodeState.load(path).alone_since
    return alone is not None and alone.kind is EntryKind.FAILOVER


async def test_woken_old_primary_cannot_erase_the_survivors_failover(ha):
    rnd = random.Random(11)
    base = ha.make_disks(SIZE, 11)
    s = ha.secondary(extra=FAST_S)
    p = ha.primary(f"unix:{ha.path('s.ctl')}", extra=P_ARGS)
    await s.wait_ready()
    await p.wait_ready()
    pc = await ha.client(p)
    sc = await ha.client(s)

    p_model = bytearray(base)
    await random_writes(pc, rnd, SIZE, 16, p_model)
    # let a checkpoint cover every write: S's disk at failover is then P's disk now
    seen = (await p.astatus())["checkpoints"]
    await p.wait_status(lambda x: x["checkpoints"] >= seen + 2, 15, "checkpoints")
    s_model = bytearray(p_model)

    os.kill(p.pid, signal.SIGSTOP)  # P stalls past the failover timeout
    try:
        st = await s.wait_status(lambda x: x["peer"] == "peer-lost", 15, "S peer-lost")
        common = st["epoch-uuid"]  # the last checkpoint both hold
        await s.qmp_async("ha-failover")
        st = await s.wait_status(
            lambda x: x["peer"] == "failed-over" and x["stage"] == "done", 15, "S failover"
        )
        failover_entry = st["epoch-uuid"]  # the failover record, after the common epoch
        assert failover_entry != common
        # the survivor writes in two regions: MiB 0 and MiB 1
        await region_writes(sc, rnd, 0, MiB, 6, s_model)
        await region_writes(sc, rnd, MiB, MiB, 6, s_model)
        assert _failover_recorded(s.state)
    finally:
        os.kill(p.pid, signal.SIGCONT)  # P wakes up

    # P learns that S failed over: it stops claiming to replicate
    st_p = await p.wait_status(lambda x: x["peer"] != "connected", 15, "P not connected")
    await asyncio.sleep(2.0)  # ten of P's checkpoint intervals: none may reach S
    st_p = await p.astatus()
    # stale: S refused P's next verb as failed over (the usual case); degraded: a call
    # P had in flight when it stalled timed out first (its timer ran out while stopped)
    assert st_p["peer"] in ("stale", "degraded"), st_p
    assert st_p["alone-since"] is not None, st_p
    if st_p["peer"] == "stale":
        assert any("failed over" in e for e in st_p["errors"]), st_p["errors"]
    with pytest.raises(AssertionError, match="not replicating"):
        await p.qmp_async("replication-checkpoint")

    # the survivor's record is intact: its failover and both regions it wrote
    assert _failover_recorded(s.state)
    st_s = await s.astatus()
    assert st_s["peer"] == "failed-over" and st_s["epoch-uuid"] == failover_entry, st_s
    assert covers(st_s["written-alone"], 0, 2 * MiB), st_s["written-alone"]

    # P keeps serving its consumer alone, in MiB 2-3; S goes on too
    await region_writes(pc, rnd, 2 * MiB, 2 * MiB, 10, p_model)
    await region_writes(sc, rnd, 0, MiB, 2, s_model)
    assert sha(bytes(await pc.read(0, SIZE))) == sha(p_model)
    assert sha(bytes(await sc.read(0, SIZE))) == sha(s_model)
    assert covers((await p.astatus())["written-alone"], 2 * MiB, 2 * MiB)

    # the survivor restarted later is still the failed-over node: its consumer works
    s.quit()
    p.quit()
    p_sha, s_sha = sha_file(p.disk), sha_file(s.disk)
    assert p_sha == sha(p_model) and s_sha == sha(s_model)
    s2 = ha.secondary(name="s2", disk=s.disk, extra=[*FAST_S, "--state-file", s.state])
    await s2.wait_ready()
    st_s = await s2.astatus()
    assert st_s["peer"] == "failed-over" and st_s["alone-since"] is not None, st_s
    sc2 = await ha.client(s2)
    assert sha(bytes(await sc2.read(0, SIZE))) == s_sha

    # a later meeting of the two: split brain, both sides' regions counted, nothing copied
    p2 = ha.primary(
        f"unix:{ha.path('s2.ctl')}",
        name="p2",
        disk=p.disk,
        extra=[*P_ARGS, "--state-file", p.state],
    )
    await p2.wait_ready()
    st = await p2.wait_status(lambda x: x["peer"] == "split-brain", 15, "split brain")
    sb = st["split-brain"]
    assert sb["common-epoch"] == common, (sb, common)
    assert covers(sb["secondary"]["written"], 0, 2 * MiB), sb
    assert covers(sb["primary"]["written"], 2 * MiB, 2 * MiB), sb
    await asyncio.sleep(0.5)
    p2.quit()
    s2.quit()
    assert sha_file(p.disk) == sha(p_model)
    assert sha_file(s.disk) == sha(s_model)
