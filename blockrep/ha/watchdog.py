"""Watching the peer: P's heartbeat (and reconnect), S's failover timeout and fence command.

P calls S every ``--heartbeat-interval`` s; a missing answer degrades P. S that hears
nothing for ``--failover-timeout`` s reports ``peer-lost`` and, with ``--auto-failover``,
fails over only after ``--fence-command`` exited 0 (no fence command: never by itself).
A fence that fails is run again while the primary stays silent (after the failover
timeout, doubling up to ``FENCE_RETRY_MAX``); a fence command that cannot be started
(not found, not executable) turns automatic failover off in status, with the reason,
until it can — checked at start and every second. Status shows the attempts and the
last error (status's ``fence``).
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import channel
from .config import SecondaryConfig
from .role import PeerStatus

if TYPE_CHECKING:
    from .primary import Primary
    from .secondary import Secondary

log = logging.getLogger("blockrep.ha")

FENCE_TIMEOUT = 60.0  # seconds a fence command may take before it counts as failed
SETTLE = 0.3  # seconds the loop reads queued input before a silence counts
FENCE_RETRY_MAX = 30.0  # the longest wait between two fence attempts (the backoff's bound)
FENCE_RECHECK = 1.0  # seconds between checks that the fence command can be started


@dataclass
class FenceState:
    """S's fencing of a silent primary: what status's ``auto-failover`` and ``fence`` report."""

    reason: str = ""  # what the watchdog did last, in words
    attempts: int = 0  # fence runs since the primary went silent
    last_error: str | None = None  # why the last run failed
    next_at: float = 0.0  # monotonic time of the next run
    start_error: str | None = None  # why the command cannot be started (None: it can)
    checked_at: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        wait = max(0.0, self.next_at - time.monotonic()) if self.attempts else 0.0
        return {
            "attempts": self.attempts,
            "last-error": self.last_error,
            "next-attempt-in": round(wait, 3),
        }


def auto_failover_status(cfg: SecondaryConfig, fence: FenceState) -> dict[str, Any]:
    """Status's ``auto-failover`` on the secondary: whether it fails over by itself, and why not."""
    if not cfg.auto_failover:
        return {"enabled": False, "reason": "manual failover (no --auto-failover)"}
    if not cfg.fence_command:
        return {
            "enabled": False,
            "reason": "no --fence-command configured: automatic failover is off",
        }
    out: dict[str, Any] = {"enabled": True, "timeout": cfg.failover_timeout, "reason": fence.reason}
    if fence.start_error is not None:
        out["enabled"] = False
        out["reason"] = f"{fence.start_error}: automatic failover is off until it can be started"
    return out


def fence_start_error(command: str) -> str | None:
    """Why ``command`` cannot be started (not found, not executable, unparsable), or None."""
    try:
        argv = shlex.split(command)
    except ValueError as e:
        return f"fence command cannot be started: {e}"
    if not argv:
        return "fence command cannot be started: it is empty"
    if shutil.which(argv[0]) is None:
        return f"fence command cannot be started: {argv[0]!r} is not found or not executable"
    return None


def check_fence_command(s: Secondary) -> None:
    """Whether the fence command can be started now; report each change (at start and after)."""
    f, cfg = s.fence, s.cfg
    f.checked_at = time.monotonic()
    if not (cfg.auto_failover and cfg.fence_command):
        return
    err = fence_start_error(cfg.fence_command)
    if err is not None and err != f.start_error:
        s.error(err)
    elif err is None and f.start_error is not None:
        log.warning("the fence command can be started now: automatic failover is on")
        f.next_at = 0.0  # no need to wait out the backoff of the attempts that could not start
    f.start_error = err


