"""A consumer of a primary that stops reading its replies (issue 12, Why 3).

On the old main its reads stayed in flight on P's export until their replies were
sent, so the checkpoint's quiesce waited for ever, every other consumer's writes
waited behind it, ``blockrep checkpoint`` hung and status still said connected. Now
the checkpoints go on, the other consumer's writes complete, and the disks end equal
to its model.
"""

from __future__ import annotations

import asyncio
import random

from blockrep.testing import MiB
from tests.harness.stalled import stalled_client
from tests.harness.tools import sha, sha_file

SIZE = 8 * MiB
FAST_S = ["--heartbeat-interval", "0.1"]
FAST_P = ["--heartbeat-interval", "0.1", "--heartbeat-timeout", "3", "--checkpoint-interval", "0"]
STEP = 10.0  # bound on each checkpoint and write: a hang fails the test


async def test_a_consumer_that_stops_reading_holds_neither_checkpoints_nor_others(ha):
    base = ha.make_disks(SIZE, 33)
    s = ha.secondary(extra=FAST_S)
    p = ha.primary(f"unix:{ha.path('s.ctl')}", extra=FAST_P)
    await s.wait_ready()
    await p.wait_ready()
    await p.wait_status(lambda x: x["peer"] == "connected", 30, "paired")
    model = bytearray(base)
    # 400 MiB of reads asked for, none read
    stalled = await asyncio.to_thread(stalled_client, p.export, 400, SIZE)
    try:
        b = await ha.client(p)
        rnd = random.Random(33)
        epoch = (await p.astatus())["epoch"]
        for i in range(8):
            for _ in range(8):
                off = rnd.randrange(0, SIZE - 65536, 4096)
                data = rnd.randbytes(rnd.choice((4096, 65536)))
                await asyncio.wait_for(b.write(off, data), STEP)
                model[off : off + len(data)] = data
            await asyncio.wait_for(p.qmp_async("replication-checkpoint"), STEP)
            st = await p.astatus()
            assert st["epoch"] == epoch + i + 1 and "checkpoint-wait" not in st, st
    finally:
        stalled.close()
    for g in ha.graphs:
        await g.close_all()
    ha.graphs.clear()
    for n in (s, p):
        n.quit()
        assert await n.wait_exit(30) == 0, n.log_text()
    assert sha_file(p.disk) == sha_file(s.disk) == sha(bytes(model))
