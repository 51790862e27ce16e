"""The switch and the counters of the request fast path (issue 15).

A write (or read) whose way through the graph needs no waiting — no overlapping
serialising request, no copy before write, no activity-log commit, no lock held on
the replication link — runs as plain calls and callbacks instead of a coroutine per
layer and a task per request (``Node.try_write``, ``Export.try_write``). Anything
else takes the general coroutine path, which stays the reference.

``BLOCKREP_FAST_PATH=0`` in the environment (read at import) or ``set_enabled(False)``
forces the general path everywhere; the counters say which path requests took and
why a request fell back (QMP ``x-blockrep-fast-path``).
"""

from __future__ import annotations

import os
from typing import Any

ENV = "BLOCKREP_FAST_PATH"

_enabled = os.environ.get(ENV, "1") != "0"


def enabled() -> bool:
    return _enabled


def set_enabled(on: bool) -> None:
    global _enabled
    _enabled = on


class Counters:
    """Requests that took the fast path, by kind, and refusals, by reason."""

    def __init__(self) -> None:
        self.taken: dict[str, int] = {}
        self.fallbacks: dict[str, int] = {}

    def take(self, kind: str) -> None:
        self.taken[kind] = self.taken.get(kind, 0) + 1

    def fallback(self, reason: str) -> None:
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1

    def reset(self) -> None:
        self.taken.clear()
        self.fallbacks.clear()


COUNTERS = Counters()


def refuse(reason: str) -> bool:
    """Count a fallback to the general path; False, for ``return refuse(...)``."""
    COUNTERS.fallback(reason)
    return False


def snapshot() -> dict[str, Any]:
    return {
        "enabled": _enabled,
        "taken": dict(COUNTERS.taken),
        "fallbacks": dict(COUNTERS.fallbacks),
    }
