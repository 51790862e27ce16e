"""Pacing and measuring a background copy: the resync's rate limit with a floor, its
moving rate and its ETA (CONTINUITY.md §4, §8). Pure helpers with an injectable clock.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

SLICE = 0.2  # longest single sleep: a rate change or a resume takes effect this soon
TRICKLE = 16  # a busy consumer slows the resync to rate/TRICKLE at worst, never to 0


def effective_rate(rate: int, min_rate: int, consumer_busy: int = 0) -> int:
    """The bytes/s the copy may use now; 0 means unlimited.

    ``rate`` is the ceiling (0: unlimited, whatever ``min_rate`` says). What the
    consumer is writing now comes off the ceiling, down to the floor ``min_rate``; with
    no floor the copy still trickles at ``rate / TRICKLE`` so that it ends some day.
    """
    if rate <= 0:
        return 0
    floor = max(min_rate, rate // TRICKLE, 1)
    return min(rate, max(floor, rate - max(consumer_busy, 0)))


class TokenBucket:
    """A token bucket without burst, in debt: a request of any size goes through as
    soon as the previous ones are paid for at the current rate, and is paid for after.

    So ``n`` bytes at ``r`` bytes/s take at least ``(n - first request) / r`` seconds
    however the requests are sized; concurrent callers queue on a lock. The rate is
    asked for again at every slice, so a change (or a busier consumer) applies at once.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens = 0.0  # <= 0: the debt still to pay
        self._stamp = clock()
        self._lock = asyncio.Lock()

    def _refill(self, rate: int) -> None:
        now = self._clock()
        self._tokens = min(0.0, self._tokens + (now - self._stamp) * rate)
        self._stamp = now

    async def take(self, nbytes: int, rate: Callable[[], int]) -> None:
        async with self._lock:
            while True:
                r = rate()
                if r <= 0:  # unlimited: forget any debt
                    self._tokens, self._stamp = 0.0, self._clock()
                    return
                self._refill(r)
                if self._tokens >= 0:
                    self._tokens -= nbytes
                    return
                await asyncio.sleep(min(-self._tokens / r, SLICE))


class RateMeter:
    """Bytes/s over the last ``window`` seconds of a growing counter."""

    def __init__(self, window: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, total: int) -> None:
        now = self._clock()
        s = self._samples
        s.append((now, total))
        while len(s) > 2 and s[1][0] <= now - self.window:
            s.popleft()

    def reset(self) -> None:
        self._samples.clear()

    def rate(self) -> int:
        s = self._samples
        if len(s) < 2:
            return 0
        (t0, b0), (t1, b1) = s[0], s[-1]
        dt = t1 - t0
        return int((b1 - b0) / dt) if dt >= 0.2 else 0


def eta(remaining: int, rate: int) -> float | None:
    """Seconds left at ``rate`` bytes/s (None when it cannot be told)."""
    if remaining <= 0:
        return 0.0
    return round(remaining / rate, 1) if rate > 0 else None
