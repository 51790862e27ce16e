"""Watching the peer: P's heartbeat (and reconnect), S's failover timeout and fence command.

P calls S every ``--heartbeat-interval`` s; a missing answer degrades P. S that hears
nothing for ``--failover-timeout`` s reports ``peer-lost`` and, with ``--auto-failover``,
fails over only after ``--fence-command`` exited 0 (no fence command: never by itself).
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import subprocess
import time
from typing import TYPE_CHECKING, Any

from . import channel
from .config import SecondaryConfig
from .role import PeerStatus

if TYPE_CHECKING:
    from .primary import Primary
    from .secondary import Secondary

log = logging.getLogger("blockrep.ha")

FENCE_TIMEOUT = 60.0  # seconds a fence command may take before it counts as failed


def auto_failover_status(cfg: SecondaryConfig, reason: str) -> dict[str, Any]:
    """Status's ``auto-failover`` on the secondary: whether it fails over by itself, and why not."""
    if not cfg.auto_failover:
        return {"enabled": False, "reason": "manual failover (no --auto-failover)"}
    if not cfg.fence_command:
        return {
            "enabled": False,
            "reason": "no --fence-command configured: automatic failover is off",
        }
    return {"enabled": True, "timeout": cfg.failover_timeout, "reason": reason}


async def run_fence(command: str, timeout: float = FENCE_TIMEOUT) -> int:
    """Run the fence command; its exit status, or -1 when it outlived ``timeout``."""
    proc = await asyncio.create_subprocess_exec(
        *shlex.split(command),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        proc.kill()
        return -1


async def heartbeat_loop(p: Primary) -> None:
    """P: call S every heartbeat interval; while degraded, pair again with --reconnect."""
    cfg = p.cfg
    while True:
        await asyncio.sleep(cfg.heartbeat_interval)
        if p.replicating and p.ch is not None:
            try:
                await p.ch.call("heartbeat", timeout=cfg.heartbeat_timeout)
            except channel.ChannelError as e:
                await p.degrade(f"secondary lost: {e}")
        elif p.peer in (PeerStatus.DEGRADED, PeerStatus.CONNECTING) and cfg.reconnect:
            try:
                await p.connect_and_replicate(first=False)
            except Exception as e:
                log.debug("reconnect: %s", e)


async def watch_primary(s: Secondary) -> None:
    """S: after the failover timeout, report peer-lost; fence and fail over if configured."""
    cfg = s.cfg
    fenced_attempted = False
    while True:
        await asyncio.sleep(0.1)
        if not s.started or s.failed_over:
            continue
        silent = time.monotonic() - s.last_heard
        if silent < cfg.failover_timeout:
            fenced_attempted = False
            continue
        if s.peer != PeerStatus.PEER_LOST:
            s.peer = PeerStatus.PEER_LOST
            s.error(f"peer-lost: no word from the primary for {silent:.1f} s")
        if not cfg.auto_failover or fenced_attempted:
            continue
        fenced_attempted = True
        if not cfg.fence_command:
            s.auto_failover_reason = "no --fence-command configured: not failing over automatically"
            continue
        rc = await run_fence(cfg.fence_command)
        if rc != 0:
            s.auto_failover_reason = f"fence command failed (exit {rc}): not failing over"
            s.error(s.auto_failover_reason)
            continue
        s.auto_failover_reason = "fenced the primary; failed over"
        await s.failover()
