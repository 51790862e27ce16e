"""blockrep under a real two-node Pacemaker 2.1 + Corosync 3 cluster (issue 14 acceptance).

Each test builds its own lab (blockrep/lab/: two nodes in network
namespaces, a veth between them, STONITH by a power switch that kills a node's
processes) and runs ``ocf:blockrep:blockrep`` as a promotable clone, failover-point
``latest``, with a consumer gate colocated with the Promoted instance. The consumer
writes through the promoted node's export with a byte model of every acknowledged
write; every scenario ends comparing the disks byte for byte with that model.

Not root, or namespaces refused: the lab raises and the test fails (never skips).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from blockrep.ha.bitmap import REGION_SIZE
from blockrep.lab import (
    BlockrepCluster,
    GatedConsumer,
    Lab,
    LabError,
    wait_until,
)

MiB = 1 << 20
SIZE = 64 * MiB
SPAN = 8 * MiB  # the consumer writes here only: what a resync copies is bounded by it
CLONE = BlockrepCluster.CLONE
T = TypeVar("T")

pytestmark = pytest.mark.timeout(150)


@dataclass
class Bed:
    lab: Lab
    cl: BlockrepCluster
    consumer: GatedConsumer
    stop: asyncio.Event
    task: asyncio.Task[None] | None = None

    def start_consumer(self) -> None:
        self.stop.clear()
        self.task = asyncio.create_task(self.consumer.run(self.stop))

    async def stop_consumer(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 90)
            self.task = None

    def other(self, name: str) -> str:
        return next(n for n in self.lab.nodes if n != name)

    def why(self) -> str:
        """Logs for an assertion message."""
        out = [self.lab.logs(40)]
        for n in self.lab.nodes:
            out.append(f"--- {n}/blockrep.log\n" + "\n".join(
                self.lab.read(n, "data/blockrep.log").splitlines()[-40:]))  # fmt: skip
        return "\n".join(out)


async def in_thread(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """A blocking lab call off the event loop (the consumer keeps writing meanwhile)."""
    return await asyncio.to_thread(fn, *args, **kw)


@pytest.fixture
async def bed() -> AsyncIterator[Bed]:
    """Both nodes booted, one promoted, the pair Protected, the gate up, no writes yet."""
    lab = Lab(token_ms=1000)
    cl = BlockrepCluster(lab, SIZE)
    b: Bed | None = None
    try:
        data = cl.setup()
        lab.start("alpha")
        lab.start("beta")
        await in_thread(lab.wait_online, timeout=60)
        b = Bed(lab, cl, GatedConsumer(cl, data, SPAN), asyncio.Event())
        yield b
    except BaseException:
        if b is not None:
            print(b.why())  # pytest shows it with the failure
        raise
    finally:
        if b is not None:
            b.stop.set()
            if b.task is not None:
                b.task.cancel()
            await b.consumer.aclose()
        lab.teardown()


async def promoted_and_protected(b: Bed, timeout: float = 60) -> tuple[str, str]:
    """(promoted, unpromoted) once the cluster says so, blockrep agrees (primary
    Protected, the other secondary) and the gate runs with the Promoted instance."""

    def ready() -> tuple[str, str] | None:
        roles = b.lab.roles(CLONE)
        p = [n for n, r in roles.items() if r == "Promoted"]
        if len(p) != 1 or len(roles) != 2 or b.lab.running_on(BlockrepCluster.GATE) != p:
            return None
        s = b.cl.protected(p[0])
        other = b.other(p[0])
        o = b.cl.status(other)
        if s is None or o is None or o.get("role") != "secondary":
            return None
        return p[0], other

    try:
        return await in_thread(wait_until, ready, timeout, "one Promoted, the pair Protected", 0.3)
    except LabError as e:
        raise AssertionError(f"{e}\n{b.why()}") from None


async def all_stopped_and_compared(b: Bed, nodes: tuple[str, ...]) -> None:
    """Stop the consumer and the clone (orderly), then every named disk == the model."""
    await b.stop_consumer()
    await in_thread(b.cl.stop_all)
    for n in nodes:
        where = b.consumer.mismatch(b.cl.read_disk(n))
        assert where is None, f"{n}'s disk: {where}"


def test_lab_fails_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not root: the lab raises (a failure), it never skips and never half-builds."""
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    lab = Lab()
    try:
        with pytest.raises(LabError, match="needs root"):
            lab.setup()
        assert lab._netns == []
    finally:
        lab.teardown()


async def test_start_promotes_one_node_and_protects_the_pair(bed: Bed) -> None:
    b = bed
    p, u = await promoted_and_protected(b)
    s = b.cl.status(p)
    assert s is not None and s["peer-role"] == "secondary" and s["failover-point"] == "latest", s
    assert b.cl.status(u)["role"] == "secondary"  # type: ignore[index]
    b.start_consumer()
    await b.consumer.wait_writes(p, 300, 60)
    assert b.consumer.errors == []
    assert b.lab.promoted(CLONE) == [p]
    await all_stopped_and_compared(b, (p, u))


async def crash_promoted(b: Bed) -> tuple[str, str]:
    """Power off the promoted node mid-write; returns (crashed, survivor) once the survivor
    is promoted and the consumer's writes through it are acknowledged again."""
    p, u = await promoted_and_protected(b)
    b.start_consumer()
    await b.consumer.wait_writes(p, 300, 60)
    fenced = b.lab.fencings(p)
    await in_thread(b.lab.poweroff, p)
    await b.consumer.wait_writes(u, 50, 90)
    assert b.lab.fencings(p) == fenced + 1, b.lab.fence_log()  # Pacemaker fenced it
    assert b.lab.promoted(CLONE, u) == [u]
    return p, u


