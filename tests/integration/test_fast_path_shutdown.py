"""SIGTERM under load on the fast path (issue 15): the primary of a replication pair,
with 16 pipelined writers whose writes go through the fast path (callbacks, no task
per request), is told to stop. It must drain what it acknowledged, exit 0, and leave
on its disk every write its consumer saw acknowledged; a write cut off by the stop is
either old or new, never torn.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time

from blockrep.errors import BlockError
from blockrep.nbd import proto as nbdp
from blockrep.nbd.client import ConnectionLost
from blockrep.testing import MiB
from tests.harness.pair import running_pair
from tests.harness.tools import read_file

BLOCK = 4096
WRITERS = 16


async def test_sigterm_under_fast_path_load_drains_and_exits_zero(monkeypatch) -> None:
    monkeypatch.setenv("BLOCKREP_FAST_PATH", "1")  # this test is of the fast path

    async def go() -> None:
        async with running_pair("blockrep", "blockrep", size=16 * MiB) as pair:
            assert pair.P is not None and pair.p_client is not None
            conn = pair.p_client.conn
            before = read_file(pair.prim)
            blocks = pair.size // BLOCK
            acked: dict[int, bytes] = {}
            in_doubt: dict[int, bytes] = {}
            rnd = random.Random(15)

            async def writer(i: int) -> None:
                mine = list(range(i, blocks, WRITERS))  # blocks of this writer only
                while True:
                    blk = rnd.choice(mine)
                    data = rnd.randbytes(BLOCK)
                    try:
                        await conn.request(nbdp.CMD_WRITE, blk * BLOCK, BLOCK, payload=data)
                    except (ConnectionLost, BlockError):
                        in_doubt[blk] = data
                        return
                    acked[blk] = data

            tasks = [asyncio.ensure_future(writer(i)) for i in range(WRITERS)]
            try:
                await asyncio.sleep(1.0)
                assert not any(t.done() for t in tasks), "a writer stopped before SIGTERM"
                snap = await pair.P.run("x-blockrep-fast-path")
                assert snap["taken"].get("write", 0) > 0, snap
                n_before = len(acked)
                proc = pair.P.process.proc
                t0 = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                rc = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30)
                took = time.monotonic() - t0
                pair.P.alive = False
                done, _ = await asyncio.wait(tasks, timeout=30)
                assert len(done) == WRITERS, "writers still running after P exited"
            finally:
                for t in tasks:
                    t.cancel()
            assert rc == 0, f"P exited {rc} after SIGTERM under load:\n{pair.P.output()}"
            assert took < 20, f"P took {took:.1f} s to stop"
            assert n_before > 100, f"only {n_before} writes before SIGTERM: no load"
            disk = read_file(pair.prim)
            for blk in range(blocks):
                got = disk[blk * BLOCK : (blk + 1) * BLOCK]
                old = acked.get(blk, before[blk * BLOCK : (blk + 1) * BLOCK])
                if blk in in_doubt:
                    assert got in (old, in_doubt[blk]), f"block {blk} torn by the stop"
                else:
                    assert got == old, f"block {blk}: an acknowledged write is missing"

    await asyncio.wait_for(go(), 120)
