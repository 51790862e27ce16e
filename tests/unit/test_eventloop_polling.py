"""The loop's adaptive polling after I/O (issue 15, blockrep/polling.py): QEMU's rule for
the window, row by row; a Poller on a real loop polls after close events, stops after a
long gap, never starts with a maximum of 0, and does not stay stuck on a closed loop;
the environment sets it, and a daemon reports it over QMP."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

from blockrep.polling import DEFAULT_MAX_NS, START_NS, Poller, next_poll_ns

MAX = 300_000

# (poll_ns, gap_ns, grow, shrink) -> the next window
RULE = [
    # the window covered the gap: right as it is
    ((8_000, 8_000, 2, 0), 8_000),
    ((MAX, 1_000, 2, 0), MAX),
    # a gap longer than the maximum: shrink (shrink 0: to nothing, QEMU's default)
    ((64_000, MAX + 1, 2, 0), 0),
    ((64_000, MAX + 1, 2, 2), 32_000),
    ((0, 10**9, 2, 0), 0),
    # a shorter gap than the maximum: grow, from 4 µs, by the factor, up to the maximum
    ((0, 1_000, 2, 0), START_NS),
    ((4_000, 5_000, 2, 0), 8_000),
    ((4_000, 5_000, 4, 0), 16_000),
    ((4_000, 5_000, 0, 0), 8_000),  # grow 0: QEMU's default factor, 2
    ((256_000, 290_000, 2, 0), MAX),
    # a gap of exactly the maximum neither grows nor shrinks it
    ((64_000, MAX, 2, 0), 64_000),
]


@pytest.mark.parametrize(("args", "want"), RULE, ids=[str(a) for a, _ in RULE])
def test_window_rule(args: tuple[int, int, int, int], want: int) -> None:
    poll_ns, gap_ns, grow, shrink = args
    assert next_poll_ns(poll_ns, gap_ns, MAX, grow, shrink) == want


async def _turns(seconds: float) -> int:
    """How many times the loop ran a callback of ours in ``seconds`` of wall time while
    we slept: a polling loop runs its ready callbacks without sleeping in between."""
    count = 0

    def tick() -> None:
        nonlocal count
        count += 1

    loop = asyncio.get_running_loop()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        loop.call_soon(tick)
        await asyncio.sleep(0.001)
    return count


async def test_poller_polls_after_close_events_and_stops_after_a_long_gap() -> None:
    now = [10**12]
    p = Poller(max_ns=MAX, clock=lambda: now[0])
    for _ in range(12):  # events 50 µs apart: the window grows until it covers the gap
        p.kick()
        now[0] += 50_000
    # 4, 8, 16, 32, 64 µs: the first to cover 50 µs, and there it stays
    assert p.poll_ns == 64_000 and p.loop is asyncio.get_running_loop()
    # the first event opens no window (no gap before it), the second opens one: each
    # later event found the loop polling
    assert p.events == 12 and p.caught == 10
    await asyncio.sleep(0)
    assert p.loop is not None  # within the window (the clock stands still): polling
    now[0] += 10_000_000
    await asyncio.sleep(0)  # the window has passed: the loop sleeps again
    assert p.loop is None
    p.kick()  # 10 ms after the last: too long a gap to poll through
    assert p.poll_ns == 0 and p.loop is None
    assert p.snapshot() == {
        "poll-max-ns": MAX,
        "poll-grow": 2,
        "poll-shrink": 0,
        "poll-ns": 0,
        "polling": False,
        "events": 13,
        "events-while-polling": 10,
    }


async def test_a_polling_loop_stays_awake_for_the_window() -> None:
    p = Poller(max_ns=10**9)
    p.kick()
    p.kick()  # the second event, right after the first: the window opens
    assert p.poll_ns == START_NS and p.loop is not None
    # a window grown to 50 ms (events that far apart), so that the polling is long
    # enough to see: an event inside it keeps it
    p.poll_ns, p.last = 50_000_000, time.monotonic_ns()
    p.kick()
    assert p.poll_ns == 50_000_000
    # while polling, the loop turns far more often than a sleeping one would
    # (asyncio.sleep(0.001) alone gives about one turn a millisecond)
    t0 = time.monotonic()
    polled = 0
    while p.loop is not None and time.monotonic() - t0 < 0.05:
        polled += 1
        await asyncio.sleep(0)
    assert polled > 200, polled


async def test_maximum_zero_never_polls() -> None:
    p = Poller(max_ns=0)
    for _ in range(10):
        p.kick()
    assert p.loop is None and p.poll_ns == 0 and p.events == 0


def test_a_loop_closed_while_polling_does_not_stop_the_next_from_polling() -> None:
    p = Poller(max_ns=10**10)

    async def burst() -> asyncio.AbstractEventLoop | None:
        # a 10 s window: the loop ends while polling
        p.poll_ns, p.last = 10**10, time.monotonic_ns()
        p.kick()
        return p.loop

    first = asyncio.run(burst())
    assert first is not None and first.is_closed() and p.loop is first
    second = asyncio.run(burst())
    assert second is not None and second is not first


PROBE = """
import json
from blockrep import eventloop
from blockrep.polling import POLLER
async def main():
    return POLLER.snapshot()
print(json.dumps(eventloop.run(main())))
"""


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({}, (DEFAULT_MAX_NS, 2, 0)),
        ({"BLOCKREP_POLL_MAX_NS": "0"}, (0, 2, 0)),
        (
            {
                "BLOCKREP_POLL_MAX_NS": "50000",
                "BLOCKREP_POLL_GROW": "4",
                "BLOCKREP_POLL_SHRINK": "2",
            },
            (50_000, 4, 2),
        ),
    ],
)
def test_environment_sets_the_poller(env: dict[str, str], want: tuple[int, int, int]) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKREP_POLL_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert (got["poll-max-ns"], got["poll-grow"], got["poll-shrink"]) == want


def test_environment_refuses_a_bad_value() -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKREP_POLL_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**base, "BLOCKREP_POLL_MAX_NS": "300us"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert out.stderr.strip() == (
        "blockrep: BLOCKREP_POLL_MAX_NS must be a whole number of nanoseconds, 0 or more, "
        "not '300us'"
    )
    assert out.stdout == ""
