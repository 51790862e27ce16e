"""HA manager: histories compared by content (issue 11, Why 2) and alone writes marked before
they are written (I1 for a node alone).

* A pair runs past the 64 generations the old state file kept; the secondary is killed,
  the primary writes alone, the secondary restarts: the pair resyncs incrementally (the
  old comparison by list position found no common epoch and refused: "the disks differ").
* A crash between the two sides' appends of one epoch (the primary lost it) and then the
  primary went on alone: the same lineage, not a split brain; the disks end identical.
* A degraded primary's write is in the state file's peer bitmap the moment it is
  acknowledged (a SIGKILL right after loses no mark; the old flush ran every 0.5 s).
"""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from blockrep.ha.node_state import NodeState
from blockrep.testing import MiB
from tests.harness.ha import HA, check_status_schema
from tests.harness.tools import sha, sha_file

pytestmark = pytest.mark.timeout(150)

SIZE = 8 * MiB
FAST_S = ["--heartbeat-interval", "0.1"]
FAST_P = ["--heartbeat-interval", "0.1", "--heartbeat-timeout", "1.5", "--checkpoint-interval", "0"]


async def _region_writes(node, rnd: random.Random, start: int, count: int) -> None:
    for _ in range(count):
        off = rnd.randrange(start, start + MiB - 4096)
        await asyncio.wait_for(node.write(off, rnd.randbytes(4096)), 10)


async def _identical(ha: HA, p, s) -> None:
    """Both disks byte for byte, through the consumer exports and on the files."""
    pc, sc = await ha.client(p), await ha.client(s)
    p_data = bytes(await pc.read(0, SIZE))
    assert sha(bytes(await sc.read(0, SIZE))) == sha(p_data)
    assert sha_file(s.disk) == sha(p_data) == sha_file(p.disk)


async def test_history_past_the_old_cap_resyncs_incrementally(ha):
    ha.make_disks(SIZE, 11)
    s = ha.secondary(extra=FAST_S)
    p = ha.primary(
        f"unix:{ha.path('s.ctl')}",
        extra=[*FAST_P, "--reconnect", "--checkpoint-interval", "0.05"],
    )
    await s.wait_ready()
    await p.wait_ready()
    pc = await ha.client(p)
    rnd = random.Random(11)
    await _region_writes(pc, rnd, 0, 8)
    # more checkpoints than the 64 generations state.py kept (and compared from index 0)
    await p.wait_status(lambda x: x["checkpoints"] > 75, 60, "75 checkpoints")
    before = (await s.astatus())["epoch"]
    assert before > 70

    s.kill()
    await p.wait_status(lambda x: x["peer"] == "degraded", 15, "P degraded")
    await _region_writes(pc, rnd, 3 * MiB, 8)  # P alone: MiB 3 only
    st = await p.astatus()
    assert st["written-alone"] and all(
        3 * MiB <= o and o + n <= 4 * MiB for o, n in st["written-alone"]
    ), st

    s2 = ha.secondary(name="s", extra=FAST_S)  # same disk, state file, listen address
    await s2.wait_ready()
    st = await p.wait_status(
        lambda x: x["peer"] == "connected" and x["alone-since"] is None, 30, "paired again"
    )
    check_status_schema(st, "primary")
    assert not any("differ" in e for e in st["errors"]), st["errors"]
    ss = await s2.wait_status(lambda x: x["peer"] == "connected", 10, "S connected")
    assert ss["epoch"] > before  # it kept its long history and went on from it
    p.quit()
    s2.quit()
    assert sha_file(s2.disk) == sha_file(p.disk)


async def test_crash_between_the_two_appends_is_not_split_brain(ha):
    ha.make_disks(SIZE, 12)
    s = ha.secondary(extra=FAST_S)
    p = ha.primary(f"unix:{ha.path('s.ctl')}", extra=[*FAST_P, "--reconnect"])
    await s.wait_ready()
    await p.wait_ready()
    pc = await ha.client(p)
    rnd = random.Random(12)
    for _ in range(3):
        await _region_writes(pc, rnd, 0, 4)
        await p.qmp_async("replication-checkpoint")
    p.quit()
    s.quit()
    # the primary crashed after S appended the last epoch and before it did
    st = NodeState.load(p.state)
    assert st.history == NodeState.load(s.state).history and len(st.history) == 4
    _drop_last_epoch(p.state)

    # P comes back first, alone: it goes on (degraded) and writes
    p2 = ha.primary(
        f"unix:{ha.path('s.ctl')}",
        name="p2",
        disk=p.disk,
        extra=[*FAST_P, "--reconnect", "--connect-timeout", "1", "--state-file", p.state],
    )
    await p2.wait_ready()
    await p2.wait_status(lambda x: x["peer"] == "degraded", 15, "P degraded")
    pc2 = await ha.client(p2)
    await _region_writes(pc2, rnd, 5 * MiB, 6)

    s2 = ha.secondary(
        name="s2",
        disk=s.disk,
        listen=f"unix:{ha.path('s.ctl')}",
        extra=[*FAST_S, "--state-file", s.state],
    )
    await s2.wait_ready()
    st2 = await p2.wait_status(
        lambda x: x["peer"] in ("connected", "split-brain", "refused"), 30, "pairing"
    )
    assert st2["peer"] == "connected", st2
    assert "split-brain" not in st2
    assert not any("split brain" in e for e in (await s2.astatus())["errors"])
    await p2.qmp_async("replication-checkpoint")
    await _identical(ha, p2, s2)


def _drop_last_epoch(path: str) -> None:
    """Remove the newest epoch from a state file, in the format it is in."""
    with open(path) as f:
        doc = json.load(f)
    if "generations" in doc:  # state.py's format (the code before node_state)
        doc["generations"].pop()
        with open(path, "w") as f:
            json.dump(doc, f)
        return
    st = NodeState.load(path)
    with st.update():
        st.history.pop()


async def test_degraded_primary_marks_before_the_write_is_acknowledged(ha):
    ha.make_disks(SIZE, 13)
    s = ha.secondary(extra=FAST_S)
    p = ha.primary(f"unix:{ha.path('s.ctl')}", extra=FAST_P)
    await s.wait_ready()
    await p.wait_ready()
    pc = await ha.client(p)
    s.kill()
    await p.wait_status(lambda x: x["peer"] == "degraded", 15, "P degraded")
    rnd = random.Random(13)
    regions = [2, 4, 6]
    model = bytearray(open(p.disk, "rb").read())
    for r in regions:
        off = r * MiB + rnd.randrange(0, MiB - 4096)
        data = rnd.randbytes(4096)
        await pc.write(off, data)
        model[off : off + 4096] = data
    p.kill()  # SIGKILL right after the last acknowledgement: no flush after the fact
    marks = set(NodeState.load(p.state).peer_bitmap)
    assert set(regions) <= marks, marks
    assert sha_file(p.disk) == sha(bytes(model))