async def test_crash_of_the_promoted_node_fails_over_with_every_acknowledged_write(
    bed: Bed,
) -> None:
    b = bed
    p, u = await crash_promoted(b)
    # at most the write in flight at the crash failed; the survivor serves every
    # acknowledged one (failover-point latest), read through its export
    assert len(b.consumer.errors) <= 1 and all(n == p for n, _ in b.consumer.errors)
    await b.stop_consumer()
    where = b.consumer.mismatch(await b.consumer.read_span(u), span_only=True)
    assert where is None, f"{u}'s export after the failover: {where}"
    s = b.cl.status(u)
    assert s is not None and s["role"] == "primary" and s["replication"] != "Protected", s
    b.start_consumer()
    await b.consumer.wait_writes(u, 50, 30)
    await all_stopped_and_compared(b, (u,))


async def test_crashed_node_returns_unpromoted_and_is_reprotected_incrementally(
    bed: Bed,
) -> None:
    b = bed
    p, u = await crash_promoted(b)
    await b.consumer.wait_writes(u, 100, 30)  # the survivor writes alone meanwhile
    # quiet during the return, so the copy is exactly the regions that differ (a consumer
    # rewriting them would have the resync chase it: more bytes, no less correct)
    await b.stop_consumer()
    await in_thread(b.lab.start, p)
    await in_thread(b.lab.wait_online, timeout=60)
    s = await in_thread(wait_until, lambda: b.cl.protected(u), 90, f"{u} Protected again", 0.3)
    hs = s["last-handshake"]
    # only what the survivor wrote alone and the crashed node's activity log: both inside
    # the consumer's span, never the whole disk
    assert 0 < hs["bytes"] <= SPAN, hs
    await in_thread(
        wait_until,
        lambda: b.lab.roles(CLONE) == {u: "Promoted", p: "Unpromoted"},
        30,
        f"{p} unpromoted",
    )
    assert b.cl.status(p)["role"] == "secondary"  # type: ignore[index]
    b.start_consumer()
    await b.consumer.wait_writes(u, 100, 30)
    await in_thread(  # removed (if the survivor placed one) once the pair is Protected again
        wait_until, lambda: b.cl.fence_constraint() is None, 30, "no fence constraint"
    )
    await all_stopped_and_compared(b, (u, p))


async def test_standby_of_the_promoted_node_switches_over_without_copy_or_error(
    bed: Bed,
) -> None:
    b = bed
    p, u = await promoted_and_protected(b)
    b.start_consumer()
    await b.consumer.wait_writes(p, 300, 60)
    await in_thread(b.lab.standby, p)
    await b.consumer.wait_writes(u, 50, 60)
    await b.stop_consumer()
    assert b.consumer.errors == []  # the gate held the consumer through the switch
    await in_thread(wait_until, lambda: b.lab.roles(CLONE) == {u: "Promoted"}, 60, f"{p} stopped")
    where = b.consumer.mismatch(await b.consumer.read_span(u), span_only=True)
    assert where is None, f"{u}'s export after the switchover: {where}"
    # the node comes back: only what the new primary wrote while it was away is copied
    # (the switch itself copied nothing: the demote's final checkpoint left nothing behind)
    written_on_u = {off // REGION_SIZE for off in b.consumer.acked[u]}
    await in_thread(b.lab.standby, p, False)
    s = await in_thread(wait_until, lambda: b.cl.protected(u), 90, f"{u} Protected", 0.3)
    hs = s["last-handshake"]
    assert hs["bytes"] <= len(written_on_u) * REGION_SIZE, (hs, sorted(written_on_u))
    b.start_consumer()
    await b.consumer.wait_writes(u, 50, 30)
    await all_stopped_and_compared(b, (u, p))


async def test_partition_keeps_one_promoted_side_and_reprotects_after_healing(
    bed: Bed,
) -> None:
    b = bed
    p, u = await promoted_and_protected(b)
    b.start_consumer()
    await b.consumer.wait_writes(p, 300, 60)
    await in_thread(b.lab.partition)
    # the promoted side fences the other first (priority-fencing-delay)
    await in_thread(wait_until, lambda: b.lab.fencings(u) == 1, 60, f"{u} fenced")
    await b.consumer.wait_writes(p, 100, 60)  # the promoted side keeps serving
    # resource-level fencing too: the primary's outdate hook forbids promoting the peer
    allowed = await in_thread(wait_until, b.cl.fence_constraint, 30, "the fence-peer constraint")
    assert allowed == p, allowed
    assert b.lab.fencings(p) == 0, b.lab.fence_log()
    assert b.lab.promoted(CLONE, p) == [p]
    assert b.consumer.errors == []
    await b.stop_consumer()  # quiet during the return: the copy is what differs, no chase
    await in_thread(b.lab.heal)
    await in_thread(b.lab.start, u)
    await in_thread(b.lab.wait_online, timeout=60)
    s = await in_thread(wait_until, lambda: b.cl.protected(p), 90, f"{p} Protected again", 0.3)
    assert s["replication"] == "Protected" and "split" not in s["last-handshake"]["rule"], s
    assert 0 < s["last-handshake"]["bytes"] <= SPAN, s["last-handshake"]
    await in_thread(
        wait_until,
        lambda: b.lab.roles(CLONE) == {p: "Promoted", u: "Unpromoted"},
        30,
        f"{u} unpromoted",
    )
    await in_thread(
        wait_until, lambda: b.cl.fence_constraint() is None, 30, "the fence constraint removed"
    )
    assert b.lab.fencings(p) == 0
    b.start_consumer()
    await b.consumer.wait_writes(p, 50, 30)
    assert b.consumer.errors == []
    await all_stopped_and_compared(b, (p, u))
