"""failover-point latest on the primary: no acknowledgement the secondary lacks while the
secondary may still be promoted (CONTINUITY.md §6, DRBD's fencing resource-and-stonith).

Paired with a secondary whose failover keeps every write the primary acknowledged
(``latest``), the primary arms an acknowledgement gate on its consumer export. The
moment it may have lost the secondary — a forward that failed, a lost channel, a
heartbeat that came back with an error — it closes the gate: writes still reach its own
disk, reads go on, but no write completes to the consumer. The gate opens again when

- ``--outdate-peer-command`` exits 0 (the secondary is Outdated: a cluster manager's
  constraint, a fence of it): the primary goes on alone, marking what it writes;
- the secondary pairs again (re-protected);
- or, with ``--on-outdate-failure continue``, the command failed (or there is none):
  the primary goes on alone and status says the promise was given up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .auth import Security
from .channel import ChannelError, Client
from .config import FailoverPoint, OutdateFailure, PrimaryConfig
from .consumer import ConsumerGroup
from .states import DiskState
from .watchdog import run_fence

if TYPE_CHECKING:
    from .secondary import Secondary

log = logging.getLogger("blockrep.ha.outdate")

RETRY_MIN, RETRY_MAX = 1.0, 30.0  # seconds between outdate attempts (doubling)


class AckFreeze:
    """The primary's acknowledgement gate and the work that opens it again."""

    def __init__(
        self, cfg: PrimaryConfig, security: Security, error: Callable[[str], None]
    ) -> None:
        self.cfg = cfg
        self.security = security
        self.error = error
        self.gate = asyncio.Event()
        self.gate.set()
        self.point = FailoverPoint.CHECKPOINT  # what the paired secondary's failover keeps
        self.why: str | None = None  # frozen: why
        self.since = 0.0
        self.attempts = 0
        self.last_error: str | None = None
        self.peer_outdated = False
        self.given_up = False  # --on-outdate-failure continue took effect
        self.task: asyncio.Task[None] | None = None

    @property
    def armed(self) -> bool:
        return self.point is FailoverPoint.LATEST

    def arm(self, point: FailoverPoint, export: ConsumerGroup | None) -> None:
        """Paired (again): the secondary's failover point decides; a freeze ends."""
        self.point = point
        self.peer_outdated = self.given_up = False
        self.release("re-protected")
        if export is not None:
            export.set_ack_gate(self.gate if self.armed else None)

    def disarm(self, export: ConsumerGroup | None) -> None:
        """The role ends (or hands over cleanly): nothing waits on the gate any more."""
        self.release("the role ended")
        if export is not None:
            export.set_ack_gate(None)

    def freeze(self, why: str) -> None:
        """The secondary may be lost: hold every acknowledgement until it is outdated."""
        if not self.armed or not self.gate.is_set() or self.peer_outdated or self.given_up:
            return
        self.gate.clear()
        self.why, self.since, self.attempts, self.last_error = why, time.monotonic(), 0, None
        self.error(f"acknowledgements frozen (failover-point latest): {why}")
        self.task = asyncio.ensure_future(self._outdate())

    def lost_forward(self) -> None:
        """The replication filter's hook: a write's forward failed."""
        self.freeze("a write could not be forwarded to the secondary")

    def release(self, how: str) -> None:
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        self.task = None
        if not self.gate.is_set():
            log.warning("acknowledgements flow again: %s", how)
            self.gate.set()
        self.why = None

    async def _ask_peer(self) -> bool:
        """The secondary confirms over the control channel that it is Outdated."""
        ch = Client()
        try:
            await ch.connect(self.cfg.secondary, self.security, timeout=2.0)
            await ch.call("outdate", timeout=2.0)
            return True
        except (ChannelError, OSError) as e:
            self.last_error = f"the secondary did not confirm: {e}"
            return False
        finally:
            await ch.close()

    async def _outdate(self) -> None:
        """The command first (a cluster's constraint is authoritative and need not wait
        for a stalled peer), then the peer's own confirmation over the channel."""
        cmd, wait = self.cfg.outdate_peer_command, RETRY_MIN
        while True:
            if cmd:
                rc, err = await run_fence(cmd)
                self.attempts += 1
                if rc == 0:
                    self.peer_outdated = True
                    self.release("the secondary is outdated (--outdate-peer-command)")
                    return
                self.last_error = err or f"--outdate-peer-command failed (exit {rc})"
            if await self._ask_peer():
                self.attempts += 1
                self.peer_outdated = True
                self.release("the secondary confirmed it is outdated")
                return
            if self.cfg.on_outdate_failure is OutdateFailure.CONTINUE:
                self.given_up = True
                self.error(
                    f"the secondary could not be outdated ({self.last_error}); going on "
                    "alone (--on-outdate-failure continue): a failover of it may lose "
                    "writes acknowledged from now on"
                )
                self.release("--on-outdate-failure continue")
                return
            await asyncio.sleep(wait)
            wait = min(wait * 2, RETRY_MAX)

    def status(self) -> dict[str, Any]:
        """Status's ``failover-point`` and ``acknowledgements`` (README)."""
        frozen = not self.gate.is_set()
        return {
            "failover-point": self.point.value,
            "acknowledgements": {
                "state": "frozen" if frozen else "flowing",
                "why": self.why,
                "frozen-seconds": round(time.monotonic() - self.since, 3) if frozen else 0.0,
                "outdate-attempts": self.attempts,
                "last-error": self.last_error,
                "peer-outdated": self.peer_outdated,
                "promise-given-up": self.given_up,
            },
        }


# -- the secondary's side: being outdated ----------------------------------------------------


def outdate_secondary(s: Secondary, why: str) -> dict[str, Any]:
    """This secondary's disk is Outdated (persisted): it refuses promotion and failover
    (I3) until a primary pairs with it again. What ``blockrep outdate`` (QMP
    ``ha-outdate``) and the primary's ``outdate`` verb do: the place an
    ``--outdate-peer-command`` reaches."""
    if s.failed_over:
        raise ChannelError("outdate refused: this node failed over and is the one going on")
    if s.state.disk_state is not DiskState.OUTDATED:
        with s.state.update():
            s.state.disk_state = DiskState.OUTDATED
        s.error(f"outdated ({why}): refusing promotion and failover until paired again")
    return {"disk-state": s.state.disk_state.value}


def register_outdate(s: Secondary) -> None:
    async def ha_outdate(args: dict[str, Any]) -> Any:
        return outdate_secondary(s, "blockrep outdate")

    s.d.qmp.commands.register("ha-outdate", ha_outdate)