async def run_fence(command: str, timeout: float = FENCE_TIMEOUT) -> tuple[int, str | None]:
    """Run the fence command: (exit status, None) or (-1, why it did not run or finish)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *shlex.split(command),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except (OSError, ValueError) as e:
        return -1, f"fence command cannot be started: {e}"
    try:
        return await asyncio.wait_for(proc.wait(), timeout), None
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, f"fence command failed (timed out after {timeout:.0f} s)"


# a primary in these states pairs again with --reconnect (SYNCING: a pairing that ended
# in an error nobody foresaw; the next attempt starts over)
_RETRY = (PeerStatus.DEGRADED, PeerStatus.CONNECTING, PeerStatus.SPLIT_BRAIN, PeerStatus.SYNCING)


async def heartbeat_loop(p: Primary) -> None:
    """P: call S every heartbeat interval; while degraded, pair again with --reconnect."""
    cfg = p.cfg
    last_split = 0.0
    while True:
        await asyncio.sleep(cfg.heartbeat_interval)
        if p.replicating and p.ch is not None:
            try:
                reply = await p.ch.call("heartbeat", timeout=cfg.heartbeat_timeout)
            except channel.ChannelError as e:
                await p.degrade(f"secondary lost: {e}", e)
                continue
            if reply.get("error"):
                # SPEC §6 cases 3-4: S's copy-before-write or its disk failed; its copy
                # is not the primary's any more: stop claiming protection now, not at
                # the next checkpoint (there may be none: --checkpoint-interval 0)
                await p.degrade(
                    "the secondary reports a replication error (stage "
                    f"{reply.get('stage')}): its disk or buffers failed; not replicating"
                )
        elif p.peer in _RETRY and (cfg.reconnect):
            # split brain: try again every 2 s (a `resolve --discard-local` ends it)
            if p.peer is PeerStatus.SPLIT_BRAIN and time.monotonic() - last_split < 2.0:
                continue
            last_split = time.monotonic()
            try:
                await p.connect_and_replicate(first=False)
            except Exception as e:
                log.debug("reconnect: %s", e)


async def watch_primary(s: Secondary) -> None:
    """S: after the failover timeout, report peer-lost; fence and fail over if configured.

    The watchdog never dies of what it runs: an error is reported and it goes on.
    """
    while True:
        await asyncio.sleep(0.1)
        try:
            await _watch_once(s)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - report, keep watching
            log.exception("watchdog")
            s.error(f"watchdog: {e}")


async def _watch_once(s: Secondary) -> None:
    cfg, f = s.cfg, s.fence
    if time.monotonic() - f.checked_at >= FENCE_RECHECK:
        check_fence_command(s)
    if not s.started or s.failed_over:
        return
    silent = time.monotonic() - s.last_heard
    if silent >= cfg.failover_timeout and s.peer != PeerStatus.PEER_LOST:
        # silence is measured after reading what is queued: a node that was paused
        # (SIGSTOP, a host stall) resumes with the primary's heartbeats in its socket
        await asyncio.sleep(SETTLE)
        silent = time.monotonic() - s.last_heard
    if silent < cfg.failover_timeout:
        f.attempts, f.next_at = 0, 0.0  # the primary answers: a later silence starts afresh
        return
    if s.peer != PeerStatus.PEER_LOST:
        s.peer = PeerStatus.PEER_LOST
        s.error(f"peer-lost: no word from the primary for {silent:.1f} s")
    if not cfg.auto_failover:
        return
    if not cfg.fence_command:
        f.reason = "no --fence-command configured: not failing over automatically"
        return
    if f.attempts and time.monotonic() < f.next_at:
        return
    rc, err = await run_fence(cfg.fence_command)
    f.attempts += 1  # counted once done: status never shows a run without its result
    if rc != 0:
        # a failed fence is tried again while the primary stays silent, backing off to a bound
        err = err or f"fence command failed (exit {rc})"
        if err.startswith("fence command cannot be started"):
            f.start_error = err
        wait = min(max(cfg.failover_timeout, 0.1) * 2 ** (f.attempts - 1), FENCE_RETRY_MAX)
        f.next_at = time.monotonic() + wait
        f.last_error = err
        f.reason = f"{err}: not failing over; attempt {f.attempts}, next in {wait:.1f} s"
        s.error(f.reason)
        return
    f.last_error = f.start_error = None
    f.reason = f"fenced the primary (attempt {f.attempts}); failing over"
    try:
        await s.failover()
    except Exception as e:  # noqa: BLE001 - reported in status; fence and try again later
        f.next_at = time.monotonic() + FENCE_RETRY_MAX
        f.last_error = f"failover after the fence failed: {e}"
        f.reason = f"fenced the primary, but {f.last_error}"
        s.error(f.reason)
        return
    f.reason = "fenced the primary; failed over"
