"""Issue 12, Deliver 6: the primary acts on the error flag the secondary returns with
each heartbeat (SPEC §6 cases 3-4: S's copy-before-write or disk failed) — it degrades
at once instead of reporting `connected` until a checkpoint that may never come."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from blockrep.ha import watchdog
from blockrep.ha.role import PeerStatus


class _Channel:
    def __init__(self, error: bool) -> None:
        self.error = error
        self.calls = 0

    async def call(self, op: str, **kw: object) -> dict:
        self.calls += 1
        return {"stage": "running", "error": self.error}


async def _run(error: bool) -> SimpleNamespace:
    degraded: list[str] = []

    async def degrade(why: str, cause: object = None) -> None:
        degraded.append(why)
        p.replicating = False
        p.peer = PeerStatus.DEGRADED

    cfg = SimpleNamespace(heartbeat_interval=0.01, heartbeat_timeout=1.0, reconnect=False)
    p = SimpleNamespace(
        cfg=cfg, replicating=True, ch=_Channel(error), peer=PeerStatus.CONNECTED,
        degrade=degrade, degraded=degraded,
    )  # fmt: skip
    task = asyncio.ensure_future(watchdog.heartbeat_loop(p))  # type: ignore[arg-type]
    await asyncio.sleep(0.2)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return p


async def test_an_error_flag_in_the_heartbeat_degrades_the_primary() -> None:
    p = await _run(error=True)
    assert p.peer is PeerStatus.DEGRADED and not p.replicating
    assert len(p.degraded) == 1 and "reports a replication error" in p.degraded[0]


async def test_a_clean_heartbeat_changes_nothing() -> None:
    p = await _run(error=False)
    assert p.peer is PeerStatus.CONNECTED and p.replicating and p.degraded == []
    assert p.ch.calls >= 3
