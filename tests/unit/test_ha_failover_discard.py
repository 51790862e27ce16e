"""Issue 11, Why 1 (silent divergence), the parts below the processes:

* the hello's regions (its activity log and bitmap) refused when ill-formed (the rule
  failover-discard itself: test_ha_pairing_decisions.py and the handshake's table);
* the consumer export on a primary: a write's region is durably in the activity log
  before the write reaches the disk (I1), and a write waiting for room in a full log
  does not hold a checkpoint's drain (the ack that makes room comes after the drain).
"""

from __future__ import annotations

import asyncio

import pytest

from blockrep.block.graph import Graph
from blockrep.ha.activity_log import ActivityLog, load
from blockrep.ha.bitmap import REGION_SIZE
from blockrep.ha.consumer import ConsumerExport
from blockrep.ha.pairing import hello_regions

R = REGION_SIZE


@pytest.mark.parametrize(
    "hello", [{"al": "x"}, {"al": [1.5]}, {"written": [[1]]}, {"written": {"a": 1}}]
)
def test_hello_regions_refuses_ill_formed(hello: dict) -> None:
    with pytest.raises(ValueError):
        hello_regions(hello, 16)


async def _export(tmp_path, limit: int):
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(8 * R))
    g = Graph()
    node = await g.add({"driver": "file", "filename": str(disk)})
    al = ActivityLog.open(str(tmp_path / "d.raw.blockrep-al"), limit=limit)
    exp = ConsumerExport(node, lambda off, n: None)
    exp.activity_log = al
    return g, exp, al


async def _request(exp: ConsumerExport, off: int, data: bytes) -> None:
    """As the NBD server runs a request: enter, the write, leave."""
    await exp.enter()
    try:
        await exp.write(off, data, False)
    finally:
        exp.leave()


async def test_region_is_in_the_activity_log_before_the_write(tmp_path) -> None:
    g, exp, al = await _export(tmp_path, limit=8)
    try:
        node = exp.node
        seen: list[frozenset[int]] = []
        write = node.write

        async def spy(offset, data, fua=False):  # noqa: ANN001
            seen.append(load(str(tmp_path / "d.raw.blockrep-al")).newest.regions)
            await write(offset, data, fua=fua)

        node.write = spy  # type: ignore[method-assign]
        await _request(exp, 3 * R + 10, b"x" * 100)
        assert seen == [frozenset({3})]  # durable on disk when the write was issued
        assert exp.active == 0 and exp.idle.is_set()
    finally:
        await al.aclose()
        await g.close_all()


async def test_a_write_waiting_for_room_does_not_hold_the_checkpoint_drain(tmp_path) -> None:
    g, exp, al = await _export(tmp_path, limit=1)
    try:
        await _request(exp, 0, b"a" * 512)  # region 0 active, not covered by a checkpoint
        waiting = asyncio.create_task(_request(exp, 2 * R, b"b" * 512))  # needs room
        await asyncio.sleep(0.05)
        assert not waiting.done() and al.waits == 1
        # the checkpoint: the drain must finish although the write is waiting
        await asyncio.wait_for(exp.quiesce(), 2)
        mark = al.checkpoint_mark()
        al.checkpoint_acked(mark)  # S acknowledged: region 0 may leave
        await asyncio.sleep(0.05)
        assert not waiting.done()  # it waits at the gate like a new request
        exp.resume()
        await asyncio.wait_for(waiting, 2)
        assert al.regions() == frozenset({2})
        assert exp.active == 0 and exp.idle.is_set()
        assert bytes(await exp.node.read(2 * R, 512)) == b"b" * 512
    finally:
        await al.aclose()
        await g.close_all()
