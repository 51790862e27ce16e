"""Real pairs under a concurrent write workload, with the fast path switched on and off
(issue 15): ``BLOCKREP_FAST_PATH`` in the environment of both processes.

* A ``blockrep daemon`` replication pair (the benches' QMP recipe): with checkpoints in
  between, P's disk, S's secondary disk, S's view and the model are equal byte for byte
  at the end, and again after S's failover; ``x-blockrep-fast-path`` says which path
  P's (and S's) writes took.
* An HA pair with ``--failover-point latest``: the primary is SIGKILLed while writes are
  in flight and the secondary fails over; every write the consumer saw acknowledged is
  on the survivor's disk.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from blockrep.polling import DEFAULT_MAX_NS
from blockrep.testing import MiB
from tests.harness.ha import HA, failover_cli
from tests.harness.models import random_extents
from tests.harness.pair import running_pair
from tests.harness.tools import read_file

SWITCH = [pytest.param("1", id="fast-path-on"), pytest.param("0", id="fast-path-off")]
# (fast path, BLOCKREP_POLL_MAX_NS: None for the default) of the pair test
PAIR_RUNS = [
    pytest.param("1", None, id="fast-path-on"),
    pytest.param("0", None, id="fast-path-off"),
    pytest.param("1", "0", id="fast-path-on-no-polling"),
]


def _check_polling(snap: dict[str, Any], max_ns: str | None, who: str) -> None:
    """The loop's polling after I/O (polling.py) as the environment set it: by default
    it watched the arrivals; with 0 it never polled."""
    poll = snap["polling"]
    if max_ns is None:
        assert poll["poll-max-ns"] == DEFAULT_MAX_NS, f"{who}: {poll}"
        # arrivals were seen (whether one found the loop polling depends on timing:
        # test_eventloop_polling holds the rule)
        assert poll["events"] > 0 and poll["events-while-polling"] <= poll["events"], poll
    else:
        assert poll["poll-max-ns"] == int(max_ns) == 0, f"{who}: {poll}"
        assert poll["events"] == poll["events-while-polling"] == 0, f"{who}: {poll}"
        assert poll["polling"] is False, f"{who}: {poll}"


def _check_counters(snap: dict[str, Any], on: bool, who: str) -> None:
    assert snap["enabled"] is on, f"{who}: {snap}"
    taken = snap["taken"].get("write", 0)
    if on:
        assert taken > 0, f"{who}: no write took the fast path: {snap}"
    else:
        assert snap["taken"] == {} and snap["fallbacks"] == {}, f"{who}: {snap}"


@pytest.mark.parametrize(("switch", "poll_max_ns"), PAIR_RUNS)
async def test_replication_pair_images_equal_the_model_on_both_paths(
    switch, poll_max_ns, monkeypatch
):
    monkeypatch.setenv("BLOCKREP_FAST_PATH", switch)
    if poll_max_ns is None:
        monkeypatch.delenv("BLOCKREP_POLL_MAX_NS", raising=False)
    else:
        monkeypatch.setenv("BLOCKREP_POLL_MAX_NS", poll_max_ns)
    on = switch == "1"
    rnd = random.Random(1500 + int(switch))

    async def go() -> None:
        async with running_pair("blockrep", "blockrep", size=16 * MiB) as pair:
            assert pair.P is not None and pair.S is not None
            size = pair.size
            for epoch in range(3):
                for _ in range(4):
                    # a batch in flight together: disjoint bytes, sharing blocks and
                    # clusters; batches overlap one another
                    batch = random_extents(rnd, size, 24, max_len=96 << 10)
                    await asyncio.gather(*(pair.p_write(off, rnd.randbytes(n)) for off, n in batch))
                # the same cluster twice in one epoch: S copies it once, then writes straight
                off = rnd.randrange(0, size // 65536) * 65536
                await pair.p_write(off, rnd.randbytes(4096))
                await pair.p_write(off + 8192, rnd.randbytes(4096))
                await pair.checkpoint()
                await pair.check(f"epoch {epoch}")
            for who, d in (("P", pair.P), ("S", pair.S)):
                snap = await d.run("x-blockrep-fast-path")
                _check_counters(snap, on, who)
                _check_polling(snap, poll_max_ns, who)
            # after the last checkpoint: P's writes, then P dies and S fails over to it
            batch = random_extents(rnd, size, 24, max_len=96 << 10)
            await asyncio.gather(*(pair.p_write(off, rnd.randbytes(n)) for off, n in batch))
            await pair.check("before failover")
            await pair.s_failover()
            assert read_file(pair.sec) == bytes(pair.model.sec), "S's disk after failover"
            assert read_file(pair.prim) == bytes(pair.model.p), "P's disk"

    await asyncio.wait_for(go(), 240)


BLOCK = 4096
SIZE = 8 * MiB
FAST_S = ["--heartbeat-interval", "0.1", "--failover-point", "latest"]
FAST_P = [
    "--heartbeat-interval",
    "0.1",
    "--heartbeat-timeout",
    "1.5",
    "--checkpoint-interval",
    "0.3",
]


@pytest.mark.parametrize("switch", SWITCH)
async def test_ha_latest_failover_keeps_every_acknowledged_write(switch, monkeypatch, ha: HA):
    """Eight writers, each write to a block of its own (never written twice), so that an
    acknowledged write has one right content on the survivor, an unacknowledged one
    (in flight at the kill) either of two, and a block never written its old bytes."""
    monkeypatch.setenv("BLOCKREP_FAST_PATH", switch)
    on = switch == "1"

    async def go() -> None:
        base = ha.make_disks(SIZE, 1501)
        s = ha.secondary(extra=FAST_S)
        p = ha.primary(f"unix:{ha.path('s.ctl')}", extra=FAST_P)
        await s.wait_ready()
        await p.wait_ready()
        await p.wait_status(lambda x: x["peer"] == "connected", 30, "paired")
        pc = await ha.client(p)
        blocks = list(range(SIZE // BLOCK))
        random.Random(1502).shuffle(blocks)
        data = {b: random.Random(b).randbytes(BLOCK) for b in blocks}
        acked: set[int] = set()
        issued: set[int] = set()
        stop = asyncio.Event()

        async def writer(mine: list[int]) -> None:
            for b in mine:
                if stop.is_set():
                    return
                issued.add(b)
                try:
                    await pc.write(b * BLOCK, data[b])
                except Exception:  # noqa: BLE001 - P died: this write was never acknowledged
                    return
                acked.add(b)

        tasks = [asyncio.ensure_future(writer(blocks[i::8])) for i in range(8)]
        while len(acked) < 600:
            assert not all(t.done() for t in tasks), "writers ended early"
            await asyncio.sleep(0.01)
        snap = await p.qmp_async("x-blockrep-fast-path")
        p.kill()  # writes in flight now
        stop.set()
        await asyncio.wait(tasks, timeout=60)
        _check_counters(snap, on, "P")
        await s.wait_status(lambda x: x["peer"] != "connected", 20, "S lost P")
        failover_cli(s)
        await s.wait_status(lambda x: x["peer"] == "failed-over", 30, "failed over")
        for g in ha.graphs:
            await asyncio.wait_for(g.close_all(), 10)
        ha.graphs.clear()
        s.quit()
        assert await s.wait_exit(30) == 0, s.log_text()
        disk = read_file(s.disk)
        lost = [b for b in acked if disk[b * BLOCK : (b + 1) * BLOCK] != data[b]]
        assert not lost, f"{len(lost)} acknowledged writes missing on S, e.g. block {lost[0]}"
        for b in blocks:
            got, old = disk[b * BLOCK : (b + 1) * BLOCK], base[b * BLOCK : (b + 1) * BLOCK]
            if b in acked:
                continue
            if b in issued:
                assert got in (old, data[b]), f"block {b} (in flight at the kill) is torn"
            else:
                assert got == old, f"block {b} was never written"

    await asyncio.wait_for(go(), 240)
