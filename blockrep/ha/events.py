"""The event stream of a node (``blockrep events``, like ``drbdsetup events2``).

The node polls its own status every ``INTERVAL`` seconds and diffs the keys that
make a state change (role, disk state, peer, replication, the last handshake, a verify
starting, finding a mismatch or ending): each
change is appended, numbered, to a bounded log. QMP ``query-ha-events {cursor}``
returns the events after ``cursor`` (and the cursor to ask with next); a client that
fell behind more than ``KEEP`` events is told so (``lost``) and gets the current state.
A change shorter than ``INTERVAL`` that is undone before the next poll is not seen.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("blockrep.ha")

INTERVAL = 0.2
KEEP = 1000

# the status keys whose change is an event, and the ones each event carries
WATCHED = (
    "role",
    "disk-state",
    "peer",
    "peer-role",
    "peer-disk-state",
    "replication",
    "last-handshake",
    "verify",
)
CARRIED = (*WATCHED, "stage", "epoch", "out-of-sync-bytes")
# of the primary's ``verify`` object, what makes an event: a pass starting or ending,
# and each new mismatch it finds (not its position, which moves all the time)
VERIFY_EVENT = ("run", "running", "last-result", "mismatched-bytes", "mismatched-regions")


def snapshot(status: dict[str, Any]) -> dict[str, Any]:
    """The part of a status an event shows (``last-handshake`` null before a pairing,
    ``verify`` null on a node that is not primary)."""
    snap = {k: status.get(k) for k in CARRIED}
    if isinstance(v := snap["verify"], dict):
        snap["verify"] = {k: v.get(k) for k in VERIFY_EVENT}
    return snap


def changed(before: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """The watched keys that differ (all of them for the first snapshot)."""
    if before is None:
        return list(WATCHED)
    return [k for k in WATCHED if before.get(k) != now.get(k)]


class EventLog:
    def __init__(self) -> None:
        self.events: deque[dict[str, Any]] = deque(maxlen=KEEP)
        self.seq = 0
        self.last: dict[str, Any] | None = None

    def observe(self, status: dict[str, Any]) -> dict[str, Any] | None:
        """Record an event if a watched key changed since the last observation."""
        snap = snapshot(status)
        keys = changed(self.last, snap)
        if not keys:
            return None
        self.last = snap
        self.seq += 1
        ev = {"seq": self.seq, "time": round(time.time(), 3), "changed": keys, **snap}
        self.events.append(ev)
        return ev

    def since(self, cursor: int) -> dict[str, Any]:
        """QMP ``query-ha-events``: the events after ``cursor``."""
        out = [e for e in self.events if e["seq"] > cursor]
        lost = bool(self.events) and cursor < self.events[0]["seq"] - 1
        return {"events": out, "cursor": self.seq, "lost": lost}


async def watch(log_: EventLog, status: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    while True:
        try:
            log_.observe(await status())
        except Exception as e:  # the event log must never take the node down
            log.debug("events: %s", e)
        await asyncio.sleep(INTERVAL)
