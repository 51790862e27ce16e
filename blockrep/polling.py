"""Adaptive polling of the event loop after I/O arrives (issue 15).

A process that sleeps in epoll between requests has to be woken for the next one: its
peer's send pays for the wake-up, and on a VM a wake-up across vCPUs is an interrupt
through the hypervisor. Polling for a while after an event instead — running a
callback that queues itself again, so the loop looks at its sockets without sleeping —
lets the next request find the process awake.

How long it polls follows QEMU's rule for its AioContexts (``poll-max-ns``,
``poll-grow``, ``poll-shrink``): ``next_poll_ns`` below, from the time between one event
and the next. A gap the current window covered changes nothing; a gap longer than the
maximum shrinks the window (to nothing, with shrink 0); a shorter one grows it, from
4 µs, up to the maximum. The loop sleeps again once a window passes with no event, so
a process without traffic does not poll.

``BLOCKREP_POLL_MAX_NS`` (0 turns polling off) sets the maximum, and
``BLOCKREP_POLL_GROW`` and ``BLOCKREP_POLL_SHRINK`` the factors, for the long-running
commands (read when their loop starts); QMP
``x-blockrep-fast-path`` reports them with the current window and how many events
arrived while the loop was polling.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from time import monotonic_ns
from typing import Any

MAX_ENV, GROW_ENV, SHRINK_ENV = "BLOCKREP_POLL_MAX_NS", "BLOCKREP_POLL_GROW", "BLOCKREP_POLL_SHRINK"
DEFAULT_MAX_NS = 300_000
START_NS = 4_000  # the first window after none, as QEMU's


def next_poll_ns(poll_ns: int, gap_ns: int, max_ns: int, grow: int, shrink: int) -> int:
    """The polling window after an event that came ``gap_ns`` after the one before."""
    if gap_ns <= poll_ns:
        return poll_ns  # the window covered it: right as it is
    if gap_ns > max_ns:
        return poll_ns // shrink if shrink else 0  # too long a wait to poll through
    if poll_ns < max_ns and gap_ns < max_ns:
        return min(poll_ns * (grow or 2) if poll_ns else START_NS, max_ns)
    return poll_ns


class Poller:
    """A process's polling state: ``kick`` on every arrival of request or reply bytes
    (the NBD server's and client's protocols call it), from the running loop."""

    def __init__(
        self, max_ns: int, grow: int = 2, shrink: int = 0, clock: Callable[[], int] = monotonic_ns
    ) -> None:
        self.max_ns, self.grow, self.shrink = max_ns, grow, shrink
        self.clock = clock
        self.poll_ns = 0
        self.last = 0  # the clock's time of the last event
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop polling, if any
        self.events = 0
        self.caught = 0  # events that found the loop polling

    def kick(self) -> None:
        if not self.max_ns:
            return
        now = self.clock()
        self.events += 1
        loop = self.loop
        if loop is not None:
            if loop.is_closed():  # a loop that ended while polling (tests run several)
                loop = self.loop = None
            else:
                self.caught += 1
        self.poll_ns = next_poll_ns(
            self.poll_ns, now - self.last, self.max_ns, self.grow, self.shrink
        )
        self.last = now
        if self.poll_ns and loop is None:
            self.loop = asyncio.get_running_loop()
            self.loop.call_soon(self._poll)

    def _poll(self) -> None:
        """Queue itself again until the window since the last event has passed: a loop
        with a callback ready looks at its sockets without sleeping."""
        loop = self.loop
        if loop is None:
            return
        if self.clock() - self.last < self.poll_ns:
            loop.call_soon(self._poll)
        else:
            self.loop = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "poll-max-ns": self.max_ns,
            "poll-grow": self.grow,
            "poll-shrink": self.shrink,
            "poll-ns": self.poll_ns,
            "polling": self.loop is not None,
            "events": self.events,
            "events-while-polling": self.caught,
        }


ENV = {MAX_ENV: "max_ns", GROW_ENV: "grow", SHRINK_ENV: "shrink"}


def configure(environ: Mapping[str, str]) -> None:
    """Set the process's poller from ``BLOCKREP_POLL_*`` (``eventloop.run`` calls it);
    ValueError, naming the variable, for a value that is not a count."""
    for name, attr in ENV.items():
        text = environ.get(name)
        if text is None:
            continue
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0:
            unit = "nanoseconds" if name == MAX_ENV else "times"
            raise ValueError(f"{name} must be a whole number of {unit}, 0 or more, not {text!r}")
        setattr(POLLER, attr, value)


POLLER = Poller(DEFAULT_MAX_NS)
kick = POLLER.kick
