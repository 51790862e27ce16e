"""Process-wide bounds on what strangers can make the process hold: a descriptor budget
for accepted connections, and logging that cannot be turned into a flood.

Descriptors: every accepted connection costs one, and a process at its RLIMIT_NOFILE
fails wherever it next opens something -- a checkpoint's files, a state-file save,
the operator's QMP connection. So a listener admits a connection only while a
reserve of descriptors stays free; QMP (``Share.OPERATOR``) may dig into half of that
reserve, so an operator can connect while data connections are being refused.

Logging: asyncio reports each failed ``accept()`` (EMFILE) with a traceback, once per
retry of the listening socket; ``install_accept_error_filter`` turns those into one
line per interval.
"""

from __future__ import annotations

import enum
import logging
import os
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("blockrep.limits")

RESERVE = 64  # descriptors kept free for the process's own files and QMP
RECOUNT_EVERY = 256  # admissions between two real counts while far from the limit


class Share(enum.Enum):
    """Who a connection is for: data (NBD, the HA channel) or the operator (QMP)."""

    DATA = "data"
    OPERATOR = "operator"


def reserve_for(soft_limit: int) -> int:
    """Descriptors kept free at this soft limit: RESERVE, and never under 1/8 of it."""
    return max(RESERVE, soft_limit // 8)


def nofile_soft_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return int(soft)


def count_open_descriptors() -> int:
    """Descriptors open in this process now (-1 where /proc is not mounted)."""
    try:
        # listdir's own descriptor on the directory is counted too: one extra, harmless
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


class DescriptorBudget:
    """Admission of connections against RLIMIT_NOFILE.

    Counting /proc/self/fd costs a directory read, so far from the limit an estimate
    is used (descriptors counted at the last real count that were not admitted
    connections, plus the connections admitted now); near the limit, and every
    RECOUNT_EVERY admissions, the descriptors are counted for real, so files the
    process opened meanwhile are seen.
    """

    def __init__(
        self,
        soft_limit: Callable[[], int] = nofile_soft_limit,
        count_open: Callable[[], int] = count_open_descriptors,
    ) -> None:
        self._soft_limit = soft_limit
        self._count_open = count_open
        self.admitted = 0  # connections admitted and not yet released
        self.refused = 0  # connections refused over budget, since the start
        self._baseline: int | None = None  # descriptors that are not admitted connections
        self._since_count = 0

    def headroom(self, share: Share) -> int:
        """Descriptors that must stay free after admitting a connection of ``share``."""
        reserve = reserve_for(self._soft_limit())
        return reserve // 2 if share is Share.OPERATOR else reserve

    def open_descriptors(self, exact: bool = False) -> int:
        """Open descriptors, the one of the connection being admitted included."""
        if exact or self._baseline is None or self._since_count >= RECOUNT_EVERY:
            n = self._count_open()
            if n < 0:  # no /proc: only what this budget admitted is known
                return (self._baseline or 0) + self.admitted + 1
            self._baseline = max(0, n - self.admitted - 1)
            self._since_count = 0
            return n
        return self._baseline + self.admitted + 1

    def admit(self, share: Share = Share.DATA) -> bool:
        """Take one connection slot (its descriptor is already open); False: close it."""
        limit = self._soft_limit()
        keep = self.headroom(share)
        n = self.open_descriptors()
        if n + keep > limit - RESERVE:  # near the limit: count for real
            n = self.open_descriptors(exact=True)
        if n + keep > limit:
            self.refused += 1
            return False
        self.admitted += 1
        self._since_count += 1
        return True

    def release(self) -> None:
        self.admitted = max(0, self.admitted - 1)


BUDGET = DescriptorBudget()


def admit_connection(share: Share = Share.DATA) -> bool:
    """Whether the process may keep one more accepted connection (call release_connection
    when it ends)."""
    return BUDGET.admit(share)


def release_connection() -> None:
    BUDGET.release()


@contextmanager
def connection_slot(share: Share = Share.DATA) -> Iterator[bool]:
    """``with connection_slot(share) as ok:`` -- ``ok`` False: close the connection now."""
    ok = BUDGET.admit(share)
    try:
        yield ok
    finally:
        if ok:
            BUDGET.release()


class RateLimitedLog:
    """Logs a message at most once per ``interval``; the next line says how many were
    suppressed meanwhile."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 60.0,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.level = level
        self.clock = clock
        self.suppressed = 0
        self._last: float | None = None

    def __call__(self, msg: str, *args: Any) -> bool:
        """Log (True) or count (False) one occurrence."""
        now = self.clock()
        if self._last is not None and now - self._last < self.interval:
            self.suppressed += 1
            return False
        if self.suppressed:
            msg += " (%d similar messages suppressed)"
            args = (*args, self.suppressed)
        self.logger.log(self.level, msg, *args)
        self._last = now
        self.suppressed = 0
        return True


def _is_accept_error(context: dict[str, Any]) -> bool:
    msg = str(context.get("message", ""))
    return msg.startswith("socket.accept() out of system resource") or (
        isinstance(context.get("exception"), OSError) and "accept" in msg
    )


def install_accept_error_filter(
    loop: Any, interval: float = 60.0, logger: logging.Logger = log
) -> RateLimitedLog:
    """Make ``loop`` report failed accepts (EMFILE and the like) as one line per
    ``interval`` instead of a traceback per retry; everything else goes to the handler
    that was installed before (or asyncio's default)."""
    limited = RateLimitedLog(logger, interval)
    previous = loop.get_exception_handler()

    def handler(lp: Any, context: dict[str, Any]) -> None:
        if _is_accept_error(context):
            limited("accept failed: %s", context.get("exception") or context.get("message"))
        elif previous is not None:
            previous(lp, context)
        else:
            lp.default_exception_handler(context)

    loop.set_exception_handler(handler)
    return limited
